//! A user reaches only their own jobs' data, in every service that holds
//! some: metrics (metrics-service asks job-service whose job it is), logs
//! (job-service) and diagnoses (diagnosis-service). Against the real
//! binaries.

use tonic::Code;
use trainmesh_proto::diagnosis::v1::{
    DiagnoseJobRequest, GetDiagnosisRequest, ListDiagnosesRequest,
};
use trainmesh_proto::job::v1::{JobState, StreamJobLogsRequest};
use trainmesh_proto::metrics::v1::{
    GetLatestMetricsRequest, ListMetricKeysRequest, MetricPoint, QueryMetricsRequest,
    WatchMetricsRequest, WriteMetricsRequest,
};
use trainmesh_tests::jobs::{python_job, submit, wait_state};
use trainmesh_tests::{
    runner_token, Mesh, ADMIN_TOKEN, ALICE_TOKEN, BOB_TOKEN, DIAGNOSIS_TOKEN, JOB_SERVICE_TOKEN,
    RUNNER_TOKEN, SCHEDULER_TOKEN,
};

fn write(job_id: &str, step: i64) -> WriteMetricsRequest {
    WriteMetricsRequest {
        attempt: 0,
        job_id: job_id.to_owned(),
        points: vec![MetricPoint {
            key: "loss".into(),
            step,
            value: 0.5,
            ..Default::default()
        }],
        json_records: Vec::new(),
    }
}

/// Every metrics RPC `token` can make on `job_id`, with the code each got.
async fn metrics_codes(mesh: &Mesh, token: &str, job_id: &str) -> Vec<(&'static str, Code)> {
    let mut m = mesh.metrics(token);
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    vec![
        (
            "WriteMetrics",
            code(m.write_metrics(write(job_id, 7)).await.map(drop)),
        ),
        (
            "GetLatestMetrics",
            code(
                m.get_latest_metrics(GetLatestMetricsRequest {
                    job_id: job_id.to_owned(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            "QueryMetrics",
            code(
                m.query_metrics(QueryMetricsRequest {
                    job_id: job_id.to_owned(),
                    keys: vec!["loss".into()],
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            "ListMetricKeys",
            code(
                m.list_metric_keys(ListMetricKeysRequest {
                    job_id: job_id.to_owned(),
                })
                .await
                .map(drop),
            ),
        ),
        (
            "WatchMetrics",
            code(
                m.watch_metrics(WatchMetricsRequest {
                    job_id: job_id.to_owned(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_reach_only_their_own_jobs_metrics_logs_and_diagnoses() {
    let mesh = Mesh::start().await;
    let job = submit(
        &mesh,
        ALICE_TOKEN,
        python_job("owned", "print('hello'); raise SystemExit(3)", &[]),
    )
    .await;
    wait_state(
        &mesh,
        &job.id,
        JobState::Failed,
        std::time::Duration::from_secs(60),
    )
    .await;
    // The runner the attempt ran on writes its metrics; another runner and
    // the services may not.
    let mut own = write(&job.id, 1);
    own.attempt = 1;
    mesh.metrics(RUNNER_TOKEN)
        .write_metrics(own.clone())
        .await
        .expect("the runner writes");
    for token in [
        runner_token("runner-b").as_str(),
        JOB_SERVICE_TOKEN,
        SCHEDULER_TOKEN,
        DIAGNOSIS_TOKEN,
    ] {
        let err = mesh
            .metrics(token)
            .write_metrics(own.clone())
            .await
            .expect_err("only the attempt's runner writes");
        assert_eq!(err.code(), Code::PermissionDenied, "{token}: {err:?}");
    }

    for (rpc, code) in metrics_codes(&mesh, ALICE_TOKEN, &job.id).await {
        assert_eq!(code, Code::Ok, "alice {rpc}");
    }
    for (rpc, code) in metrics_codes(&mesh, ADMIN_TOKEN, &job.id).await {
        assert_eq!(code, Code::Ok, "admin {rpc}");
    }
    // Another user's job looks like no job at all.
    for (rpc, code) in metrics_codes(&mesh, BOB_TOKEN, &job.id).await {
        assert_eq!(code, Code::NotFound, "bob {rpc}");
    }
    // Bob's write was not stored: alice's latest step is still hers.
    let latest = mesh
        .metrics(ALICE_TOKEN)
        .get_latest_metrics(GetLatestMetricsRequest {
            job_id: job.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.points.len(), 1);

    let logs = mesh
        .jobs(BOB_TOKEN)
        .stream_job_logs(StreamJobLogsRequest {
            job_id: job.id.clone(),
            tail_lines: 10,
            ..Default::default()
        })
        .await;
    assert_eq!(
        logs.err().map(|s| s.code()),
        Some(Code::NotFound),
        "bob's logs"
    );

    let mut bobs = mesh.diagnosis(BOB_TOKEN);
    let diagnose = bobs
        .diagnose_job(DiagnoseJobRequest {
            job_id: job.id.clone(),
            use_llm: false,
        })
        .await;
    assert!(
        matches!(
            diagnose.as_ref().map_err(|s| s.code()),
            Err(Code::NotFound | Code::PermissionDenied)
        ),
        "bob diagnoses alice's job: {diagnose:?}"
    );
    let get = bobs
        .get_diagnosis(GetDiagnosisRequest {
            job_id: job.id.clone(),
            ..Default::default()
        })
        .await;
    assert!(
        matches!(
            get.as_ref().map_err(|s| s.code()),
            Err(Code::NotFound | Code::PermissionDenied)
        ),
        "bob reads alice's diagnosis: {get:?}"
    );
    let listed = bobs
        .list_diagnoses(ListDiagnosesRequest {
            job_id: job.id.clone(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().diagnoses.len());
    assert!(
        matches!(listed, Ok(0)) || listed.is_err(),
        "bob lists alice's diagnoses: {listed:?}"
    );
    mesh.stop().await;
}
