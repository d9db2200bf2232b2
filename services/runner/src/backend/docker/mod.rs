//! The `docker` backend: each attempt is a container of the node's Docker
//! Engine, driven through the Engine API (bollard), never the CLI.
//!
//! - The container's name is derived from the attempt, so an assignment
//!   delivered twice adopts the container the first delivery made (follows
//!   it if running, collects its result if ended) instead of starting a
//!   second one; a create that loses that race (409) adopts too.
//! - Images are pulled by the pull policy (default: only when absent).
//! - GPUs are device requests for the `nvidia` driver; an engine without
//!   the NVIDIA runtime is a clear `setup` error, not a cryptic one.
//! - The attempt directory is bind-mounted at its own path (see
//!   [`spec::build`]), so the metrics file lands where the tailer reads it.
//! - Finished containers: removed at once or kept for a while by the
//!   settings' keep times (the workload removes at once, [`reaper`] later).

use std::time::Duration;

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use bollard::query_parameters::CreateContainerOptions;
use bollard::Docker;
use futures::future::BoxFuture;
use trainmesh_common::proto::runner::v1::Gpu;

use super::{Backend, LaunchRequest, Workload};
use crate::config::DockerSettings;
use crate::error::Error;
use crate::watchdog::Watchdog;

pub mod errors;
pub mod image;
pub mod output;
pub mod reaper;
pub mod spec;
pub mod workload;

pub use spec::ContainerSpec;
pub use workload::{DockerWorkload, RemoveOnExit};

/// How long a name the engine reported taken may stay uninspectable.
const CONFLICT_PATIENCE: Duration = Duration::from_secs(10);

/// Grace of a left-over container at runner start: its attempt was
/// already declared lost, so it gets SIGTERM and a short while to exit.
const ORPHAN_STOP_GRACE_SECS: i32 = 10;

/// The engine's runtime that gives containers NVIDIA GPUs.
const NVIDIA_RUNTIME: &str = "nvidia";

pub struct DockerBackend {
    docker: Docker,
    settings: DockerSettings,
    gpus: Vec<Gpu>,
    _reaper: reaper::Reaper,
    /// Kills this runner's containers should it die ([`crate::watchdog`]).
    watchdog: Option<std::sync::Arc<Watchdog>>,
}

