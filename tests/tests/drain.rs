//! Runners stopped gracefully (SIGTERM), with the real binaries: a running
//! attempt with attempts left is never cancelled — it finishes (`--on-stop
//! wait`) or is handed back and retried elsewhere without using the job's
//! budget (`--on-stop handback`); and work submitted while a runner drains
//! never goes to it.

use std::path::Path;
use std::time::Duration;

use trainmesh_common::testing::wait_for;
use trainmesh_proto::job::v1::{AttemptState, Job, JobSpec, JobState, RetryPolicy};
use trainmesh_proto::scheduler::v1::{GetQueueRequest, PendingReason};
use trainmesh_tests::jobs::{events_to_end, python_job, submit, wait_state, ATTEMPT_PRELUDE};
use trainmesh_tests::{process_alive, Gate, Mesh, MeshOptions, ADMIN_TOKEN, ALICE_TOKEN};

const WAIT: Duration = Duration::from_secs(30);

/// After [`ATTEMPT_PRELUDE`]: writes `<pid>` to `$MARK_DIR/attempt-<n>`. Attempt 1 then runs until it
/// is stopped, or until `$MARK_DIR/go` exists; a later attempt checks
/// attempt 1's process is gone (else exits 3) and succeeds.
const SCRIPT: &str = r#"
tmp = os.path.join(marks, f".attempt-{attempt}")
with open(tmp, "w") as f:
    f.write(str(os.getpid()))
os.rename(tmp, os.path.join(marks, f"attempt-{attempt}"))
if attempt == "1":
    print("attempt 1 runs", flush=True)
    # Blocks until the test opens the gate (a FIFO).
    open(os.path.join(marks, "go")).read()
    print("attempt 1 finished its work", flush=True)
    sys.exit(0)
first = int(open(os.path.join(marks, "attempt-1")).read())
if alive(first):
    print(f"attempt 1 (pid {first}) still runs", flush=True)
    sys.exit(3)
print(f"attempt {attempt} done", flush=True)
"#;

/// One attempt only: were a hand-back counted, the job would fail.
fn one_attempt(name: &str, marks: &Path) -> JobSpec {
    let mut spec = python_job(
        name,
        &format!("{ATTEMPT_PRELUDE}{SCRIPT}"),
        &[("MARK_DIR", &marks.display().to_string())],
    );
    spec.retry_policy = Some(RetryPolicy {
        max_attempts: 1,
        ..Default::default()
    });
    spec
}

async fn wait_mark(marks: &Path, attempt: i32) -> i32 {
    let path = marks.join(format!("attempt-{attempt}"));
    wait_for(&format!("attempt {attempt} to start"), WAIT, || {
        let text = std::fs::read_to_string(&path).ok();
        async move { text?.trim().parse().ok() }
    })
    .await
}

/// The mesh, the marks dir, and the gate attempt 1 waits at.
async fn mesh_with_marks() -> (Mesh, std::path::PathBuf, Gate) {
    let mesh = Mesh::start_with(MeshOptions {
        no_runner: true,
        ..Default::default()
    })
    .await;
    let marks = mesh.dir.path().join("marks");
    std::fs::create_dir_all(&marks).expect("marks dir");
    let gate = Gate::new(marks.join("go"));
    (mesh, marks, gate)
}

