//! A runner with the docker backend, as a real process against the real
//! engine: when it is killed with SIGKILL, its containers do not run on
//! (they would run next to the attempt the scheduler retries elsewhere).

use std::time::Duration;

use trainmesh_common::testing::wait_for;
use trainmesh_proto::job::v1::{JobSpec, JobState};
use trainmesh_tests::docker::{engine, ensure_test_image, Cleanup, TEST_IMAGE};
use trainmesh_tests::jobs::{submit, wait_state};
use trainmesh_tests::{Mesh, MeshOptions, ALICE_TOKEN};

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runner_takes_its_containers_down() {
    let Some(docker) = engine().await else {
        return;
    };
    ensure_test_image(&docker).await;
    let mut mesh = Mesh::start_with(MeshOptions {
        no_runner: true,
        ..Default::default()
    })
    .await;
    mesh.start_runner("docker-runner", &["--backend", "docker"])
        .await;
    let job = submit(
        &mesh,
        ALICE_TOKEN,
        JobSpec {
            name: "outlive-me".into(),
            image: TEST_IMAGE.into(),
            command: vec!["/bin/busybox".into(), "sleep".into(), "1000".into()],
            ..Default::default()
        },
    )
    .await;
    let _cleanup = Cleanup {
        job_id: job.id.clone(),
    };
    wait_state(&mesh, &job.id, JobState::Running, DEADLINE).await;
    let name = format!("trainmesh-{}-1", job.id);
    let running = || async {
        docker
            .inspect_container(&name, None)
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|s| s.running)
            .unwrap_or(false)
    };
    wait_for("the job's container to run", DEADLINE, || async {
        running().await.then_some(())
    })
    .await;

    mesh.kill("docker-runner").await;
    wait_for(
        "the container to be killed with its runner",
        DEADLINE,
        || async { (!running().await).then_some(()) },
    )
    .await;
    mesh.stop().await;
}
