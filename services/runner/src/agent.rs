//! The agent loop: register, heartbeat, long-poll for assignments, start
//! attempts, sweep ended attempts' directories; when stopped, drain: take
//! no more work, tell the scheduler, let the attempts end or hand them
//! back, deregister.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument;
use trainmesh_common::proto::runner::v1::{
    AcquireAssignmentsRequest, Assignment, Capacity, RegisterRunnerRequest,
};

use crate::attempt::{self, AttemptContext, StopReason};
use crate::config::Config;
use crate::domain::AttemptKey;
use crate::health::Health;
use crate::rpc::{request, Backoff, Peers, CALL_TIMEOUT};

/// How long a stop waits for a registration call already in flight.
const REGISTER_GRACE_ON_STOP: Duration = Duration::from_secs(2);

pub mod fence;
mod heartbeat;
mod stop;

use fence::Lease;

/// The scheduler's answer to a registration.
#[derive(Clone, Debug)]
pub struct Registration {
    pub runner_id: String,
    pub heartbeat_interval: Duration,
    pub lease_ttl: Duration,
}

/// Registers, and registers again when the scheduler forgot this runner;
/// concurrent callers share one re-registration.
struct Registrar {
    peers: Peers,
    request: RegisterRunnerRequest,
    current: watch::Sender<Option<Registration>>,
    lock: tokio::sync::Mutex<()>,
    default_heartbeat: Duration,
    max_backoff: Duration,
    /// Renewed by each registration, as by each heartbeat.
    lease: Arc<Lease>,
}

impl Registrar {
    fn current(&self) -> Option<Registration> {
        self.current.borrow().clone()
    }

    /// Registers, retrying until it succeeds; `None` if `stop` fires first.
    async fn register(&self, stop: &mut watch::Receiver<bool>) -> Option<Registration> {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.max_backoff);
        loop {
            let sent = tokio::time::Instant::now();
            let mut client = self.peers.scheduler.clone();
            let call = client.register_runner(request(self.request.clone(), CALL_TIMEOUT));
            tokio::pin!(call);
            let answered = tokio::select! {
                r = &mut call => Some(r),
                _ = stop.wait_for(|s| *s) => None,
            };
            let result = match answered {
                Some(r) => r,
                // The scheduler may already hold this registration: let the
                // call land, briefly, so the stop drains and deregisters
                // instead of leaving a runner that the scheduler only
                // forgets when its lease runs out.
                None => match tokio::time::timeout(REGISTER_GRACE_ON_STOP, call).await {
                    Ok(r @ Ok(_)) => r,
                    _ => return None,
                },
            };
            match result {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let positive = |d: Option<prost_types::Duration>| {
                        d.and_then(|d| trainmesh_common::time::from_duration(&d))
                            .filter(|d| !d.is_zero())
                    };
                    let reg = Registration {
                        runner_id: resp.runner_id,
                        heartbeat_interval: positive(resp.heartbeat_interval)
                            .unwrap_or(self.default_heartbeat),
                        lease_ttl: positive(resp.lease_ttl).unwrap_or_default(),
                    };
                    tracing::info!(runner_id = %reg.runner_id, heartbeat_ms = reg.heartbeat_interval.as_millis() as u64,
                        lease_ttl_ms = reg.lease_ttl.as_millis() as u64, "registered with the scheduler");
                    self.current.send_replace(Some(reg.clone()));
                    self.lease.renewed(sent, reg.lease_ttl);
                    return Some(reg);
                }
                Err(s) => {
                    self.lease.renewal_failed();
                    let delay = backoff.next_delay();
                    tracing::warn!(code = ?s.code(), detail = s.message(),
                        retry_in_ms = delay.as_millis() as u64, "cannot register with the scheduler; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => return None,
                    }
                }
            }
        }
    }

    /// Registers again unless someone already replaced `stale_id`.
    async fn reregister(
        &self,
        stale_id: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Registration> {
        let _one_at_a_time = self.lock.lock().await;
        match self.current() {
            Some(r) if r.runner_id != stale_id => Some(r),
            _ => {
                tracing::warn!(
                    runner_id = stale_id,
                    "the scheduler does not know this runner; registering again"
                );
                self.lease.lost();
                self.register(stop).await
            }
        }
    }
}

struct ActiveAttempt {
    stop: watch::Sender<Option<StopReason>>,
}

type ActiveMap = Arc<Mutex<HashMap<AttemptKey, ActiveAttempt>>>;

/// Removes an attempt from the active set when its task ends, however it
/// ends, and frees its slot.
struct ActiveGuard {
    key: AttemptKey,
    active: ActiveMap,
    freed: Arc<Notify>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.active.lock() {
            m.remove(&self.key);
        }
        self.freed.notify_one();
    }
}

fn lock(active: &ActiveMap) -> std::sync::MutexGuard<'_, HashMap<AttemptKey, ActiveAttempt>> {
    // A panic while holding the lock leaves the map consistent (every
    // operation on it is a single insert/remove/read).
    active.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Agent {
    config: Config,
    ctx: Arc<AttemptContext>,
    registrar: Arc<Registrar>,
    active: ActiveMap,
    slot_freed: Arc<Notify>,
    health: Health,
}

