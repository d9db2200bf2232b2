//! The LLM half of DiagnoseJob over real gRPC, against an in-test
//! chat-completions endpoint that speaks the real wire format
//! ([`common::fake_llm`]), on SQLite and (when
//! `TRAINMESH_TEST_POSTGRES_URL` is set) PostgreSQL. What happens when the
//! endpoint fails is in `failures.rs`.

#[path = "../common/mod.rs"]
mod common;
mod failures;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::fake_llm::{FakeLlm, Received, Reply, ANSWER};
use common::{start_fake_jobs, Diag, FakeJobs};
use diagnosis_service::llm::LlmSettings;
use diagnosis_service::Config;
use sha2::{Digest, Sha256};
use tonic::Request;
use trainmesh_common::client::Channel;
use trainmesh_common::proto::diagnosis::v1 as dpb;
use trainmesh_common::proto::job::v1 as jpb;
use trainmesh_common::testing;

type Client = dpb::diagnosis_service_client::DiagnosisServiceClient<Channel>;

const BODY: &str = r#" {{ index .Metadata "JobName" }} status={{ index .Metadata "JobStatus" }}
masters {{ index .Metadata "MasterCreatedCount" }}/{{ index .Metadata "MasterExpected" }} workers {{ index .Metadata "WorkerCreatedCount" }}/{{ index .Metadata "WorkerExpected" }}
{{- /* Aegis writes `index`; `.Metadata.Key` works too. */}}
master: {{.Metadata.MasterDiagnosis}}
workers: {{ index .Metadata "WorkerDiagnosis" }}
ERRORS:
{{.ErrorInfo}}
EVENTS:
{{ .EventInfo }}
LOGS:
{{.LogInfo -}}
"#;

fn ddp_log() -> Vec<String> {
    [
        "[trainmesh] k8s: created PyTorchJob training/ddp",
        "rank0: loading model",
        "rank0: step 10 loss=2.31",
        "[trainmesh] k8s: event Failed pod=ddp-worker-1 container=pytorch exit_code=137: OOMKilled",
        "[trainmesh] k8s: log of worker (pod ddp-worker-1), last 500 lines:",
        "[ddp-worker-1] rank2: loading shard 3",
        "[ddp-worker-1] Killed",
        "[ddp-worker-0] rank1: step 10 loss=2.30",
        "[rank0]:[E ProcessGroupNCCL.cpp:1182] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=42, OpType=ALLREDUCE) ran for 600000 milliseconds before timing out.",
        "Traceback (most recent call last):",
        "torch.distributed.DistBackendError: NCCL communicator was aborted on rank 0.",
    ]
    .map(String::from)
    .to_vec()
}

fn replica(
    role: &str,
    name: &str,
    phase: &str,
    reason: &str,
    exit: Option<i32>,
) -> jpb::ReplicaStatus {
    jpb::ReplicaStatus {
        role: role.into(),
        name: name.into(),
        phase: phase.into(),
        reason: reason.into(),
        message: String::new(),
        exit_code: exit,
        restarts: 0,
    }
}

/// A failed PyTorchJob-shaped job of alice's: a master and two workers,
/// one of them OOM-killed; `workers` 0 makes it a single-replica job.
fn add_job(fake: &FakeJobs, workers: i32) -> String {
    let id = uuid::Uuid::now_v7().to_string();
    let replicas = if workers > 0 {
        vec![
            replica("master", "ddp-master-0", "Failed", "Error", Some(1)),
            replica("worker", "ddp-worker-0", "Running", "", None),
            replica("worker", "ddp-worker-1", "Failed", "OOMKilled", Some(137)),
        ]
    } else {
        Vec::new()
    };
    let job = jpb::Job {
        id: id.clone(),
        owner: "alice".into(),
        org: "ml".into(),
        spec: Some(jpb::JobSpec {
            name: "ddp".into(),
            replicas: Some(jpb::Replicas {
                masters: 1,
                workers,
            }),
            ..Default::default()
        }),
        state: jpb::JobState::Failed as i32,
        failure_cause: jpb::FailureCause::UserCode as i32,
        state_reason: "worker ddp-worker-1 failed: OOMKilled".into(),
        error: Some(jpb::JobError {
            r#type: "torch.distributed.DistBackendError".into(),
            message: "NCCL communicator was aborted on rank 0.".into(),
            exit_code: 1,
            replicas,
            ..Default::default()
        }),
        attempts: vec![jpb::Attempt {
            number: 1,
            exit_code: Some(1),
            ..Default::default()
        }],
        ..Default::default()
    };
    fake.add(job, ddp_log());
    id
}

