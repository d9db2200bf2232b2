//! The objects the backend creates, as pure functions of the launch
//! request and the backend's settings: a batch/v1 Job for a single
//! replica, a Kubeflow PyTorchJob (kubeflow.org/v1) for master + workers.
//!
//! Both run pods with `restartPolicy: Never` and no retries of their own
//! (Job `backoffLimit: 0`): the scheduler owns retries, and a pod that
//! Kubernetes restarted behind its back would run an attempt twice.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    LocalObjectReference, PodSpec, PodTemplateSpec, ResourceRequirements, SecretKeySelector,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;
use trainmesh_common::error::FieldError;

use super::config::KubernetesConfig;
use super::{gpus, names};
use crate::backend::LaunchRequest;
use crate::error::Error;

pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// The container of a single-replica Job.
pub const JOB_CONTAINER: &str = "main";
/// The training operator finds the container to wire up by this name.
pub const PYTORCH_CONTAINER: &str = "pytorch";
/// The training operator's default rendezvous port, named as it expects.
const PYTORCH_PORT: i32 = 23456;
const PYTORCH_PORT_NAME: &str = "pytorchjob-port";
/// The pod-local directory behind `TRAINMESH_METRICS_FILE` and
/// `TRAINMESH_OUTPUT_DIR` (the runner's attempt directory is on another
/// machine).
pub const POD_WORK_DIR: &str = "/var/run/trainmesh";

/// Which kind of object an attempt runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Job,
    PyTorchJob,
}

impl Kind {
    pub fn for_workers(workers: u32) -> Self {
        if workers == 0 {
            Kind::Job
        } else {
            Kind::PyTorchJob
        }
    }

    pub fn api_resource(self) -> ApiResource {
        match self {
            Kind::Job => ApiResource::erase::<Job>(&()),
            Kind::PyTorchJob => ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("kubeflow.org", "v1", "PyTorchJob"),
                "pytorchjobs",
            ),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Job => "Job",
            Kind::PyTorchJob => "PyTorchJob",
        }
    }
}

/// Whole seconds, rounded up, at least 1 (0 would mean "unset" or "now").
fn seconds(d: Duration) -> i64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(s.max(1)).unwrap_or(i64::MAX)
}

/// The object for `req`: a Job or a PyTorchJob, named after the attempt,
/// in `namespace`.
pub fn object(
    req: &LaunchRequest,
    cfg: &KubernetesConfig,
    namespace: &str,
) -> Result<(Kind, DynamicObject), Error> {
    let kind = Kind::for_workers(req.details.workers);
    let meta = metadata(req, namespace);
    let affinity = gpu_affinity(req, cfg)?;
    let obj = match kind {
        Kind::Job => job(req, cfg, meta, affinity),
        Kind::PyTorchJob => pytorch_job(req, cfg, meta, affinity),
    };
    let mut obj: DynamicObject = serde_json::from_value(obj).map_err(|e| Error::Kubernetes {
        what: format!("cannot build the {} object", kind.as_str()),
        status: None,
        message: e.to_string(),
    })?;
    // DynamicObject keeps apiVersion/kind in `types`; make sure they match
    // the resource the object is posted to.
    let ar = kind.api_resource();
    obj.types = Some(kube::api::TypeMeta {
        api_version: ar.api_version,
        kind: ar.kind,
    });
    Ok((kind, obj))
}

