//! The queued-jobs limit: set on the scheduler by an admin, enforced by
//! job-service at submit with RESOURCE_EXHAUSTED naming the limit; other
//! users are unaffected and an idempotent retry is never refused.

use std::time::Duration;

use tonic::Code;
use trainmesh_proto::job::v1::{
    CancelJobRequest, CreateJobRequest, JobSpec, JobState, ListJobsRequest,
};
use trainmesh_proto::scheduler::v1::{GetLimitsRequest, LimitScope, Limits, SetLimitsRequest};
use trainmesh_tests::jobs::wait_state;
use trainmesh_tests::{Mesh, MeshOptions, ADMIN_TOKEN, ALICE_TOKEN, BOB_TOKEN};

fn spec(name: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        image: "python:3.11-slim".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

async fn create(
    mesh: &Mesh,
    token: &str,
    key: &str,
) -> Result<trainmesh_proto::job::v1::CreateJobResponse, tonic::Status> {
    mesh.jobs(token)
        .create_job(CreateJobRequest {
            spec: Some(spec(key)),
            idempotency_key: key.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn count_jobs(mesh: &Mesh, token: &str) -> usize {
    mesh.jobs(token)
        .list_jobs(ListJobsRequest {
            page_size: 500,
            ..Default::default()
        })
        .await
        .expect("list jobs")
        .into_inner()
        .jobs
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_limit_refuses_submit_naming_the_limit() {
    // No runner: submitted jobs stay queued.
    let mesh = Mesh::start_with(MeshOptions {
        no_runner: true,
        ..Default::default()
    })
    .await;

    let err = mesh
        .scheduler(ALICE_TOKEN)
        .set_limits(SetLimitsRequest {
            limits: Some(Limits {
                scope: LimitScope::User as i32,
                subject: "alice".into(),
                max_queued_jobs: Some(100),
                ..Default::default()
            }),
        })
        .await
        .expect_err("a user sets her own limit");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    mesh.scheduler(ADMIN_TOKEN)
        .set_limits(SetLimitsRequest {
            limits: Some(Limits {
                scope: LimitScope::User as i32,
                subject: "alice".into(),
                max_queued_jobs: Some(2),
                ..Default::default()
            }),
        })
        .await
        .expect("admin sets alice's queued-jobs limit");
    let limits = mesh
        .scheduler(ALICE_TOKEN)
        .get_limits(GetLimitsRequest {
            user: "alice".into(),
            org: "ml".into(),
        })
        .await
        .expect("alice reads her limits")
        .into_inner();
    let effective = limits
        .effective
        .iter()
        .find(|e| e.name == "max_queued_jobs")
        .unwrap_or_else(|| panic!("an effective max_queued_jobs: {limits:#?}"));
    assert_eq!(effective.value, 2);
    assert_eq!(effective.binding_scope, LimitScope::User as i32);

    let first = create(&mesh, ALICE_TOKEN, "a1").await.expect("1st job");
    create(&mesh, ALICE_TOKEN, "a2").await.expect("2nd job");
    let err = create(&mesh, ALICE_TOKEN, "a3")
        .await
        .expect_err("3rd job over the queued-jobs limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let msg = err.message();
    assert!(msg.contains("queued-jobs limit"), "names the limit: {msg}");
    assert!(msg.contains("alice"), "names the user: {msg}");
    assert!(msg.contains('2'), "names the limit's value: {msg}");
    assert_eq!(count_jobs(&mesh, ALICE_TOKEN).await, 2, "nothing stored");

    let again = create(&mesh, ALICE_TOKEN, "a1")
        .await
        .expect("an idempotent retry is never refused");
    assert!(again.existing);
    assert_eq!(
        again.job.map(|j| j.id),
        first.job.as_ref().map(|j| j.id.clone())
    );

    for key in ["b1", "b2", "b3"] {
        create(&mesh, BOB_TOKEN, key)
            .await
            .unwrap_or_else(|e| panic!("bob is not limited by alice's limit: {e:?}"));
    }

    // A cancelled job no longer counts as queued.
    let first_id = first.job.expect("job").id;
    mesh.jobs(ALICE_TOKEN)
        .cancel_job(CancelJobRequest {
            job_id: first_id.clone(),
            reason: "make room".into(),
        })
        .await
        .expect("cancel");
    wait_state(
        &mesh,
        &first_id,
        JobState::Cancelled,
        Duration::from_secs(20),
    )
    .await;
    create(&mesh, ALICE_TOKEN, "a4")
        .await
        .expect("room again after a cancel");
    mesh.stop().await;
}
