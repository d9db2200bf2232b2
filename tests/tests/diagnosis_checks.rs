//! The diagnosis's static checks against the live mesh: a job that asks
//! for more than any runner offers is diagnosed from the scheduler's list
//! of runners, before it ever runs.

use std::time::Duration;

use trainmesh_common::testing::wait_for;
use trainmesh_proto::diagnosis::v1::DiagnoseJobRequest;
use trainmesh_proto::job::v1::{CreateJobRequest, JobSpec, Resources};
use trainmesh_proto::scheduler::v1::{ListRunnersRequest, RunnerState};
use trainmesh_tests::{Mesh, ADMIN_TOKEN, ALICE_TOKEN};

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_asking_for_more_gpus_than_any_runner_has_is_diagnosed_before_it_runs() {
    let mesh = Mesh::start().await;
    wait_for("the runner to be ready", DEADLINE, || {
        let mut s = mesh.scheduler(ADMIN_TOKEN);
        async move {
            let runners = s
                .list_runners(ListRunnersRequest {})
                .await
                .ok()?
                .into_inner()
                .runners;
            runners
                .iter()
                .any(|r| r.state == RunnerState::Ready as i32)
                .then_some(())
        }
    })
    .await;
    let job = mesh
        .jobs(ALICE_TOKEN)
        .create_job(CreateJobRequest {
            spec: Some(JobSpec {
                name: "too-big".into(),
                image: "python:3.11-slim".into(),
                command: vec!["python3".into(), "-c".into(), "pass".into()],
                resources: Some(Resources {
                    gpus: 64,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            idempotency_key: String::new(),
        })
        .await
        .expect("create job")
        .into_inner()
        .job
        .expect("job");

    let d = mesh
        .diagnosis(ALICE_TOKEN)
        .diagnose_job(DiagnoseJobRequest {
            job_id: job.id.clone(),
            use_llm: false,
        })
        .await
        .expect("diagnose")
        .into_inner()
        .diagnosis
        .expect("diagnosis");
    assert!(!d.healthy, "{}", d.text);
    assert_eq!(d.category, "resource", "{}", d.text);
    let finding = d
        .findings
        .iter()
        .find(|f| f.rule_id == "beyond-fleet")
        .unwrap_or_else(|| panic!("{:?}", d.findings));
    let evidence = &finding.evidence[0].text;
    assert!(
        evidence.starts_with("each replica asks for 64 GPUs; no runner offers that: "),
        "{evidence}"
    );
    assert!(evidence.contains("test-runner: "), "{evidence}");
    assert!(
        d.error.starts_with("No runner can take the job as it asks"),
        "{}",
        d.error
    );
}
