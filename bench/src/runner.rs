//! Fake runners: the real RunnerService protocol over gRPC (register,
//! heartbeat, long-poll AcquireAssignments, report RUNNING then SUCCEEDED)
//! without launching anything. They record when each assignment arrived.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use trainmesh_common::client::{channel, Channel};
use trainmesh_common::proto::job::v1::AttemptState;
use trainmesh_common::proto::runner::v1::runner_service_client::RunnerServiceClient;
use trainmesh_common::proto::runner::v1::{
    AcquireAssignmentsRequest, Assignment, AttemptRef, Capacity, Gpu, HeartbeatRequest,
    RegisterRunnerRequest, ReportAttemptStatusRequest,
};
use trainmesh_common::time::{now_micros, to_timestamp};

/// What the fleet of fake runners saw.
#[derive(Default)]
pub struct Observed {
    /// job id → when its (first) assignment arrived.
    pub received: HashMap<String, Instant>,
    /// Jobs whose SUCCEEDED report was acknowledged.
    pub finished: HashSet<String>,
    pub first_at: Option<Instant>,
    pub last_at: Option<Instant>,
    /// Assignments for a job that had already been received.
    pub duplicates: usize,
    /// Jobs held (assignment received, final report not yet sent) per owner.
    pub holding: HashMap<String, u32>,
    /// The most jobs one owner held at once.
    pub max_holding_per_owner: u32,
}

#[derive(Default)]
struct Shared {
    observed: Mutex<Observed>,
    changed: Notify,
    report_errors: AtomicUsize,
    acquire_errors: AtomicUsize,
    cancels: AtomicUsize,
}

/// A set of fake runners against one scheduler.
pub struct Fleet {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// One runner's offer.
#[derive(Clone, Debug)]
pub struct RunnerSpec {
    pub gpus: i32,
    pub cpu: f64,
    pub memory_mib: i64,
}

impl Fleet {
    /// Registers `count` runners and starts their loops; returns once every
    /// runner has registered and has a long-poll in flight (or about to be).
    pub async fn start(
        scheduler: SocketAddr,
        token: &str,
        count: usize,
        spec: RunnerSpec,
    ) -> anyhow::Result<Fleet> {
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        for i in 0..count {
            // A channel (connection) per runner, as separate processes would have.
            let client = RunnerServiceClient::new(channel(&scheduler.to_string(), Some(token))?);
            let reg = client
                .clone()
                .register_runner(RegisterRunnerRequest {
                    // One credential (one runner name) for the whole fleet:
                    // registrations from one installation may share a name.
                    name: trainmesh_common::testing::TEST_RUNNER.into(),
                    backend: "process".into(),
                    capacity: Some(capacity(&spec)),
                    labels: [("fleet-index".to_string(), i.to_string())].into(),
                    instance: "bench-fleet".into(),
                })
                .await?
                .into_inner();
            let heartbeat = reg
                .heartbeat_interval
                .and_then(|d| trainmesh_common::time::from_duration(&d))
                .unwrap_or(Duration::from_secs(5));
            let held: Arc<Mutex<HashSet<(String, i32)>>> = Arc::default();
            let runner = Runner {
                id: reg.runner_id,
                client,
                shared: shared.clone(),
                held,
            };
            tasks.push(tokio::spawn(
                runner.clone().heartbeats(heartbeat, stopped.clone()),
            ));
            tasks.push(tokio::spawn(runner.acquire_loop(stopped.clone())));
        }
        Ok(Fleet {
            shared,
            stop,
            tasks,
        })
    }

    pub fn observed(&self) -> MutexGuard<'_, Observed> {
        lock(&self.shared.observed)
    }

    pub fn report_errors(&self) -> usize {
        self.shared.report_errors.load(Ordering::Relaxed)
    }

    pub fn acquire_errors(&self) -> usize {
        self.shared.acquire_errors.load(Ordering::Relaxed)
    }

    pub fn cancels(&self) -> usize {
        self.shared.cancels.load(Ordering::Relaxed)
    }

    /// Waits until `cond` holds or `timeout` passes; returns whether it held.
    pub async fn wait_until(&self, timeout: Duration, cond: impl Fn(&Observed) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if cond(&self.observed()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return cond(&self.observed());
            }
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                tracing::warn!("a fake runner task did not stop in 5 s");
            }
        }
    }
}

