//! A real service's log file (`TRAINMESH_LOG_FILE`) rotates at
//! `TRAINMESH_LOG_MAX_BYTES` and keeps `TRAINMESH_LOG_KEEP` older files.

use std::path::PathBuf;
use std::time::Duration;

use trainmesh_common::testing::wait_for;
use trainmesh_proto::metrics::v1::{MetricPoint, WriteMetricsRequest};
use trainmesh_tests::{Mesh, MeshOptions, ADMIN_TOKEN};

const MAX_BYTES: u64 = 4096;

#[tokio::test]
async fn a_service_log_rotates_at_its_size_and_keeps_that_many_files() {
    let env = [
        ("TRAINMESH_LOG_MAX_BYTES", MAX_BYTES.to_string()),
        ("TRAINMESH_LOG_KEEP", "2".to_string()),
        ("TRAINMESH_LOG_LEVEL", "debug".to_string()),
    ];
    let opts = MeshOptions {
        no_runner: true,
        extra_env: vec![(
            "metrics-service".into(),
            env.iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )],
        ..Default::default()
    };
    let mesh = Mesh::start_with(opts).await;
    let log = mesh.log_path("metrics-service");
    let files = [
        log.clone(),
        PathBuf::from(format!("{}.1", log.display())),
        PathBuf::from(format!("{}.2", log.display())),
    ];
    let third = PathBuf::from(format!("{}.3", log.display()));
    let text = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();

    // Each write logs a few lines; write until the file that held the
    // service's first lines has been rotated out of the kept ones.
    let metrics = mesh.metrics(ADMIN_TOKEN);
    let job = uuid::Uuid::new_v4().to_string();
    let mut step = 0i64;
    wait_for(
        "the first log file to be rotated away",
        Duration::from_secs(90),
        || {
            step += 1;
            let mut metrics = metrics.clone();
            let req = WriteMetricsRequest {
                attempt: 0,
                job_id: job.clone(),
                points: vec![MetricPoint {
                    key: "loss".into(),
                    step,
                    value: 1.0,
                    ..Default::default()
                }],
                json_records: vec![],
            };
            let rotated_away = files[2].exists()
                && !files
                    .iter()
                    .any(|p| text(p).contains(r#""message":"serving""#));
            async move {
                metrics.write_metrics(req).await.expect("write metrics");
                rotated_away.then_some(())
            }
        },
    )
    .await;

    // The service writes its log on a thread of its own: let it finish the
    // lines of the last call before looking.
    let sizes = || {
        files
            .iter()
            .chain([&third])
            .map(|p| std::fs::metadata(p).map(|m| m.len()).ok())
            .collect::<Vec<_>>()
    };
    let mut last = None;
    wait_for("the log files to settle", Duration::from_secs(30), || {
        let now = sizes();
        let settled = last.as_ref() == Some(&now);
        last = Some(now);
        async move { settled.then_some(()) }
    })
    .await;

    assert!(!third.exists(), "only two rotated files are kept");
    for p in &files {
        let body = text(p);
        let len = body.len() as u64;
        assert!(
            len > 0 && len <= MAX_BYTES,
            "{} is {len} bytes",
            p.display()
        );
        for line in body.lines() {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{}: a whole JSON line: {e}: {line}", p.display()));
        }
    }
    mesh.stop().await;
}
