//! Approvals end to end, with the scheduler's clock moved by the test: a
//! job that needs approval waits in AWAITING_APPROVAL, expires after the
//! TTL into one consistent CANCELLED state everywhere, or is approved and
//! runs; a second decision is refused.

use std::time::Duration;

use tonic::Code;
use trainmesh_proto::job::v1::{FailureCause, JobSpec, JobState};
use trainmesh_proto::scheduler::v1::{
    Approval, ApprovalState, ApproveJobRequest, ExplainJobRequest, GetQueueRequest,
    ListApprovalsRequest, PendingReason, RejectJobRequest,
};
use trainmesh_tests::jobs::{events_to_end, get_job, python_job, submit, wait_state};
use trainmesh_tests::{Mesh, MeshOptions, ADMIN_TOKEN, ALICE_TOKEN, APPROVER_TOKEN};

const RULES: &str = r#"
rules:
  - name: prod-tier
    when: { label: { key: "tier", matches: "^prod$" } }
ttl: 1h
"#;

const WAIT: Duration = Duration::from_secs(20);

async fn mesh() -> Mesh {
    Mesh::start_with(
        MeshOptions {
            controllable_clock: true,
            approval_rules: Some(RULES.into()),
            ..Default::default()
        }
        // The runner's lease outlives every jump of the clock here, so a
        // live runner with free capacity is there all along.
        .arg(
            "scheduler-service",
            &[
                "--approval-sweep-secs",
                "1",
                "--lease-ttl-secs",
                "86400",
                "--heartbeat-interval-secs",
                "1",
            ],
        ),
    )
    .await
}

fn prod_job(name: &str) -> JobSpec {
    let mut spec = python_job(name, "print('the approved job ran')", &[]);
    spec.labels.insert("tier".into(), "prod".into());
    spec
}

async fn approvals(mesh: &Mesh, state: ApprovalState) -> Vec<Approval> {
    mesh.scheduler(APPROVER_TOKEN)
        .list_approvals(ListApprovalsRequest {
            state: state as i32,
            page_size: 500,
            page_token: String::new(),
        })
        .await
        .expect("list approvals")
        .into_inner()
        .approvals
}