fn use_llm(c: &mut Config, llm: &FakeLlm) {
    let mut s = LlmSettings::new(llm.base_url(), "test-model");
    s.backoff = Duration::from_millis(10);
    s.timeout = Duration::from_secs(20);
    c.llm = Some(s);
}

fn template_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("master.tmpl"), format!("MASTER{BODY}")).unwrap();
    std::fs::write(dir.path().join("worker.tmpl"), format!("WORKER{BODY}")).unwrap();
    dir
}

fn key_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("api-key");
    std::fs::write(&p, "sk-test-123\n").unwrap();
    p
}

async fn diagnose(c: &mut Client, job_id: &str, llm: bool) -> dpb::Diagnosis {
    diagnose_req(
        c,
        Request::new(dpb::DiagnoseJobRequest {
            job_id: job_id.into(),
            use_llm: llm,
        }),
    )
    .await
}

async fn diagnose_req(c: &mut Client, req: Request<dpb::DiagnoseJobRequest>) -> dpb::Diagnosis {
    c.diagnose_job(req)
        .await
        .unwrap()
        .into_inner()
        .diagnosis
        .unwrap()
}

async fn latest(c: &mut Client, job_id: &str) -> dpb::Diagnosis {
    c.get_diagnosis(dpb::GetDiagnosisRequest {
        diagnosis_id: String::new(),
        job_id: job_id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .diagnosis
    .unwrap()
}

/// The job's stored diagnosis once its first analysis has `want`.
async fn stored_with(c: &Client, job_id: &str, want: dpb::LlmStatus, what: &str) -> dpb::Diagnosis {
    testing::wait_for(what, Duration::from_secs(15), || {
        let mut c = c.clone();
        let id = job_id.to_owned();
        async move {
            let d = latest(&mut c, &id).await;
            (status(&d.llm_analyses[0]) == want).then_some(d)
        }
    })
    .await
}

/// The rules' answer: what the LLM must never change.
fn rules_answer(d: &dpb::Diagnosis) -> impl PartialEq + std::fmt::Debug {
    (
        (
            d.healthy,
            d.error.clone(),
            d.analysis.clone(),
            d.solution.clone(),
        ),
        (d.text.clone(), d.category.clone()),
        (d.findings.clone(), d.evidence.clone()),
    )
}

fn status(a: &dpb::LlmAnalysis) -> dpb::LlmStatus {
    dpb::LlmStatus::try_from(a.status).unwrap()
}

/// The part of a prompt between `start` and `end` (or its end).
fn section<'a>(prompt: &'a str, start: &str, end: Option<&str>) -> &'a str {
    let from = prompt
        .find(start)
        .unwrap_or_else(|| panic!("no {start} in {prompt}"))
        + start.len();
    let rest = &prompt[from..];
    let to = end.and_then(|e| rest.find(e)).unwrap_or(rest.len());
    rest[..to].trim()
}

