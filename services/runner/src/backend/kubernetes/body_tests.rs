//! The objects the backend POSTs, and how it adopts, against a scripted
//! API server behind `kube::Client`. No cluster was available to test
//! against; the documents are shaped as the API server returns them.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::fake_api::{self, fixture, ok, status};
use super::test_support::*;
use super::*;
use crate::backend::{JobDetails, Workload};

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
    // A secret variable is taken from the jobs' Secret by the kubelet: its
    // value never passes through the runner or the object it posts.
    let secret = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "WANDB_API_KEY")
        .expect("the secret variable");
    assert!(secret.get("value").is_none(), "{secret}");
    assert_eq!(
        secret["valueFrom"]["secretKeyRef"],
        json!({"name": "trainmesh-job-secrets", "key": "wandb", "optional": false})
    );
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

#[test]
fn a_job_without_gpus_sees_none_and_without_deadline_has_none() {
    let req = LaunchRequest {
        key: key(),
        command: vec!["python".into(), "eval.py".into()],
        image: "python:3.12".into(),
        env: BTreeMap::from([("CUDA_VISIBLE_DEVICES".to_owned(), "0".to_owned())]),
        working_dir: Some("/workspace".into()),
        gpu_indexes: vec![],
        owner: String::new(),
        correlation_id: String::new(),
        resources: Default::default(),
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
        owner: String::new(),
        correlation_id: String::new(),
        resources: Default::default(),
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
