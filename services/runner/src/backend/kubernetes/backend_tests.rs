//! The backend against recorded API exchanges (a scripted API server
//! behind `kube::Client`): what it POSTs, how it adopts, polls, copies
//! logs, and deletes. No cluster was available to test against; the
//! documents are shaped as the API server returns them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::fake_api::{self, empty_list, fixture, ok, status, Recorded, Reply};
use super::*;
use crate::backend::{JobDetails, Workload};
use crate::domain::{AttemptKey, JobId, Termination};
use crate::logs::LogWriter;

const JOB_ID: &str = "0190f1c2-7a3b-7c4d-8e5f-123456789abc";
const NAME: &str = "tm-0190f1c2-7a3b-7c4d-8e5f-123456789abc-1";
const JOBS: &str = "/apis/batch/v1/namespaces/training/jobs";
const PYTORCHJOBS: &str = "/apis/kubeflow.org/v1/namespaces/training/pytorchjobs";
const PODS: &str = "/api/v1/namespaces/training/pods";
const EVENTS: &str = "/api/v1/namespaces/training/events";

fn key() -> AttemptKey {
    AttemptKey {
        job_id: JobId::parse_field("job_id", JOB_ID).unwrap(),
        attempt: 1,
    }
}

fn config() -> KubernetesConfig {
    KubernetesConfig {
        namespace: Some("training".into()),
        service_account: Some("trainer".into()),
        image_pull_secrets: vec!["regcred".into(), "mirror".into()],
        poll_interval: Duration::from_secs(5),
        unschedulable_timeout: Duration::from_secs(600),
        start_timeout: Duration::from_secs(10),
        ttl_after_finished: Duration::from_secs(3600),
    }
}

struct Launched {
    _dir: tempfile::TempDir,
    writer: LogWriter,
    log_path: std::path::PathBuf,
}

impl Launched {
    async fn log(mut self) -> String {
        self.writer.finished().await;
        std::fs::read_to_string(&self.log_path).unwrap()
    }
}

/// Launches on `client`; the workload keeps the only sink.
async fn launch(
    client: kube::Client,
    workers: u32,
) -> (Result<KubeWorkload, crate::error::Error>, Launched) {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("output.log");
    let (sink, writer) = LogWriter::start(&log_path).await.unwrap();
    let req = LaunchRequest {
        key: key(),
        command: vec!["torchrun".into(), "train.py".into(), "--lr=3e-4".into()],
        image: "registry.example.com/llm/trainer:2.3".into(),
        env: BTreeMap::from([
            ("TRAINMESH_JOB_ID".to_owned(), JOB_ID.to_owned()),
            ("HF_HOME".to_owned(), "/cache/hf".to_owned()),
        ]),
        working_dir: None,
        gpu_indexes: vec![],
        attempt_dir: dir.path().to_owned(),
        metrics_file: dir.path().join("metrics.jsonl"),
        output: sink,
        details: JobDetails {
            owner: "alice@example.com".into(),
            correlation_id: "c0ffee00-1111-4222-8333-444455556666".into(),
            labels: BTreeMap::from([("team".to_owned(), "nlp".to_owned())]),
            gpus: 8,
            cpu: 12.5,
            memory_mib: 65536,
            shm_mib: 16384,
            workers,
            deadline: Some(Duration::from_secs(86400)),
            termination_grace: Duration::from_secs(30),
        },
    };
    let backend = KubernetesBackend::new(client, config());
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

/// Answers a create with the object it was given.
fn created(r: &Recorded) -> Reply {
    Reply::Json(201, r.body.clone())
}

fn requests(log: &std::sync::Mutex<Vec<Recorded>>) -> Vec<Recorded> {
    log.lock().unwrap().clone()
}

fn env_of(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn assert_pod_template(t: &Value, container_name: &str) {
    assert_eq!(t["metadata"]["labels"]["trainmesh.io/job"], JOB_ID);
    assert_eq!(t["metadata"]["labels"]["trainmesh.io/attempt"], "1");
    let spec = &t["spec"];
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(spec["serviceAccountName"], "trainer");
    assert_eq!(
        spec["imagePullSecrets"],
        json!([{"name": "regcred"}, {"name": "mirror"}])
    );
    assert_eq!(spec["terminationGracePeriodSeconds"], 30);
    let c = &spec["containers"][0];
    assert_eq!(c["name"], container_name);
    assert_eq!(c["image"], "registry.example.com/llm/trainer:2.3");
    assert_eq!(c["command"], json!(["torchrun", "train.py", "--lr=3e-4"]));
    assert!(c.get("args").is_none());
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "8");
    assert_eq!(c["resources"]["limits"]["memory"], "65536Mi");
    assert_eq!(c["resources"]["requests"]["cpu"], "12500m");
    let env = env_of(c);
    assert_eq!(env["TRAINMESH_JOB_ID"], JOB_ID);
    assert_eq!(env["HF_HOME"], "/cache/hf");
    assert_eq!(
        env["TRAINMESH_METRICS_FILE"],
        "/var/run/trainmesh/metrics.jsonl"
    );
    assert!(!env.contains_key("NVIDIA_VISIBLE_DEVICES"));
    let dshm = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "dshm")
        .unwrap();
    assert_eq!(
        dshm["emptyDir"],
        json!({"medium": "Memory", "sizeLimit": "16384Mi"})
    );
    assert_eq!(spec["tolerations"][0]["key"], "nvidia.com/gpu");
}

