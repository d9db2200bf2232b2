//! Runner leases with the scheduler's clock moved by the test: a runner
//! killed with SIGKILL takes its attempt's processes with it (children and
//! escaped grandchildren included) and loses the attempt, which then runs
//! once elsewhere; a late report from a runner whose lease expired is
//! refused.

use std::path::Path;
use std::time::Duration;

use tonic::Code;
use trainmesh_common::testing::wait_for;
use trainmesh_common::time::from_timestamp;
use trainmesh_proto::job::v1::{AttemptState, JobState};
use trainmesh_proto::scheduler::v1::GetQueueRequest;
use trainmesh_tests::fake_runner::{cpu_capacity, FakeRunner};
use trainmesh_tests::jobs::{get_job, python_job, submit, wait_job, wait_state, ATTEMPT_PRELUDE};
use trainmesh_tests::{process_alive, Mesh, MeshOptions, ADMIN_TOKEN, ALICE_TOKEN};

const WAIT: Duration = Duration::from_secs(20);

/// After [`ATTEMPT_PRELUDE`]: attempt 1 starts two `sleep`s — one its
/// child, one in a session of its own — and waits "forever"; attempt 2
/// checks that attempt 1 and both of its children are gone (else exits 3)
/// and succeeds. Each writes `<output dir> <pid>…` to
/// `$MARK_DIR/attempt-<n>`.
const SCRIPT: &str = r#"
import signal, subprocess
pids = [os.getpid()]
if attempt == "1":
    pids.append(subprocess.Popen(["sleep", "1000"]).pid)
    pids.append(subprocess.Popen(["sleep", "1000"], start_new_session=True).pid)
tmp = os.path.join(marks, f".attempt-{attempt}")
with open(tmp, "w") as f:
    f.write(" ".join([os.environ.get("TRAINMESH_OUTPUT_DIR", "")] + [str(p) for p in pids]))
os.rename(tmp, os.path.join(marks, f"attempt-{attempt}"))
if attempt == "1":
    print("attempt 1 runs until its runner dies", flush=True)
    # Blocks until a signal ends it: the shim's SIGKILL when the runner dies.
    signal.pause()
    sys.exit(0)
first = [int(p) for p in open(os.path.join(marks, "attempt-1")).read().split()[1:]]
left = [p for p in first if alive(p)]
if left:
    print(f"processes of attempt 1 still run: {left}", flush=True)
    sys.exit(3)
print("attempt 1 is gone; attempt 2 done", flush=True)
"#;

