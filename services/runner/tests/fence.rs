//! A runner cut off from the scheduler fences itself: its attempts are
//! dead before the scheduler could declare them lost and run them
//! elsewhere, are reported FAILED (`runner-lost`) and never SUCCEEDED, and
//! a refused report is not retried. Once the scheduler answers again the
//! runner registers anew and takes work. Against the in-test scheduler of
//! `support`, with the process backend.

mod support;

use std::time::{Duration, Instant};

use support::*;
use trainmesh_common::proto::job::v1::AttemptState;
use trainmesh_common::testing::wait_for;

/// Short, so the test is; the fence is a fraction of it (2/3, kill by 5/6).
const TTL: Duration = Duration::from_secs(6);

/// Ignores SIGTERM, like a job busy in native code: only SIGKILL ends it.
const STUBBORN: &str = r#"trap '' TERM; echo "pid $$"; echo up; while true; do sleep 0.05; done"#;
/// Exits 0 on SIGTERM, like a job that saves a checkpoint and ends.
const POLITE: &str =
    r#"trap 'echo saved; exit 0' TERM; echo "pid $$"; echo up; while true; do sleep 0.05; done"#;

/// An attempt of `script` whose own grace is far beyond the lease.
fn long_grace(script: &str) -> trainmesh_common::proto::runner::v1::Assignment {
    let mut a = assignment(&["/bin/sh", "-c", script]);
    a.spec.as_mut().unwrap().termination_grace = Some(prost_types::Duration {
        seconds: 600,
        nanos: 0,
    });
    a
}

/// Waits until the attempt runs and the scheduler has its RUNNING report.
async fn running(m: &Mesh, job_id: &str) -> i32 {
    let pid = printed_pid(&m.fake, job_id).await;
    wait_for("the RUNNING report", WAIT, || async {
        (!m.fake.reports(job_id).is_empty()).then_some(())
    })
    .await;
    pid
}

fn registrations(m: &Mesh) -> u32 {
    m.fake.with(|s| s.registrations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_runner_kills_its_attempts_before_the_lease_expires_then_takes_work_again() {
    let m = mesh().await;
    m.fake.with(|s| s.lease_ttl = Some(TTL));
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| config(&endpoint, w));
    let stubborn = long_grace(STUBBORN);
    let polite = long_grace(POLITE);
    let (stubborn_id, polite_id) = (stubborn.job_id.clone(), polite.job_id.clone());
    m.fake.assign(stubborn);
    m.fake.assign(polite);
    let stubborn_pid = running(&m, &stubborn_id).await;
    let polite_pid = running(&m, &polite_id).await;

    // The last heartbeat the scheduler got came before this moment: it
    // could declare the runner lost from `cut + TTL` on.
    let cut = Instant::now();
    m.fake.with(|s| s.partitioned = true);
    wait_for("both attempts to be killed", TTL, || async {
        (!alive(stubborn_pid) && !alive(polite_pid)).then_some(())
    })
    .await;
    let took = cut.elapsed();
    assert!(took < TTL, "killed {took:?} after the cut, lease {TTL:?}");
    // Not on the first missed heartbeat: the fence is at 2/3 of the TTL
    // after the last heartbeat that got through.
    assert!(took > TTL / 2, "killed only {took:?} after the cut");

    // The scheduler answers again, having let the lease go.
    m.fake.with(|s| {
        s.partitioned = false;
        s.lost_runners.push("runner-1".into());
    });
    for (job_id, exit_code) in [(&stubborn_id, 137), (&polite_id, 0)] {
        let last = m.fake.final_report(job_id).await;
        assert_eq!(last.state, AttemptState::Failed as i32, "{job_id}");
        assert_eq!(last.exit_code, Some(exit_code), "{job_id}");
        let err = last.error.unwrap();
        assert_eq!(err.category, "runner-lost");
        assert_eq!(err.r#type, "RunnerLeaseLost");
        assert!(err.retryable);
    }
    takes_work_again(&m).await;
    runner.shutdown().await.unwrap();

    // Each refused final report was sent once, never retried.
    for job_id in [&stubborn_id, &polite_id] {
        assert_eq!(
            states(&m.fake.reports(job_id)),
            [AttemptState::Running, AttemptState::Failed],
            "{job_id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_that_no_longer_knows_the_runner_fences_it_at_once() {
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| config(&endpoint, w));
    let a = long_grace(STUBBORN);
    let job_id = a.job_id.clone();
    m.fake.assign(a);
    let pid = running(&m, &job_id).await;

    // Heartbeats kept going: only the scheduler's word says the lease is
    // gone. The 15 s lease would fence at 10 s; this is at once.
    m.fake.with(|s| s.lost_runners.push("runner-1".into()));
    wait_for(
        "the attempt to be killed",
        Duration::from_secs(5),
        || async { (!alive(pid)).then_some(()) },
    )
    .await;
    let last = m.fake.final_report(&job_id).await;
    assert_eq!(last.state, AttemptState::Failed as i32);
    assert_eq!(last.error.unwrap().category, "runner-lost");
    takes_work_again(&m).await;
    runner.shutdown().await.unwrap();
}

/// The fenced runner registers again (as runner-2) and runs new work.
async fn takes_work_again(m: &Mesh) {
    wait_for("a new registration", WAIT, || async {
        (registrations(m) >= 2).then_some(())
    })
    .await;
    let again = assignment(&["/bin/sh", "-c", "echo again"]);
    let again_id = again.job_id.clone();
    m.fake.assign(again);
    let last = m.fake.final_report(&again_id).await;
    assert_eq!(last.state, AttemptState::Succeeded as i32);
    assert_eq!(last.runner_id, "runner-2");
}