#[tokio::test]
async fn single_replica_posts_a_batch_job() {
    let (client, log) = fake_api::client(|r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => created(r),
        _ => status(404, "NotFound", "unexpected"),
    });
    let (w, launched) = launch(client, 0).await;
    let w = w.unwrap();
    assert_eq!(w.describe(), format!("Job training/{NAME}"));
    drop(w);
    let reqs = requests(&log);
    assert_eq!(reqs.len(), 1);
    assert!(reqs[0].is("POST", JOBS));
    let b = &reqs[0].body;
    assert_eq!(b["apiVersion"], "batch/v1");
    assert_eq!(b["kind"], "Job");
    let m = &b["metadata"];
    assert_eq!(m["name"], NAME);
    assert_eq!(m["namespace"], "training");
    assert_eq!(m["labels"]["trainmesh.io/job"], JOB_ID);
    assert_eq!(m["labels"]["trainmesh.io/attempt"], "1");
    assert_eq!(m["labels"]["trainmesh.io/owner"], "alice_example.com");
    assert_eq!(
        m["labels"]["trainmesh.io/correlation-id"],
        "c0ffee00-1111-4222-8333-444455556666"
    );
    assert_eq!(m["labels"]["team"], "nlp");
    assert_eq!(m["annotations"]["trainmesh.io/owner"], "alice@example.com");
    let spec = &b["spec"];
    assert_eq!(spec["backoffLimit"], 0);
    assert_eq!(spec["activeDeadlineSeconds"], 86400);
    assert_eq!(spec["ttlSecondsAfterFinished"], 3600);
    assert_pod_template(&spec["template"], "main");
    let text = launched.log().await;
    assert!(text.contains(&format!("[trainmesh] k8s: created Job training/{NAME}")));
}

#[tokio::test]
async fn workers_post_a_pytorchjob_with_master_and_workers() {
    let (client, log) = fake_api::client(|r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", PYTORCHJOBS) => created(r),
        _ => status(404, "NotFound", "unexpected"),
    });
    let (w, _launched) = launch(client, 3).await;
    assert_eq!(w.unwrap().describe(), format!("PyTorchJob training/{NAME}"));
    let reqs = requests(&log);
    assert!(reqs[0].is("POST", PYTORCHJOBS));
    let b = &reqs[0].body;
    assert_eq!(b["apiVersion"], "kubeflow.org/v1");
    assert_eq!(b["kind"], "PyTorchJob");
    assert_eq!(b["metadata"]["name"], NAME);
    assert_eq!(b["metadata"]["labels"]["trainmesh.io/job"], JOB_ID);
    let run = &b["spec"]["runPolicy"];
    assert_eq!(run["backoffLimit"], 0);
    assert_eq!(run["activeDeadlineSeconds"], 86400);
    assert_eq!(run["cleanPodPolicy"], "None");
    let specs = &b["spec"]["pytorchReplicaSpecs"];
    assert_eq!(specs["Master"]["replicas"], 1);
    assert_eq!(specs["Worker"]["replicas"], 3);
    for role in ["Master", "Worker"] {
        assert_eq!(specs[role]["restartPolicy"], "Never");
        assert_pod_template(&specs[role]["template"], "pytorch");
        assert_eq!(
            specs[role]["template"]["spec"]["containers"][0]["ports"][0]["name"],
            "pytorchjob-port"
        );
    }
}

