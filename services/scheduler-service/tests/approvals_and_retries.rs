//! Approvals (decide, expiry), retries with backoff, and status sync from
//! heartbeats, with the test clock moved instead of waited for. Every test
//! runs on SQLite, and on PostgreSQL when TRAINMESH_TEST_POSTGRES_URL is set.

mod common;

use std::time::Duration;

use common::{new_job_id, spec, spec_with_attempts, Harness};
use scheduler_service::approvals::Rules;
use tonic::Code;
use trainmesh_common::proto::job::v1::{AttemptState, FailureCause, JobError, JobState};
use trainmesh_common::proto::scheduler::v1::{
    ApprovalState, ApproveJobRequest, ExplainJobRequest, GetQueueRequest, ListApprovalsRequest,
    PendingReason, RejectJobRequest,
};
use trainmesh_common::testing::{all_dbs, test_tokens, TestDb};

const RULES: &str = "rules:\n  - name: big-gpu-jobs\n    when: { gpus_above: 4 }\nttl: 1h\n";

async fn with_rules(db: TestDb) -> Harness {
    Harness::start_with(db, |c| {
        c.approval_rules = Rules::parse(RULES).expect("rules");
    })
    .await
}

async fn approve(h: &Harness, token: &str, job: &str, note: &str) -> Result<(), tonic::Status> {
    h.public(token)
        .approve_job(ApproveJobRequest {
            job_id: job.into(),
            note: note.into(),
        })
        .await
        .map(|_| ())
}

