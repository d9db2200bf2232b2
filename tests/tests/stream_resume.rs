//! Streams across a job-service restart (SIGTERM, then the same binary on
//! the same address and data): a stream nobody resumes ends with
//! UNAVAILABLE, never OK; `trainctl logs -f` and `trainctl watch` resume
//! and show every line and event exactly once, and `logs -f` exits 0 only
//! at the real end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tonic::Code;
use trainmesh_common::testing::wait_for;
use trainmesh_proto::job::v1::{StreamJobLogsRequest, WatchJobsRequest};
use trainmesh_tests::jobs::{python_job, submit, wait_job};
use trainmesh_tests::{bin_dir, Gate, Mesh, ALICE_TOKEN};

const DEADLINE: Duration = Duration::from_secs(90);

/// Prints lines 1-30, waits at the gate (a FIFO), prints lines 31-60.
const GATED: &str = r#"
import os
for i in range(1, 31):
    print(f"line {i}")
open(os.environ["GATE"]).read()
for i in range(31, 61):
    print(f"line {i}")
"#;

/// A `trainctl` process with its stdout and stderr in files.
struct Cli {
    child: tokio::process::Child,
    out: PathBuf,
    err: PathBuf,
}

impl Cli {
    fn start(mesh: &Mesh, name: &str, args: &[&str]) -> Cli {
        let dir = mesh.dir.path();
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let child = tokio::process::Command::new(bin_dir().join("trainctl"))
            .args(["--job-endpoint", &mesh.addr("job-service")])
            .args(["--token", ALICE_TOKEN])
            .args(args)
            .env_remove("TRAINMESH_TOKEN")
            .envs(mesh.client_env())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .kill_on_drop(true)
            .spawn()
            .expect("start trainctl");
        Cli { child, out, err }
    }

    fn stdout(&self) -> String {
        read(&self.out)
    }

    fn stderr(&self) -> String {
        read(&self.err)
    }

    async fn wait_stdout(&self, what: &str, done: impl Fn(&str) -> bool) {
        wait_for(what, DEADLINE, || {
            let out = self.stdout();
            let ok = done(&out);
            async move { ok.then_some(()) }
        })
        .await;
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Reads a stream to its end and returns how it ended.
async fn end_of<T>(stream: &mut tonic::Streaming<T>) -> Result<(), tonic::Status> {
    tokio::time::timeout(DEADLINE, async {
        while stream.message().await?.is_some() {}
        Ok(())
    })
    .await
    .expect("the stream ends")
}

#[tokio::test]
async fn streams_survive_a_job_service_restart_and_end_unavailable_otherwise() {
    let mut mesh = Mesh::start().await;
    let gate = Gate::new(mesh.dir.path().join("gate"));
    let gate_s = gate.path().display().to_string();
    let job = submit(
        &mesh,
        ALICE_TOKEN,
        python_job("restarted", GATED, &[("GATE", &gate_s)]),
    )
    .await;

    let logs = Cli::start(&mesh, "logs", &["logs", &job.id, "-f"]);
    let watch = Cli::start(
        &mesh,
        "watch",
        &["-o", "json", "watch", &job.id, "--from-start"],
    );
    logs.wait_stdout("`trainctl logs -f` to show line 30", |o| {
        o.lines().any(|l| l == "line 30")
    })
    .await;

    // Streams of a client that does not resume.
    let mut raw_logs = mesh
        .jobs(ALICE_TOKEN)
        .stream_job_logs(StreamJobLogsRequest {
            job_id: job.id.clone(),
            follow: true,
            ..Default::default()
        })
        .await
        .expect("StreamJobLogs")
        .into_inner();
    let mut raw_watch = mesh
        .jobs(ALICE_TOKEN)
        .watch_jobs(WatchJobsRequest {
            job_id: job.id.clone(),
            ..Default::default()
        })
        .await
        .expect("WatchJobs")
        .into_inner();

    let stopped = mesh.stop_instance("job-service").await;
    assert!(stopped.success(), "job-service stops cleanly: {stopped}");
    for (what, end) in [
        ("StreamJobLogs", end_of(&mut raw_logs).await),
        ("WatchJobs", end_of(&mut raw_watch).await),
    ] {
        let status = end.expect_err(&format!("{what}: a shutdown is not the end"));
        assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
        assert!(
            status.message().contains("job-service is shutting down"),
            "{what}: {status:?}"
        );
    }
    mesh.start_instance_in_place("job-service").await;

    gate.open().await;
    let done = wait_job(&mesh, &job.id, "the job to succeed", DEADLINE, |j| {
        j.state == trainmesh_proto::job::v1::JobState::Succeeded as i32
    })
    .await;
    assert_eq!(done.id, job.id);

    let mut logs = logs;
    let status = tokio::time::timeout(DEADLINE, logs.child.wait())
        .await
        .expect("`trainctl logs -f` ends with the job")
        .expect("wait");
    let err = logs.stderr();
    assert!(status.success(), "exit {status}; stderr: {err}");
    let want: Vec<String> = (1..=60).map(|i| format!("line {i}")).collect();
    assert_eq!(logs.stdout().lines().collect::<Vec<_>>(), want);
    assert!(err.contains("resuming where it stopped"), "stderr: {err}");

    let mut watch = watch;
    watch
        .wait_stdout("`trainctl watch` to show the job's end", |o| {
            o.contains("SUCCEEDED")
        })
        .await;
    watch.child.start_kill().expect("stop trainctl watch");
    let _ = watch.child.wait().await;
    let sequences: Vec<i64> = watch
        .stdout()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON event per line");
            assert_eq!(v["job_id"], job.id.as_str());
            v["sequence"].as_i64().expect("sequence")
        })
        .collect();
    let n = sequences.len() as i64;
    assert!(n >= 5, "created … succeeded: {sequences:?}");
    assert_eq!(sequences, (1..=n).collect::<Vec<_>>(), "each event once");
    assert!(
        watch.stderr().contains("resuming where it stopped"),
        "stderr: {}",
        watch.stderr()
    );
    mesh.stop().await;
}
