//! Narrow identities across real binaries: a runner's credential acts only
//! for that runner and the attempts placed on it, a service's only for the
//! calls it owns, and a runner name is held by one runner at a time.

use std::time::Duration;

use tonic::Code;
use trainmesh_common::testing::wait_for;
use trainmesh_proto::job::v1::{
    AppendJobLogsRequest, AttemptState, JobState, LogLine, UpdateJobStatusRequest,
};
use trainmesh_proto::metrics::v1::WriteMetricsRequest;
use trainmesh_proto::runner::v1::{HeartbeatRequest, ReportAttemptStatusRequest};
use trainmesh_proto::scheduler::v1::EnqueueJobRequest;
use trainmesh_tests::fake_runner::{cpu_capacity, FakeRunner};
use trainmesh_tests::jobs::{python_job, submit, wait_state};
use trainmesh_tests::{
    runner_token, Mesh, ALICE_TOKEN, JOB_SERVICE_TOKEN, METRICS_TOKEN, RUNNER_TOKEN,
    SCHEDULER_TOKEN,
};

#[track_caller]
fn denied<T: std::fmt::Debug>(what: &str, res: Result<T, tonic::Status>) {
    let err = res.expect_err(what);
    assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_acts_only_for_itself_and_a_service_only_for_its_own_calls() {
    let mut mesh = Mesh::start().await;
    let a_id = mesh.wait_runner_registered("runner").await;
    let job = submit(
        &mesh,
        ALICE_TOKEN,
        python_job(
            "held",
            "import time\nprint('started', flush=True)\ntime.sleep(600)",
            &[],
        ),
    )
    .await;
    wait_state(&mesh, &job.id, JobState::Running, Duration::from_secs(60)).await;

    // Runner B, with its own valid credential and registration.
    let b = FakeRunner::register(
        &mesh,
        "scheduler-service",
        "runner-b",
        cpu_capacity(1.0, 1024),
    )
    .await;
    let b_token = runner_token("runner-b");
    let mut b_sched = mesh.runner_service("scheduler-service", &b_token);
    denied(
        "B heartbeats as A",
        b_sched
            .heartbeat(HeartbeatRequest {
                runner_id: a_id.clone(),
                active: vec![],
            })
            .await,
    );
    denied(
        "B reports A's attempt as A",
        b_sched
            .report_attempt_status(ReportAttemptStatusRequest {
                runner_id: a_id.clone(),
                job_id: job.id.clone(),
                attempt: 1,
                state: AttemptState::Failed as i32,
                exit_code: Some(1),
                ..Default::default()
            })
            .await,
    );
    let err = b_sched
        .report_attempt_status(ReportAttemptStatusRequest {
            runner_id: b.runner_id.clone(),
            job_id: job.id.clone(),
            attempt: 1,
            state: AttemptState::Failed as i32,
            exit_code: Some(1),
            ..Default::default()
        })
        .await
        .expect_err("B reports A's attempt under its own registration");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    denied(
        "B ships logs for A's attempt",
        mesh.job_internal(&b_token)
            .append_job_logs(AppendJobLogsRequest {
                job_id: job.id.clone(),
                attempt: 1,
                lines: vec![LogLine {
                    number: 1_000_000,
                    text: "forged".into(),
                    ..Default::default()
                }],
            })
            .await,
    );
    denied(
        "B writes metrics for A's attempt",
        mesh.metrics(&b_token)
            .write_metrics(WriteMetricsRequest {
                job_id: job.id.clone(),
                attempt: 1,
                json_records: vec![r#"{"step": 1, "loss": 9}"#.into()],
                ..Default::default()
            })
            .await,
    );

    // Services: only their own calls.
    denied(
        "the scheduler enqueues",
        mesh.scheduler_internal(SCHEDULER_TOKEN)
            .enqueue_job(EnqueueJobRequest {
                job_id: uuid::Uuid::now_v7().to_string(),
                owner: "alice".into(),
                org: "ml".into(),
                spec: Some(python_job("forged", "print(1)", &[])),
                ..Default::default()
            })
            .await,
    );
    for token in [JOB_SERVICE_TOKEN, METRICS_TOKEN, RUNNER_TOKEN] {
        denied(
            "a status update not from the scheduler",
            mesh.job_internal(token)
                .update_job_status(UpdateJobStatusRequest {
                    job_id: job.id.clone(),
                    attempt: 1,
                    state: JobState::Succeeded as i32,
                    attempt_state: AttemptState::Succeeded as i32,
                    exit_code: Some(0),
                    scheduler_sequence: 1_000,
                    ..Default::default()
                })
                .await,
        );
    }
    denied(
        "a service registers as a runner",
        mesh.runner_service("scheduler-service", JOB_SERVICE_TOKEN)
            .register_runner(trainmesh_proto::runner::v1::RegisterRunnerRequest {
                name: "test-runner".into(),
                backend: "process".into(),
                ..Default::default()
            })
            .await,
    );

    // None of it touched the job: it still runs on A, and A still acts.
    let j = trainmesh_tests::jobs::get_job(&mesh, &job.id).await;
    assert_eq!(j.state, JobState::Running as i32, "{j:?}");
    assert_eq!(j.attempts.len(), 1, "{j:?}");
    assert_eq!(j.attempts[0].runner_name, "test-runner");
    mesh.metrics(RUNNER_TOKEN)
        .write_metrics(WriteMetricsRequest {
            job_id: job.id.clone(),
            attempt: 1,
            json_records: vec![r#"{"step": 1, "loss": 0.5}"#.into()],
            ..Default::default()
        })
        .await
        .expect("A writes its attempt's metrics");

    // A second runner process claiming A's name from another work
    // directory is refused while A lives.
    mesh.spawn_runner_named("impostor", "test-runner", &[]);
    wait_for(
        "the second test-runner to be refused",
        Duration::from_secs(60),
        || {
            let log = mesh.log_text("impostor");
            async move { log.contains("held by another live runner").then_some(()) }
        },
    )
    .await;
    assert!(
        !mesh
            .log_text("impostor")
            .contains("\"registered with the scheduler\""),
        "the impostor registered"
    );
}
