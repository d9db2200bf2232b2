//! A started (or adopted) container: its log pump, its end, its stop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::errors::Error as EngineError;
use bollard::models::ContainerState;
use bollard::query_parameters::{EventsOptions, RemoveContainerOptions, StopContainerOptions};
use bollard::Docker;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::task::JoinHandle;
use trainmesh_common::proto::job::v1::JobError;

use super::errors;
use super::output::{follow, Followed};
use crate::backend::Workload;
use crate::domain::Termination;
use crate::logs::OutputSink;
use crate::watchdog::Watchdog;

/// How long output may keep arriving after the container ended (the
/// engine closes the log stream right after the exit).
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// How long a SIGKILL under a memory limit waits for the engine's `oom`
/// event that may have caused it.
const OOM_EVENT_WAIT: Duration = Duration::from_secs(1);
/// Added to the grace period for the stop request itself: the engine
/// answers only once the container is gone.
const STOP_SLACK: Duration = Duration::from_secs(30);

/// Which finished containers the workload removes itself (the rest are
/// left to the reaper, to be inspected meanwhile).
#[derive(Clone, Copy, Debug)]
pub struct RemoveOnExit {
    pub succeeded: bool,
    pub failed: bool,
}

pub struct DockerWorkload {
    docker: Docker,
    name: String,
    image: String,
    memory_mib: Option<i64>,
    remove: RemoveOnExit,
    logs: Option<JoinHandle<Followed>>,
    ended: Option<Termination>,
    failure: Option<JobError>,
    /// Told once the container has ended.
    watchdog: Option<Arc<Watchdog>>,
}

impl DockerWorkload {
    /// Follows the container `name`, which has been started (or has
    /// already ended), its output going to `sink`.
    pub fn attach(
        docker: Docker,
        name: String,
        image: String,
        memory_mib: Option<i64>,
        remove: RemoveOnExit,
        sink: OutputSink,
        watchdog: Option<Arc<Watchdog>>,
    ) -> Self {
        let logs = tokio::spawn(follow(docker.clone(), name.clone(), sink));
        Self {
            docker,
            name,
            image,
            memory_mib,
            remove,
            logs: Some(logs),
            ended: None,
            failure: None,
            watchdog,
        }
    }

    /// Resolves once the container is not running.
    async fn wait_exit(&self) -> std::io::Result<()> {
        let mut stream = self.docker.wait_container(&self.name, None);
        match stream.next().await {
            // bollard turns a non-zero exit into an error; the state is
            // read from inspect either way.
            Some(Ok(_)) | Some(Err(EngineError::DockerContainerWaitError { .. })) => Ok(()),
            Some(Err(e)) => Err(io_error(&format!("waiting for `{}`", self.name), e)),
            None => Err(std::io::Error::other(format!(
                "the engine closed the wait for `{}` without an answer",
                self.name
            ))),
        }
    }

    /// After the exit: the rest of the output, the result from the engine,
    /// and removal when the policy says at once.
    async fn finish(&mut self) -> std::io::Result<Termination> {
        if let Some(mut logs) = self.logs.take() {
            match tokio::time::timeout(OUTPUT_DRAIN, &mut logs).await {
                Ok(Ok(followed)) => followed.catch_up(&self.docker, &self.name).await,
                Ok(Err(e)) => {
                    tracing::error!(container = %self.name, error = %e, "log task failed")
                }
                Err(_) => {
                    tracing::warn!(container = %self.name,
                        "log stream still open after the container ended; dropping the rest");
                    logs.abort();
                }
            }
        }
        let state = self.final_state().await?;
        if is_running(&state) {
            return Err(std::io::Error::other(format!(
                "container `{}` is still running after its wait ended",
                self.name
            )));
        }
        let term = errors::termination(&state);
        self.failure = errors::failure_of(&state, &self.image, self.memory_mib);
        self.ended = Some(term);
        if let Some(w) = &self.watchdog {
            w.unwatch(&self.name);
        }
        let remove = if term.success() {
            self.remove.succeeded
        } else {
            self.remove.failed
        };
        if remove {
            let options = RemoveContainerOptions {
                force: true,
                ..RemoveContainerOptions::default()
            };
            match self
                .docker
                .remove_container(&self.name, Some(options))
                .await
            {
                Ok(()) => tracing::debug!(container = %self.name, "container removed"),
                Err(e) if errors::is_not_found(&e) => {}
                // The reaper tries again later.
                Err(e) => tracing::warn!(container = %self.name, error = %e,
                    "cannot remove the finished container"),
            }
        }
        Ok(term)
    }

