//! A runner that is stopped drains: it tells the scheduler first (listing
//! what it runs), then lets its attempts end (`--on-stop wait`, up to the
//! drain timeout) or hands them back (`handback`), and deregisters last.
//! A handed-back attempt is reported FAILED in the `runner-shutdown`
//! category, never CANCELLED. Against the in-test scheduler of `support`.

mod support;

use std::time::Duration;

use runner::OnStop;
use support::*;
use trainmesh_common::proto::job::v1::AttemptState;
use trainmesh_common::testing::wait_for;

/// Runs until the file `go` appears in its attempt directory.
const WAITS_FOR_GO: &str =
    r#"echo up; while [ ! -e "$TRAINMESH_OUTPUT_DIR/go" ]; do sleep 0.02; done; echo finished"#;

fn position(calls: &[Call], pred: impl Fn(&Call) -> bool) -> usize {
    index_of(calls, pred)
}

fn is_drain(c: &Call) -> bool {
    matches!(c, Call::Drain(_))
}

fn is_deregister(c: &Call) -> bool {
    matches!(c, Call::Deregister(_))
}

fn is_final_report(c: &Call, job_id: &str) -> bool {
    matches!(c, Call::Report(r, _) if r.job_id == job_id && r.state != AttemptState::Running as i32)
}

/// A runner stopping with `on_stop` after `drain_timeout`, running one
/// attempt that ends only when told to.
async fn running_attempt(on_stop: OnStop, drain_timeout: Duration) -> (Mesh, Runner, String) {
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| {
        let mut c = config(&endpoint, w);
        c.on_stop = on_stop;
        c.drain_timeout = drain_timeout;
        c
    });
    let a = assignment(&["/bin/sh", "-c", WAITS_FOR_GO]);
    let job_id = a.job_id.clone();
    m.fake.assign(a);
    wait_running(&m, &job_id).await;
    (m, runner, job_id)
}

/// The scheduler heard the drain, then the job's final report, then the
/// deregistration; returns the deregistration's index in `calls`.
fn assert_drain_report_deregister(calls: &[Call], job_id: &str) -> usize {
    let drained = position(calls, is_drain);
    let reported = position(calls, |c| is_final_report(c, job_id));
    let deregistered = position(calls, is_deregister);
    assert!(drained < reported && reported < deregistered, "{calls:#?}");
    deregistered
}

async fn wait_running(m: &Mesh, job_id: &str) {
    wait_for("the attempt to run", WAIT, || async {
        m.fake
            .log_lines(job_id)
            .iter()
            .any(|l| l.text == "up")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_stop_wait_lets_a_running_attempt_finish() {
    let (m, mut runner, job_id) = running_attempt(OnStop::Wait, Duration::from_secs(60)).await;
    let dir = runner.work.path().join(&job_id).join("1");

    runner.begin_stop();
    // The scheduler hears first, with the attempt listed as still running.
    let drain = wait_for("the drain call", WAIT, || async {
        m.fake.calls().into_iter().find_map(|c| match c {
            Call::Drain(d) => Some(d),
            _ => None,
        })
    })
    .await;
    assert_eq!(drain.runner_id, "runner-1");
    assert_eq!(drain.active.len(), 1);
    assert_eq!(drain.active[0].job_id, job_id);
    // Still running while the runner waits: the job decides when it ends.
    assert_eq!(m.fake.reports(&job_id).len(), 1, "only RUNNING so far");
    std::fs::write(dir.join("go"), "").unwrap();
    runner.stopped().await.unwrap();

    let reports = m.fake.reports(&job_id);
    assert_eq!(
        states(&reports),
        [AttemptState::Running, AttemptState::Succeeded]
    );
    let calls = m.fake.calls();
    assert_drain_report_deregister(&calls, &job_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_still_running_when_the_drain_timeout_ends_are_handed_back() {
    let (m, mut runner, job_id) = running_attempt(OnStop::Wait, Duration::from_millis(300)).await;
    runner.begin_stop();
    runner.stopped().await.unwrap();

    let reports = m.fake.reports(&job_id);
    assert_eq!(
        states(&reports),
        [AttemptState::Running, AttemptState::Failed],
        "handed back, never cancelled"
    );
    let err = reports[1].error.clone().unwrap();
    assert_eq!(err.category, "runner-shutdown");
    assert_eq!(err.r#type, "RunnerShutdown");
    assert!(err.retryable);
    assert_eq!(reports[1].exit_code, Some(143), "stopped with SIGTERM");
    assert!(!m
        .fake
        .log_lines(&job_id)
        .iter()
        .any(|l| l.text == "finished"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_stop_handback_hands_attempts_back_at_once_and_deregisters() {
    // Were the drain timeout waited for, the test would time out.
    let (m, mut runner, job_id) =
        running_attempt(OnStop::Handback, Duration::from_secs(3600)).await;
    runner.begin_stop();
    runner.stopped().await.unwrap();

    let reports = m.fake.reports(&job_id);
    assert_eq!(
        states(&reports),
        [AttemptState::Running, AttemptState::Failed]
    );
    assert_eq!(
        reports[1].error.as_ref().unwrap().category,
        "runner-shutdown"
    );
    let calls = m.fake.calls();
    let deregistered = assert_drain_report_deregister(&calls, &job_id);
    let Call::Deregister(d) = &calls[deregistered] else {
        unreachable!()
    };
    assert_eq!(d.runner_id, "runner-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_runner_with_nothing_running_drains_and_leaves_at_once() {
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| config(&endpoint, w));
    wait_for("registration", WAIT, || async {
        (m.fake.with(|s| s.registrations) >= 1).then_some(())
    })
    .await;
    runner.shutdown().await.unwrap();
    let calls = m.fake.calls();
    let drained = position(&calls, is_drain);
    let Call::Drain(d) = &calls[drained] else {
        unreachable!()
    };
    assert!(d.active.is_empty());
    assert!(position(&calls, is_deregister) > drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_stopped_while_registering_still_drains_and_deregisters() {
    let m = mesh().await;
    let hold = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    m.fake.with(|s| s.hold_registration = Some(hold.clone()));
    let endpoint = m.addr.to_string();
    let mut runner = Runner::start(|w| config(&endpoint, w));
    wait_for("the registration call", WAIT, || async {
        (m.fake.with(|s| s.registrations) >= 1).then_some(())
    })
    .await;
    // The scheduler holds the registration; the runner is stopped before
    // it hears back, then the answer arrives.
    runner.begin_stop();
    hold.add_permits(1);
    runner.stopped().await.unwrap();
    let calls = m.fake.calls();
    let drained = position(&calls, is_drain);
    assert!(position(&calls, is_deregister) > drained);
}