impl DockerBackend {
    /// Connects to the engine of `settings.host` (else `DOCKER_HOST`, else
    /// the local socket) and agrees on an API version with it; `gpus` is
    /// the node's inventory as registered. Starts the reaper.
    pub async fn connect(settings: DockerSettings, gpus: Vec<Gpu>) -> Result<Self, Error> {
        let docker = match &settings.host {
            Some(host) => Docker::connect_with_host(host),
            None => Docker::connect_with_defaults(),
        }
        .map_err(|e| Error::docker("cannot connect", e))?;
        // bollard speaks a newer API than older engines (20.10 speaks
        // 1.41): ask the engine and use the lower of the two.
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| Error::docker("the engine does not answer", e))?;
        let reaper = reaper::spawn(
            docker.clone(),
            reaper::KeepPolicy {
                succeeded: settings.keep_succeeded,
                failed: settings.keep_failed,
            },
        );
        tracing::info!(api_version = %docker.client_version(), "connected to the Docker engine");
        let backend = Self {
            docker,
            settings,
            gpus,
            _reaper: reaper,
            watchdog: None,
        };
        backend.stop_orphans().await?;
        Ok(backend)
    }

    /// Tells `watchdog` about every container from now on, so that none
    /// outlives this runner.
    pub fn with_watchdog(mut self, watchdog: Watchdog) -> Self {
        self.watchdog = Some(std::sync::Arc::new(watchdog));
        self
    }

    /// Stops the containers an earlier run of this runner left running. A
    /// killed runner's containers outlive it (a process backend's jobs die
    /// with their runner); its attempts belong to a runner id the scheduler
    /// declares lost and retries elsewhere, and nothing will deliver them
    /// here again, so left running they would be a second copy of a job.
    pub async fn stop_orphans(&self) -> Result<usize, Error> {
        if self.settings.runner.is_empty() {
            return Ok(0);
        }
        let filters = std::collections::HashMap::from([(
            "label".to_owned(),
            vec![format!("{}={}", spec::LABEL_RUNNER, self.settings.runner)],
        )]);
        let options = bollard::query_parameters::ListContainersOptions {
            all: false,
            filters: Some(filters),
            ..Default::default()
        };
        let running = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| Error::docker("listing this runner's containers", e))?;
        let mut stopped = 0;
        for c in running {
            let Some(id) = c.id else { continue };
            let options = bollard::query_parameters::StopContainerOptions {
                t: Some(ORPHAN_STOP_GRACE_SECS),
                ..Default::default()
            };
            match self.docker.stop_container(&id, Some(options)).await {
                Ok(()) => {
                    stopped += 1;
                    tracing::warn!(container = %id, names = ?c.names,
                        "stopped a container an earlier run of this runner left running");
                }
                Err(e) if errors::is_not_found(&e) => {}
                Err(e) => return Err(Error::docker("stopping a left-over container", e)),
            }
        }
        Ok(stopped)
    }

    /// The engine connection (tests inspect what the backend made).
    pub fn engine(&self) -> &Docker {
        &self.docker
    }

    /// The container `req` runs in.
    pub fn spec(&self, req: &LaunchRequest) -> Result<ContainerSpec, Error> {
        spec::build(req, &self.settings, &self.gpus)
    }

    /// Refuses GPUs when the engine has no NVIDIA runtime: the engine's own
    /// error would come only at start and says nothing of the fix.
    pub async fn check_gpu_support(&self) -> Result<(), Error> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| Error::docker("reading the engine's info", e))?;
        let runtimes: Vec<String> = info
            .runtimes
            .unwrap_or_default()
            .into_keys()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if runtimes.iter().any(|r| r == NVIDIA_RUNTIME) {
            return Ok(());
        }
        Err(Error::NoNvidiaRuntime {
            detail: format!(
                "its runtimes are {}; install nvidia-container-toolkit on the node",
                runtimes.join(", ")
            ),
        })
    }

    /// Creates the container of `spec`; `Ok(false)` when one of that name
    /// exists already (it is to be adopted).
    pub async fn create(&self, spec: &ContainerSpec) -> Result<bool, Error> {
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..CreateContainerOptions::default()
        };
        match self
            .docker
            .create_container(Some(options), spec.body.clone())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if errors::is_conflict(&e) => Ok(false),
            Err(e) if errors::is_not_found(&e) => Err(Error::ImagePull {
                image: spec.image.clone(),
                reason: "the engine does not have it".into(),
                transient: false,
            }),
            Err(e) => Err(Error::docker(format!("creating `{}`", spec.name), e)),
        }
    }

    /// Starts the created container `name`; starting a started one is a
    /// no-op for the engine.
    pub async fn start(&self, name: &str, image: &str) -> Result<(), Error> {
        self.docker
            .start_container(name, None)
            .await
            .map_err(|e| errors::start_failure(name, image, e))
    }

    /// Starts `name` unless another delivery of the attempt started it
    /// meanwhile (two starts race: the loser's error is no failure). A
    /// container that really could not start is removed: it never ran, the
    /// error says why, and a later delivery should create it afresh.
    async fn start_once(&self, name: &str, image: &str) -> Result<(), Error> {
        let Err(e) = self.start(name, image).await else {
            return Ok(());
        };
        if let Ok(Some(info)) = self.inspect(name).await {
            let state = info.state.unwrap_or_default();
            let engine_error = state.error.as_deref().is_some_and(|e| !e.trim().is_empty());
            let started = state.running == Some(true)
                || (state.status != Some(ContainerStateStatusEnum::CREATED) && !engine_error);
            if started {
                tracing::debug!(container = name, error = %e, "started by another delivery");
                return Ok(());
            }
        }
        self.discard(name).await;
        Err(e)
    }

    /// The container another delivery created between our inspect and our
    /// create. The engine reserves the name before the container can be
    /// inspected: wait the moment that takes.
    async fn inspect_created_elsewhere(
        &self,
        name: &str,
    ) -> Result<ContainerInspectResponse, Error> {
        let deadline = tokio::time::Instant::now() + CONFLICT_PATIENCE;
        loop {
            if let Some(info) = self.inspect(name).await? {
                return Ok(info);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::ContainerNameTaken {
                    name: name.to_owned(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn inspect(&self, name: &str) -> Result<Option<ContainerInspectResponse>, Error> {
        match self.docker.inspect_container(name, None).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if errors::is_not_found(&e) => Ok(None),
            Err(e) => Err(Error::docker(format!("inspecting `{name}`"), e)),
        }
    }

    async fn run(&self, req: LaunchRequest) -> Result<Box<dyn Workload>, Error> {
        let spec = self.spec(&req)?;
        // Before the container can start: a runner killed right after the
        // start must not leave it running.
        if let Some(w) = &self.watchdog {
            w.watch(&spec.name);
        }
        let started = self.start_or_adopt(&req, &spec).await;
        if let (Err(_), Some(w)) = (&started, &self.watchdog) {
            w.unwatch(&spec.name);
        }
        started?;
        tracing::debug!(container = %spec.name, image = %spec.image, "container running");
        Ok(Box::new(DockerWorkload::attach(
            self.docker.clone(),
            spec.name,
            spec.image,
            (req.resources.memory_mib > 0).then_some(req.resources.memory_mib),
            RemoveOnExit {
                succeeded: self.settings.keep_succeeded.is_zero(),
                failed: self.settings.keep_failed.is_zero(),
            },
            req.output,
            self.watchdog.clone(),
        )))
    }

    async fn start_or_adopt(&self, req: &LaunchRequest, spec: &ContainerSpec) -> Result<(), Error> {
        let existing = self.inspect(&spec.name).await?;
        let adopted = match existing {
            Some(info) => Some(info),
            None => {
                if !req.gpu_indexes.is_empty() {
                    self.check_gpu_support().await?;
                }
                image::ensure_image(&self.docker, &spec.image, self.settings.pull_policy).await?;
                if self.create(spec).await? {
                    self.start_once(&spec.name, &spec.image).await?;
                    None
                } else {
                    Some(self.inspect_created_elsewhere(&spec.name).await?)
                }
            }
        };
        if let Some(info) = adopted {
            self.adopt(req, spec, info).await?;
        }
        Ok(())
    }

    /// Takes over the existing container of this attempt: starts it when
    /// it was only created; a running or ended one is followed as it is.
    async fn adopt(
        &self,
        req: &LaunchRequest,
        spec: &ContainerSpec,
        info: ContainerInspectResponse,
    ) -> Result<(), Error> {
        let labels = info.config.and_then(|c| c.labels).unwrap_or_default();
        if labels.get(spec::LABEL_JOB) != Some(&req.key.job_id.to_string())
            || labels.get(spec::LABEL_ATTEMPT) != Some(&req.key.attempt.to_string())
        {
            return Err(Error::ContainerNameTaken {
                name: spec.name.clone(),
            });
        }
        let state = info.state.unwrap_or_default();
        tracing::info!(container = %spec.name, status = ?state.status,
            "adopting the attempt's existing container");
        if state.status == Some(ContainerStateStatusEnum::CREATED) {
            self.start_once(&spec.name, &spec.image).await?;
        }
        Ok(())
    }

    /// Removes a container that could not be started.
    async fn discard(&self, name: &str) {
        let options = bollard::query_parameters::RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        if let Err(e) = self.docker.remove_container(name, Some(options)).await {
            if !errors::is_not_found(&e) {
                tracing::warn!(container = name, error = %e, "cannot remove the unstarted container");
            }
        }
    }
}

impl Backend for DockerBackend {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<Box<dyn Workload>, Error>> {
        Box::pin(self.run(req))
    }

    /// `GET /_ping`: the engine's own liveness endpoint, which does no work.
    fn ping(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.docker
                .ping()
                .await
                .map(|_| ())
                .map_err(|e| Error::docker("the engine does not answer a ping", e))
        })
    }
}