    /// The ended container's state. The engine's `OOMKilled` flag is
    /// lossy: when its OOM event and the exit race (two or three containers
    /// ending at once are enough), the flag can stay false for good, while
    /// the `oom` event itself was published. So a SIGKILL under a memory
    /// limit without the flag asks the engine's event log as well.
    async fn final_state(&self) -> std::io::Result<ContainerState> {
        let info = self
            .docker
            .inspect_container(&self.name, None)
            .await
            .map_err(|e| io_error(&format!("inspecting `{}`", self.name), e))?;
        let mut state = info.state.unwrap_or_default();
        if self.memory_mib.is_some()
            && state.exit_code == Some(137)
            && state.oom_killed != Some(true)
        {
            let since = state.started_at.as_deref().and_then(unix_time);
            if let Some(id) = info.id.as_deref() {
                if self.engine_reported_oom(id, since).await {
                    tracing::debug!(container = %self.name,
                        "OOMKilled unset but the engine published an oom event");
                    state.oom_killed = Some(true);
                }
            }
        }
        Ok(state)
    }

    /// Whether the engine published an `oom` event for container `id`
    /// since `since` (unix seconds), waiting up to [`OOM_EVENT_WAIT`] for
    /// one still on its way.
    async fn engine_reported_oom(&self, id: &str, since: Option<f64>) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let until = now + OOM_EVENT_WAIT;
        let options = EventsOptions {
            since: Some(format!("{:.9}", since.unwrap_or(0.0))),
            until: Some(format!("{}.{:09}", until.as_secs(), until.subsec_nanos())),
            filters: Some(HashMap::from([
                ("type".to_owned(), vec!["container".to_owned()]),
                ("container".to_owned(), vec![id.to_owned()]),
                ("event".to_owned(), vec!["oom".to_owned()]),
            ])),
        };
        let mut events = self.docker.events(Some(options));
        match tokio::time::timeout(OOM_EVENT_WAIT + STOP_SLACK, events.next()).await {
            Ok(Some(Ok(_))) => true,
            Ok(Some(Err(e))) => {
                tracing::debug!(container = %self.name, error = %e,
                    "cannot read the engine's events");
                false
            }
            Ok(None) | Err(_) => false,
        }
    }
}

/// Unix seconds of an RFC 3339 time from the engine.
fn unix_time(rfc3339: &str) -> Option<f64> {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339).ok()?;
    Some(t.timestamp() as f64 + f64::from(t.timestamp_subsec_nanos()) / 1e9)
}

fn is_running(state: &ContainerState) -> bool {
    state.running == Some(true) || state.restarting == Some(true) || state.paused == Some(true)
}

fn io_error(what: &str, e: EngineError) -> std::io::Error {
    let kind = if errors::is_not_found(&e) {
        std::io::ErrorKind::NotFound
    } else {
        std::io::ErrorKind::Other
    };
    std::io::Error::new(kind, format!("{what}: {e}"))
}

impl Workload for DockerWorkload {
    fn describe(&self) -> String {
        format!("container {}", self.name)
    }

    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<Termination>> {
        Box::pin(async move {
            if let Some(t) = self.ended {
                return Ok(t);
            }
            self.wait_exit().await?;
            self.finish().await
        })
    }

    /// `docker stop`: the engine sends the image's stop signal (SIGTERM),
    /// and SIGKILL when the container is still running after `grace`.
    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, std::io::Result<Termination>> {
        Box::pin(async move {
            if let Some(t) = self.ended {
                return Ok(t);
            }
            // The engine counts whole seconds; round up so the job gets
            // at least the grace it was promised.
            let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
            let options = StopContainerOptions {
                t: Some(i32::try_from(secs).unwrap_or(i32::MAX)),
                ..StopContainerOptions::default()
            };
            let docker = self
                .docker
                .clone()
                .with_timeout(Duration::from_secs(secs) + STOP_SLACK);
            match docker.stop_container(&self.name, Some(options)).await {
                Ok(()) => {}
                Err(e) => return Err(io_error(&format!("stopping `{}`", self.name), e)),
            }
            self.wait_exit().await?;
            self.finish().await
        })
    }

    fn failure(&self) -> Option<JobError> {
        self.failure.clone()
    }
}

impl Drop for DockerWorkload {
    fn drop(&mut self) {
        if let Some(logs) = self.logs.take() {
            logs.abort();
        }
    }
}
