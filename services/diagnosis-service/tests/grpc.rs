//! diagnosis-service over real gRPC on loopback, reading jobs from an
//! in-test job-service (a real tonic peer that serves GetJob and
//! StreamJobLogs), on SQLite and (when `TRAINMESH_TEST_POSTGRES_URL` is set)
//! PostgreSQL. The LLM half is in `llm.rs`.

mod common;

use std::sync::Arc;

use common::{start_fake_jobs, Diag, FakeJobs};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};
use trainmesh_common::proto::diagnosis::v1 as dpb;
use trainmesh_common::proto::job::v1 as jpb;
use trainmesh_common::testing;

const OOM_LINE: &str = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.20 GiB is free.";

/// A failed job of alice's whose 1500-line log ends in a CUDA OOM at line 1497.
fn failed_oom_job(fake: &FakeJobs) -> String {
    let id = uuid::Uuid::now_v7().to_string();
    let mut log: Vec<String> = (1..=1480)
        .map(|i| {
            format!(
                "{{'loss': {:.3}, 'learning_rate': 2e-05, 'epoch': {i}}}",
                2.0 / i as f64
            )
        })
        .collect();
    log.extend(
        [
            "Traceback (most recent call last):",
            "  File \"/workspace/train.py\", line 142, in <module>",
            "    main()",
            "  File \"/workspace/train.py\", line 120, in main",
            "    trainer.train()",
            "  File \"/usr/local/lib/python3.10/dist-packages/transformers/trainer.py\", line 1938, in train",
            "    return inner_training_loop(",
            "  File \"/usr/local/lib/python3.10/dist-packages/torch/_tensor.py\", line 522, in backward",
            "    torch.autograd.backward(",
            "  File \"/usr/local/lib/python3.10/dist-packages/torch/autograd/graph.py\", line 768, in _engine_run_backward",
            "    return Variable._execution_engine.run_backward(",
            "  File \"/usr/local/lib/python3.10/dist-packages/torch/nn/modules/module.py\", line 1553, in _wrapped_call_impl",
            "    return self._call_impl(*args, **kwargs)",
            "  File \"/usr/local/lib/python3.10/dist-packages/torch/nn/modules/linear.py\", line 117, in forward",
            "    return F.linear(input, self.weight, self.bias)",
            "  File \"<frozen>\", line 1, in <module>",
            OOM_LINE,
            "[2025-01-10 12:00:42] ERROR runner: process exited with code 1",
            "",
            "",
        ]
        .map(String::from),
    );
    assert_eq!(log[1496], OOM_LINE);
    let job = jpb::Job {
        id: id.clone(),
        owner: "alice".into(),
        org: "ml".into(),
        spec: Some(jpb::JobSpec {
            name: "llama-sft".into(),
            resources: Some(jpb::Resources {
                gpus: 1,
                shm_mib: 8192,
                ..Default::default()
            }),
            ..Default::default()
        }),
        state: jpb::JobState::Failed as i32,
        failure_cause: jpb::FailureCause::UserCode as i32,
        error: Some(jpb::JobError {
            r#type: "torch.OutOfMemoryError".into(),
            message: OOM_LINE
                .trim_start_matches("torch.OutOfMemoryError: ")
                .into(),
            traceback: "Traceback (most recent call last):\n  ...".into(),
            exit_code: 1,
            category: "cuda-oom".into(),
            ..Default::default()
        }),
        attempts: vec![jpb::Attempt {
            number: 1,
            exit_code: Some(1),
            ..Default::default()
        }],
        correlation_id: "job-cid-1".into(),
        ..Default::default()
    };
    fake.jobs.lock().unwrap().insert(id.clone(), (job, log));
    id
}

fn diagnose_req(job_id: &str) -> dpb::DiagnoseJobRequest {
    dpb::DiagnoseJobRequest {
        job_id: job_id.into(),
        use_llm: false,
    }
}

