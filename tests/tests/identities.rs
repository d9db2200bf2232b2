//! Narrow identities across real binaries: a runner's credential acts only
//! for that runner and the attempts placed on it, a service's only for the
//! calls it owns, and a runner name is held by one runner at a time.

use std::time::Duration;

use tonic::Code;
use trainmesh_common::testing::wait_for;
use trainmesh_proto::auth::v1::{CreateTokenRequest, ListTokensRequest};
use trainmesh_proto::job::v1::{
    AppendJobLogsRequest, AttemptState, CancelJobRequest, CreateJobRequest, JobState, LogLine,
    UpdateJobStatusRequest,
};
use trainmesh_proto::metrics::v1::WriteMetricsRequest;
use trainmesh_proto::runner::v1::{HeartbeatRequest, ReportAttemptStatusRequest};
use trainmesh_proto::scheduler::v1::EnqueueJobRequest;
use trainmesh_tests::fake_runner::{cpu_capacity, FakeRunner};
use trainmesh_tests::jobs::{python_job, submit, wait_state};
use trainmesh_tests::{
    runner_token, Mesh, ADMIN_TOKEN, ALICE_TOKEN, JOB_SERVICE_TOKEN, METRICS_TOKEN, RUNNER_TOKEN,
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
            "import signal\nprint('started', flush=True)\nsignal.pause()",
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

    for token in [METRICS_TOKEN, SCHEDULER_TOKEN, RUNNER_TOKEN] {
        denied(
            "a service or runner cancels a user's job",
            mesh.jobs(token)
                .cancel_job(CancelJobRequest {
                    job_id: job.id.clone(),
                    ..Default::default()
                })
                .await,
        );
        denied(
            "a service or runner submits a job",
            mesh.jobs(token)
                .create_job(CreateJobRequest {
                    spec: Some(python_job("forged", "print(1)", &[])),
                    idempotency_key: String::new(),
                })
                .await,
        );
    }

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_joins_once_and_keeps_its_credential() {
    use std::os::unix::fs::PermissionsExt;
    let mut mesh = Mesh::start().await;
    let join = mesh
        .tokens(ADMIN_TOKEN)
        .create_token(CreateTokenRequest {
            user: "runner-join".into(),
            org: "system".into(),
            roles: vec!["join".into()],
            description: "nodes of the test".into(),
            ..Default::default()
        })
        .await
        .expect("a join token")
        .into_inner()
        .secret;
    let dir = mesh.runner_work_dir("joiner-creds");
    std::fs::create_dir_all(&dir).unwrap();
    let join_file = dir.join("join.token");
    std::fs::write(&join_file, &join).unwrap();
    let credential = dir.join("runner.token");
    let flags = [
        "--join-token-file".to_string(),
        join_file.display().to_string(),
        "--service-token-file".into(),
        credential.display().to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    mesh.spawn_runner_named("joiner", "gpu-node-7", &flags);
    mesh.wait_runner_registered("joiner").await;
    let mode = std::fs::metadata(&credential).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the credential is the runner's alone");
    let stored = std::fs::read_to_string(&credential).unwrap();
    assert_ne!(stored.trim(), join.trim());

    // The credential is bound to the name, and stored like any token.
    let listed = mesh
        .tokens(ADMIN_TOKEN)
        .list_tokens(ListTokensRequest {
            user: "gpu-node-7".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].roles, ["runner"]);

    // The join token does nothing else, and a second machine cannot join
    // under the taken name.
    denied(
        "a join token submits a job",
        mesh.jobs(&join)
            .create_job(CreateJobRequest {
                spec: Some(python_job("forged", "print(1)", &[])),
                idempotency_key: String::new(),
            })
            .await,
    );
    let again = mesh
        .tokens(&join)
        .join_runner(trainmesh_proto::auth::v1::JoinRunnerRequest {
            name: "gpu-node-7".into(),
        })
        .await
        .expect_err("one credential per name");
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");

    // Started again, the runner uses the credential it kept.
    mesh.kill("joiner").await;
    let before = mesh
        .log_text("joiner")
        .matches("joined: credential stored")
        .count();
    assert_eq!(before, 1);
    mesh.spawn_runner_named("joiner", "gpu-node-7", &flags);
    wait_for("the joiner to register again", Duration::from_secs(60), || {
        let log = mesh.log_text("joiner");
        async move {
            (log.matches("\"registered with the scheduler\"").count() >= 2).then_some(())
        }
    })
    .await;
    assert_eq!(
        mesh.log_text("joiner")
            .matches("joined: credential stored")
            .count(),
        1,
        "the runner joined only once"
    );
}
