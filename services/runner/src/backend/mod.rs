//! Backends run an attempt's workload: a local process, a Docker
//! container, or Jobs and PyTorchJobs in a Kubernetes cluster, behind the
//! same trait. A backend launches, reports how the workload ended, and
//! stops it (SIGTERM, grace, kill). Everything else — directories, log
//! files, shipping, reports — is the attempt's, the same for every backend.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use trainmesh_common::proto::job::v1::JobError;

use crate::domain::{AttemptKey, ResourceLimits, Termination};
use crate::error::Error;
use crate::logs::OutputSink;

pub mod docker;
pub mod kubernetes;
pub mod process;

pub use docker::DockerBackend;
pub use kubernetes::KubernetesBackend;
pub use process::ProcessBackend;

/// What a backend needs to start one attempt.
#[derive(Debug)]
pub struct LaunchRequest {
    pub key: AttemptKey,
    /// The job's owner and the assignment's correlation id, for backends
    /// that label what they create (containers).
    pub owner: String,
    pub correlation_id: String,
    /// argv; never empty, never given to a shell.
    pub command: Vec<String>,
    /// The image, for backends that run containers.
    pub image: String,
    /// The job's environment: its spec's `env` with the platform's
    /// variables (`TRAINMESH_JOB_ID`, `TRAINMESH_ATTEMPT`,
    /// `TRAINMESH_CORRELATION_ID`) on top. Backends add what depends on
    /// where the workload runs (paths, GPU visibility).
    pub env: BTreeMap<String, String>,
    /// The spec's working directory; `None` for the backend's default.
    pub working_dir: Option<PathBuf>,
    /// GPUs of this node allocated to the attempt (indexes as registered).
    pub gpu_indexes: Vec<i32>,
    /// CPU, memory and shm from the spec; containers enforce them, the
    /// process backend enforces memory only (by sampling).
    pub resources: ResourceLimits,
    /// `<work-dir>/<job_id>/<attempt>/`, absolute.
    pub attempt_dir: PathBuf,
    /// Where the job writes JSON-lines metrics, absolute.
    pub metrics_file: PathBuf,
    /// Every line the workload prints (stdout and stderr) goes here.
    pub output: OutputSink,
    /// What orchestrating backends need besides the command.
    pub details: JobDetails,
}

/// What backends that hand the workload to an orchestrator (Kubernetes)
/// need to describe it there; the process backend needs none of it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobDetails {
    /// The job's own labels (spec.labels).
    pub labels: BTreeMap<String, String>,
    /// GPUs per replica.
    pub gpus: u32,
    /// Worker replicas besides the master; 0 for a single-replica job.
    pub workers: u32,
    /// The attempt's deadline (spec.deadline), for the orchestrator to
    /// enforce too.
    pub deadline: Option<Duration>,
    /// Grace between SIGTERM and SIGKILL, resolved against the runner's
    /// default.
    pub termination_grace: Duration,
    /// Variables the orchestrator fills from its own secrets (variable ->
    /// secret name), for backends that take secrets by reference; other
    /// backends get the values in `env`.
    pub secret_refs: BTreeMap<String, String>,
}

/// Starts workloads.
pub trait Backend: Send + Sync + 'static {
    /// "process", "docker", "kubernetes": what the runner registers as.
    fn kind(&self) -> &'static str;

    /// Whether the job's secret variables are handed over by name
    /// ([`JobDetails::secret_refs`]) rather than read by the runner.
    fn secrets_by_reference(&self) -> bool {
        false
    }

    /// Starts the workload. `Ok` means it is running.
    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<Box<dyn Workload>, Error>>;

    /// Whether what the backend launches through answers now (the Docker
    /// engine, the Kubernetes API), for the runner's health. One cheap
    /// call; the caller bounds it with a timeout. Local processes need
    /// nothing that could be unreachable.
    fn ping(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }
}

/// A started workload.
pub trait Workload: Send {
    /// Human-readable identity for logs (`pid 1234`, a container id).
    fn describe(&self) -> String;

    /// Resolves when the workload has ended and its output has been
    /// delivered to the sink. Cancel-safe: may be dropped and called again.
    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<Termination>>;

    /// Asks the workload to stop (SIGTERM to all of it), kills it when it
    /// has not ended after `grace`, and resolves like [`Workload::wait`].
    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, std::io::Result<Termination>>;

    /// What the backend knows about a failure that the exit code cannot
    /// say (the engine's OOMKilled, an image that could not be pulled, a
    /// pod that was never scheduled). Asked once `wait` resolved with a
    /// failure; `None` leaves the error to be read from the exit code and
    /// the log.
    fn failure(&self) -> Option<JobError> {
        None
    }
}