async fn approvals(h: &Harness, token: &str, state: ApprovalState) -> Vec<String> {
    h.public(token)
        .list_approvals(ListApprovalsRequest {
            state: state as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .approvals
        .into_iter()
        .map(|a| a.job_id)
        .collect()
}

#[tokio::test]
async fn approval_is_a_compare_and_set_by_approvers() {
    for db in all_dbs().await {
        let h = with_rules(db).await;
        let t = test_tokens();
        let runner = h.register(8).await;
        let job = new_job_id();
        let r = h.enqueue(&job, "alice", spec(8)).await;
        assert_eq!(r.state, JobState::AwaitingApproval as i32, "{}", h.label);
        let first = h.wait_status(&job, JobState::AwaitingApproval).await;
        assert_eq!(first.reason, "approval required by rule `big-gpu-jobs`");
        assert_eq!(
            approvals(&h, t.approver, ApprovalState::Pending).await,
            vec![job.clone()]
        );
        assert!(approvals(&h, t.bob, ApprovalState::Unspecified)
            .await
            .is_empty());
        let x = h
            .public(t.alice)
            .explain_job(ExplainJobRequest {
                job_id: job.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(x.causes[0].reason, PendingReason::AwaitingApproval as i32);
        assert!(
            x.causes[0].unblock.contains("role approver"),
            "{}",
            x.causes[0].unblock
        );

        let err = approve(&h, t.alice, &job, "").await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        approve(&h, t.approver, &job, "looks fine").await.unwrap();
        let queued = h.wait_status(&job, JobState::Queued).await;
        assert_eq!(
            queued.reason, "approved by carol: looks fine",
            "{}",
            h.label
        );
        let err = h
            .public(t.admin)
            .reject_job(RejectJobRequest {
                job_id: job.clone(),
                note: "too late".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("APPROVED"), "{}", err.message());
        let got = h.acquire_n(&runner, 1).await;
        assert_eq!(got[0].job_id, job);

        let other = new_job_id();
        h.enqueue(&other, "bob", spec(8)).await;
        h.public(t.approver)
            .reject_job(RejectJobRequest {
                job_id: other.clone(),
                note: "no".into(),
            })
            .await
            .unwrap();
        let cancelled = h.wait_status(&other, JobState::Cancelled).await;
        assert_eq!(cancelled.reason, "rejected by carol: no");
        assert_eq!(cancelled.failure_cause, FailureCause::Cancelled as i32);
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn pending_approval_expires_into_a_cancelled_job() {
    for db in all_dbs().await {
        let h = with_rules(db).await;
        let t = test_tokens();
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(8)).await;
        h.wait_status(&job, JobState::AwaitingApproval).await;
        // Past the 1 h TTL of the rules file; dispatch rounds expire it.
        h.clock.advance(Duration::from_secs(3601));
        let cancelled = h.wait_status(&job, JobState::Cancelled).await;
        assert_eq!(cancelled.reason, "approval-expired", "{}", h.label);
        assert_eq!(
            cancelled.failure_cause,
            FailureCause::ApprovalExpired as i32
        );
        assert_eq!(
            approvals(&h, t.approver, ApprovalState::Expired).await,
            vec![job.clone()]
        );
        let q = h
            .public(t.admin)
            .get_queue(GetQueueRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(q.entries.is_empty(), "{}: {:?}", h.label, q.entries);
        let err = approve(&h, t.approver, &job, "").await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("EXPIRED"), "{}", err.message());
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn exit_137_is_retried_after_backoff_and_exit_1_is_final() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(1).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(1)).await;
        h.acquire_n(&runner, 1).await;
        h.report(&runner, &job, 1, AttemptState::Running, None)
            .await
            .unwrap();
        h.report(&runner, &job, 1, AttemptState::Failed, Some(137))
            .await
            .unwrap();
        let requeued = h.wait_status_n(&job, JobState::Queued, 2).await;
        assert_eq!(
            requeued.reason, "retrying after exit 137 (attempt 1 of 3) in 10s",
            "{}",
            h.label
        );
        assert_eq!(requeued.attempt_state, AttemptState::Failed as i32);
        assert_eq!(requeued.exit_code, Some(137));
        let q = h
            .public(test_tokens().alice)
            .get_queue(GetQueueRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(q.entries[0].reason, PendingReason::Backoff as i32);
        assert!(h.acquire(&runner, 0).await.unwrap().is_empty());

        h.clock.advance(Duration::from_secs(11));
        let again = h.acquire_n(&runner, 1).await;
        assert_eq!(
            (again[0].job_id.as_str(), again[0].attempt),
            (job.as_str(), 2)
        );
        h.report(&runner, &job, 2, AttemptState::Running, None)
            .await
            .unwrap();
        h.report(&runner, &job, 2, AttemptState::Failed, Some(137))
            .await
            .unwrap();
        let second = h.wait_status_n(&job, JobState::Queued, 3).await;
        assert_eq!(
            second.reason,
            "retrying after exit 137 (attempt 2 of 3) in 20s"
        );

        let user_error = new_job_id();
        h.enqueue(&user_error, "bob", spec(1)).await;
        h.acquire_n(&runner, 1).await;
        h.report(&runner, &user_error, 1, AttemptState::Running, None)
            .await
            .unwrap();
        h.report(&runner, &user_error, 1, AttemptState::Failed, Some(1))
            .await
            .unwrap();
        let failed = h.wait_status(&user_error, JobState::Failed).await;
        assert_eq!(
            failed.failure_cause,
            FailureCause::UserCode as i32,
            "{}",
            h.label
        );
        assert_eq!(failed.attempt, 1);
        h.stop().await.unwrap();
    }
}

/// Kubernetes preempted the running attempt: it is retried at once and
/// gives its place in the budget back, so a job allowed one attempt still
/// gets its one real try afterwards.
#[tokio::test]
async fn a_preempted_attempt_is_retried_at_once_and_does_not_use_the_budget() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(1).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec_with_attempts(1, 1)).await;
        h.acquire_n(&runner, 1).await;
        h.report(&runner, &job, 1, AttemptState::Running, None)
            .await
            .unwrap();
        let preempted = JobError {
            r#type: "Preempted".into(),
            message: "pod `tm-x-1-worker-0` was preempted: PreemptionByScheduler".into(),
            exit_code: 143,
            category: "preempted".into(),
            retryable: true,
            ..JobError::default()
        };
        h.report_error(
            &runner,
            &job,
            1,
            AttemptState::Failed,
            Some(143),
            Some(preempted),
        )
        .await
        .unwrap();
        let requeued = h.wait_status_n(&job, JobState::Queued, 2).await;
        assert_eq!(
            requeued.reason, "retrying after preemption (a preempted attempt does not count)",
            "{}",
            h.label
        );
        // No backoff: dispatched again at once, without moving the clock.
        let again = h.acquire_n(&runner, 1).await;
        assert_eq!(
            (again[0].job_id.as_str(), again[0].attempt),
            (job.as_str(), 2),
            "{}",
            h.label
        );
        h.report(&runner, &job, 2, AttemptState::Running, None)
            .await
            .unwrap();
        h.report(&runner, &job, 2, AttemptState::Failed, Some(137))
            .await
            .unwrap();
        // The one counted attempt is spent now.
        let failed = h.wait_status(&job, JobState::Failed).await;
        assert_eq!(
            failed.failure_cause,
            FailureCause::Signal as i32,
            "{}",
            h.label
        );
        assert!(
            failed.reason.contains("no attempts left (1 of 1 started)"),
            "{}: {}",
            h.label,
            failed.reason
        );
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn attempt_missing_from_two_heartbeats_is_lost_and_retried() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(1).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(1)).await;
        h.acquire_n(&runner, 1).await;
        h.report(&runner, &job, 1, AttemptState::Running, None)
            .await
            .unwrap();
        h.heartbeat(&runner, &[(job.as_str(), 1)]).await.unwrap();
        // One miss is tolerated (a transient gap), and listing it resets.
        h.heartbeat(&runner, &[]).await.unwrap();
        h.heartbeat(&runner, &[(job.as_str(), 1)]).await.unwrap();
        h.heartbeat(&runner, &[]).await.unwrap();
        assert_eq!(
            h.statuses(&job)
                .iter()
                .filter(|s| s.attempt_state == AttemptState::Lost as i32)
                .count(),
            0,
            "{}",
            h.label
        );
        h.heartbeat(&runner, &[]).await.unwrap();
        let lost = h.wait_status_n(&job, JobState::Queued, 2).await;
        assert_eq!(lost.attempt_state, AttemptState::Lost as i32, "{}", h.label);
        assert_eq!(lost.reason, "retrying after runner lost (attempt 1 of 3)");
        let again = h.acquire_n(&runner, 1).await;
        assert_eq!(again[0].attempt, 2);
        let err = h
            .report(&runner, &job, 1, AttemptState::Succeeded, Some(0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn report_after_the_lease_ran_out_is_refused_before_any_sweep() {
    for db in all_dbs().await {
        // No sweep will run during the test: only the lease check fences.
        let h = Harness::start_with(db, |c| c.sweep_interval = Duration::from_secs(3600)).await;
        let runner = h.register(1).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(1)).await;
        h.acquire_n(&runner, 1).await;
        h.report(&runner, &job, 1, AttemptState::Running, None)
            .await
            .unwrap();
        h.clock.advance(Duration::from_secs(20));
        let err = h
            .report(&runner, &job, 1, AttemptState::Succeeded, Some(0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", h.label);
        assert!(err.message().contains("lease expired"), "{}", err.message());
        h.stop().await.unwrap();
    }
}
