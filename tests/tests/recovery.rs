//! How fast the mesh catches up after a peer was down: job-service's
//! outbox probes an unreachable scheduler at short intervals and sends its
//! whole backlog the moment it answers, instead of each message waiting
//! out a backoff of its own that grew during the outage.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use trainmesh_common::client::channel;
use trainmesh_common::testing::wait_for;
use trainmesh_proto::job::v1::JobSpec;
use trainmesh_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use trainmesh_proto::scheduler::v1::GetQueueRequest;
use trainmesh_tests::jobs::submit;
use trainmesh_tests::{Mesh, MeshOptions, ADMIN_TOKEN, ALICE_TOKEN};

/// Long enough for per-message backoff (doubling from 100 ms) to have
/// grown past 10 s; the outage is the scenario, not a wait for something.
const OUTAGE: Duration = Duration::from_secs(20);
const JOBS: usize = 50;
/// The target is 1 s; the bound leaves room for a slow, shared machine and
/// still fails for a backlog that waits out per-message backoff.
const BOUND: Duration = Duration::from_secs(5);

async fn queued(mesh: &Mesh) -> Option<BTreeSet<String>> {
    let ch = channel(&mesh.endpoint("scheduler-service"), Some(ADMIN_TOKEN)).ok()?;
    let resp = SchedulerServiceClient::new(ch)
        .get_queue(GetQueueRequest {
            page_size: 500,
            ..Default::default()
        })
        .await
        .ok()?;
    Some(
        resp.into_inner()
            .entries
            .into_iter()
            .map(|e| e.job_id)
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_submitted_during_a_scheduler_outage_reach_it_right_after_it_returns() {
    let mut mesh = Mesh::start_with(MeshOptions {
        no_runner: true,
        ..Default::default()
    })
    .await;
    mesh.stop_instance("scheduler-service").await;
    let down = Instant::now();
    let mut ids = BTreeSet::new();
    for i in 0..JOBS {
        let job = submit(
            &mesh,
            ALICE_TOKEN,
            JobSpec {
                name: format!("during-outage-{i}"),
                image: "busybox".into(),
                command: vec!["true".into()],
                ..Default::default()
            },
        )
        .await;
        ids.insert(job.id);
    }
    if let Some(rest) = OUTAGE.checked_sub(down.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let restart = Instant::now();
    mesh.start_instance("scheduler-service").await;
    let healthy = restart.elapsed();
    wait_for(
        "every job submitted during the outage to be queued",
        Duration::from_secs(60),
        || async { (queued(&mesh).await? == ids).then_some(()) },
    )
    .await;
    let caught_up = restart.elapsed();
    eprintln!(
        "scheduler down {:.1} s with {JOBS} jobs waiting: healthy {} ms after its restart, \
         all {JOBS} queued {} ms after it ({} ms after health)",
        OUTAGE.as_secs_f64(),
        healthy.as_millis(),
        caught_up.as_millis(),
        (caught_up - healthy).as_millis()
    );
    assert!(
        caught_up - healthy <= BOUND,
        "the backlog took {caught_up:?} after the restart ({healthy:?} to healthy)"
    );
    mesh.stop().await;
}