#[tokio::test]
async fn duplicate_assignment_adopts_the_existing_object() {
    let (client, log) = fake_api::client(|r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => status(409, "AlreadyExists", "jobs.batch \"x\" already exists"),
        ("GET", p) if p == format!("{JOBS}/{NAME}") => ok(fixture("job-active.json")),
        _ => status(404, "NotFound", "unexpected"),
    });
    let (w, launched) = launch(client, 0).await;
    drop(w.unwrap());
    let reqs = requests(&log);
    assert_eq!(reqs.len(), 2);
    assert!(reqs[1].is("GET", &format!("{JOBS}/{NAME}")));
    assert!(launched.log().await.contains("adopted existing Job"));
}

#[tokio::test]
async fn name_conflict_with_a_foreign_object_is_refused() {
    let (client, _log) = fake_api::client(|r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => status(409, "AlreadyExists", "exists"),
        ("GET", _) => {
            let mut other = fixture("job-active.json");
            other["metadata"]["labels"]["trainmesh.io/attempt"] = json!("2");
            ok(other)
        }
        _ => status(404, "NotFound", "unexpected"),
    });
    let (w, _launched) = launch(client, 0).await;
    let err = w.err().unwrap();
    assert!(matches!(
        err,
        crate::error::Error::Kubernetes {
            status: Some(409),
            ..
        }
    ));
    assert_eq!(err.to_job_error().category, "platform");
}

#[tokio::test]
async fn cancel_deletes_in_the_foreground_with_the_grace_period() {
    let deleted = Arc::new(AtomicUsize::new(0));
    let d = deleted.clone();
    let (client, log) = fake_api::client(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => created(r),
        ("DELETE", _) => {
            d.fetch_add(1, Ordering::SeqCst);
            ok(fixture("job-active.json"))
        }
        ("GET", _) if d.load(Ordering::SeqCst) > 0 => status(404, "NotFound", "gone"),
        _ => status(404, "NotFound", "unexpected"),
    });
    let (w, launched) = launch(client, 0).await;
    let mut w = w.unwrap();
    let term = w.stop(Duration::from_secs(7)).await.unwrap();
    assert_eq!(term, Termination::Signaled(15));
    // A second stop or wait answers the same without calling again.
    assert_eq!(w.wait().await.unwrap(), term);
    drop(w);
    let reqs = requests(&log);
    let del = reqs.iter().find(|r| r.method == "DELETE").unwrap();
    assert_eq!(del.path, format!("{JOBS}/{NAME}"));
    assert_eq!(del.body["propagationPolicy"], "Foreground");
    assert_eq!(del.body["gracePeriodSeconds"], 7);
    assert_eq!(deleted.load(Ordering::SeqCst), 1);
    assert!(launched.log().await.contains("deleted Job"));
}

/// The pod of `pods-succeeded.json`, still running.
fn running_pod_list() -> Value {
    let mut list = fixture("pods-succeeded.json");
    let pod = &mut list["items"][0];
    pod["status"]["phase"] = json!("Running");
    pod["status"]["containerStatuses"][0]["state"] =
        json!({"running": {"startedAt": "2024-05-14T09:12:30Z"}});
    list
}

