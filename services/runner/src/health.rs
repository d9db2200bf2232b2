//! The runner's health, served as `grpc.health.v1` (and nothing else) on
//! `--health-listen`, for Kubernetes probes and compose health checks.
//!
//! SERVING exactly while the runner can do its job: it is registered, its
//! latest call to renew its lease (the registration or a heartbeat)
//! succeeded and it has not fenced itself (`agent::fence`), its backend
//! answered its latest probe, and it is not stopping. The agent reports the first and last as they happen; the
//! backend is probed on a timer, each probe bounded by a timeout, so a
//! probe of the health port costs nothing but a read.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::ServingStatus;
use trainmesh_common::tls::ServerTls;

use crate::backend::Backend;

/// The one service name health is reported under: "", the server as a
/// whole, which is what a Kubernetes gRPC probe and `grpc_health_probe`
/// ask for when given no service. The runner serves no gRPC service of its
/// own that a name could stand for; other names answer NOT_FOUND.
pub const SERVICE: &str = "";

/// How often and how patiently the backend is probed.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Probe {
    /// Every 5 s, 3 s each: a dead engine or API shows within 8 s, and a
    /// slow one does not pile probes up.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(3),
        }
    }
}

/// What health is made of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    /// Registered, the latest call renewing the lease succeeded, and the
    /// runner is not fenced.
    pub lease: bool,
    /// The backend answered its latest probe (false until the first).
    pub backend: bool,
    /// The runner is stopping: it takes no more work.
    pub stopping: bool,
}

impl Conditions {
    pub fn serving(&self) -> bool {
        self.lease && self.backend && !self.stopping
    }
}

/// The runner's health as it changes; cheap to clone and to update.
#[derive(Clone, Debug)]
pub struct Health {
    state: Arc<watch::Sender<Conditions>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Not serving: not registered yet, backend not probed yet.
    pub fn new() -> Self {
        Self {
            state: Arc::new(watch::channel(Conditions::default()).0),
        }
    }

    pub fn conditions(&self) -> Conditions {
        *self.state.borrow()
    }

    pub fn set_lease(&self, ok: bool) {
        self.update(|c| c.lease = ok);
    }

    pub fn set_backend(&self, ok: bool) {
        self.update(|c| c.backend = ok);
    }

    /// For good: a stopping runner does not start again.
    pub fn set_stopping(&self) {
        self.update(|c| c.stopping = true);
    }

    fn update(&self, f: impl FnOnce(&mut Conditions)) {
        self.state.send_if_modified(|c| {
            let before = *c;
            f(c);
            before != *c
        });
    }

    fn subscribe(&self) -> watch::Receiver<Conditions> {
        self.state.subscribe()
    }
}

/// Serves `grpc.health.v1` on `listener` (with `tls`) until `shutdown`
/// resolves, probing `backend` meanwhile.
pub async fn serve(
    listener: TcpListener,
    tls: ServerTls,
    health: Health,
    backend: Arc<dyn Backend>,
    probe: Probe,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let mut builder = tls.server_builder(addr)?;
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVICE, ServingStatus::NotServing)
        .await;
    tracing::info!(%addr, tls = tls.is_tls(), "serving the runner's health");
    let server = builder.add_service(service).serve_with_incoming_shutdown(
        tonic::transport::server::TcpIncoming::from(listener),
        shutdown,
    );
    // The other two never end; the server ends them.
    tokio::select! {
        r = server => r?,
        _ = publish(health.subscribe(), reporter) => {}
        _ = probe_backend(backend, health, probe) => {}
    }
    Ok(())
}

/// Keeps the served status in line with the conditions.
async fn publish(
    mut conditions: watch::Receiver<Conditions>,
    reporter: tonic_health::server::HealthReporter,
) {
    let mut served = None;
    loop {
        let now = *conditions.borrow_and_update();
        let serving = now.serving();
        if served != Some(serving) {
            if serving {
                tracing::info!("health: serving");
            } else {
                tracing::info!(
                    lease = now.lease,
                    backend = now.backend,
                    stopping = now.stopping,
                    "health: not serving"
                );
            }
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status(SERVICE, status).await;
            served = Some(serving);
        }
        if conditions.changed().await.is_err() {
            // Health is gone with the runner; the server is about to end.
            return futures::future::pending().await;
        }
    }
}

async fn probe_backend(backend: Arc<dyn Backend>, health: Health, probe: Probe) {
    let mut tick = tokio::time::interval(probe.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ok = None;
    loop {
        tick.tick().await;
        let ok = match tokio::time::timeout(probe.timeout, backend.ping()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                if was_ok != Some(false) {
                    tracing::warn!(backend = backend.kind(), error = %e, "the backend is unreachable");
                }
                false
            }
            Err(_) => {
                if was_ok != Some(false) {
                    tracing::warn!(
                        backend = backend.kind(),
                        timeout_ms = probe.timeout.as_millis() as u64,
                        "the backend did not answer in time"
                    );
                }
                false
            }
        };
        if ok && was_ok == Some(false) {
            tracing::info!(backend = backend.kind(), "the backend answers again");
        }
        was_ok = Some(ok);
        health.set_backend(ok);
    }
}

#[cfg(test)]
#[path = "health_tests.rs"]
mod tests;