async fn queued_ids(mesh: &Mesh) -> Vec<(String, i32)> {
    mesh.scheduler(ADMIN_TOKEN)
        .get_queue(GetQueueRequest::default())
        .await
        .expect("get queue")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| (e.job_id, e.reason))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_expires_end_to_end() {
    let mesh = mesh().await;
    let job = submit(&mesh, ALICE_TOKEN, prod_job("needs-approval")).await;

    let waiting = wait_state(&mesh, &job.id, JobState::AwaitingApproval, WAIT).await;
    assert!(
        waiting.state_reason.contains("prod-tier"),
        "job-service says which rule requires approval: {:?}",
        waiting.state_reason
    );

    let explained = mesh
        .scheduler(ALICE_TOKEN)
        .explain_job(ExplainJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("explain job")
        .into_inner();
    let cause = explained
        .causes
        .iter()
        .find(|c| c.reason == PendingReason::AwaitingApproval as i32)
        .unwrap_or_else(|| panic!("AwaitingApproval among the causes: {explained:#?}"));
    assert!(cause.detail.contains("prod-tier"), "{cause:#?}");
    assert!(
        cause.unblock.contains("approver"),
        "says who can approve: {cause:#?}"
    );

    let pending = approvals(&mesh, ApprovalState::Pending).await;
    let approval = pending
        .iter()
        .find(|a| a.job_id == job.id)
        .unwrap_or_else(|| panic!("a pending approval for the job: {pending:#?}"));
    assert_eq!(approval.rule, "prod-tier");
    assert_eq!(approval.owner, "alice");
    let (created, expires) = (
        approval.create_time.expect("create_time"),
        approval.expire_time.expect("expire_time"),
    );
    assert_eq!(
        expires.seconds - created.seconds,
        3600,
        "TTL from the rules file: {approval:#?}"
    );
    assert!(
        queued_ids(&mesh)
            .await
            .contains(&(job.id.clone(), PendingReason::AwaitingApproval as i32)),
        "GetQueue shows the job awaiting approval"
    );

    // Two hours later the approval is past its TTL.
    mesh.advance_clock(2 * 3600);

    let cancelled = wait_state(&mesh, &job.id, JobState::Cancelled, WAIT).await;
    assert_eq!(
        cancelled.failure_cause,
        FailureCause::ApprovalExpired as i32,
        "{cancelled:#?}"
    );
    assert_eq!(cancelled.state_reason, "approval-expired");
    assert!(
        cancelled.attempts.is_empty(),
        "an expired job never runs: {:#?}",
        cancelled.attempts
    );

    let events = events_to_end(&mesh, &job.id).await;
    let types: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
    let expired = events
        .iter()
        .find(|e| e.r#type == "approval_expired")
        .unwrap_or_else(|| panic!("an approval_expired event: {types:?}"));
    assert_eq!(expired.state, JobState::Cancelled as i32, "{expired:#?}");
    assert!(
        types.contains(&"approval_requested"),
        "an approval_requested event: {types:?}"
    );

    let expired_list = approvals(&mesh, ApprovalState::Expired).await;
    let approval = expired_list
        .iter()
        .find(|a| a.job_id == job.id)
        .unwrap_or_else(|| panic!("the approval is listed as expired: {expired_list:#?}"));
    assert_eq!(approval.state, ApprovalState::Expired as i32);
    assert!(
        !approvals(&mesh, ApprovalState::Pending)
            .await
            .iter()
            .any(|a| a.job_id == job.id),
        "no longer pending"
    );
    assert!(
        !queued_ids(&mesh).await.iter().any(|(id, _)| *id == job.id),
        "the scheduler's queue entry is closed"
    );
    let explained = mesh
        .scheduler(ALICE_TOKEN)
        .explain_job(ExplainJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("explain job")
        .into_inner();
    assert_eq!(
        explained.state,
        JobState::Cancelled as i32,
        "{explained:#?}"
    );
    assert!(explained.causes.is_empty(), "{explained:#?}");

    let err = mesh
        .scheduler(APPROVER_TOKEN)
        .approve_job(ApproveJobRequest {
            job_id: job.id.clone(),
            note: "too late".into(),
        })
        .await
        .expect_err("approving an expired job");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().to_lowercase().contains("expired"),
        "names the current state: {}",
        err.message()
    );
    let after = get_job(&mesh, &job.id).await;
    assert_eq!(after.state, JobState::Cancelled as i32);
    assert!(after.attempts.is_empty());
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_job_runs_and_a_second_decision_is_refused() {
    let mesh = mesh().await;
    let job = submit(&mesh, ALICE_TOKEN, prod_job("approved")).await;
    wait_state(&mesh, &job.id, JobState::AwaitingApproval, WAIT).await;

    let err = mesh
        .scheduler(ALICE_TOKEN)
        .approve_job(ApproveJobRequest {
            job_id: job.id.clone(),
            note: "I approve of myself".into(),
        })
        .await
        .expect_err("a plain user approves");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let approval = mesh
        .scheduler(APPROVER_TOKEN)
        .approve_job(ApproveJobRequest {
            job_id: job.id.clone(),
            note: "looks fine".into(),
        })
        .await
        .expect("approve")
        .into_inner()
        .approval
        .expect("approval");
    assert_eq!(
        approval.state,
        ApprovalState::Approved as i32,
        "{approval:#?}"
    );
    assert_eq!(approval.decided_by, "carol");
    assert_eq!(approval.note, "looks fine");

    let done = wait_state(&mesh, &job.id, JobState::Succeeded, Duration::from_secs(60)).await;
    assert_eq!(done.attempts.len(), 1, "{:#?}", done.attempts);

    for (what, result) in [
        (
            "reject",
            mesh.scheduler(APPROVER_TOKEN)
                .reject_job(RejectJobRequest {
                    job_id: job.id.clone(),
                    note: "changed my mind".into(),
                })
                .await
                .map(|_| ()),
        ),
        (
            "approve",
            mesh.scheduler(ADMIN_TOKEN)
                .approve_job(ApproveJobRequest {
                    job_id: job.id.clone(),
                    note: "again".into(),
                })
                .await
                .map(|_| ()),
        ),
    ] {
        let err = result.expect_err(what);
        assert_eq!(err.code(), Code::FailedPrecondition, "{what}: {err:?}");
        assert!(
            err.message().to_lowercase().contains("approved"),
            "{what}: names the current state: {}",
            err.message()
        );
    }

    let events = events_to_end(&mesh, &job.id).await;
    let mut states: Vec<i32> = Vec::new();
    for e in &events {
        if states.last() != Some(&e.state) {
            states.push(e.state);
        }
    }
    let tail = [
        JobState::AwaitingApproval,
        JobState::Queued,
        JobState::Scheduled,
        JobState::Running,
        JobState::Succeeded,
    ]
    .map(|s| s as i32);
    assert!(
        states.ends_with(&tail),
        "approval, then the normal path: {:?}",
        states
            .iter()
            .map(|s| JobState::try_from(*s)
                .map(|s| s.as_str_name())
                .unwrap_or("?"))
            .collect::<Vec<_>>()
    );
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("approved by carol") && e.message.contains("looks fine")),
        "the approval and its note are in the job's events: {events:#?}"
    );
    let approved = approvals(&mesh, ApprovalState::Approved).await;
    assert!(
        approved
            .iter()
            .any(|a| a.job_id == job.id && a.decided_by == "carol"),
        "{approved:#?}"
    );
    mesh.stop().await;
}
