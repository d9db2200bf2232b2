//! A runner played by the test itself: it speaks RunnerService with the
//! service token (register, heartbeat listing the attempts it holds,
//! long-poll for assignments, reports) but runs nothing, so a test decides
//! exactly when an attempt starts and ends, or that its runner goes silent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tonic::Status;
use trainmesh_common::client::Channel;
use trainmesh_common::time::{now_micros, to_duration, to_timestamp};
use trainmesh_proto::job::v1::AttemptState;
use trainmesh_proto::runner::v1::runner_service_client::RunnerServiceClient;
use trainmesh_proto::runner::v1::{
    AcquireAssignmentsRequest, Assignment, AttemptRef, Capacity, HeartbeatRequest,
    HeartbeatResponse, RegisterRunnerRequest, ReportAttemptStatusRequest,
};

use crate::{runner_token, Mesh};

/// Attempts the runner holds (listed in its heartbeats), each with whether
/// its final report is under way.
type Held = Arc<Mutex<BTreeMap<(String, i32), bool>>>;

pub struct FakeRunner {
    client: RunnerServiceClient<Channel>,
    pub name: String,
    pub runner_id: String,
    pub heartbeat_interval: Duration,
    pub lease_ttl: Duration,
    held: Held,
    /// Attempts a heartbeat told this runner to stop while it held them and
    /// had not yet begun their final report (see [`FakeRunner::finishing`]).
    pub told_to_stop: Arc<Mutex<Vec<(String, i32)>>>,
    /// Heartbeats the scheduler refused (with the status).
    pub heartbeat_errors: Arc<Mutex<Vec<String>>>,
    heartbeats: Option<JoinHandle<()>>,
}

/// CPU-only capacity.
pub fn cpu_capacity(cpu: f64, memory_mib: i64) -> Capacity {
    Capacity {
        gpus: vec![],
        cpu,
        memory_mib,
    }
}

impl FakeRunner {
    /// Registers with the scheduler instance `scheduler` as `name`.
    pub async fn register(mesh: &Mesh, scheduler: &str, name: &str, capacity: Capacity) -> Self {
        let mut client = mesh.runner_service(scheduler, &runner_token(name));
        let resp = client
            .register_runner(RegisterRunnerRequest {
                name: name.into(),
                backend: "process".into(),
                capacity: Some(capacity),
                labels: Default::default(),
                instance: format!("fake-{name}"),
            })
            .await
            .unwrap_or_else(|e| panic!("register fake runner {name}: {e}"))
            .into_inner();
        let dur = |d: Option<prost_types::Duration>| {
            d.and_then(|d| trainmesh_common::time::from_duration(&d))
                .unwrap_or_default()
        };
        FakeRunner {
            client,
            name: name.into(),
            runner_id: resp.runner_id,
            heartbeat_interval: dur(resp.heartbeat_interval),
            lease_ttl: dur(resp.lease_ttl),
            held: Held::default(),
            told_to_stop: Default::default(),
            heartbeat_errors: Default::default(),
            heartbeats: None,
        }
    }

    /// Heartbeats in the background at the interval the scheduler asked
    /// for, listing the attempts held, until dropped.
    pub fn keep_alive(&mut self) {
        let interval = if self.heartbeat_interval.is_zero() {
            Duration::from_secs(1)
        } else {
            self.heartbeat_interval
        };
        let mut client = self.client.clone();
        let runner_id = self.runner_id.clone();
        let held = self.held.clone();
        let stop = self.told_to_stop.clone();
        let errors = self.heartbeat_errors.clone();
        self.heartbeats = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match client.heartbeat(heartbeat_request(&runner_id, &held)).await {
                    Ok(resp) => note_stops(&resp.into_inner(), &held, &stop),
                    Err(e) => lock(&errors).push(e.to_string()),
                }
            }
        }));
    }

    /// One heartbeat now, listing the attempts held.
    pub async fn heartbeat(&self) -> Result<HeartbeatResponse, Status> {
        let resp = self
            .client
            .clone()
            .heartbeat(heartbeat_request(&self.runner_id, &self.held))
            .await?
            .into_inner();
        note_stops(&resp, &self.held, &self.told_to_stop);
        Ok(resp)
    }

    /// One long-poll for assignments.
    pub async fn acquire(&self, max: i32, wait: Duration) -> Result<Vec<Assignment>, Status> {
        Ok(self
            .client
            .clone()
            .acquire_assignments(AcquireAssignmentsRequest {
                runner_id: self.runner_id.clone(),
                max_assignments: max,
                wait: Some(to_duration(wait)),
            })
            .await?
            .into_inner()
            .assignments)
    }

    /// Long-polls until an assignment arrives (panics after `timeout`).
    pub async fn next_assignment(&self, timeout: Duration) -> Assignment {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "fake runner {} got no assignment within {timeout:?}",
                self.name
            );
            let got = self
                .acquire(1, left.min(Duration::from_secs(5)))
                .await
                .unwrap_or_else(|e| panic!("acquire on fake runner {}: {e}", self.name));
            if let Some(a) = got.into_iter().next() {
                return a;
            }
        }
    }

    /// From now on heartbeats list this attempt as running here.
    pub fn hold(&self, job_id: &str, attempt: i32) {
        lock(&self.held).insert((job_id.to_string(), attempt), false);
    }

    /// The attempt's final report is about to be sent: heartbeats still
    /// list it (as a real runner's do until the report is acknowledged),
    /// but a stop for it is no longer counted in `told_to_stop` — the
    /// scheduler may answer a heartbeat that crossed the report.
    pub fn finishing(&self, job_id: &str, attempt: i32) {
        if let Some(f) = lock(&self.held).get_mut(&(job_id.to_string(), attempt)) {
            *f = true;
        }
    }

    /// Heartbeats stop listing the attempt.
    pub fn release(&self, job_id: &str, attempt: i32) {
        lock(&self.held).remove(&(job_id.to_string(), attempt));
    }

    /// ReportAttemptStatus for one attempt; `Ok(changed)`.
    pub async fn report(
        &self,
        job_id: &str,
        attempt: i32,
        state: AttemptState,
        exit_code: Option<i32>,
    ) -> Result<bool, Status> {
        Ok(self
            .client
            .clone()
            .report_attempt_status(ReportAttemptStatusRequest {
                runner_id: self.runner_id.clone(),
                job_id: job_id.into(),
                attempt,
                state: state as i32,
                exit_code,
                error: None,
                log_tail: vec![],
                time: Some(to_timestamp(now_micros())),
            })
            .await?
            .into_inner()
            .changed)
    }
}

impl Drop for FakeRunner {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeats.take() {
            h.abort();
        }
    }
}

fn heartbeat_request(runner_id: &str, held: &Held) -> HeartbeatRequest {
    HeartbeatRequest {
        runner_id: runner_id.to_string(),
        active: lock(held)
            .keys()
            .map(|(job_id, attempt)| AttemptRef {
                job_id: job_id.clone(),
                attempt: *attempt,
            })
            .collect(),
    }
}

fn note_stops(resp: &HeartbeatResponse, held: &Held, stops: &Mutex<Vec<(String, i32)>>) {
    let held = lock(held);
    let mut stops = lock(stops);
    for c in &resp.cancel {
        let key = (c.job_id.clone(), c.attempt);
        if held.get(&key) == Some(&false) {
            stops.push(key);
        }
    }
}

/// A test that panics while holding a lock must not take the heartbeat
/// task down with a second panic.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
