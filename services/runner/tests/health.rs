//! The runner's health port (grpc.health.v1, service ""): NOT_SERVING
//! until the runner is registered, SERVING while its heartbeats get
//! through, NOT_SERVING while the scheduler cannot be reached and SERVING
//! again when it can, NOT_SERVING from the moment the runner drains.
//! Against the in-test scheduler of `support`, with the process backend
//! (which is always reachable).

mod support;

use std::sync::Arc;
use std::time::Duration;

use runner::OnStop;
use support::*;
use tonic_health::ServingStatus::{NotServing, Serving};
use trainmesh_common::testing::wait_for;

/// Runs until the file `go` appears in its attempt directory.
const WAITS_FOR_GO: &str =
    r#"echo up; while [ ! -e "$TRAINMESH_OUTPUT_DIR/go" ]; do sleep 0.02; done; echo finished"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_registration_the_scheduler_and_the_drain() {
    let m = mesh().await;
    let hold = Arc::new(tokio::sync::Semaphore::new(0));
    m.fake.with(|s| s.hold_registration = Some(hold.clone()));
    let endpoint = m.addr.to_string();
    let (mut runner, addr) = Runner::start_with_health(|w| {
        let mut c = config(&endpoint, w);
        c.on_stop = OnStop::Wait;
        c.drain_timeout = Duration::from_secs(60);
        c
    })
    .await;

    // The registration call is in flight, held by the scheduler.
    wait_for("the registration call", WAIT, || async {
        (m.fake.with(|s| s.registrations) >= 1).then_some(())
    })
    .await;
    let before = wait_for("the health port to answer", WAIT, || health(addr)).await;
    assert_eq!(before, NotServing, "not registered yet");

    hold.add_permits(1);
    wait_health(addr, Serving, WAIT).await;

    // At the first failed heartbeat (they go every 50 ms), well before the
    // 15 s lease would fence the runner at 10 s.
    m.fake.with(|s| s.partitioned = true);
    wait_health(addr, NotServing, Duration::from_secs(5)).await;
    m.fake.with(|s| s.partitioned = false);
    wait_health(addr, Serving, Duration::from_secs(5)).await;

    // Draining with an attempt that runs on: not serving all along.
    let a = assignment(&["/bin/sh", "-c", WAITS_FOR_GO]);
    let job_id = a.job_id.clone();
    let dir = runner.work.path().join(&job_id).join("1");
    m.fake.assign(a);
    wait_for("the attempt to run", WAIT, || async {
        m.fake
            .log_lines(&job_id)
            .iter()
            .any(|l| l.text == "up")
            .then_some(())
    })
    .await;
    assert_eq!(health(addr).await, Some(Serving));
    runner.begin_stop();
    wait_health(addr, NotServing, WAIT).await;
    wait_for("the drain call", WAIT, || async {
        m.fake
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Drain(_)))
            .then_some(())
    })
    .await;
    // Heartbeats still succeed while it drains; health stays down.
    let heartbeats = || {
        m.fake
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Heartbeat(_)))
            .count()
    };
    let seen = heartbeats();
    wait_for("a heartbeat while draining", WAIT, || async {
        (heartbeats() > seen).then_some(())
    })
    .await;
    assert_eq!(health(addr).await, Some(NotServing));

    std::fs::write(dir.join("go"), "").unwrap();
    runner.stopped().await.unwrap();
    // The port closes with the runner.
    assert_eq!(health(addr).await, None);
}
