//! What the backend's tests share: the attempt they launch, the backend's
//! settings, and the paths of the scripted API.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::fake_api::{Recorded, Reply};
use super::{KubeWorkload, KubernetesBackend, KubernetesConfig};
use crate::backend::{JobDetails, LaunchRequest};
use crate::domain::{AttemptKey, JobId, ResourceLimits};
use crate::logs::{LogLimits, LogWriter, OutputSink};

pub const JOB_ID: &str = "0190f1c2-7a3b-7c4d-8e5f-123456789abc";
pub const NAME: &str = "tm-0190f1c2-7a3b-7c4d-8e5f-123456789abc-1";
pub const JOBS: &str = "/apis/batch/v1/namespaces/training/jobs";
pub const PYTORCHJOBS: &str = "/apis/kubeflow.org/v1/namespaces/training/pytorchjobs";
pub const PODS: &str = "/api/v1/namespaces/training/pods";
pub const EVENTS: &str = "/api/v1/namespaces/training/events";

pub fn key() -> AttemptKey {
    AttemptKey {
        job_id: JobId::parse_field("job_id", JOB_ID).unwrap(),
        attempt: 1,
    }
}

pub fn config() -> KubernetesConfig {
    KubernetesConfig {
        namespace: Some("training".into()),
        service_account: Some("trainer".into()),
        image_pull_secrets: vec!["regcred".into(), "mirror".into()],
        poll_interval: Duration::from_secs(5),
        unschedulable_timeout: Duration::from_secs(600),
        start_timeout: Duration::from_secs(10),
        ttl_after_finished: Duration::from_secs(3600),
        gpus: Vec::new(),
        gpu_product_label: super::gpus::DEFAULT_PRODUCT_LABEL.into(),
    }
}

pub struct Launched {
    pub _dir: tempfile::TempDir,
    pub writer: LogWriter,
    pub log_path: std::path::PathBuf,
}

impl Launched {
    pub async fn log(mut self) -> String {
        self.writer.finished().await;
        std::fs::read_to_string(&self.log_path).unwrap()
    }
}

/// Launches on `client`; the workload keeps the only sink.
pub async fn launch(
    client: kube::Client,
    workers: u32,
) -> (Result<KubeWorkload, crate::error::Error>, Launched) {
    launch_with(client, config(), workers, vec![]).await
}

/// [`launch`] with the backend's settings and the GPUs the scheduler
/// allocated.
pub async fn launch_with(
    client: kube::Client,
    cfg: KubernetesConfig,
    workers: u32,
    gpu_indexes: Vec<i32>,
) -> (Result<KubeWorkload, crate::error::Error>, Launched) {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("output.log");
    let (sink, writer) = LogWriter::start(&log_path, LogLimits::default())
        .await
        .unwrap();
    let req = LaunchRequest {
        gpu_indexes,
        ..request(dir.path(), sink, workers)
    };
    let backend = KubernetesBackend::new(client, cfg);
    let w = backend.start(req).await;
    (
        w,
        Launched {
            _dir: dir,
            writer,
            log_path,
        },
    )
}

/// The attempt the tests launch: 8 GPUs per replica (none allocated),
/// `workers` workers besides the master, its files under `dir`.
pub fn request(dir: &Path, output: OutputSink, workers: u32) -> LaunchRequest {
    LaunchRequest {
        key: key(),
        command: vec!["torchrun".into(), "train.py".into(), "--lr=3e-4".into()],
        image: "registry.example.com/llm/trainer:2.3".into(),
        env: BTreeMap::from([
            ("TRAINMESH_JOB_ID".to_owned(), JOB_ID.to_owned()),
            ("HF_HOME".to_owned(), "/cache/hf".to_owned()),
        ]),
        working_dir: None,
        gpu_indexes: vec![],
        owner: "alice@example.com".into(),
        correlation_id: "c0ffee00-1111-4222-8333-444455556666".into(),
        resources: ResourceLimits {
            cpu: 12.5,
            memory_mib: 65536,
            shm_mib: 16384,
        },
        attempt_dir: dir.to_owned(),
        metrics_file: dir.join("metrics.jsonl"),
        output,
        details: JobDetails {
            labels: BTreeMap::from([("team".to_owned(), "nlp".to_owned())]),
            gpus: 8,
            workers,
            deadline: Some(Duration::from_secs(86400)),
            termination_grace: Duration::from_secs(30),
            secret_refs: BTreeMap::from([("WANDB_API_KEY".to_owned(), "wandb".to_owned())]),
        },
    }
}

/// Answers a create with the object it was given.
pub fn created(r: &Recorded) -> Reply {
    Reply::Json(201, r.body.clone())
}

pub fn requests(log: &std::sync::Mutex<Vec<Recorded>>) -> Vec<Recorded> {
    log.lock().unwrap().clone()
}

/// The container's plain variables (secret references are left out).
pub fn env_of(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect()
}
