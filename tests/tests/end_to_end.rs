//! The whole mesh, end to end: real binaries on loopback, real gRPC.

use std::time::Duration;

use trainmesh_common::testing::wait_for;
use trainmesh_proto::diagnosis::v1::GetDiagnosisRequest;
use trainmesh_proto::job::v1::{
    watch_jobs_response, CreateJobRequest, GetJobRequest, Job, JobSpec, JobState,
    StreamJobLogsRequest, WatchJobsRequest,
};
use trainmesh_proto::metrics::v1::GetLatestMetricsRequest;
use trainmesh_tests::{with_correlation, Mesh, ALICE_TOKEN, SERVICES};

const DEADLINE: Duration = Duration::from_secs(90);

fn python_job(name: &str, args: &[&str]) -> JobSpec {
    JobSpec {
        name: name.into(),
        image: "python:3.11-slim".into(),
        command: std::iter::once("python3")
            .chain(args.iter().copied())
            .map(String::from)
            .collect(),
        env: [("PYTHONUNBUFFERED".to_string(), "1".to_string())].into(),
        ..Default::default()
    }
}

async fn wait_terminal(mesh: &Mesh, job_id: &str) -> Job {
    let mut jobs = mesh.jobs(ALICE_TOKEN);
    wait_for(&format!("job `{job_id}` to finish"), DEADLINE, || {
        let mut jobs = jobs.clone();
        let id = job_id.to_string();
        async move {
            let job = jobs
                .get_job(GetJobRequest { job_id: id })
                .await
                .ok()?
                .into_inner()
                .job?;
            let terminal = [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
                .map(|s| s as i32)
                .contains(&job.state);
            terminal.then_some(job)
        }
    })
    .await;
    jobs.get_job(GetJobRequest {
        job_id: job_id.into(),
    })
    .await
    .expect("get job")
    .into_inner()
    .job
    .expect("job")
}

/// The states a job went through, from its event log.
async fn states_of(mesh: &Mesh, job_id: &str) -> Vec<JobState> {
    let mut stream = mesh
        .jobs(ALICE_TOKEN)
        .watch_jobs(WatchJobsRequest {
            job_id: job_id.into(),
            cursor: String::new(),
            from_start: true,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut states = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event or heartbeat within 10 s")
            .expect("stream ok")
            .expect("stream open");
        match next.kind {
            Some(watch_jobs_response::Kind::Event(e)) => {
                let s = JobState::try_from(e.state).unwrap_or(JobState::Unspecified);
                if states.last() != Some(&s) {
                    states.push(s);
                }
                if matches!(
                    s,
                    JobState::Succeeded | JobState::Failed | JobState::Cancelled
                ) {
                    return states;
                }
            }
            Some(watch_jobs_response::Kind::Heartbeat(_)) | None => {}
        }
    }
}

async fn log_text(mesh: &Mesh, job_id: &str) -> String {
    let mut stream = mesh
        .jobs(ALICE_TOKEN)
        .stream_job_logs(StreamJobLogsRequest {
            job_id: job_id.into(),
            attempt: 0,
            tail_lines: 0,
            follow: false,
            cursor: String::new(),
        })
        .await
        .expect("logs")
        .into_inner();
    let mut text = String::new();
    while let Some(chunk) = stream.message().await.expect("log stream") {
        for l in chunk.lines {
            text.push_str(&l.text);
            text.push('\n');
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn succeeding_and_failing_jobs_end_to_end() {
    let mesh = Mesh::start().await;
    let cid = format!("e2e-{}", uuid::Uuid::new_v4());
    let mut jobs = mesh.jobs(ALICE_TOKEN);

    let ok = jobs
        .create_job(with_correlation(
            CreateJobRequest {
                spec: Some(python_job(
                    "ok",
                    &["examples/train_ok.py", "--steps", "5", "--sleep", "0"],
                )),
                idempotency_key: String::new(),
            },
            &cid,
        ))
        .await
        .expect("create ok job");
    assert_eq!(
        ok.metadata()
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        Some(cid.as_str()),
        "the correlation id is echoed"
    );
    let ok = ok.into_inner().job.expect("job");
    assert_eq!(ok.owner, "alice");
    let fail = jobs
        .create_job(with_correlation(
            CreateJobRequest {
                spec: Some(python_job(
                    "fail",
                    &["examples/train_fail.py", "--sleep", "0"],
                )),
                idempotency_key: String::new(),
            },
            &cid,
        ))
        .await
        .expect("create failing job")
        .into_inner()
        .job
        .expect("job");

    // The succeeding job.
    let done = wait_terminal(&mesh, &ok.id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(done.attempts[0].exit_code, Some(0));
    assert!(done.start_time.is_some() && done.end_time.is_some());
    assert_eq!(
        states_of(&mesh, &ok.id).await,
        vec![
            JobState::Pending,
            JobState::Queued,
            JobState::Scheduled,
            JobState::Running,
            JobState::Succeeded
        ]
    );
    let latest = mesh
        .metrics(ALICE_TOKEN)
        .get_latest_metrics(GetLatestMetricsRequest {
            job_id: ok.id.clone(),
            ..Default::default()
        })
        .await
        .expect("latest metrics")
        .into_inner()
        .points;
    let loss = latest
        .iter()
        .find(|p| p.key == "loss")
        .expect("latest loss");
    assert_eq!(loss.step, 5, "latest loss is the last step's: {latest:?}");
    assert!(
        latest.iter().any(|p| p.key == "reward.mean"),
        "nested keys are flattened"
    );
    let log = log_text(&mesh, &ok.id).await;
    assert!(
        log.contains(&format!("correlation_id={cid}")),
        "the job saw TRAINMESH_CORRELATION_ID: {log}"
    );

    // The failing job: structured error, exit code, diagnosis.
    let failed = wait_terminal(&mesh, &fail.id).await;
    assert_eq!(failed.state, JobState::Failed as i32, "{failed:?}");
    let err = failed.error.clone().expect("structured error");
    assert_eq!(err.r#type, "RuntimeError");
    assert!(err.message.contains("CUDA out of memory"), "{err:?}");
    assert!(
        err.traceback
            .starts_with("Traceback (most recent call last):"),
        "{err:?}"
    );
    assert!(err.traceback.contains("train_fail.py"), "{err:?}");
    assert_eq!(err.exit_code, 1);
    assert!(failed
        .error_message
        .starts_with("Error Type: RuntimeError\nError Message: CUDA out of memory"));
    assert!(failed.error_message.contains("Full Traceback:\nTraceback"));
    assert_eq!(failed.attempts.last().and_then(|a| a.exit_code), Some(1));

    let diagnosis = wait_for("the failed job's diagnosis", DEADLINE, || {
        let mut d = mesh.diagnosis(ALICE_TOKEN);
        let id = fail.id.clone();
        async move {
            d.get_diagnosis(GetDiagnosisRequest {
                diagnosis_id: String::new(),
                job_id: id,
            })
            .await
            .ok()?
            .into_inner()
            .diagnosis
        }
    })
    .await;
    assert!(!diagnosis.healthy);
    assert_eq!(diagnosis.category, "cuda-oom", "{diagnosis:?}");
    assert!(
        diagnosis.text.starts_with("Healthy: No\nError: "),
        "{}",
        diagnosis.text
    );
    assert!(diagnosis.text.contains("\nAnalysis: ") && diagnosis.text.contains("\nSolution: "));
    assert!(
        diagnosis
            .evidence
            .iter()
            .any(|e| e.text.contains("CUDA out of memory") && e.line_number > 0),
        "evidence cites the log line: {:?}",
        diagnosis.evidence
    );
    let attached = wait_for("the diagnosis attached to the job", DEADLINE, || {
        let mut j = mesh.jobs(ALICE_TOKEN);
        let id = fail.id.clone();
        async move {
            j.get_job(GetJobRequest { job_id: id })
                .await
                .ok()?
                .into_inner()
                .job?
                .diagnosis
        }
    })
    .await;
    assert!(!attached.healthy);

    // The client's correlation id is on log lines of every service and the
    // runner (JSON logs, top-level field).
    for name in SERVICES.iter().chain(std::iter::once(&"runner")) {
        let found = wait_for(
            &format!("correlation id in the {name} log"),
            Duration::from_secs(20),
            || {
                let text = mesh.log_text(name);
                let cid = cid.clone();
                async move {
                    text.lines()
                        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                        .find(|v| v["correlation_id"] == cid.as_str())
                }
            },
        )
        .await;
        assert!(found["timestamp"].is_string() && found["level"].is_string());
    }

    let stopped = mesh.stop().await;
    for (name, status) in stopped {
        assert!(
            status.success(),
            "{name} did not stop cleanly on SIGTERM: {status}"
        );
    }
}
