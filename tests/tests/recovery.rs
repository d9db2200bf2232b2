//! The mesh catches up after a peer was down: job-service's outbox probes
//! an unreachable scheduler at short intervals and sends its whole backlog
//! the moment it answers. (The benchmark's `recovery` scenario measures it
//! after a 20 s outage.)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use trainmesh_common::testing::wait_for;
use trainmesh_proto::job::v1::JobSpec;
use trainmesh_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use trainmesh_proto::scheduler::v1::GetQueueRequest;
use trainmesh_tests::jobs::submit;
use trainmesh_tests::{Mesh, MeshOptions, ADMIN_TOKEN, ALICE_TOKEN};

const JOBS: usize = 50;
/// The target is 1 s; the bound leaves room for a slow, shared machine.
const BOUND: Duration = Duration::from_secs(5);

async fn queued(mesh: &Mesh) -> Option<BTreeSet<String>> {
    let ch = mesh.endpoint_channel("scheduler-service", Some(ADMIN_TOKEN));
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
    // The outage lasts until job-service has found the scheduler down.
    wait_for(
        "job-service to find the scheduler unreachable",
        Duration::from_secs(30),
        || {
            let log = mesh.log_text("job-service");
            async move {
                log.lines()
                    .any(|l| {
                        l.contains("outbox destination unreachable")
                            && l.contains("scheduler-service")
                    })
                    .then_some(())
            }
        },
    )
    .await;
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
        "{JOBS} jobs waiting: scheduler healthy {} ms after its restart, \
         all {JOBS} queued {} ms after it ({} ms after health)",
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
