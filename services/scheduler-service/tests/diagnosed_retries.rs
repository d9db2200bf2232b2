//! Retries that follow the runner's diagnosis: an out-of-memory kill is
//! retried with more memory (the next assignment carries it), a node fault
//! moves the job to another runner and counts against the first, which is
//! cordoned after enough of them until an admin uncordons it. Every test
//! runs on SQLite, and on PostgreSQL when TRAINMESH_TEST_POSTGRES_URL is set.

mod common;

use common::{new_job_id, spec, Harness};
use tonic::Code;
use trainmesh_common::proto::audit::v1::audit_service_client::AuditServiceClient;
use trainmesh_common::proto::audit::v1::ListAuditEventsRequest;
use trainmesh_common::proto::job::v1::{AttemptState, FailureCause, JobError, JobState};
use trainmesh_common::proto::scheduler::v1::{
    ExplainJobRequest, ExplainJobResponse, ListRunnersRequest, PendingReason, RetryAction,
    RunnerInfo, RunnerState, UncordonRunnerRequest,
};
use trainmesh_common::testing::{all_dbs, test_tokens, TEST_RUNNER, TEST_RUNNER_B};

fn oom_killed() -> JobError {
    JobError {
        r#type: "OOMKilled".into(),
        message: "the attempt's processes used 1100 MiB, more than its memory limit".into(),
        exit_code: 137,
        signal: 9,
        category: "oom-killed".into(),
        retryable: true,
        ..Default::default()
    }
}

fn no_gpus() -> JobError {
    JobError {
        r#type: "RuntimeError".into(),
        message: "No CUDA GPUs are available".into(),
        exit_code: 1,
        category: "gpu-unavailable".into(),
        retryable: true,
        node_fault: true,
        ..Default::default()
    }
}

async fn explain(h: &Harness, job: &str) -> ExplainJobResponse {
    h.public(test_tokens().alice)
        .explain_job(ExplainJobRequest { job_id: job.into() })
        .await
        .expect("explain")
        .into_inner()
}

async fn runners(h: &Harness) -> Vec<RunnerInfo> {
    h.public(test_tokens().admin)
        .list_runners(ListRunnersRequest {})
        .await
        .expect("list runners")
        .into_inner()
        .runners
}

fn named<'a>(rs: &'a [RunnerInfo], name: &str) -> &'a RunnerInfo {
    rs.iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no runner `{name}` in {rs:#?}"))
}