/// `(output dir, pids)` written by an attempt of [`SCRIPT`].
async fn wait_mark(marks: &Path, attempt: i32) -> (String, Vec<i32>) {
    let path = marks.join(format!("attempt-{attempt}"));
    wait_for(&format!("attempt {attempt} to start"), WAIT, || {
        let text = std::fs::read_to_string(&path).ok();
        async move {
            let text = text?;
            let mut words = text.split(' ');
            let dir = words.next()?.to_string();
            let pids = words
                .map(|p| p.parse().ok())
                .collect::<Option<Vec<i32>>>()?;
            Some((dir, pids))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_runner_attempt_is_lost_and_runs_once_elsewhere() {
    const LEASE_TTL: i64 = 40;
    let mut mesh = Mesh::start_with(
        MeshOptions {
            no_runner: true,
            controllable_clock: true,
            ..Default::default()
        }
        .arg(
            "scheduler-service",
            &[
                "--lease-ttl-secs",
                &LEASE_TTL.to_string(),
                "--heartbeat-interval-secs",
                "1",
            ],
        ),
    )
    .await;
    let marks = mesh.dir.path().join("marks");
    std::fs::create_dir_all(&marks).expect("marks dir");

    let runner_a = mesh.start_runner("runner-a", &[]).await;
    let job = submit(
        &mesh,
        ALICE_TOKEN,
        python_job(
            "outlives-its-runner",
            &format!("{ATTEMPT_PRELUDE}{SCRIPT}"),
            &[("MARK_DIR", &marks.display().to_string())],
        ),
    )
    .await;
    let running = wait_state(&mesh, &job.id, JobState::Running, WAIT).await;
    assert_eq!(running.attempts.len(), 1);
    assert_eq!(running.attempts[0].runner_id, runner_a);
    let (dir1, pids1) = wait_mark(&marks, 1).await;
    assert!(
        Path::new(&dir1).starts_with(mesh.runner_work_dir("runner-a")),
        "attempt 1 runs on runner A: {dir1}"
    );
    assert_eq!(pids1.len(), 3, "the job and its two children: {pids1:?}");
    assert!(pids1.iter().all(|p| process_alive(*p)), "{pids1:?}");

    let runner_b = mesh.start_runner("runner-b", &[]).await;
    mesh.kill("runner-a").await;
    // Its child, and the one that left its session, too: nothing of the
    // attempt may run on next to its retry.
    wait_for("the job's processes to die with their runner", WAIT, || {
        let alive: Vec<i32> = pids1
            .iter()
            .copied()
            .filter(|p| process_alive(*p))
            .collect();
        async move { alive.is_empty().then_some(()) }
    })
    .await;

    // Runner B heartbeats every second; runner A has stopped. Moving the
    // clock to a few seconds before A's lease runs out makes it expire a
    // few real seconds from now, while B's renewals keep B's lease.
    mesh.advance_clock(LEASE_TTL - 5);
    let lost = wait_job(&mesh, &job.id, "attempt 1 to be marked lost", WAIT, |j| {
        j.attempts.first().map(|a| a.state) == Some(AttemptState::Lost as i32)
    })
    .await;
    assert_ne!(
        lost.state,
        JobState::Failed as i32,
        "a lost runner is retried: {lost:#?}"
    );
    // Past any retry backoff (still well inside B's lease).
    mesh.advance_clock(15);

    let done = wait_state(&mesh, &job.id, JobState::Succeeded, Duration::from_secs(40)).await;
    assert_eq!(done.attempts.len(), 2, "{:#?}", done.attempts);
    let (a1, a2) = (&done.attempts[0], &done.attempts[1]);
    assert_eq!(a1.state, AttemptState::Lost as i32, "{a1:#?}");
    assert_eq!(a1.runner_id, runner_a);
    assert_eq!(a2.number, 2);
    assert_eq!(a2.state, AttemptState::Succeeded as i32, "{a2:#?}");
    assert_eq!(a2.runner_id, runner_b, "attempt 2 ran on runner B");
    assert_eq!(a2.exit_code, Some(0));
    let end1 = from_timestamp(&a1.end_time.expect("attempt 1 end time"));
    let start2 = from_timestamp(&a2.start_time.expect("attempt 2 start time"));
    assert!(
        start2 >= end1,
        "attempt 2 started after attempt 1 ended (scheduler clock): {a1:#?} {a2:#?}"
    );
    let (dir2, _) = wait_mark(&marks, 2).await;
    assert!(
        Path::new(&dir2).starts_with(mesh.runner_work_dir("runner-b")),
        "attempt 2 ran on runner B: {dir2}"
    );
    assert!(!marks.join("attempt-3").exists(), "no third attempt ran");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_report_from_a_dead_runner_is_refused() {
    let mesh = Mesh::start_with(
        MeshOptions {
            no_runner: true,
            controllable_clock: true,
            ..Default::default()
        }
        .arg(
            "scheduler-service",
            &["--lease-ttl-secs", "10", "--heartbeat-interval-secs", "1"],
        ),
    )
    .await;
    let runner = FakeRunner::register(
        &mesh,
        "scheduler-service",
        "goes-silent",
        cpu_capacity(4.0, 8192),
    )
    .await;
    let job = submit(
        &mesh,
        ALICE_TOKEN,
        python_job("reported-late", "print('never runs')", &[]),
    )
    .await;
    let a = runner.next_assignment(WAIT).await;
    assert_eq!((a.job_id.as_str(), a.attempt), (job.id.as_str(), 1));
    runner.hold(&a.job_id, a.attempt);
    runner
        .report(&a.job_id, a.attempt, AttemptState::Running, None)
        .await
        .expect("RUNNING while the lease is live");
    wait_state(&mesh, &job.id, JobState::Running, WAIT).await;

    // The runner goes silent; a minute passes on the scheduler's clock.
    mesh.advance_clock(60);
    let before = wait_job(&mesh, &job.id, "attempt 1 to be marked lost", WAIT, |j| {
        j.attempts.first().map(|a| a.state) == Some(AttemptState::Lost as i32)
            && j.state != JobState::Running as i32
    })
    .await;

    let err = runner
        .report(&a.job_id, a.attempt, AttemptState::Succeeded, Some(0))
        .await
        .expect_err("a report after the lease expired");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let after = get_job(&mesh, &job.id).await;
    assert_eq!(after.state, before.state, "{after:#?}");
    assert_ne!(after.state, JobState::Succeeded as i32);
    assert_eq!(after.attempts.len(), before.attempts.len());
    assert_eq!(after.attempts[0].state, AttemptState::Lost as i32);
    assert_eq!(
        after.attempts[0].exit_code, None,
        "{:#?}",
        after.attempts[0]
    );
    let queue = mesh
        .scheduler(ADMIN_TOKEN)
        .get_queue(GetQueueRequest::default())
        .await
        .expect("get queue")
        .into_inner();
    assert!(
        queue.entries.iter().any(|e| e.job_id == job.id),
        "the scheduler still has the job waiting for its retry: {queue:#?}"
    );

    let err = runner
        .heartbeat()
        .await
        .expect_err("a heartbeat after the lease expired");
    assert_eq!(
        err.code(),
        Code::NotFound,
        "the runner must register again: {err:?}"
    );
    mesh.stop().await;
}
