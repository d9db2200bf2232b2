//! The real `scheduler-service` binary: flags, tokens and service token
//! from the data dir, `--addr-file`, and JSON logs that carry the job's
//! correlation id on the queued / dispatched / finished lines.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{capacity, new_job_id, spec, FakeJobService, DEADLINE};
use trainmesh_common::auth::{Role, TokensFile};
use trainmesh_common::client::channel;
use trainmesh_common::proto::job::v1::job_internal_service_server::JobInternalServiceServer;
use trainmesh_common::proto::job::v1::{AttemptState, JobState};
use trainmesh_common::proto::runner::v1::runner_service_client::RunnerServiceClient;
use trainmesh_common::proto::runner::v1::{
    AcquireAssignmentsRequest, RegisterRunnerRequest, ReportAttemptStatusRequest,
};
use trainmesh_common::proto::scheduler::v1::scheduler_internal_service_client::SchedulerInternalServiceClient;
use trainmesh_common::proto::scheduler::v1::EnqueueJobRequest;
use trainmesh_common::testing::{listener, wait_for};

fn log_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test]
async fn binary_logs_the_jobs_correlation_id_as_json() {
    let dir = tempfile::tempdir().unwrap();
    TokensFile::default()
        .with("job-secret", "job-service", "system", &[Role::Service])
        .with(
            "scheduler-secret",
            "scheduler-service",
            "system",
            &[Role::Service],
        )
        .with("runner-secret", "node", "system", &[Role::Runner])
        .write(&dir.path().join("tokens.yaml"))
        .unwrap();
    std::fs::write(
        dir.path().join("scheduler-service.token"),
        "scheduler-secret\n",
    )
    .unwrap();

    let jobs = FakeJobService::default();
    let (job_listener, job_addr) = listener().await;
    let svc = JobInternalServiceServer::new(jobs.clone());
    let job_task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(job_listener))
            .await;
    });

    let log = dir.path().join("scheduler.log");
    let addr_file = dir.path().join("scheduler.addr");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_scheduler-service"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--addr-file")
        .arg(&addr_file)
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--job-endpoint")
        .arg(job_addr.to_string())
        .arg("--sweep-interval-ms")
        .arg("50")
        .env("TRAINMESH_LOG_FORMAT", "json")
        .env("TRAINMESH_LOG_FILE", &log)
        .env_remove("TRAINMESH_SCHEDULER_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let endpoint = format!("file:{}", addr_file.display());
    wait_for("addr file", DEADLINE, || async {
        addr_file.exists().then_some(())
    })
    .await;
    let mut runners = RunnerServiceClient::new(channel(&endpoint, Some("runner-secret")).unwrap());
    let mut internal =
        SchedulerInternalServiceClient::new(channel(&endpoint, Some("job-secret")).unwrap());

    let runner_id = wait_for("binary to serve", DEADLINE, || {
        let mut runners = runners.clone();
        async move {
            runners
                .register_runner(RegisterRunnerRequest {
                    name: "node".into(),
                    backend: "process".into(),
                    capacity: Some(capacity(1, common::H100)),
                    labels: Default::default(),
                    instance: String::new(),
                })
                .await
                .ok()
                .map(|r| r.into_inner().runner_id)
        }
    })
    .await;

    let job = new_job_id();
    let cid = format!("e2e-{job}");
    internal
        .enqueue_job(EnqueueJobRequest {
            job_id: job.clone(),
            owner: "alice".into(),
            org: "ml".into(),
            spec: Some(spec(1)),
            correlation_id: cid.clone(),
            submit_time: None,
        })
        .await
        .unwrap();
    let a = tokio::time::timeout(
        DEADLINE,
        runners.acquire_assignments(AcquireAssignmentsRequest {
            runner_id: runner_id.clone(),
            max_assignments: 1,
            wait: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner()
    .assignments;
    assert_eq!(a[0].job_id, job);
    for state in [AttemptState::Running, AttemptState::Succeeded] {
        runners
            .report_attempt_status(ReportAttemptStatusRequest {
                runner_id: runner_id.clone(),
                job_id: job.clone(),
                attempt: 1,
                state: state as i32,
                exit_code: (state == AttemptState::Succeeded).then_some(0),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    wait_for("SUCCEEDED at job-service", DEADLINE, || async {
        jobs.calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.req.job_id == job && c.req.state == JobState::Succeeded as i32)
            .then_some(())
    })
    .await;
    // The status updates carried the service token read from the data dir.
    assert!(jobs
        .calls
        .lock()
        .unwrap()
        .iter()
        .all(|c| c.authorization.as_deref() == Some("Bearer scheduler-secret")));

    for message in ["job queued", "job dispatched", "job finished"] {
        wait_for(
            &format!("`{message}` in the JSON log"),
            DEADLINE,
            || async {
                log_lines(&log)
                    .into_iter()
                    .find(|l| l["message"] == message)
            },
        )
        .await;
    }
    for line in log_lines(&log).iter().filter(|l| {
        ["job queued", "job dispatched", "job finished"]
            .contains(&l["message"].as_str().unwrap_or(""))
    }) {
        assert_eq!(line["correlation_id"], cid.as_str(), "{line}");
        assert_eq!(line["job_id"], job.as_str(), "{line}");
        assert_eq!(line["level"], "INFO");
    }
    let dispatched = log_lines(&log)
        .into_iter()
        .find(|l| l["message"] == "job dispatched")
        .unwrap();
    assert_eq!(dispatched["runner_id"], runner_id.as_str());
    assert_eq!(dispatched["gpus"], "[0]");

    assert!(
        dir.path().join("scheduler.db").exists(),
        "default SQLite file in the data dir"
    );
    child.start_kill().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    job_task.abort();
}

/// The flags T's cross-process tests rely on: `--approval-rules`,
/// `--approval-sweep-secs` and the test clock `--clock-offset-file`.
#[tokio::test]
async fn binary_expires_approvals_when_the_offset_file_moves_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    TokensFile::default()
        .with("job-secret", "job-service", "system", &[Role::Service])
        .with(
            "scheduler-secret",
            "scheduler-service",
            "system",
            &[Role::Service],
        )
        .with("runner-secret", "node", "system", &[Role::Runner])
        .write(&dir.path().join("tokens.yaml"))
        .unwrap();
    std::fs::write(
        dir.path().join("scheduler-service.token"),
        "scheduler-secret\n",
    )
    .unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - name: first-job\n    when: { first_job_of_user: true }\nttl: 1h\n",
    )
    .unwrap();
    let offset = dir.path().join("clock-offset");

    let jobs = FakeJobService::default();
    let (job_listener, job_addr) = listener().await;
    let svc = JobInternalServiceServer::new(jobs.clone());
    let job_task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(job_listener))
            .await;
    });
    let addr_file = dir.path().join("scheduler.addr");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_scheduler-service"))
        .args(["--listen", "127.0.0.1:0", "--approval-sweep-secs", "1"])
        .arg("--addr-file")
        .arg(&addr_file)
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--job-endpoint")
        .arg(job_addr.to_string())
        .arg("--approval-rules")
        .arg(&rules)
        .arg("--clock-offset-file")
        .arg(&offset)
        .env_remove("TRAINMESH_SCHEDULER_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for("addr file", DEADLINE, || async {
        addr_file.exists().then_some(())
    })
    .await;
    let ch = channel(&format!("file:{}", addr_file.display()), Some("job-secret")).unwrap();
    let internal = SchedulerInternalServiceClient::new(ch);
    let job = new_job_id();
    let r = wait_for("binary to serve", DEADLINE, || {
        let mut internal = internal.clone();
        let job = job.clone();
        async move {
            internal
                .enqueue_job(EnqueueJobRequest {
                    job_id: job,
                    owner: "alice".into(),
                    org: "ml".into(),
                    spec: Some(spec(0)),
                    correlation_id: String::new(),
                    submit_time: None,
                })
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(r.into_inner().state, JobState::AwaitingApproval as i32);

    std::fs::write(&offset, "3700\n").unwrap();
    let cancelled = wait_for("approval-expired at job-service", DEADLINE, || async {
        jobs.calls
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.req.job_id == job && c.req.state == JobState::Cancelled as i32)
            .map(|c| c.req.clone())
    })
    .await;
    assert_eq!(cancelled.reason, "approval-expired");
    assert_eq!(
        cancelled.failure_cause,
        trainmesh_common::proto::job::v1::FailureCause::ApprovalExpired as i32
    );
    child.start_kill().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    job_task.abort();
}