/// The node affinity that keeps the attempt's pods on nodes with the
/// product of the GPUs it was allocated. `None` when it uses no GPUs, or
/// when the cluster's GPUs are an untyped count (`--gpus N`): nothing then
/// says which nodes they are on.
pub fn gpu_affinity(
    req: &LaunchRequest,
    cfg: &KubernetesConfig,
) -> Result<Option<Affinity>, Error> {
    if req.details.gpus == 0 || cfg.gpus.is_empty() {
        return Ok(None);
    }
    if req.gpu_indexes.is_empty() {
        // Without an allocation there is no product to pin to, and an
        // unpinned pod could take GPUs of a type the job did not ask for.
        return Err(FieldError::new(
            "assignment.gpu_indexes",
            "must name the attempt's GPUs when the cluster's GPUs are declared by product",
        )
        .into());
    }
    // Normally one product: the scheduler takes all of an attempt's GPUs
    // from one runner and, for a typed job, all of that type. A job that
    // names no type may be given GPUs of several products when no single
    // product has enough free; any node of those products suits it, so
    // all of them are allowed (each replica lands on one of them).
    let products = gpus::products_of(&cfg.gpus, &req.gpu_indexes)?;
    Ok(Some(gpus::node_affinity(&cfg.gpu_product_label, products)))
}

fn metadata(req: &LaunchRequest, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(names::object_name(&req.key)),
        namespace: Some(namespace.to_owned()),
        labels: Some(names::labels(
            &req.key,
            &req.owner,
            &req.correlation_id,
            &req.details.labels,
        )),
        annotations: Some(BTreeMap::from([
            (names::ANNOTATION_OWNER.to_owned(), req.owner.clone()),
            (
                names::ANNOTATION_CORRELATION_ID.to_owned(),
                req.correlation_id.clone(),
            ),
        ])),
        ..ObjectMeta::default()
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    // Serialising k8s-openapi types cannot fail (no maps with non-string
    // keys); Null would be refused by the API server, not panic here.
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn job(
    req: &LaunchRequest,
    cfg: &KubernetesConfig,
    meta: ObjectMeta,
    affinity: Option<Affinity>,
) -> serde_json::Value {
    let job = Job {
        metadata: meta.clone(),
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            completions: Some(1),
            parallelism: Some(1),
            active_deadline_seconds: req.details.deadline.map(seconds),
            ttl_seconds_after_finished: Some(
                i32::try_from(cfg.ttl_after_finished.as_secs()).unwrap_or(i32::MAX),
            ),
            template: pod_template(req, cfg, &meta, JOB_CONTAINER, affinity),
            ..JobSpec::default()
        }),
        status: None,
    };
    let mut v = to_json(&job);
    v["apiVersion"] = json!("batch/v1");
    v["kind"] = json!("Job");
    v
}

fn pytorch_job(
    req: &LaunchRequest,
    cfg: &KubernetesConfig,
    meta: ObjectMeta,
    affinity: Option<Affinity>,
) -> serde_json::Value {
    // Master and workers share the template, node affinity included: every
    // replica's GPUs are of the allocation.
    let template = to_json(&pod_template(req, cfg, &meta, PYTORCH_CONTAINER, affinity));
    let replica = |replicas: u32| {
        json!({
            "replicas": replicas,
            "restartPolicy": "Never",
            "template": template,
        })
    };
    let mut run_policy = json!({
        "backoffLimit": 0,
        // Pods stay after the end so abnormal workers' logs can still be
        // read; the TTL removes them with the job.
        "cleanPodPolicy": "None",
        "ttlSecondsAfterFinished": cfg.ttl_after_finished.as_secs(),
    });
    if let Some(d) = req.details.deadline {
        run_policy["activeDeadlineSeconds"] = json!(seconds(d));
    }
    json!({
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": to_json(&meta),
        "spec": {
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": {
                "Master": replica(1),
                "Worker": replica(req.details.workers),
            },
        },
    })
}

fn quantity(s: String) -> Quantity {
    Quantity(s)
}