#[tokio::test]
async fn master_and_the_oom_killed_worker_are_analysed_from_custom_templates_beside_the_rules() {
    let tokens = testing::test_tokens();
    for db in testing::all_dbs().await {
        let label = db.label;
        let fake = Arc::new(FakeJobs::default());
        let job_id = add_job(&fake, 2);
        let jobs = start_fake_jobs(fake).await;
        let llm = FakeLlm::start(Vec::new(), Reply::Answer(ANSWER.into())).await;
        let dir = template_dir();
        let key = key_file(dir.path());
        let server = Diag::start(&db, &jobs.to_string(), |c| {
            use_llm(c, &llm);
            c.prompt_dir = Some(dir.path().to_owned());
            if let Some(s) = c.llm.as_mut() {
                s.api_key_file = Some(key.clone());
            }
        })
        .await;
        let mut alice = server.client(tokens.alice);

        let templates = alice
            .list_prompt_templates(dpb::ListPromptTemplatesRequest {})
            .await
            .unwrap()
            .into_inner()
            .templates;
        let version = |kind: &str| {
            let t = templates.iter().find(|t| t.kind == kind).unwrap();
            t.version.clone()
        };
        let (master_v, worker_v) = (version("master"), version("worker"));
        assert!(master_v.starts_with("master.tmpl@"), "{master_v}");
        assert!(worker_v.starts_with("worker.tmpl@"), "{worker_v}");
        assert!(version("job").starts_with("builtin@"));

        let rules_only = diagnose(&mut alice, &job_id, false).await;
        assert!(rules_only.llm_analyses.is_empty() && rules_only.llm_text.is_empty());
        assert!(llm.received().is_empty(), "{label}: asked without use_llm");
        let d = diagnose(&mut alice, &job_id, true).await;
        assert_eq!(rules_answer(&d), rules_answer(&rules_only), "{label}");
        assert!(!d.healthy);

        // One request per analysed replica: the master and the OOM-killed
        // worker, not the healthy one.
        let got = llm.received();
        assert_eq!(got.len(), 2, "{label}: {got:#?}");
        let prompt_of = |first: &str| -> Received {
            got.iter()
                .find(|r| r.prompt().starts_with(first))
                .cloned()
                .unwrap()
        };
        let master = prompt_of("MASTER ");
        let worker = prompt_of("WORKER ");
        for r in [&master, &worker] {
            assert_eq!(r.path, "/v1/chat/completions");
            assert_eq!(r.authorization.as_deref(), Some("Bearer sk-test-123"));
            assert_eq!(r.model(), "test-model");
            let p = r.prompt();
            assert!(p.contains(" ddp status=Failed: worker ddp-worker-1 failed: OOMKilled\nmasters 1/1 workers 2/2\nmaster: ddp-master-0: Failed, Error, exit 1, 0 restarts\n"), "{p}");
            assert!(p.contains("workers: ddp-worker-0: Running, 0 restarts\nddp-worker-1: Failed, OOMKilled, exit 137, 0 restarts\n"), "{p}");
            let events = section(p, "EVENTS:", Some("LOGS:"));
            assert!(
                events.starts_with("Job state: FAILED (worker ddp-worker-1 failed: OOMKilled)"),
                "{events}"
            );
            assert!(events.contains("4: [trainmesh] k8s: event Failed pod=ddp-worker-1 container=pytorch exit_code=137: OOMKilled"), "{events}");
            let errors = section(p, "ERRORS:", Some("EVENTS:"));
            assert!(errors.contains("Job error: torch.distributed.DistBackendError: NCCL communicator was aborted on rank 0."), "{errors}");
        }
        let m_logs = section(master.prompt(), "LOGS:", None);
        assert!(m_logs.starts_with("2: rank0: loading model\n3: rank0: step 10 loss=2.31\n9: [rank0]:[E ProcessGroupNCCL.cpp:1182]"), "{m_logs}");
        assert!(
            m_logs.ends_with(
                "11: torch.distributed.DistBackendError: NCCL communicator was aborted on rank 0."
            ),
            "{m_logs}"
        );
        assert!(
            !m_logs.contains("Killed") && !m_logs.contains("loss=2.30"),
            "{m_logs}"
        );
        assert_eq!(
            section(worker.prompt(), "LOGS:", None),
            "6: rank2: loading shard 3\n7: Killed"
        );
        assert!(section(worker.prompt(), "ERRORS:", None).starts_with(
            "Replica analysed: worker ddp-worker-1: Failed, OOMKilled, exit 137, 0 restarts"
        ));

        // The answers, beside the rules' findings.
        let who: Vec<(&str, &str)> = d
            .llm_analyses
            .iter()
            .map(|a| (a.kind.as_str(), a.replica.as_str()))
            .collect();
        assert_eq!(
            who,
            [("master", "ddp-master-0"), ("worker", "ddp-worker-1")]
        );
        for (a, r, v) in [
            (&d.llm_analyses[0], &master, &master_v),
            (&d.llm_analyses[1], &worker, &worker_v),
        ] {
            assert_eq!(status(a), dpb::LlmStatus::Ok, "{label}: {a:?}");
            assert!(!a.healthy);
            assert_eq!(a.error, "Worker ddp-worker-1 was OOMKilled");
            assert_eq!(a.analysis, "The worker was killed with exit code 137 (log line 9).\nThe master then lost its peer.");
            assert_eq!(a.solution, "Raise the worker's memory limit.");
            assert_eq!(a.raw_text, ANSWER);
            assert_eq!(&a.prompt_version, v);
            assert_eq!(
                a.prompt_sha256,
                hex::encode(Sha256::digest(r.prompt().as_bytes()))
            );
            assert_eq!(
                (a.model.as_str(), a.attempt, a.cached),
                ("test-model", 1, false)
            );
        }
        assert_eq!(
            d.prompt_version,
            format!("rules-v1; master={master_v}; worker={worker_v}")
        );
        assert!(
            d.llm_text
                .starts_with("[master ddp-master-0] (test-model, prompt master.tmpl@"),
            "{}",
            d.llm_text
        );
        assert!(
            d.llm_text.contains("\n\n[worker ddp-worker-1] (test-model"),
            "{}",
            d.llm_text
        );
        assert_eq!(
            latest(&mut alice, &job_id).await,
            d,
            "{label}: stored as returned"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn a_second_diagnosis_of_the_same_attempt_does_not_ask_again_even_after_a_restart() {
    let tokens = testing::test_tokens();
    for db in testing::all_dbs().await {
        let fake = Arc::new(FakeJobs::default());
        let job_id = add_job(&fake, 2);
        let jobs = start_fake_jobs(fake).await;
        let llm = FakeLlm::start(Vec::new(), Reply::Answer(ANSWER.into())).await;
        let server = Diag::start(&db, &jobs.to_string(), |c| use_llm(c, &llm)).await;
        let first = diagnose(&mut server.client(tokens.alice), &job_id, true).await;
        assert_eq!(llm.received().len(), 2);
        let second = diagnose(&mut server.client(tokens.alice), &job_id, true).await;
        server.stop().await;
        let server = Diag::start(&db, &jobs.to_string(), |c| use_llm(c, &llm)).await;
        let third = diagnose(&mut server.client(tokens.alice), &job_id, true).await;
        assert_eq!(llm.received().len(), 2, "{}: asked again", db.label);
        for d in [&second, &third] {
            assert_ne!(d.id, first.id);
            assert_eq!(d.llm_analyses.len(), 2);
            for (a, b) in d.llm_analyses.iter().zip(&first.llm_analyses) {
                assert!(a.cached, "{}", db.label);
                assert_eq!(status(a), dpb::LlmStatus::Ok);
                assert_eq!((&a.error, &a.prompt_sha256), (&b.error, &b.prompt_sha256));
            }
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn without_an_llm_use_llm_changes_nothing() {
    let tokens = testing::test_tokens();
    let db = testing::sqlite_db();
    let fake = Arc::new(FakeJobs::default());
    let job_id = add_job(&fake, 2);
    let jobs = start_fake_jobs(fake).await;
    let server = Diag::start(&db, &jobs.to_string(), |_| {}).await;
    let mut alice = server.client(tokens.alice);
    let d = diagnose(&mut alice, &job_id, true).await;
    assert!(d.llm_analyses.is_empty());
    assert!(d.llm_text.is_empty());
    assert_eq!(d.prompt_version, "rules-v1");
    server.stop().await;
}

#[tokio::test]
async fn a_bad_prompt_template_stops_the_start() {
    let tokens = testing::test_tokens();
    let db = testing::sqlite_db();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("worker.tmpl"),
        "ok\nlog: {{ index .Metadata \"PodName\" }}",
    )
    .unwrap();
    let mut config = Config::new(tokens.store.clone(), db.url.clone(), "127.0.0.1:1", None);
    config.prompt_dir = Some(dir.path().to_owned());
    let (listener, _) = testing::listener().await;
    let e = diagnosis_service::run(config, listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("worker.tmpl` line 2 column 6"), "{e}");
    assert!(e.contains("unknown .Metadata key `PodName`"), "{e}");
}
