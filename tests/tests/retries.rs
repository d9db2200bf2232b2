//! Retry policy end to end: a job killed by a signal (SIGSEGV, exit 139)
//! is retried after the default backoff (the test moves the scheduler's
//! clock past it); a job that exits 1 is the user's error and is not
//! retried. Retries that follow the runner's diagnosis (more memory after
//! an out-of-memory kill, another runner after a node fault) are in
//! `diagnosed_retries.rs`.

use std::time::Duration;

use trainmesh_proto::job::v1::{AttemptState, FailureCause, JobEvent, JobState};
use trainmesh_proto::scheduler::v1::{ExplainJobRequest, GetQueueRequest, PendingReason};
use trainmesh_tests::jobs::{events_to_end, python_job, submit, wait_job, wait_state};
use trainmesh_tests::{Mesh, MeshOptions, ADMIN_TOKEN, ALICE_TOKEN};

const WAIT: Duration = Duration::from_secs(30);

/// Attempt 1 dies of SIGSEGV (exit 139, as a crashing native library
/// would); later attempts succeed.
const KILLED_ONCE: &str = r#"
import os, signal
if os.environ["TRAINMESH_ATTEMPT"] == "1":
    print("attempt 1 crashes", flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)
print("attempt", os.environ["TRAINMESH_ATTEMPT"], "succeeds")
"#;

fn state_names(events: &[JobEvent]) -> Vec<&'static str> {
    let mut states: Vec<&'static str> = Vec::new();
    for e in events {
        let s = JobState::try_from(e.state)
            .map(|s| s.as_str_name())
            .unwrap_or("?");
        if states.last() != Some(&s) {
            states.push(s);
        }
    }
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_139_is_retried_after_backoff() {
    let mesh = Mesh::start_with(
        MeshOptions {
            controllable_clock: true,
            ..Default::default()
        }
        // Jumps of the clock stay far inside the runner's lease.
        .arg(
            "scheduler-service",
            &["--lease-ttl-secs", "600", "--heartbeat-interval-secs", "1"],
        ),
    )
    .await;
    let job = submit(
        &mesh,
        ALICE_TOKEN,
        python_job("killed-once", KILLED_ONCE, &[]),
    )
    .await;

    let backoff = wait_job(
        &mesh,
        &job.id,
        "the job to be back in the queue after attempt 1",
        WAIT,
        |j| {
            j.state == JobState::Queued as i32
                && j.attempts.first().is_some_and(|a| a.end_time.is_some())
        },
    )
    .await;
    assert_eq!(backoff.attempts.len(), 1, "{:#?}", backoff.attempts);
    let a1 = &backoff.attempts[0];
    assert_eq!(a1.state, AttemptState::Failed as i32, "{a1:#?}");
    assert_eq!(a1.exit_code, Some(139), "{a1:#?}");
    let err = a1.error.clone().expect("attempt 1 keeps its error");
    assert_eq!(err.r#type, "Segfault", "{err:#?}");
    assert_eq!(err.exit_code, 139);
    assert!(
        backoff
            .state_reason
            .contains("retrying after exit 139 (attempt 1 of 3) in 10s"),
        "{:?}",
        backoff.state_reason
    );

    let explained = mesh
        .scheduler(ALICE_TOKEN)
        .explain_job(ExplainJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("explain job")
        .into_inner();
    assert!(
        explained
            .causes
            .iter()
            .any(|c| c.reason == PendingReason::Backoff as i32),
        "the job waits in backoff: {explained:#?}"
    );
    let queue = mesh
        .scheduler(ADMIN_TOKEN)
        .get_queue(GetQueueRequest::default())
        .await
        .expect("get queue")
        .into_inner();
    let entry = queue
        .entries
        .iter()
        .find(|e| e.job_id == job.id)
        .unwrap_or_else(|| panic!("the job is in the queue: {queue:#?}"));
    assert_eq!(entry.reason, PendingReason::Backoff as i32, "{entry:#?}");

    // Past the 10 s backoff.
    mesh.advance_clock(30);
    let done = wait_state(&mesh, &job.id, JobState::Succeeded, WAIT).await;
    assert_eq!(done.attempts.len(), 2, "{:#?}", done.attempts);
    assert_eq!(done.attempts[0].exit_code, Some(139));
    assert_eq!(done.attempts[0].state, AttemptState::Failed as i32);
    assert_eq!(done.attempts[1].number, 2);
    assert_eq!(done.attempts[1].exit_code, Some(0));
    assert_eq!(
        state_names(&events_to_end(&mesh, &job.id).await),
        [
            "JOB_STATE_PENDING",
            "JOB_STATE_QUEUED",
            "JOB_STATE_SCHEDULED",
            "JOB_STATE_RUNNING",
            "JOB_STATE_QUEUED",
            "JOB_STATE_SCHEDULED",
            "JOB_STATE_RUNNING",
            "JOB_STATE_SUCCEEDED"
        ]
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_1_is_not_retried() {
    let mesh = Mesh::start().await;
    let job = submit(
        &mesh,
        ALICE_TOKEN,
        python_job(
            "user-error",
            "import sys\nprint('bad hyperparameters', flush=True)\nsys.exit(1)\n",
            &[],
        ),
    )
    .await;
    let failed = wait_job(&mesh, &job.id, "the job to finish", WAIT, |j| {
        trainmesh_tests::jobs::is_terminal(trainmesh_tests::jobs::state_of(j))
    })
    .await;
    assert_eq!(failed.state, JobState::Failed as i32, "{failed:#?}");
    assert_eq!(failed.failure_cause, FailureCause::UserCode as i32);
    assert_eq!(failed.attempts.len(), 1, "{:#?}", failed.attempts);
    assert_eq!(failed.attempts[0].exit_code, Some(1));
    assert_eq!(failed.attempts[0].state, AttemptState::Failed as i32);
    assert_eq!(
        state_names(&events_to_end(&mesh, &job.id).await),
        [
            "JOB_STATE_PENDING",
            "JOB_STATE_QUEUED",
            "JOB_STATE_SCHEDULED",
            "JOB_STATE_RUNNING",
            "JOB_STATE_FAILED"
        ],
        "no second attempt"
    );
    mesh.stop().await;
}