/// Dispatches `job` to node-1 (attempt `n`), reports it running, then
/// failed with `error`.
async fn fail_on_node_1(h: &Harness, runner: &str, job: &str, n: i32, error: JobError) {
    let got = h.acquire_n(runner, 1).await;
    assert_eq!((got[0].job_id.as_str(), got[0].attempt), (job, n));
    h.report(runner, job, n, AttemptState::Running, None)
        .await
        .unwrap();
    let code = error.exit_code;
    h.report_error(
        runner,
        job,
        n,
        AttemptState::Failed,
        Some(code),
        Some(error),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn an_oom_killed_attempt_runs_again_with_more_memory() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(1).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(1)).await;
        fail_on_node_1(&h, &runner, &job, 1, oom_killed()).await;
        let requeued = h.wait_status_n(&job, JobState::Queued, 2).await;
        assert_eq!(
            requeued.reason,
            "retrying with memory 1536 MiB (1.5 × 1024 MiB) after the out-of-memory killer \
             stopped attempt 1 (attempt 1 of 3)",
            "{}",
            h.label
        );
        // At once (no backoff), placed and handed out with the new memory.
        let again = h.acquire_n(&runner, 1).await;
        assert_eq!(again[0].attempt, 2, "{}", h.label);
        let resources = again[0].spec.clone().unwrap().resources.unwrap();
        assert_eq!(resources.memory_mib, 1536, "{}", h.label);
        let x = explain(&h, &job).await;
        let last = x.last_retry.expect("the last decision");
        assert_eq!(last.action, RetryAction::MoreMemory as i32);
        assert_eq!((last.attempt, last.memory_mib), (1, 1536));
        assert_eq!(last.category, "oom-killed");
        assert_eq!(last.runner_name, TEST_RUNNER);

        // Killed again: 2304, then the budget (3 attempts) is spent.
        h.report(&runner, &job, 2, AttemptState::Running, None)
            .await
            .unwrap();
        h.report_error(
            &runner,
            &job,
            2,
            AttemptState::Failed,
            Some(137),
            Some(oom_killed()),
        )
        .await
        .unwrap();
        let second = h.wait_status_n(&job, JobState::Queued, 3).await;
        assert!(
            second
                .reason
                .starts_with("retrying with memory 2304 MiB (1.5 × 1536 MiB)"),
            "{}",
            second.reason
        );
        fail_on_node_1(&h, &runner, &job, 3, oom_killed()).await;
        let failed = h.wait_status(&job, JobState::Failed).await;
        assert!(
            failed
                .reason
                .contains("at 2304 MiB; no attempts left (3 of 3 started)"),
            "{}: {}",
            h.label,
            failed.reason
        );
        assert_eq!(failed.failure_cause, FailureCause::Signal as i32);
        assert_eq!(
            explain(&h, &job).await.last_retry.unwrap().action,
            RetryAction::Fail as i32
        );
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn an_oom_killed_job_without_a_memory_request_fails_saying_what_to_set() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(1).await;
        let job = new_job_id();
        let mut s = spec(1);
        s.resources.as_mut().unwrap().memory_mib = 0;
        h.enqueue(&job, "alice", s).await;
        fail_on_node_1(&h, &runner, &job, 1, oom_killed()).await;
        let failed = h.wait_status(&job, JobState::Failed).await;
        assert!(
            failed.reason.contains("set spec.resources.memory_mib"),
            "{}: {}",
            h.label,
            failed.reason
        );
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_node_fault_moves_the_job_to_another_runner_without_using_the_budget() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let t = test_tokens();
        let first = h.register(1).await;
        let job = new_job_id();
        // One attempt allowed: the node fault must not spend it.
        h.enqueue(&job, "alice", common::spec_with_attempts(1, 1))
            .await;
        fail_on_node_1(&h, &first, &job, 1, no_gpus()).await;
        let requeued = h.wait_status_n(&job, JobState::Queued, 2).await;
        assert!(
            requeued.reason.starts_with(&format!(
                "retrying on another runner after a node fault on runner `{TEST_RUNNER}` \
                 stopped attempt 1"
            )),
            "{}: {}",
            h.label,
            requeued.reason
        );
        // Only node-1 is there: the job waits and says why.
        assert!(h.acquire(&first, 0).await.unwrap().is_empty());
        let x = explain(&h, &job).await;
        assert_eq!(x.avoided_runners, [TEST_RUNNER], "{}", h.label);
        let avoiding = x
            .causes
            .iter()
            .find(|c| c.reason == PendingReason::AvoidingRunners as i32)
            .unwrap_or_else(|| panic!("{}: {x:#?}", h.label));
        assert!(
            avoiding.detail.contains(&format!(
                "avoiding runner `{TEST_RUNNER}` after a node fault"
            )),
            "{}",
            avoiding.detail
        );
        assert!(
            avoiding.unblock.contains("trainctl runners uncordon"),
            "{}",
            avoiding.unblock
        );
        let last = x.last_retry.unwrap();
        assert_eq!(last.action, RetryAction::OtherRunner as i32);
        // The fault is counted against node-1, which is suspect now.
        let rs = runners(&h).await;
        let r1 = named(&rs, TEST_RUNNER);
        assert_eq!((r1.node_faults, r1.suspect), (1, true), "{r1:#?}");
        assert_eq!(r1.state, RunnerState::Ready as i32);
        assert!(
            r1.last_fault.contains("No CUDA GPUs are available"),
            "{r1:#?}"
        );
        assert_eq!(r1.capacity.as_ref().unwrap().gpus.len(), 1);

        // Another runner: the job runs there and its one attempt is real.
        let second = h.register_as(t.runner_b, TEST_RUNNER_B, 1).await;
        let got = h.acquire_as(t.runner_b, &second, 10).await.unwrap();
        assert_eq!((got[0].job_id.as_str(), got[0].attempt), (job.as_str(), 2));
        for state in [AttemptState::Running, AttemptState::Succeeded] {
            let code = (state == AttemptState::Succeeded).then_some(0);
            h.report_as(t.runner_b, &second, &job, 2, state, code, None)
                .await
                .unwrap();
        }
        h.wait_status(&job, JobState::Succeeded).await;
        let rs = runners(&h).await;
        assert!(!named(&rs, TEST_RUNNER_B).suspect);
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_job_that_says_fail_on_a_node_fault_fails_and_the_fault_still_counts() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(1).await;
        let job = new_job_id();
        let mut s = spec(1);
        s.retry_policy = Some(trainmesh_common::proto::job::v1::RetryPolicy {
            on_node_fault: trainmesh_common::proto::job::v1::NodeFaultAction::Fail as i32,
            ..Default::default()
        });
        h.enqueue(&job, "alice", s).await;
        fail_on_node_1(&h, &runner, &job, 1, no_gpus()).await;
        let failed = h.wait_status(&job, JobState::Failed).await;
        assert_eq!(
            failed.failure_cause,
            FailureCause::Platform as i32,
            "{}",
            h.label
        );
        assert!(
            failed.reason.contains("on_node_fault is FAIL"),
            "{}: {}",
            h.label,
            failed.reason
        );
        let rs = runners(&h).await;
        assert_eq!(named(&rs, TEST_RUNNER).node_faults, 1, "{}", h.label);
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_runner_is_cordoned_after_node_faults_until_an_admin_uncordons_it() {
    for db in all_dbs().await {
        let h = Harness::start_with(db, |c| c.cordon_after_node_faults = 2).await;
        let t = test_tokens();
        let runner = h.register(1).await;
        for _ in 0..2 {
            let job = new_job_id();
            h.enqueue(&job, "alice", spec(1)).await;
            fail_on_node_1(&h, &runner, &job, 1, no_gpus()).await;
            h.wait_status_n(&job, JobState::Queued, 2).await;
        }
        let rs = runners(&h).await;
        let r1 = named(&rs, TEST_RUNNER);
        assert_eq!(
            r1.state,
            RunnerState::Cordoned as i32,
            "{}: {r1:#?}",
            h.label
        );
        assert_eq!(r1.node_faults, 2);
        assert!(r1.cordon_reason.contains("after 2 node faults"), "{r1:#?}");
        assert!(r1.cordon_time.is_some());

        // A new job is not placed on it, and says why.
        let job = new_job_id();
        h.enqueue(&job, "bob", spec(1)).await;
        assert!(h.acquire(&runner, 0).await.unwrap().is_empty());
        let x = h
            .public(t.bob)
            .explain_job(ExplainJobRequest {
                job_id: job.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            x.causes
                .iter()
                .any(|c| c.reason == PendingReason::AvoidingRunners as i32
                    && c.detail
                        .contains(&format!("runner `{TEST_RUNNER}` is cordoned"))),
            "{}: {x:#?}",
            h.label
        );

        // Only admins (and the diagnosis) see runners; only admins uncordon.
        let denied = h
            .public(t.alice)
            .list_runners(ListRunnersRequest {})
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert!(h
            .public(t.diagnosis)
            .list_runners(ListRunnersRequest {})
            .await
            .is_ok());
        let denied = h
            .public(t.alice)
            .uncordon_runner(UncordonRunnerRequest {
                name: TEST_RUNNER.into(),
                note: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        let unknown = h
            .public(t.admin)
            .uncordon_runner(UncordonRunnerRequest {
                name: "no-such-node".into(),
                note: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);

        let done = h
            .public(t.admin)
            .uncordon_runner(UncordonRunnerRequest {
                name: TEST_RUNNER.into(),
                note: "replaced the GPU".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(done.was_cordoned);
        let r = done.runner.unwrap();
        assert_eq!(
            (r.state, r.node_faults, r.suspect),
            (RunnerState::Ready as i32, 0, false)
        );
        // Its jobs come back: the two that avoided it, and the new one.
        let got = h.acquire_n(&runner, 1).await;
        assert!(!got.is_empty(), "{}", h.label);
        let audit = AuditServiceClient::new(
            trainmesh_common::client::channel(&h.addr.to_string(), Some(t.admin)).unwrap(),
        )
        .list_audit_events(ListAuditEventsRequest {
            action: "uncordon_runner".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
        let event = audit.events.first().expect("an audit event");
        assert_eq!(
            (event.actor.as_str(), event.target.as_str()),
            ("admin", TEST_RUNNER)
        );
        assert_eq!(
            event.details.get("note").map(String::as_str),
            Some("replaced the GPU"),
            "{event:#?}"
        );
        h.stop().await.unwrap();
    }
}