impl Agent {
    pub fn new(
        config: Config,
        capacity: Capacity,
        instance: String,
        ctx: Arc<AttemptContext>,
        backend_kind: &str,
        health: Health,
    ) -> Self {
        let request = RegisterRunnerRequest {
            name: config.name.clone(),
            backend: backend_kind.to_owned(),
            capacity: Some(capacity),
            labels: config
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            instance,
        };
        let active: ActiveMap = Arc::new(Mutex::new(HashMap::new()));
        let lease = Arc::new(Lease::new(active.clone(), health.clone()));
        let registrar = Arc::new(Registrar {
            peers: ctx.peers.clone(),
            request,
            current: watch::channel(None).0,
            lock: tokio::sync::Mutex::new(()),
            default_heartbeat: config.default_heartbeat_interval,
            max_backoff: config.max_backoff,
            lease,
        });
        Self {
            config,
            ctx,
            registrar,
            active,
            slot_freed: Arc::new(Notify::new()),
            health,
        }
    }

    /// Runs until `stop` turns true, then drains (see [`Agent::drain`])
    /// and returns.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let fence = self.registrar.lease.spawn_enforcer();
        if self.registrar.register(&mut stop).await.is_none() {
            self.health.set_stopping();
            fence.abort();
            tracing::info!("stopped before registering");
            return Ok(());
        }
        let (hb_stop_tx, hb_stop_rx) = watch::channel(false);
        let heartbeat = tokio::spawn(
            heartbeat::heartbeat_loop(
                self.ctx.peers.clone(),
                self.registrar.clone(),
                self.active.clone(),
                hb_stop_rx,
                stop.clone(),
            )
            .in_current_span(),
        );
        let sweeper = self.spawn_retention();
        let mut attempts = JoinSet::new();
        self.acquire_loop(&mut stop, &mut attempts).await;
        self.drain(&mut attempts).await;
        // After the attempts are done, so the lease held while they ended.
        let _ = hb_stop_tx.send(true);
        let _ = heartbeat.await;
        fence.abort();
        sweeper.abort();
        self.deregister().await;
        tracing::info!("runner stopped");
        Ok(())
    }

    async fn acquire_loop(&self, stop: &mut watch::Receiver<bool>, attempts: &mut JoinSet<()>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.config.max_backoff);
        loop {
            if *stop.borrow() {
                return;
            }
            while let Some(r) = attempts.try_join_next() {
                log_join(r);
            }
            let free = self
                .config
                .max_concurrent
                .saturating_sub(lock(&self.active).len());
            if free == 0 {
                tokio::select! {
                    _ = self.slot_freed.notified() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
            // Work taken now could not run: the scheduler is about to give
            // it, like the attempts just stopped, to another runner.
            if self.registrar.lease.fenced().is_some() {
                tokio::select! {
                    _ = self.registrar.lease.unfenced() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
            let Some(reg) = self.registrar.current() else {
                return;
            };
            let req = AcquireAssignmentsRequest {
                runner_id: reg.runner_id.clone(),
                max_assignments: i32::try_from(free).unwrap_or(i32::MAX),
                wait: Some(trainmesh_common::time::to_duration(
                    self.config.acquire_wait,
                )),
            };
            let mut client = self.ctx.peers.scheduler.clone();
            let call =
                client.acquire_assignments(request(req, self.config.acquire_wait + CALL_TIMEOUT));
            let result = tokio::select! {
                r = call => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match result {
                Ok(resp) => {
                    backoff.reset();
                    for a in resp.into_inner().assignments {
                        self.start(a, &reg.runner_id, attempts);
                    }
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    if self
                        .registrar
                        .reregister(&reg.runner_id, stop)
                        .await
                        .is_none()
                    {
                        return;
                    }
                }
                Err(s) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(code = ?s.code(), detail = s.message(),
                        retry_in_ms = delay.as_millis() as u64, "cannot acquire assignments; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
        }
    }

    fn start(&self, a: Assignment, runner_id: &str, attempts: &mut JoinSet<()>) {
        let key = match AttemptKey::parse(&a.job_id, a.attempt, "assignment") {
            Ok(k) => k,
            Err(e) => {
                // Without a valid key there is nothing to report against.
                tracing::error!(job_id = %a.job_id, attempt = a.attempt, error = %e,
                    "ignoring an assignment without a valid job id and attempt");
                return;
            }
        };
        let rx = {
            let mut active = lock(&self.active);
            if active.contains_key(&key) {
                tracing::warn!(job_id = %key.job_id, attempt = key.attempt,
                    "assignment for an attempt already running here; ignoring the duplicate");
                return;
            }
            // Read under the lock the fence stops attempts under: one
            // delivered by a long poll that outlived the lease is stopped
            // before it starts and reported as such.
            let (tx, rx) = watch::channel(self.registrar.lease.fenced());
            active.insert(key, ActiveAttempt { stop: tx });
            rx
        };
        let guard = ActiveGuard {
            key,
            active: self.active.clone(),
            freed: self.slot_freed.clone(),
        };
        let correlation_id = trainmesh_common::correlation::accept(Some(&a.correlation_id));
        let span = tracing::info_span!(
            "attempt",
            job_id = %key.job_id,
            attempt = key.attempt,
            correlation_id = %correlation_id,
        );
        let ctx = self.ctx.clone();
        let runner_id = runner_id.to_owned();
        span.in_scope(|| tracing::info!(gpus = ?a.gpu_indexes, "assignment received"));
        attempts.spawn(trainmesh_common::correlation::scope(
            correlation_id,
            async move {
                let _guard = guard;
                attempt::run(ctx, runner_id, key, a, rx).await;
            }
            .instrument(span),
        ));
    }
}

fn log_join(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        tracing::error!(error = %e, "attempt task failed");
    }
}