#[derive(Clone)]
struct Runner {
    id: String,
    client: RunnerServiceClient<Channel>,
    shared: Arc<Shared>,
    held: Arc<Mutex<HashSet<(String, i32)>>>,
}

impl Runner {
    async fn heartbeats(self, every: Duration, mut stopped: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
            let active = lock(&self.held)
                .iter()
                .map(|(job_id, attempt)| AttemptRef {
                    job_id: job_id.clone(),
                    attempt: *attempt,
                })
                .collect();
            match self
                .client
                .clone()
                .heartbeat(HeartbeatRequest {
                    runner_id: self.id.clone(),
                    active,
                })
                .await
            {
                Ok(r) => {
                    self.shared
                        .cancels
                        .fetch_add(r.into_inner().cancel.len(), Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(runner_id = %self.id, error = %e, "heartbeat failed"),
            }
        }
    }

    async fn acquire_loop(self, mut stopped: watch::Receiver<bool>) {
        let mut client = self.client.clone();
        loop {
            let req = AcquireAssignmentsRequest {
                runner_id: self.id.clone(),
                max_assignments: 0,
                wait: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
            };
            let got = tokio::select! {
                r = client.acquire_assignments(req) => r,
                _ = stopped.wait_for(|s| *s) => return,
            };
            match got {
                Ok(r) => {
                    let now = Instant::now();
                    for a in r.into_inner().assignments {
                        self.received(&a, now);
                        tokio::spawn(self.clone().finish(a));
                    }
                }
                Err(e) => {
                    self.shared.acquire_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(runner_id = %self.id, error = %e, "acquire failed");
                    if *stopped.borrow() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn received(&self, a: &Assignment, at: Instant) {
        lock(&self.held).insert((a.job_id.clone(), a.attempt));
        {
            let mut o = lock(&self.shared.observed);
            if o.received.contains_key(&a.job_id) {
                o.duplicates += 1;
            } else {
                o.received.insert(a.job_id.clone(), at);
            }
            o.first_at.get_or_insert(at);
            o.last_at = Some(at);
            let n = o.holding.entry(a.owner.clone()).or_insert(0);
            *n += 1;
            let n = *n;
            o.max_holding_per_owner = o.max_holding_per_owner.max(n);
        }
        self.shared.changed.notify_waiters();
    }

    /// Reports RUNNING, then SUCCEEDED at once.
    async fn finish(self, a: Assignment) {
        let ok = self.report(&a, AttemptState::Running).await;
        // Released before the final report: once the scheduler has it, the
        // user's slot may be given to the next job.
        {
            let mut o = lock(&self.shared.observed);
            if let Some(n) = o.holding.get_mut(&a.owner) {
                *n = n.saturating_sub(1);
            }
        }
        let ok = ok && self.report(&a, AttemptState::Succeeded).await;
        lock(&self.held).remove(&(a.job_id.clone(), a.attempt));
        if ok {
            lock(&self.shared.observed)
                .finished
                .insert(a.job_id.clone());
        }
        self.shared.changed.notify_waiters();
    }

    async fn report(&self, a: &Assignment, state: AttemptState) -> bool {
        let mut client = self.client.clone();
        for attempt in 0..5u32 {
            let req = ReportAttemptStatusRequest {
                runner_id: self.id.clone(),
                job_id: a.job_id.clone(),
                attempt: a.attempt,
                state: state as i32,
                exit_code: (state == AttemptState::Succeeded).then_some(0),
                error: None,
                log_tail: Vec::new(),
                time: Some(to_timestamp(now_micros())),
            };
            match client.report_attempt_status(req).await {
                Ok(_) => return true,
                Err(e) => {
                    self.shared.report_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(job_id = %a.job_id, ?state, error = %e, "report failed");
                    if e.code() == tonic::Code::FailedPrecondition {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                }
            }
        }
        false
    }
}

fn capacity(spec: &RunnerSpec) -> Capacity {
    Capacity {
        gpus: (0..spec.gpus)
            .map(|i| Gpu {
                index: i,
                uuid: format!("GPU-bench-{i}"),
                model: "NVIDIA H100 80GB HBM3".into(),
                memory_mib: 81_559,
            })
            .collect(),
        cpu: spec.cpu,
        memory_mib: spec.memory_mib,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
