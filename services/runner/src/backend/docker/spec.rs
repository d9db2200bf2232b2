//! The container an attempt runs in, as a pure function of the launch
//! request and the runner's settings, so tests can assert on every field
//! without an engine.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountType};
use trainmesh_common::error::FieldError;
use trainmesh_common::proto::runner::v1::Gpu;

use crate::backend::LaunchRequest;
use crate::config::DockerSettings;
use crate::domain::AttemptKey;
use crate::error::Error;

pub const LABEL_JOB: &str = "trainmesh.job";
pub const LABEL_ATTEMPT: &str = "trainmesh.attempt";
pub const LABEL_OWNER: &str = "trainmesh.owner";
pub const LABEL_CORRELATION_ID: &str = "trainmesh.correlation-id";
/// The name of the runner that started the container.
pub const LABEL_RUNNER: &str = "trainmesh.runner";

const MIB: i64 = 1024 * 1024;

/// What to create: the container's name and its configuration.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub name: String,
    /// The image reference as pulled and run (with `:latest` made explicit).
    pub image: String,
    pub body: ContainerCreateBody,
}

/// One name per attempt, so a second delivery of the same assignment finds
/// the first one's container instead of starting another.
pub fn container_name(key: &AttemptKey) -> String {
    format!("trainmesh-{}-{}", key.job_id, key.attempt)
}

/// `image` with its tag made explicit: the engine pulls every tag of a
/// repository when asked for one without a tag.
pub fn image_reference(image: &str) -> String {
    let image = image.trim();
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// The engine's ids for the attempt's GPUs: the UUID when the inventory
/// has one (stable when the node's numbering changes), else the index.
pub fn device_ids(indexes: &[i32], gpus: &[Gpu]) -> Result<Vec<String>, Error> {
    indexes
        .iter()
        .map(|i| {
            let gpu = gpus
                .iter()
                .find(|g| g.index == *i)
                .ok_or(Error::UnknownGpu { index: *i })?;
            Ok(if gpu.uuid.trim().is_empty() {
                gpu.index.to_string()
            } else {
                gpu.uuid.clone()
            })
        })
        .collect()
}

/// The container for `req`.
pub fn build(
    req: &LaunchRequest,
    settings: &DockerSettings,
    gpus: &[Gpu],
) -> Result<ContainerSpec, Error> {
    if req.image.trim().is_empty() {
        return Err(
            FieldError::new("assignment.spec.image", "is required by the docker backend").into(),
        );
    }
    if req.command.first().is_none_or(|p| p.is_empty()) {
        return Err(FieldError::new("assignment.spec.command", "is required").into());
    }
    let working_dir = match &req.working_dir {
        None => None,
        Some(d) if d.is_absolute() => Some(d.display().to_string()),
        Some(d) => {
            return Err(Error::WorkingDir {
                path: d.display().to_string(),
                reason: "must be an absolute path inside the image for the docker backend".into(),
            })
        }
    };
    let ids = device_ids(&req.gpu_indexes, gpus)?;

    let mut env = req.env.clone();
    // The attempt directory is bind-mounted at the same absolute path, so
    // the paths the job is given are the runner's own: the metrics tailer
    // reads the file the job writes with no translation, and paths in logs
    // and errors mean the same thing on the host and in the container.
    let attempt_dir = req.attempt_dir.display().to_string();
    env.insert(
        "TRAINMESH_METRICS_FILE".into(),
        req.metrics_file.display().to_string(),
    );
    env.insert("TRAINMESH_OUTPUT_DIR".into(), attempt_dir.clone());
    // CUDA images set NVIDIA_VISIBLE_DEVICES=all, and an engine whose
    // default runtime is nvidia honours it: say exactly which GPUs, and
    // "void" (none) for CPU jobs, so no job gets GPUs it was not given.
    env.insert(
        "NVIDIA_VISIBLE_DEVICES".into(),
        if ids.is_empty() {
            "void".into()
        } else {
            ids.join(",")
        },
    );
    env.insert("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into());

    let labels = HashMap::from([
        (LABEL_JOB.to_owned(), req.key.job_id.to_string()),
        (LABEL_ATTEMPT.to_owned(), req.key.attempt.to_string()),
        (LABEL_OWNER.to_owned(), req.owner.clone()),
        (LABEL_CORRELATION_ID.to_owned(), req.correlation_id.clone()),
        (LABEL_RUNNER.to_owned(), settings.runner.clone()),
    ]);

    let limits = req.resources;
    let shm_mib = if limits.shm_mib > 0 {
        limits.shm_mib
    } else {
        settings.shm_size_mib
    };
    let memory = (limits.memory_mib > 0).then(|| limits.memory_mib.saturating_mul(MIB));
    let host_config = HostConfig {
        mounts: Some(vec![Mount {
            target: Some(attempt_dir.clone()),
            source: Some(attempt_dir),
            typ: Some(MountType::BIND),
            read_only: Some(false),
            ..Mount::default()
        }]),
        memory,
        // Swap equal to the limit means none: a job over its limit is
        // OOM-killed (and reported so) instead of crawling in swap.
        memory_swap: memory,
        nano_cpus: (limits.cpu > 0.0).then(|| (limits.cpu * 1e9).round() as i64),
        shm_size: (shm_mib > 0).then(|| shm_mib.saturating_mul(MIB)),
        device_requests: (!ids.is_empty()).then(|| {
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                device_ids: Some(ids),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..DeviceRequest::default()
            }]
        }),
        init: settings.init.then_some(true),
        network_mode: settings.network.clone(),
        ..HostConfig::default()
    };

    Ok(ContainerSpec {
        name: container_name(&req.key),
        image: image_reference(&req.image),
        body: ContainerCreateBody {
            image: Some(image_reference(&req.image)),
            // The argv runs as given, never through a shell; an empty
            // entrypoint overrides the image's (as a Kubernetes `command`
            // does), so argv[0] is the program that runs.
            entrypoint: Some(Vec::new()),
            cmd: Some(req.command.clone()),
            env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir,
            labels: Some(labels),
            tty: Some(false),
            open_stdin: Some(false),
            host_config: Some(host_config),
            ..ContainerCreateBody::default()
        },
    })
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