async fn assert_never_cancelled(mesh: &Mesh, job: &Job) {
    for e in events_to_end(mesh, &job.id).await {
        assert_ne!(e.state, JobState::Cancelled as i32, "{e:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_stopped_with_handback_has_its_attempt_retried_elsewhere_without_using_the_budget()
{
    let (mut mesh, marks, _gate) = mesh_with_marks().await;
    let runner_a = mesh
        .start_runner("runner-a", &["--on-stop", "handback"])
        .await;
    let job = submit(&mesh, ALICE_TOKEN, one_attempt("handed-back", &marks)).await;
    wait_state(&mesh, &job.id, JobState::Running, WAIT).await;
    let pid1 = wait_mark(&marks, 1).await;
    let runner_b = mesh.start_runner("runner-b", &[]).await;

    mesh.terminate("runner-a");
    let status = mesh.wait_exit("runner-a", WAIT).await;
    assert!(status.success(), "runner A stops cleanly: {status}");
    assert!(
        !process_alive(pid1),
        "attempt 1 was stopped before A exited"
    );

    let done = wait_state(&mesh, &job.id, JobState::Succeeded, WAIT).await;
    assert_eq!(done.attempts.len(), 2, "{:#?}", done.attempts);
    let (a1, a2) = (&done.attempts[0], &done.attempts[1]);
    assert_eq!(a1.runner_id, runner_a);
    assert_eq!(a1.state, AttemptState::Failed as i32, "{a1:#?}");
    let err = a1.error.as_ref().expect("attempt 1's error");
    assert_eq!(err.category, "runner-shutdown", "{err:#?}");
    assert_eq!(a2.runner_id, runner_b);
    assert_eq!(a2.state, AttemptState::Succeeded as i32, "{a2:#?}");
    assert_eq!(a2.exit_code, Some(0), "attempt 1 was gone when 2 started");
    assert_never_cancelled(&mesh, &done).await;

    // A is gone at once, not when its lease would have run out: the next
    // job goes to B, in one attempt, never lost on A.
    let late = submit(
        &mesh,
        ALICE_TOKEN,
        python_job("after-the-stop", "print('ran')", &[]),
    )
    .await;
    let ran = wait_state(&mesh, &late.id, JobState::Succeeded, WAIT).await;
    assert_eq!(ran.attempts.len(), 1, "{:#?}", ran.attempts);
    assert_eq!(ran.attempts[0].runner_id, runner_b);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_runner_lets_its_attempt_finish_and_takes_no_new_work() {
    let (mut mesh, marks, gate) = mesh_with_marks().await;
    let runner_a = mesh
        .start_runner(
            "runner-a",
            &["--on-stop", "wait", "--drain-timeout-secs", "120"],
        )
        .await;
    let job = submit(&mesh, ALICE_TOKEN, one_attempt("finishes", &marks)).await;
    wait_state(&mesh, &job.id, JobState::Running, WAIT).await;
    wait_mark(&marks, 1).await;

    mesh.terminate("runner-a");
    wait_for("runner A to drain", WAIT, || {
        let log = mesh.log_text("runner-a");
        async move {
            log.contains("the scheduler places nothing more on this runner")
                .then_some(())
        }
    })
    .await;
    // Submitted while A drains, with room on A: the scheduler plans it
    // and finds no runner for it.
    let late = submit(
        &mesh,
        ALICE_TOKEN,
        python_job("after-the-stop", "print('ran')", &[]),
    )
    .await;
    wait_for("the late job to wait for a runner", WAIT, || async {
        let queue = mesh
            .scheduler(ADMIN_TOKEN)
            .get_queue(GetQueueRequest::default())
            .await
            .ok()?
            .into_inner();
        queue
            .entries
            .iter()
            .any(|e| e.job_id == late.id && e.reason == PendingReason::NoRunnerCapacity as i32)
            .then_some(())
    })
    .await;

    gate.open().await;
    let done = wait_state(&mesh, &job.id, JobState::Succeeded, WAIT).await;
    let status = mesh.wait_exit("runner-a", WAIT).await;
    assert!(status.success(), "runner A stops cleanly: {status}");
    assert_eq!(done.attempts.len(), 1, "{:#?}", done.attempts);
    assert_eq!(done.attempts[0].runner_id, runner_a);
    assert_never_cancelled(&mesh, &done).await;

    let runner_b = mesh.start_runner("runner-b", &[]).await;
    let ran = wait_state(&mesh, &late.id, JobState::Succeeded, WAIT).await;
    assert_eq!(
        ran.attempts.len(),
        1,
        "never placed on A: {:#?}",
        ran.attempts
    );
    assert_eq!(ran.attempts[0].runner_id, runner_b);
    assert_ne!(ran.attempts[0].state, AttemptState::Lost as i32);
    mesh.stop().await;
}