#[tokio::test(start_paused = true)]
async fn wait_follows_the_master_log_and_retries_api_errors() {
    let pod = format!("{NAME}-z9w8x");
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    let pod_path = format!("{PODS}/{pod}");
    let log_path = format!("{PODS}/{pod}/log");
    let (client, log) = fake_api::client(move |r| {
        let job_path = format!("{JOBS}/{NAME}");
        match (r.method.as_str(), r.path.as_str()) {
            ("POST", JOBS) => created(r),
            ("GET", path) if path == job_path => match p.fetch_add(1, Ordering::SeqCst) {
                0 => ok(fixture("job-active.json")),
                // A flaky API server must not fail a healthy job.
                1 => status(500, "InternalError", "etcdserver: request timed out"),
                2 => status(503, "ServiceUnavailable", "the server is currently unable"),
                _ => ok(fixture("job-succeeded.json")),
            },
            ("GET", PODS) if p.load(Ordering::SeqCst) <= 3 => ok(running_pod_list()),
            ("GET", PODS) => ok(fixture("pods-succeeded.json")),
            ("GET", EVENTS) => ok(empty_list("EventList")),
            ("GET", path) if path == log_path => Reply::Text(
                "2024-05-14T09:12:31.5Z loading model\n2024-05-14T09:12:31.5Z step 1 loss=2.31\n\
                 2024-05-14T10:02:10Z done\n"
                    .into(),
            ),
            ("GET", path) if path == pod_path => {
                ok(fixture("pods-succeeded.json")["items"][0].clone())
            }
            _ => status(404, "NotFound", "unexpected"),
        }
    });
    let (w, launched) = launch(client, 0).await;
    let mut w = w.unwrap();
    assert_eq!(w.wait().await.unwrap(), Termination::Exited(0));
    assert!(w.failure().is_none());
    let reqs = requests(&log);
    let follow = reqs
        .iter()
        .find(|r| r.path == format!("{PODS}/{pod}/log"))
        .unwrap();
    assert!(follow.query.contains("follow=true") && follow.query.contains("timestamps=true"));
    assert!(follow.query.contains("container=main"));
    let pods_list = reqs.iter().find(|r| r.is("GET", PODS)).unwrap();
    assert!(pods_list
        .query
        .contains("labelSelector=trainmesh.io%2Fjob%3D0190f1c2"));
    let events = reqs.iter().find(|r| r.is("GET", EVENTS)).unwrap();
    assert_eq!(events.query, "&fieldSelector=type%3DWarning");
    drop(w);
    let text = launched.log().await;
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.contains(&"loading model") && lines.contains(&"done"),
        "{text}"
    );
    assert!(lines.contains(&"step 1 loss=2.31"));
    // The Running phase was seen on several polls but written once.
    let running = lines
        .iter()
        .filter(|l| l.contains("k8s: job Running"))
        .count();
    assert_eq!(running, 1, "{text}");
    assert!(text.contains("k8s: job Succeeded"));
    assert!(text.contains("k8s: container Completed pod=") && text.contains("exit_code=0"));
}

#[tokio::test(start_paused = true)]
async fn image_pull_backoff_past_the_timeout_fails_and_deletes_the_job() {
    let (client, log) = fake_api::client(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => created(r),
        ("GET", PODS) => ok(fixture("pods-image-pull-backoff.json")),
        ("GET", EVENTS) => ok(fixture("events-image-pull.json")),
        ("GET", _) => ok(fixture("job-active.json")),
        ("DELETE", _) => ok(fixture("job-active.json")),
        _ => status(404, "NotFound", "unexpected"),
    });
    let (w, launched) = launch(client, 0).await;
    let mut w = w.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(w.wait().await.unwrap(), Termination::Exited(-1));
    // start_timeout is 10 s, polls every 5 s.
    assert!(started.elapsed() >= Duration::from_secs(10));
    let e = w.failure().unwrap();
    assert_eq!(e.category, "image-pull");
    assert!(e.message.contains("trainer:2.4-typo"));
    let reqs = requests(&log);
    let del = reqs.iter().find(|r| r.method == "DELETE").unwrap();
    assert_eq!(del.path, format!("{JOBS}/{NAME}"));
    drop(w);
    let text = launched.log().await;
    // Each event once, though every poll returned it.
    let pulls = text.matches("Error: ImagePullBackOff").count();
    assert_eq!(pulls, 1, "{text}");
    assert!(text.contains("k8s: container ImagePullBackOff"));
}