fn pod_template(
    req: &LaunchRequest,
    cfg: &KubernetesConfig,
    meta: &ObjectMeta,
    container_name: &str,
    affinity: Option<Affinity>,
) -> PodTemplateSpec {
    let d = &req.details;
    let r = &req.resources;
    let mut limits = BTreeMap::new();
    let mut requests = BTreeMap::new();
    if d.gpus > 0 {
        limits.insert(GPU_RESOURCE.to_owned(), quantity(d.gpus.to_string()));
    }
    if r.memory_mib > 0 {
        // Requested and limited alike: the job gets what it asked for and
        // an overrun is an OOMKilled the user can act on, not an eviction.
        let mem = quantity(format!("{}Mi", r.memory_mib));
        limits.insert("memory".to_owned(), mem.clone());
        requests.insert("memory".to_owned(), mem);
    }
    if r.cpu > 0.0 {
        // No CPU limit: throttling a trainer's data loaders costs more
        // than it protects.
        let millis = (r.cpu * 1000.0).ceil().max(1.0) as u64;
        requests.insert("cpu".to_owned(), quantity(format!("{millis}m")));
    }
    let mut volumes = vec![Volume {
        name: "trainmesh".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "trainmesh".into(),
        mount_path: POD_WORK_DIR.into(),
        ..VolumeMount::default()
    }];
    if r.shm_mib > 0 {
        // The container runtime's 64 MiB /dev/shm is too small for NCCL
        // and data-loader workers.
        volumes.push(Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(quantity(format!("{}Mi", r.shm_mib))),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..VolumeMount::default()
        });
    }
    let container = Container {
        name: container_name.to_owned(),
        image: Some(req.image.clone()),
        // `command` replaces the image's entrypoint: the argv runs as
        // given, never through a shell.
        command: Some(req.command.clone()),
        env: Some(environment(req)),
        working_dir: req.working_dir.as_ref().map(|p| p.display().to_string()),
        resources: Some(ResourceRequirements {
            limits: (!limits.is_empty()).then_some(limits),
            requests: (!requests.is_empty()).then_some(requests),
            ..ResourceRequirements::default()
        }),
        ports: (container_name == PYTORCH_CONTAINER).then(|| {
            vec![ContainerPort {
                name: Some(PYTORCH_PORT_NAME.into()),
                container_port: PYTORCH_PORT,
                ..ContainerPort::default()
            }]
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let tolerations = (d.gpus > 0).then(|| {
        // GPU nodes are commonly tainted so that only GPU pods land there.
        vec![Toleration {
            key: Some(GPU_RESOURCE.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        }]
    });
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: meta.labels.clone(),
            annotations: meta.annotations.clone(),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            containers: vec![container],
            service_account_name: cfg.service_account.clone(),
            image_pull_secrets: (!cfg.image_pull_secrets.is_empty()).then(|| {
                cfg.image_pull_secrets
                    .iter()
                    .map(|s| LocalObjectReference { name: s.clone() })
                    .collect()
            }),
            termination_grace_period_seconds: Some(seconds(d.termination_grace)),
            tolerations,
            affinity,
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
    }
}

/// The container's environment: the job's (with the platform's variables
/// already on top), and the paths and GPU visibility that depend on
/// running in a pod.
pub fn environment(req: &LaunchRequest) -> Vec<EnvVar> {
    let mut env = req.env.clone();
    env.insert(
        "TRAINMESH_METRICS_FILE".into(),
        format!("{POD_WORK_DIR}/metrics.jsonl"),
    );
    env.insert("TRAINMESH_OUTPUT_DIR".into(), POD_WORK_DIR.into());
    if req.details.gpus == 0 {
        // CUDA base images set NVIDIA_VISIBLE_DEVICES=all: without this a
        // pod that asked for no GPU would see every GPU of its node.
        env.insert("NVIDIA_VISIBLE_DEVICES".into(), "void".into());
    } else {
        // The device plugin decides which GPUs the pod gets.
        env.remove("NVIDIA_VISIBLE_DEVICES");
        env.remove("CUDA_VISIBLE_DEVICES");
    }
    let secrets = req.details.secret_refs.iter().map(|(name, key)| EnvVar {
        name: name.clone(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: JOB_SECRETS.into(),
                key: key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    });
    env.into_iter()
        .map(|(name, value)| EnvVar {
            name,
            value: Some(value),
            value_from: None,
        })
        .chain(secrets)
        .collect()
}

/// The Secret, in the jobs' namespace, whose keys are the secrets jobs may
/// name in `secret_env`.
pub const JOB_SECRETS: &str = "trainmesh-job-secrets";
