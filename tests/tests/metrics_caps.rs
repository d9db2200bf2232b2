//! A job past metrics-service's per-job caps, through a real runner: the
//! points of keys the job already has keep arriving past the key cap, the
//! job's own outcome is untouched, and past the points cap the runner stops
//! sending instead of retrying a refused batch for ever.

use std::collections::BTreeMap;
use std::time::Duration;

use trainmesh_common::testing::wait_for;
use trainmesh_proto::job::v1::JobState;
use trainmesh_proto::metrics::v1::QueryMetricsRequest;
use trainmesh_tests::jobs::{python_job, submit, wait_state};
use trainmesh_tests::{Mesh, MeshOptions, ADMIN_TOKEN, ALICE_TOKEN};

const DEADLINE: Duration = Duration::from_secs(60);

/// Points stored per key.
async fn stored(mesh: &Mesh, job_id: &str) -> BTreeMap<String, Vec<i64>> {
    let resp = mesh
        .metrics(ADMIN_TOKEN)
        .query_metrics(QueryMetricsRequest {
            job_id: job_id.into(),
            max_points: 1000,
            ..Default::default()
        })
        .await
        .expect("query metrics")
        .into_inner();
    resp.series
        .into_iter()
        .map(|s| (s.key, s.points.iter().map(|p| p.step).collect()))
        .collect()
}

/// A job that writes `records` (Python expressions of dicts, one per line)
/// to its metrics file.
fn metrics_job(name: &str, records: &str) -> trainmesh_proto::job::v1::JobSpec {
    let code = format!(
        "import json, os\n\
         with open(os.environ['TRAINMESH_METRICS_FILE'], 'a') as f:\n\
         \x20   for r in {records}:\n\
         \x20       f.write(json.dumps(r) + '\\n')\n"
    );
    python_job(name, &code, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_key_cap_points_of_known_keys_still_arrive() {
    let mesh = Mesh::start_with(
        MeshOptions::default().arg("metrics-service", &["--max-keys-per-job", "3"]),
    )
    .await;
    let records = "[{'step': i, 'a': i, 'b': i, 'c': i} for i in range(10)] \
                   + [{'step': i, 'd': i} for i in range(10, 20)] \
                   + [{'step': i, 'a': i} for i in range(20, 30)]";
    let job = submit(&mesh, ALICE_TOKEN, metrics_job("key-cap", records)).await;
    wait_state(&mesh, &job.id, JobState::Succeeded, DEADLINE).await;
    let want_a: Vec<i64> = (0..10).chain(20..30).collect();
    let got = wait_for("every point of key `a`", DEADLINE, || async {
        let s = stored(&mesh, &job.id).await;
        (s.get("a") == Some(&want_a)).then_some(s)
    })
    .await;
    assert_eq!(got.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(got["b"], (0..10).collect::<Vec<i64>>());
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_points_cap_the_runner_stops_sending() {
    let mesh = Mesh::start_with(
        MeshOptions::default().arg("metrics-service", &["--max-points-per-job", "50"]),
    )
    .await;
    let job = submit(
        &mesh,
        ALICE_TOKEN,
        metrics_job(
            "points-cap",
            "[{'step': i, 'loss': 1.0 / (i + 1)} for i in range(400)]",
        ),
    )
    .await;
    wait_state(&mesh, &job.id, JobState::Succeeded, DEADLINE).await;
    wait_for(
        "the runner to give up on the capped job",
        DEADLINE,
        || async {
            mesh.log_text("runner")
                .contains("the job is past its metrics cap; metrics shipping stops")
                .then_some(())
        },
    )
    .await;
    let got = stored(&mesh, &job.id).await;
    assert_eq!(got["loss"], (0..50).collect::<Vec<i64>>());
    mesh.stop().await;
}
