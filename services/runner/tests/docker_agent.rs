//! The runner on its docker backend against the in-test scheduler,
//! job-service and metrics-service: attempts run as containers of the real
//! engine, and their logs, metrics and errors arrive as with any backend.
//! Skipped only when no engine answers (failing in CI).

mod support;

use runner::{BackendKind, GpuSetting};
use support::docker::{containers_of, engine, ensure_test_image, Cleanup, TEST_IMAGE};
use support::*;
use trainmesh_common::proto::job::v1::{AttemptState, Resources};
use trainmesh_common::proto::runner::v1::Assignment;

fn docker_config(endpoint: &str, work: &std::path::Path) -> runner::Config {
    let mut c = config(endpoint, work);
    c.backend = BackendKind::Docker;
    c.gpus = GpuSetting::Count(0);
    c
}

fn container_assignment(argv: &[&str], memory_mib: i64) -> Assignment {
    let mut a = assignment(argv);
    let spec = a.spec.as_mut().unwrap();
    spec.image = TEST_IMAGE.into();
    spec.resources = Some(Resources {
        memory_mib,
        ..Resources::default()
    });
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_in_a_container_ships_its_logs_and_metrics_and_succeeds() {
    let Some(docker) = engine().await else { return };
    ensure_test_image(&docker).await;
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| docker_config(&endpoint, w));
    let script = r#"echo "attempt=$TRAINMESH_ATTEMPT cid=$TRAINMESH_CORRELATION_ID"
echo '{"step":1,"loss":0.5}' >> "$TRAINMESH_METRICS_FILE"
printf '{"step":2,"loss":0.25}\n' >> "$TRAINMESH_METRICS_FILE"
echo bye >&2"#;
    let a = container_assignment(&["/bin/sh", "-c", script], 64);
    let (job_id, cid) = (a.job_id.clone(), a.correlation_id.clone());
    let _cleanup = Cleanup {
        job_id: job_id.clone(),
    };
    m.fake.assign(a);

    let last = m.fake.final_report(&job_id).await;
    assert_eq!(
        states(&m.fake.reports(&job_id)),
        [AttemptState::Running, AttemptState::Succeeded]
    );
    assert_eq!(last.exit_code, Some(0));
    assert!(last.error.is_none(), "{:?}", last.error);
    let texts: Vec<String> = m
        .fake
        .log_lines(&job_id)
        .into_iter()
        .map(|l| l.text)
        .collect();
    // The engine copies a container's stdout and stderr separately: the
    // order across the two streams is not kept, only each stream's own.
    let mut texts = texts;
    texts.sort();
    assert_eq!(texts, [format!("attempt=1 cid={cid}"), "bye".to_owned()]);
    assert_eq!(
        m.fake.metrics(&job_id),
        [r#"{"step":1,"loss":0.5}"#, r#"{"step":2,"loss":0.25}"#]
    );
    // Succeeded: removed at once.
    assert!(containers_of(&docker, &job_id).await.is_empty());
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_over_its_memory_limit_fails_as_oom_killed() {
    let Some(docker) = engine().await else { return };
    ensure_test_image(&docker).await;
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| docker_config(&endpoint, w));
    // `tail -n 1` of a stream without newlines holds it all in memory.
    let a = container_assignment(&["/bin/busybox", "tail", "-n", "1", "/dev/zero"], 8);
    let job_id = a.job_id.clone();
    let _cleanup = Cleanup {
        job_id: job_id.clone(),
    };
    m.fake.assign(a);

    let last = m.fake.final_report(&job_id).await;
    assert_eq!(last.state, AttemptState::Failed as i32);
    assert_eq!(last.exit_code, Some(137));
    let error = last.error.expect("a structured error");
    assert_eq!(error.r#type, "OOMKilled");
    assert_eq!(error.category, "oom-killed");
    assert!(
        error.message.contains("memory limit of 8 MiB"),
        "{}",
        error.message
    );
    // Failed: kept for inspection (the Cleanup guard removes it).
    assert_eq!(containers_of(&docker, &job_id).await.len(), 1);
    runner.shutdown().await.unwrap();
}
