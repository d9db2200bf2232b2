//! `trainctl up` stopped with Ctrl-C while a job runs: the runner hands the
//! attempt back before the scheduler stops, so the job is not cancelled;
//! the next `up` runs it again although it had only one attempt. And
//! `trainctl up --tls`: the mesh serves TLS, and trainctl trusts its CA.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use trainmesh_common::client::channel;
use trainmesh_common::testing::wait_for;
use trainmesh_proto::job::v1::job_service_client::JobServiceClient;
use trainmesh_proto::job::v1::{
    AttemptState, CreateJobRequest, Job, JobSpec, JobState, ListJobsRequest, RetryPolicy,
};
use trainmesh_tests::bin_dir;
use trainmesh_tests::jobs::wait_job_at;

const WAIT: Duration = Duration::from_secs(60);

/// Attempt 1 runs until it is stopped; a later attempt ends at once.
const SCRIPT: &str = r#"
import os, signal, sys
print(f"attempt {os.environ['TRAINMESH_ATTEMPT']}", flush=True)
if os.environ["TRAINMESH_ATTEMPT"] == "1":
    signal.pause()
"#;

/// `trainctl up` in its own process group, as a terminal would run it
/// (Ctrl-C then reaches `trainctl` alone, which stops its children).
async fn up(data: &Path, run: u32, extra: &[&str]) -> (Child, String) {
    let out = data.with_file_name(format!("up-{run}.out"));
    let child = Command::new(bin_dir().join("trainctl"))
        .args(["up", "--ports-from-zero", "--data-dir"])
        .arg(data)
        .args(extra)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("up output"))
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("start trainctl up");
    let summary = wait_for("the mesh to be up", WAIT, || async {
        let text = std::fs::read_to_string(&out).ok()?;
        text.contains("press Ctrl-C").then_some(text)
    })
    .await;
    (child, summary)
}

fn jobs(data: &Path) -> JobServiceClient<trainmesh_common::client::Channel> {
    let addr = std::fs::read_to_string(data.join("run").join("job-service.addr")).expect("addr");
    let token = std::fs::read_to_string(data.join("admin.token")).expect("admin token");
    JobServiceClient::new(channel(addr.trim(), Some(token.trim())).expect("channel"))
}

async fn wait_job(data: &Path, id: &str, what: &str, done: impl Fn(&Job) -> bool) -> Job {
    wait_job_at(|| jobs(data), id, what, WAIT, done).await
}

async fn ctrl_c(mut up: Child) {
    let pid = up.id().expect("running") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = tokio::time::timeout(WAIT, up.wait())
        .await
        .expect("up stops")
        .expect("wait");
    assert!(status.success(), "trainctl up stops cleanly: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_of_up_hands_a_running_job_back_instead_of_cancelling_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("mesh");
    let (first, _) = up(&data, 1, &[]).await;
    let mut spec = JobSpec {
        name: "outlives-the-mesh".into(),
        image: "python:3.11-slim".into(),
        command: vec!["python3".into(), "-c".into(), SCRIPT.into()],
        retry_policy: Some(RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    spec.env.insert("PYTHONUNBUFFERED".into(), "1".into());
    let job = jobs(&data)
        .create_job(CreateJobRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .expect("create job")
        .into_inner()
        .job
        .expect("job");
    wait_job(&data, &job.id, "the job to run", |j| {
        j.state == JobState::Running as i32
    })
    .await;
    ctrl_c(first).await;

    let (second, _) = up(&data, 2, &[]).await;
    let done = wait_job(&data, &job.id, "the job to run again and succeed", |j| {
        j.state == JobState::Succeeded as i32
    })
    .await;
    assert_eq!(done.attempts.len(), 2, "{:#?}", done.attempts);
    let a1 = &done.attempts[0];
    assert_eq!(a1.state, AttemptState::Failed as i32, "{a1:#?}");
    assert_eq!(
        a1.error.as_ref().map(|e| e.category.as_str()),
        Some("runner-shutdown"),
        "{a1:#?}"
    );
    ctrl_c(second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_tls_prints_the_grpcurl_line_and_trainctl_trusts_its_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("mesh");
    let (mesh, summary) = up(&data, 1, &["--tls"]).await;
    let ca = data.join("tls").join("ca.crt");
    assert!(
        summary.contains(&format!("grpcurl -cacert {} ", ca.display())),
        "{summary}"
    );
    let addr = std::fs::read_to_string(data.join("run").join("job-service.addr")).expect("addr");
    let addr = addr.trim();
    jobs(&data)
        .list_jobs(ListJobsRequest::default())
        .await
        .expect_err("plaintext is refused");

    // No CA named: trainctl finds the one `up --tls` wrote in the data dir.
    let list = Command::new(bin_dir().join("trainctl"))
        .args(["--data-dir"])
        .arg(&data)
        .args(["--job-endpoint", addr, "list"])
        .env_remove("TRAINMESH_TOKEN")
        .env_remove("TRAINMESH_TLS_CA")
        .output()
        .await
        .expect("run trainctl list");
    assert!(
        list.status.success(),
        "trainctl list over TLS: {}",
        String::from_utf8_lossy(&list.stderr)
    );
    ctrl_c(mesh).await;
}

/// Tries to read every file it is given; fails if it runs as root or can
/// read any of them.
const PROBE: &str = r#"
import os, sys
if os.getuid() == 0:
    sys.exit("the job runs as root")
readable = []
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            f.read(1)
        readable.append(path)
    except OSError:
        pass
print("readable:", readable, flush=True)
sys.exit(1 if readable else 0)
"#;

/// A job submitted through `trainctl up` (the process backend, `up` run as
/// root) runs as an unprivileged user and cannot read the mesh's tokens or
/// databases, although it knows where they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_up_cannot_read_its_tokens_or_databases() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: `up` runs jobs as its own user, who owns these files");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("mesh");
    let (mesh, _) = up(&data, 1, &[]).await;
    let mut private = Vec::new();
    for entry in walk(&data) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".token") || name.ends_with(".yaml") || name.contains(".db") {
            private.push(entry.display().to_string());
        }
    }
    assert!(
        private.iter().any(|p| p.ends_with("admin.token"))
            && private
                .iter()
                .any(|p| p.ends_with("jobs.db") || p.contains("job")),
        "{private:?}"
    );
    let mut command = vec!["python3".into(), "-c".into(), PROBE.into()];
    command.extend(private.iter().cloned());
    let job = jobs(&data)
        .create_job(CreateJobRequest {
            spec: Some(JobSpec {
                name: "probe".into(),
                image: "python:3.11-slim".into(),
                command,
                ..Default::default()
            }),
            idempotency_key: String::new(),
        })
        .await
        .expect("create job")
        .into_inner()
        .job
        .expect("job");
    let done = wait_job(&data, &job.id, "the probe to end", |j| {
        j.state == JobState::Succeeded as i32 || j.state == JobState::Failed as i32
    })
    .await;
    assert_eq!(
        done.state,
        JobState::Succeeded as i32,
        "the job read a private file or ran as root: {:#?}",
        done.attempts
    );
    ctrl_c(mesh).await;
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