#[tokio::test]
async fn failed_job_with_cuda_oom_is_diagnosed_stored_and_kept_from_other_users() {
    let tokens = testing::test_tokens();
    for db in testing::all_dbs().await {
        let fake = Arc::new(FakeJobs::default());
        let job_id = failed_oom_job(&fake);
        let jobs_addr = start_fake_jobs(fake.clone()).await;
        let server = Diag::start(&db, &jobs_addr.to_string(), |_| {}).await;
        let mut alice = server.client(tokens.alice);

        let mut req = Request::new(diagnose_req(&job_id));
        req.metadata_mut().insert(
            "x-correlation-id",
            MetadataValue::from_static("diag-test-cid"),
        );
        let d = alice
            .diagnose_job(req)
            .await
            .unwrap()
            .into_inner()
            .diagnosis
            .unwrap();
        let label = db.label;
        assert!(!d.healthy, "{label}");
        assert_eq!(d.job_id, job_id);
        assert_eq!(d.category, "cuda-oom");
        assert_eq!(d.findings[0].rule_id, "cuda-oom");
        assert_eq!(d.findings[0].layer, dpb::Layer::Execution as i32);
        assert_eq!(d.prompt_version, "rules-v1");
        assert!(d.llm_text.is_empty());
        assert!(d.create_time.is_some());

        let oom = d
            .evidence
            .iter()
            .find(|e| e.source == "log")
            .expect("log evidence");
        assert_eq!((oom.line_number, oom.text.as_str()), (1497, OOM_LINE));
        assert!(d.evidence.iter().any(|e| e.source == "error"
            && e.text
                .starts_with("torch.OutOfMemoryError: CUDA out of memory")));

        let lines: Vec<&str> = d.text.split('\n').collect();
        assert_eq!(lines.len(), 4, "{}", d.text);
        assert_eq!(lines[0], "Healthy: No");
        assert!(
            lines[1].starts_with("Error: CUDA out of memory (torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
            "{}",
            lines[1]
        );
        assert_eq!(lines[1], format!("Error: {}", d.error));
        assert_eq!(lines[2], format!("Analysis: {}", d.analysis));
        assert!(d.analysis.contains("log line 1497"), "{}", d.analysis);
        assert_eq!(lines[3], format!("Solution: {}", d.solution));
        assert!(!d.solution.is_empty());

        // The caller's correlation id travelled to job-service.
        assert!(fake
            .seen_correlation_ids
            .lock()
            .unwrap()
            .contains(&"diag-test-cid".to_string()));

        let by_id = alice
            .get_diagnosis(dpb::GetDiagnosisRequest {
                diagnosis_id: d.id.clone(),
                job_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .diagnosis
            .unwrap();
        assert_eq!(by_id, d);
        let latest = alice
            .get_diagnosis(dpb::GetDiagnosisRequest {
                diagnosis_id: String::new(),
                job_id: job_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .diagnosis
            .unwrap();
        assert_eq!(latest.id, d.id);
        let listed = alice
            .list_diagnoses(dpb::ListDiagnosesRequest {
                job_id: job_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.diagnoses, vec![d.clone()]);
        assert!(listed.next_page_token.is_empty());

        // Another user sees nothing of it.
        let mut bob = server.client(tokens.bob);
        let e = bob.diagnose_job(diagnose_req(&job_id)).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{label}: {e:?}");
        let e = bob
            .get_diagnosis(dpb::GetDiagnosisRequest {
                diagnosis_id: d.id.clone(),
                job_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = bob
            .get_diagnosis(dpb::GetDiagnosisRequest {
                diagnosis_id: String::new(),
                job_id: job_id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let bobs = bob
            .list_diagnoses(dpb::ListDiagnosesRequest {
                job_id: job_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(bobs.diagnoses.is_empty());

        // Admins and services may.
        let mut admin = server.client(tokens.admin);
        admin
            .get_diagnosis(dpb::GetDiagnosisRequest {
                diagnosis_id: d.id.clone(),
                job_id: String::new(),
            })
            .await
            .unwrap();
        let mut service = server.client(tokens.job_service);
        let again = service
            .diagnose_job(diagnose_req(&job_id))
            .await
            .unwrap()
            .into_inner()
            .diagnosis
            .unwrap();
        assert_ne!(again.id, d.id);
        server.stop().await;
    }
}

#[tokio::test]
async fn unknown_jobs_bad_ids_and_an_unreachable_job_service_are_told_apart() {
    let tokens = testing::test_tokens();
    let db = testing::sqlite_db();
    let fake = Arc::new(FakeJobs::default());
    let jobs_addr = start_fake_jobs(fake).await;
    let server = Diag::start(&db, &jobs_addr.to_string(), |_| {}).await;
    let mut c = server.client(tokens.alice);

    let e = c
        .diagnose_job(diagnose_req(&uuid::Uuid::new_v4().to_string()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c.diagnose_job(diagnose_req("nope")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("job_id"));
    let e = c
        .get_diagnosis(dpb::GetDiagnosisRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .list_diagnoses(dpb::ListDiagnosesRequest {
            page_token: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    server.stop().await;

    // A port nobody listens on.
    let (closed, closed_addr) = testing::listener().await;
    drop(closed);
    let server = Diag::start(&db, &closed_addr.to_string(), |_| {}).await;
    let mut c = server.client(tokens.alice);
    let e = c
        .diagnose_job(diagnose_req(&uuid::Uuid::new_v4().to_string()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    server.stop().await;
}

#[tokio::test]
async fn diagnoses_are_listed_newest_first_in_pages() {
    let tokens = testing::test_tokens();
    for db in testing::all_dbs().await {
        let fake = Arc::new(FakeJobs::default());
        let job_id = failed_oom_job(&fake);
        let other = failed_oom_job(&fake);
        let jobs_addr = start_fake_jobs(fake).await;
        let server = Diag::start(&db, &jobs_addr.to_string(), |_| {}).await;
        let mut c = server.client(tokens.alice);
        let mut ids = Vec::new();
        for _ in 0..3 {
            let d = c
                .diagnose_job(diagnose_req(&job_id))
                .await
                .unwrap()
                .into_inner();
            ids.push(d.diagnosis.unwrap().id);
        }
        c.diagnose_job(diagnose_req(&other)).await.unwrap();
        let page = |token: String| dpb::ListDiagnosesRequest {
            job_id: job_id.clone(),
            page_size: 2,
            page_token: token,
        };
        let first = c
            .list_diagnoses(page(String::new()))
            .await
            .unwrap()
            .into_inner();
        let got: Vec<_> = first.diagnoses.iter().map(|d| d.id.clone()).collect();
        assert_eq!(got, [ids[2].clone(), ids[1].clone()], "{}", db.label);
        assert!(!first.next_page_token.is_empty());
        let second = c
            .list_diagnoses(page(first.next_page_token))
            .await
            .unwrap()
            .into_inner();
        let got: Vec<_> = second.diagnoses.iter().map(|d| d.id.clone()).collect();
        assert_eq!(got, [ids[0].clone()]);
        assert!(second.next_page_token.is_empty());

        // Without a job id: every diagnosis the caller may see.
        let all = c
            .list_diagnoses(dpb::ListDiagnosesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.diagnoses.len(), 4);
        let mut bob = server.client(tokens.bob);
        let none = bob
            .list_diagnoses(dpb::ListDiagnosesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(none.diagnoses.is_empty());
        server.stop().await;
    }
}

#[tokio::test]
async fn prompt_templates_and_a_rules_file() {
    let tokens = testing::test_tokens();
    let db = testing::sqlite_db();
    let fake = Arc::new(FakeJobs::default());
    let job_id = failed_oom_job(&fake);
    let jobs_addr = start_fake_jobs(fake).await;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - id: site-oom\n    layer: execution\n    category: site\n    \
         summary: Site rule\n    hint: Ask the site admins.\n    \
         log_patterns: ['Tried to allocate']\n",
    )
    .unwrap();
    let server = Diag::start(&db, &jobs_addr.to_string(), |c| {
        c.rules_file = Some(rules.clone());
    })
    .await;
    let mut c = server.client(tokens.alice);
    let t = c
        .list_prompt_templates(dpb::ListPromptTemplatesRequest {})
        .await
        .unwrap()
        .into_inner()
        .templates;
    let kinds: Vec<&str> = t.iter().map(|t| t.kind.as_str()).collect();
    assert_eq!(kinds, ["job", "master", "worker"]);
    for t in &t {
        assert_eq!(t.source, "builtin");
        assert!(t.version.starts_with("builtin@"), "{}", t.version);
        assert!(t.text.contains("{{.LogInfo}}") && t.text.contains("{{.Metadata.JobName}}"));
    }

    let d = c
        .diagnose_job(diagnose_req(&job_id))
        .await
        .unwrap()
        .into_inner()
        .diagnosis
        .unwrap();
    let ids: Vec<_> = d.findings.iter().map(|f| f.rule_id.as_str()).collect();
    assert_eq!(ids, ["site-oom", "cuda-oom"]);
    server.stop().await;
}
