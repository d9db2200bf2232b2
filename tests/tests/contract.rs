//! What a new user meets first: auth, validation, ownership, state rules,
//! health and reflection on every service — against the real binaries.

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use trainmesh_common::testing::wait_for;
use trainmesh_proto::job::v1::{
    CancelJobRequest, CreateJobRequest, GetJobRequest, JobSpec, JobState, ListJobsRequest,
    Resources, Training,
};
use trainmesh_tests::{Mesh, MeshOptions, ALICE_TOKEN, BOB_TOKEN, SERVICES};

fn spec() -> JobSpec {
    JobSpec {
        name: "t".into(),
        image: "python:3.11-slim".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

async fn count_jobs(mesh: &Mesh, token: &str) -> usize {
    mesh.jobs(token)
        .list_jobs(ListJobsRequest {
            page_size: 500,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .jobs
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_field_and_changes_nothing() {
    let mesh = Mesh::start_with(MeshOptions {
        no_runner: true,
        ..Default::default()
    })
    .await;
    let root = mesh.data_root.display().to_string();
    let with_training = |dataset: String| JobSpec {
        training: Some(Training {
            dataset_path: dataset,
            ..Default::default()
        }),
        ..spec()
    };
    let cases: Vec<(&str, JobSpec)> = vec![
        (
            "image",
            JobSpec {
                image: String::new(),
                ..spec()
            },
        ),
        (
            "command",
            JobSpec {
                command: vec![],
                ..spec()
            },
        ),
        (
            "gpus",
            JobSpec {
                resources: Some(Resources {
                    gpus: -1,
                    ..Default::default()
                }),
                ..spec()
            },
        ),
        (
            "memory_mib",
            JobSpec {
                resources: Some(Resources {
                    memory_mib: -5,
                    ..Default::default()
                }),
                ..spec()
            },
        ),
        (
            "algorithm",
            JobSpec {
                training: Some(Training {
                    algorithm: 99,
                    ..Default::default()
                }),
                ..spec()
            },
        ),
        (
            "dataset_path",
            with_training(format!("{root}/ok/../../etc/passwd")),
        ),
        (
            "dataset_path",
            with_training(format!("{root}/ok/%2e%2e/%2e%2e/etc")),
        ),
        (
            "dataset_path",
            with_training(format!("{root}/escape/passwd")),
        ),
        ("dataset_path", with_training("/etc/passwd".into())),
    ];
    let mut jobs = mesh.jobs(ALICE_TOKEN);
    for (field, spec) in cases {
        let err = jobs
            .create_job(CreateJobRequest {
                spec: Some(spec),
                idempotency_key: String::new(),
            })
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(field),
            "message names `{field}`: {}",
            err.message()
        );
    }
    assert_eq!(
        count_jobs(&mesh, ALICE_TOKEN).await,
        0,
        "nothing was stored"
    );
    assert!(
        !mesh.data_root.join("ok").join("..").join("etc").exists(),
        "validation created no directory"
    );

    // A path inside the root is accepted.
    std::fs::write(mesh.data_root.join("ok").join("train.jsonl"), "{}\n").unwrap();
    jobs.create_job(CreateJobRequest {
        spec: Some(with_training(format!("{root}/ok/train.jsonl"))),
        idempotency_key: String::new(),
    })
    .await
    .expect("a dataset under the allowed root is accepted");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_ownership_and_state_rules() {
    let mesh = Mesh::start().await;

    // No token.
    let mut anonymous = trainmesh_proto::job::v1::job_service_client::JobServiceClient::new(
        mesh.channel("job-service", None),
    );
    let err = anonymous
        .create_job(CreateJobRequest {
            spec: Some(spec()),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("anonymous submission");
    assert_eq!(err.code(), Code::Unauthenticated);

    // Another user's job is invisible.
    let mut alice = mesh.jobs(ALICE_TOKEN);
    let job = alice
        .create_job(CreateJobRequest {
            spec: Some(spec()),
            idempotency_key: "k1".into(),
        })
        .await
        .expect("create")
        .into_inner()
        .job
        .expect("job");
    let err = mesh
        .jobs(BOB_TOKEN)
        .get_job(GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect_err("bob reads alice's job");
    assert_eq!(err.code(), Code::NotFound);
    let err = mesh
        .jobs(BOB_TOKEN)
        .cancel_job(CancelJobRequest {
            job_id: job.id.clone(),
            reason: "mine now".into(),
        })
        .await
        .expect_err("bob cancels alice's job");
    assert_eq!(err.code(), Code::NotFound);

    // An idempotent retry returns the original.
    let again = alice
        .create_job(CreateJobRequest {
            spec: Some(spec()),
            idempotency_key: "k1".into(),
        })
        .await
        .expect("retry")
        .into_inner();
    assert!(again.existing);
    assert_eq!(again.job.expect("job").id, job.id);

    // Cancel of a finished job.
    wait_for("the job to succeed", Duration::from_secs(60), || {
        let mut alice = alice.clone();
        let id = job.id.clone();
        async move {
            let j = alice
                .get_job(GetJobRequest { job_id: id })
                .await
                .ok()?
                .into_inner()
                .job?;
            (j.state == JobState::Succeeded as i32).then_some(())
        }
    })
    .await;
    let err = alice
        .cancel_job(CancelJobRequest {
            job_id: job.id.clone(),
            reason: "too late".into(),
        })
        .await
        .expect_err("cancel finished job");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_health_and_reflection_without_a_token() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let mesh = Mesh::start_with(MeshOptions {
        no_runner: true,
        ..Default::default()
    })
    .await;
    let expected = [
        ("job-service", "trainmesh.job.v1.JobService"),
        (
            "scheduler-service",
            "trainmesh.scheduler.v1.SchedulerService",
        ),
        ("metrics-service", "trainmesh.metrics.v1.MetricsService"),
        (
            "diagnosis-service",
            "trainmesh.diagnosis.v1.DiagnosisService",
        ),
    ];
    for (name, service) in expected {
        assert!(SERVICES.contains(&name));
        let mut client = ServerReflectionClient::new(mesh.channel(name, None));
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .expect("reflection")
            .into_inner();
        let resp = stream.next().await.expect("one answer").expect("ok");
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection answer from {name}");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&service), "{name} lists {names:?}");
        assert!(
            names.contains(&"grpc.health.v1.Health"),
            "{name} lists {names:?}"
        );
    }
    mesh.stop().await;
}
