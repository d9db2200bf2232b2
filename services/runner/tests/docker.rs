//! The docker backend against the real Docker Engine of this machine, with
//! a busybox image built by the tests. Skipped only when no engine answers
//! (and then failing in CI). Workloads are built with busybox `sh` here;
//! the product itself never builds shell strings.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use runner::backend::docker::{reaper, DockerBackend};
use runner::backend::{Backend, LaunchRequest, Workload};
use runner::config::{DockerSettings, PullPolicy};
use runner::domain::{AttemptKey, JobId, ResourceLimits, Termination};
use runner::error::Error;
use runner::inventory::fake_gpus;
use runner::logs::{LogLimits, LogWriter};
use support::docker::{containers_of, engine, ensure_test_image, Cleanup, TEST_IMAGE};
use trainmesh_common::testing::wait_for;

const WAIT: Duration = Duration::from_secs(60);

type Finished = (
    Termination,
    Vec<String>,
    Box<dyn Workload>,
    tempfile::TempDir,
);

/// One attempt on the backend: its directory, log and workload.
struct Run {
    dir: tempfile::TempDir,
    writer: LogWriter,
    workload: Box<dyn Workload>,
}

impl Run {
    /// Waits for the end: how it ended, the whole log, the workload, and
    /// the directory (removed when dropped).
    async fn finish(mut self) -> Finished {
        let t = tokio::time::timeout(WAIT, self.workload.wait())
            .await
            .expect("the container ends in time")
            .unwrap();
        self.writer.finished().await;
        (t, self.log(), self.workload, self.dir)
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("output.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    async fn wait_for_line(&self, line: &str) {
        wait_for(&format!("the line `{line}`"), WAIT, || async {
            self.log().iter().any(|l| l == line).then_some(())
        })
        .await
    }
}

async fn backend(settings: DockerSettings) -> DockerBackend {
    DockerBackend::connect(settings, fake_gpus(2))
        .await
        .unwrap()
}

fn key() -> AttemptKey {
    AttemptKey {
        job_id: JobId::new(),
        attempt: 1,
    }
}

/// A request for `argv` in the test image, logging into a fresh directory.
async fn request(key: AttemptKey, argv: &[&str]) -> (LaunchRequest, tempfile::TempDir, LogWriter) {
    let dir = tempfile::tempdir().unwrap();
    let (sink, writer) = LogWriter::start(&dir.path().join("output.log"), LogLimits::default())
        .await
        .unwrap();
    let attempt_dir = std::fs::canonicalize(dir.path()).unwrap();
    let req = LaunchRequest {
        key,
        owner: "alice".into(),
        correlation_id: format!("cid-{}", key.job_id),
        command: argv.iter().map(|s| s.to_string()).collect(),
        image: TEST_IMAGE.into(),
        env: BTreeMap::from([("GREETING".to_owned(), "hello from $HOME".to_owned())]),
        working_dir: None,
        gpu_indexes: vec![],
        resources: ResourceLimits::default(),
        metrics_file: attempt_dir.join("metrics.jsonl"),
        attempt_dir,
        output: sink,
        details: Default::default(),
    };
    (req, dir, writer)
}

async fn launch(
    backend: &DockerBackend,
    req: LaunchRequest,
    dir: tempfile::TempDir,
    writer: LogWriter,
) -> Run {
    let workload = backend.launch(req).await.expect("launch");
    Run {
        dir,
        writer,
        workload,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_to_success_with_its_logs_and_metrics() {
    let Some(docker) = engine().await else { return };
    ensure_test_image(&docker).await;
    let backend = backend(DockerSettings::default()).await;
    let key = key();
    let _cleanup = Cleanup {
        job_id: key.job_id.to_string(),
    };
    let script = r#"echo "$GREETING"
echo oops >&2
echo '{"step":1,"loss":0.5}' >> "$TRAINMESH_METRICS_FILE"
printf 'no newline'"#;
    let (req, dir, writer) = request(key, &["/bin/sh", "-c", script]).await;
    let run = launch(&backend, req, dir, writer).await;
    assert!(run.workload.describe().contains(&key.job_id.to_string()));
    let (term, log, workload, dir) = run.finish().await;

    assert_eq!(term, Termination::Exited(0));
    assert!(workload.failure().is_none());
    // The spec's value reaches the job as given: no shell expanded it.
    assert!(log.contains(&"hello from $HOME".to_owned()), "{log:?}");
    assert!(log.contains(&"oops".to_owned()), "{log:?}");
    assert!(log.contains(&"no newline".to_owned()), "{log:?}");
    // Written in the container, read on the host: the attempt directory is
    // mounted at its own path.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap(),
        "{\"step\":1,\"loss\":0.5}\n"
    );
    // Succeeded containers are removed at once by default.
    assert!(containers_of(&docker, &key.job_id.to_string())
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_reports_its_exit_code_and_is_kept_until_reaped() {
    let Some(docker) = engine().await else { return };
    ensure_test_image(&docker).await;
    let backend = backend(DockerSettings::default()).await;
    let key = key();
    let job = key.job_id.to_string();
    let _cleanup = Cleanup {
        job_id: job.clone(),
    };
    let (req, dir, writer) = request(key, &["/bin/sh", "-c", "echo failing; exit 3"]).await;
    let (term, log, workload, _dir) = launch(&backend, req, dir, writer).await.finish().await;

    assert_eq!(term, Termination::Exited(3));
    assert_eq!(log, ["failing"]);
    // Nothing the engine knows beyond the exit code: the log classifies it.
    assert!(workload.failure().is_none());
    let je = runner::job_error::classify(term, &log.join("\n")).unwrap();
    assert_eq!((je.category.as_str(), je.exit_code), ("user-code", 3));

    // Kept for inspection, then removed once its keep time is over.
    assert_eq!(containers_of(&docker, &job).await.len(), 1);
    let policy = reaper::KeepPolicy {
        succeeded: Duration::ZERO,
        failed: Duration::from_secs(3600),
    };
    let label = format!("trainmesh.job={job}");
    let now = chrono::Utc::now();
    assert_eq!(
        reaper::sweep(&docker, &label, policy, now).await.unwrap(),
        0
    );
    let later = now + chrono::Duration::hours(2);
    assert_eq!(
        reaper::sweep(&docker, &label, policy, later).await.unwrap(),
        1
    );
    assert!(containers_of(&docker, &job).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_memory_limit_is_reported_oom_killed() {
    let Some(docker) = engine().await else { return };
    ensure_test_image(&docker).await;
    let backend = backend(DockerSettings {
        keep_failed: Duration::ZERO,
        ..DockerSettings::default()
    })
    .await;
    let key = key();
    let _cleanup = Cleanup {
        job_id: key.job_id.to_string(),
    };
    // `tail -n 1` keeps the current line in memory, and /dev/zero has no
    // newline: it grows until the limit kills it.
    let (mut req, dir, writer) =
        request(key, &["/bin/busybox", "tail", "-n", "1", "/dev/zero"]).await;
    req.resources.memory_mib = 8;
    let (term, _log, workload, _dir) = launch(&backend, req, dir, writer).await.finish().await;

    assert_eq!(term.exit_code(), 137);
    let je = workload
        .failure()
        .expect("the engine's OOMKilled is reported");
    assert_eq!(je.r#type, "OOMKilled");
    assert_eq!(je.category, "oom-killed");
    assert!(
        je.message.contains("exceeded its memory limit of 8 MiB"),
        "{}",
        je.message
    );
    // keep_failed zero: removed at once.
    assert!(containers_of(&docker, &key.job_id.to_string())
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sends_sigterm_and_kills_after_the_grace_period() {
    let Some(docker) = engine().await else { return };
    ensure_test_image(&docker).await;
    let backend = backend(DockerSettings::default()).await;

    // A job that handles SIGTERM ends on it.
    let polite = key();
    let _c1 = Cleanup {
        job_id: polite.job_id.to_string(),
    };
    let script = "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.1; done";
    let (req, dir, writer) = request(polite, &["/bin/sh", "-c", script]).await;
    let mut run = launch(&backend, req, dir, writer).await;
    run.wait_for_line("ready").await;
    let term = run.workload.stop(Duration::from_secs(20)).await.unwrap();
    assert_eq!(term, Termination::Exited(0));
    run.writer.finished().await;
    assert!(run.log().contains(&"got-term".to_owned()));

    // One that ignores it is killed once the grace period is over.
    let stubborn = key();
    let _c2 = Cleanup {
        job_id: stubborn.job_id.to_string(),
    };
    let script = "trap '' TERM; echo ready; while :; do sleep 0.1; done";
    let (req, dir, writer) = request(stubborn, &["/bin/sh", "-c", script]).await;
    let mut run = launch(&backend, req, dir, writer).await;
    run.wait_for_line("ready").await;
    let started = Instant::now();
    let term = run.workload.stop(Duration::from_secs(1)).await.unwrap();
    assert_eq!(term, Termination::Signaled(9));
    assert!(started.elapsed() >= Duration::from_secs(1));
    // Waiting again answers the same.
    assert_eq!(run.workload.wait().await.unwrap(), term);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_delivered_twice_runs_one_container() {
    let Some(docker) = engine().await else { return };
    ensure_test_image(&docker).await;
    // Kept after success, so a late delivery finds the finished container.
    let backend = backend(DockerSettings {
        keep_succeeded: Duration::from_secs(3600),
        ..DockerSettings::default()
    })
    .await;
    let key = key();
    let job = key.job_id.to_string();
    let _cleanup = Cleanup {
        job_id: job.clone(),
    };
    // Each run appends to `runs`; the job ends only when the test says so.
    let script = r#"echo run >> "$TRAINMESH_OUTPUT_DIR/runs"; echo started
while [ ! -e "$TRAINMESH_OUTPUT_DIR/go" ]; do sleep 0.05; done; echo done"#;
    let argv = ["/bin/sh", "-c", script];
    let (req1, dir, mut writer1) = request(key, &argv).await;
    let (mut req2, dir2, mut writer2) = request(key, &argv).await;
    // The same attempt: the same directory on the host.
    req2.attempt_dir = req1.attempt_dir.clone();
    req2.metrics_file = req1.metrics_file.clone();
    let attempt_dir = req1.attempt_dir.clone();

    let (a, b) = tokio::join!(backend.launch(req1), backend.launch(req2));
    let (mut a, mut b) = (a.expect("first delivery"), b.expect("second delivery"));
    assert_eq!(containers_of(&docker, &job).await.len(), 1);
    assert_eq!(a.describe(), b.describe());

    std::fs::write(attempt_dir.join("go"), "").unwrap();
    assert_eq!(a.wait().await.unwrap(), Termination::Exited(0));
    assert_eq!(b.wait().await.unwrap(), Termination::Exited(0));
    // Both followed the one container's whole output.
    drop((a, b));
    writer1.finished().await;
    writer2.finished().await;
    let log = |p: PathBuf| std::fs::read_to_string(p).unwrap();
    assert_eq!(log(dir.path().join("output.log")), "started\ndone\n");
    assert_eq!(log(dir2.path().join("output.log")), "started\ndone\n");

    // A delivery after the end collects the result instead of running again.
    let (req3, dir3, writer3) = request(key, &argv).await;
    let req3 = LaunchRequest {
        attempt_dir: attempt_dir.clone(),
        ..req3
    };
    let (term, log3, _, _dir3) = launch(&backend, req3, dir3, writer3).await.finish().await;
    assert_eq!(term, Termination::Exited(0));
    assert_eq!(log3, ["started", "done"]);
    assert_eq!(log(attempt_dir.join("runs")), "run\n");
    assert_eq!(containers_of(&docker, &job).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_on_an_engine_without_nvidia_runtime_are_a_setup_error() {
    let Some(docker) = engine().await else { return };
    ensure_test_image(&docker).await;
    let info = docker.info().await.unwrap();
    if info.runtimes.unwrap_or_default().contains_key("nvidia") {
        eprintln!(
            "SKIPPED: this engine has the NVIDIA runtime; the no-runtime error cannot be shown"
        );
        return;
    }
    let backend = backend(DockerSettings::default()).await;
    let key = key();
    let job = key.job_id.to_string();
    let _cleanup = Cleanup {
        job_id: job.clone(),
    };
    let (mut req, _dir, _writer) = request(key, &["/bin/true"]).await;
    req.gpu_indexes = vec![1];

    // The container the backend would create asks the engine for GPU 1.
    let spec = backend.spec(&req).unwrap();
    assert!(backend.create(&spec).await.unwrap());
    let created = docker.inspect_container(&spec.name, None).await.unwrap();
    let requests = created.host_config.unwrap().device_requests.unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].driver.as_deref(), Some("nvidia"));
    assert_eq!(requests[0].device_ids, Some(vec!["GPU-fake-1".to_owned()]));
    assert_eq!(requests[0].capabilities, Some(vec![vec!["gpu".to_owned()]]));
    // The engine refuses to start it, and says so in its own words: mapped.
    let e = backend.start(&spec.name, &spec.image).await.unwrap_err();
    assert!(matches!(e, Error::NoNvidiaRuntime { .. }), "{e:?}");
    docker.remove_container(&spec.name, None).await.unwrap();

    // A launch says it before creating anything.
    let e = backend
        .launch(req)
        .await
        .err()
        .expect("a GPU launch must fail");
    let je = e.to_job_error();
    assert_eq!(je.category, "setup");
    assert!(je.message.contains("no NVIDIA runtime"), "{}", je.message);
    assert!(je.hint.contains("nvidia-container-toolkit"), "{}", je.hint);
    assert!(containers_of(&docker, &job).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_an_image_pull_error_naming_it() {
    let Some(docker) = engine().await else { return };
    // A registry on a closed loopback port: the pull fails at once, with
    // no traffic leaving the machine.
    let image = format!(
        "127.0.0.1:1/trainmesh/missing:{}",
        uuid::Uuid::new_v4().simple()
    );
    for policy in [PullPolicy::IfNotPresent, PullPolicy::Never] {
        let backend = backend(DockerSettings {
            pull_policy: policy,
            ..DockerSettings::default()
        })
        .await;
        let key = key();
        let _cleanup = Cleanup {
            job_id: key.job_id.to_string(),
        };
        let (mut req, _dir, _writer) = request(key, &["/bin/true"]).await;
        req.image = image.clone();
        let e = backend
            .launch(req)
            .await
            .err()
            .expect("a missing image must fail");
        assert!(matches!(e, Error::ImagePull { .. }), "{e:?}");
        let je = e.to_job_error();
        assert_eq!(je.category, "image-pull");
        assert!(je.message.contains(&format!("`{image}`")), "{}", je.message);
        assert!(containers_of(&docker, &key.job_id.to_string())
            .await
            .is_empty());
        if policy == PullPolicy::Never {
            assert!(!je.retryable);
        }
    }
    assert!(docker.inspect_image(&image).await.is_err());
}

/// A runner killed outright leaves its containers running; its attempts
/// are retried elsewhere, so the runner stops them when it starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_runner_stops_the_containers_it_left_running() {
    let Some(docker) = engine().await else { return };
    ensure_test_image(&docker).await;
    let settings = DockerSettings {
        runner: format!("runner-{}", uuid::Uuid::new_v4()),
        ..DockerSettings::default()
    };
    let first = backend(settings.clone()).await;
    let key = key();
    let _cleanup = Cleanup {
        job_id: key.job_id.to_string(),
    };
    // Exits on SIGTERM (a shell as PID 1 would ignore it until the kill).
    let script = "trap 'exit 0' TERM; echo started; sleep 300 & wait";
    let (req, dir, writer) = request(key, &["/bin/sh", "-c", script]).await;
    let run = launch(&first, req, dir, writer).await;
    run.wait_for_line("started").await;
    // The runner dies without stopping anything.
    std::mem::forget(run.workload);
    drop(first);

    let other = backend(DockerSettings {
        runner: format!("runner-{}", uuid::Uuid::new_v4()),
        ..DockerSettings::default()
    })
    .await;
    let id = containers_of(&docker, &key.job_id.to_string()).await;
    assert_eq!(id.len(), 1);
    let running = |id: String| {
        let docker = docker.clone();
        async move {
            let info = docker.inspect_container(&id, None).await.unwrap();
            info.state.and_then(|s| s.running).unwrap_or(false)
        }
    };
    assert!(
        running(id[0].clone()).await,
        "another runner leaves it alone"
    );
    drop(other);

    let again = backend(settings).await;
    assert!(
        !running(id[0].clone()).await,
        "the same runner, restarted, stopped it"
    );
    assert_eq!(again.stop_orphans().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_answers_the_health_ping() {
    let Some(_docker) = engine().await else {
        return;
    };
    let backend = backend(DockerSettings::default()).await;
    backend.ping().await.expect("the engine answers /_ping");
}