#[tokio::test(start_paused = true)]
async fn failed_worker_log_is_copied_and_the_oom_named() {
    let master = format!("{NAME}-master-0");
    let worker = format!("{NAME}-worker-1");
    let master_log = format!("{PODS}/{master}/log");
    let worker_log = format!("{PODS}/{worker}/log");
    let master_pod = format!("{PODS}/{master}");
    let (client, log) = fake_api::client(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", PYTORCHJOBS) => created(r),
        ("GET", PODS) => ok(fixture("pods-failed-worker-oom.json")),
        ("GET", EVENTS) => ok(empty_list("EventList")),
        ("GET", p) if p == master_log => {
            Reply::Text("2024-05-14T09:41:19Z RuntimeError: NCCL communicator was aborted\n".into())
        }
        ("GET", p) if p == worker_log => Reply::Text("step 812\nKilled\n".into()),
        ("GET", p) if p == master_pod => {
            ok(fixture("pods-failed-worker-oom.json")["items"][0].clone())
        }
        ("GET", _) => ok(fixture("pytorchjob-failed-worker-oom.json")),
        _ => status(404, "NotFound", "unexpected"),
    });
    let (w, launched) = launch(client, 2).await;
    let mut w = w.unwrap();
    assert_eq!(w.wait().await.unwrap(), Termination::Exited(137));
    let e = w.failure().unwrap();
    assert_eq!(
        (e.r#type.as_str(), e.category.as_str()),
        ("OOMKilled", "oom-killed")
    );
    let reqs = requests(&log);
    let fetched = reqs
        .iter()
        .find(|r| r.path.ends_with("-worker-1/log"))
        .unwrap();
    assert!(fetched.query.contains("tailLines=500") && !fetched.query.contains("follow"));
    // The healthy worker's log is not fetched.
    assert!(!reqs.iter().any(|r| r.path.ends_with("-worker-0/log")));
    drop(w);
    let text = launched.log().await;
    assert!(
        text.contains(&format!("[{NAME}-worker-1] Killed")),
        "{text}"
    );
    assert!(text.contains("NCCL communicator was aborted"));
    assert!(text.contains("OOMKilled") && text.contains("exit_code=137"));
}

#[test]
fn a_job_without_gpus_sees_none_and_without_deadline_has_none() {
    let req = LaunchRequest {
        key: key(),
        command: vec!["python".into(), "eval.py".into()],
        image: "python:3.12".into(),
        env: BTreeMap::from([("CUDA_VISIBLE_DEVICES".to_owned(), "0".to_owned())]),
        working_dir: Some("/workspace".into()),
        gpu_indexes: vec![],
        attempt_dir: "/tmp/a".into(),
        metrics_file: "/tmp/a/metrics.jsonl".into(),
        output: crate::logs::OutputSink::closed(),
        details: JobDetails::default(),
    };
    let (kind, obj) = body::object(&req, &KubernetesConfig::default(), "default").unwrap();
    assert_eq!(kind, body::Kind::Job);
    let v = serde_json::to_value(&obj).unwrap();
    assert!(v["spec"].get("activeDeadlineSeconds").is_none());
    let spec = &v["spec"]["template"]["spec"];
    assert!(spec.get("serviceAccountName").is_none() && spec.get("imagePullSecrets").is_none());
    assert!(spec.get("tolerations").is_none());
    let c = &spec["containers"][0];
    assert_eq!(c["workingDir"], "/workspace");
    assert!(c["resources"].get("limits").is_none());
    let env = env_of(c);
    // CUDA images expose every GPU unless told otherwise.
    assert_eq!(env["NVIDIA_VISIBLE_DEVICES"], "void");
    assert_eq!(env["CUDA_VISIBLE_DEVICES"], "0");
}

#[tokio::test]
async fn a_job_without_an_image_is_refused_before_any_call() {
    let (client, log) = fake_api::client(|_| status(500, "InternalError", "no call expected"));
    let backend = KubernetesBackend::new(client, config());
    let req = LaunchRequest {
        key: key(),
        command: vec!["python".into()],
        image: " ".into(),
        env: BTreeMap::new(),
        working_dir: None,
        gpu_indexes: vec![],
        attempt_dir: "/tmp/a".into(),
        metrics_file: "/tmp/a/metrics.jsonl".into(),
        output: crate::logs::OutputSink::closed(),
        details: JobDetails::default(),
    };
    let err = backend.start(req).await.err().unwrap();
    assert!(
        matches!(err, crate::error::Error::InvalidAssignment(ref f) if f.field == "spec.image")
    );
    assert!(requests(&log).is_empty());
}

#[tokio::test]
async fn a_missing_training_operator_is_named() {
    let (client, _log) = fake_api::client(|_| {
        status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    });
    let (w, _launched) = launch(client, 1).await;
    let err = w.err().unwrap();
    assert!(err.to_string().contains("training operator"), "{err}");
}
