//! A running attempt on Kubernetes: polls its Job/PyTorchJob, pods and
//! Warning events, writes what changed into the attempt's log, copies pod
//! logs, and turns the end into a [`Termination`] and a [`JobError`].
//!
//! Polling, not a watch: a poll every few seconds is cheap at one object
//! per attempt, needs no resync logic after a dropped watch, and API errors
//! simply mean "try again at the next poll" — they never fail a job.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PropagationPolicy};
use tokio::time::Instant;
use trainmesh_common::proto::job::v1::JobError;

use super::body::Kind;
use super::config::KubernetesConfig;
use super::disruption;
use super::failure;
use super::observe::{self, Observation};
use super::podlogs::Copies;
use super::replicas;
use super::status::{self, Phase, PodView, Role};
use super::verdict::{self, Cause, Timeouts, Verdict};
use crate::backend::Workload;
use crate::domain::Termination;
use crate::logs::OutputSink;

/// Beyond the grace period, how long a cancel waits for the object to go.
const STOP_MARGIN: Duration = Duration::from_secs(30);

/// The API handles and identity of one attempt's object.
pub struct Target {
    pub jobs: Api<DynamicObject>,
    pub pods: Api<Pod>,
    pub events: Api<Event>,
    pub kind: Kind,
    pub name: String,
    pub namespace: String,
    pub pod_selector: String,
}

pub struct KubeWorkload {
    t: Target,
    cfg: KubernetesConfig,
    deadline: Option<Duration>,
    output: OutputSink,
    /// Keys of observations already written: each fact once.
    seen: HashSet<String>,
    observations: Vec<Observation>,
    /// When each pod problem (by key) was first seen.
    stuck_since: HashMap<String, Instant>,
    /// Disrupted pods, kept after the API stops listing them.
    disrupted: disruption::Seen,
    logs: Copies,
    /// Last API error written to the runner's log, to not repeat it.
    last_api_error: Option<String>,
    ended: Option<Termination>,
    failure: Option<JobError>,
    /// The pods as the last poll saw them, for the failure's replicas.
    pods: Vec<PodView>,
}

/// Why a poll gave no answer.
enum PollError {
    /// The object is gone: someone else deleted it.
    Gone,
    /// The API did not answer as it should; try again.
    Api,
}

impl KubeWorkload {
    pub fn new(
        t: Target,
        cfg: KubernetesConfig,
        deadline: Option<Duration>,
        output: OutputSink,
    ) -> Self {
        Self {
            t,
            cfg,
            deadline,
            output,
            seen: HashSet::new(),
            observations: Vec::new(),
            stuck_since: HashMap::new(),
            disrupted: disruption::Seen::default(),
            logs: Copies::default(),
            last_api_error: None,
            ended: None,
            failure: None,
            pods: Vec::new(),
        }
    }

    /// Everything observed so far, in order.
    pub fn observations(&self) -> &[Observation] {
        &self.observations
    }

    async fn note(&mut self, o: Observation) {
        if self.seen.insert(o.key()) {
            self.output.line(o.line()).await;
            self.observations.push(o);
        }
    }

    fn api_error(&mut self, what: &str, e: &kube::Error) -> PollError {
        let text = format!("{what}: {e}");
        if self.last_api_error.as_deref() != Some(text.as_str()) {
            tracing::warn!(object = %self.t.name, error = %text,
                "kubernetes API error; retrying at the next poll");
            self.last_api_error = Some(text.clone());
        }
        PollError::Api
    }

    async fn fetch(&mut self) -> Result<(status::JobStatus, Vec<PodView>, Vec<Event>), PollError> {
        let obj = match self.t.jobs.get_opt(&self.t.name).await {
            Ok(Some(o)) => o,
            Ok(None) => return Err(PollError::Gone),
            Err(e) => return Err(self.api_error("cannot read the job", &e)),
        };
        let lp = ListParams::default().labels(&self.t.pod_selector);
        let pods = match self.t.pods.list(&lp).await {
            Ok(l) => l.items,
            Err(e) => return Err(self.api_error("cannot list the job's pods", &e)),
        };
        // Events explain, they do not decide: without them the poll goes on.
        let events = match self
            .t
            .events
            .list(&ListParams::default().fields("type=Warning"))
            .await
        {
            Ok(l) => l.items,
            Err(e) => {
                self.api_error("cannot list events", &e);
                Vec::new()
            }
        };
        self.last_api_error = None;
        Ok((
            status::job_status(&obj.data),
            status::pod_views(&pods),
            events,
        ))
    }

    /// One look at the job: notes what changed, copies logs, and says
    /// whether the attempt has ended.
    async fn poll(&mut self) -> Result<Option<Verdict>, PollError> {
        let (job, pods, events) = self.fetch().await?;
        let warnings = observe::warnings(&events, &self.t.name);
        self.note(observe::of_job(self.t.kind.as_str(), &self.t.name, &job))
            .await;
        for pod in &pods {
            for o in observe::of_pod(pod) {
                self.note(o).await;
            }
        }
        for e in &warnings {
            self.note(observe::of_event(e)).await;
        }
        let now = Instant::now();
        let stuck = verdict::stuck(&pods, &warnings);
        self.stuck_since
            .retain(|k, _| stuck.iter().any(|s| &s.key == k));
        for s in &stuck {
            self.stuck_since.entry(s.key.clone()).or_insert(now);
        }
        let ages = self
            .stuck_since
            .iter()
            .map(|(k, since)| (k.clone(), now.duration_since(*since)))
            .collect();
        self.logs.update(&self.t.pods, &self.output, &pods).await;
        self.disrupted.note(&pods);
        // A preempted pod is deleted once it stops: the poll that sees the
        // job fail may no longer list it.
        let pods = if job.phase == Phase::Failed {
            self.disrupted.with_gone(&pods)
        } else {
            pods
        };
        let timeouts = Timeouts {
            unschedulable: self.cfg.unschedulable_timeout,
            start: self.cfg.start_timeout,
        };
        let verdict = verdict::decide(&job, &pods, &warnings, &ages, timeouts);
        self.pods = pods;
        Ok(verdict)
    }

    /// The attempt ended: deletes what Kubernetes would leave hanging,
    /// waits for the master's log, and keeps the error.
    async fn finish(&mut self, v: Verdict) -> Termination {
        if v.delete {
            self.output
                .line(format!(
                    "[trainmesh] k8s: deleting {} {}: it cannot run",
                    self.t.kind.as_str(),
                    self.t.name
                ))
                .await;
            self.delete(None).await;
        }
        self.logs.drain_master().await;
        self.failure = v.cause.as_ref().map(|c| {
            let log = failing_pod(c)
                .map(|p| self.logs.tail_text(p))
                .unwrap_or_default();
            let mut e = failure::job_error(c, v.termination, &log, self.deadline);
            e.replicas = replicas::replica_statuses(&self.pods);
            e
        });
        self.ended = Some(v.termination);
        v.termination
    }

    /// Asks the API to delete the object (and, by propagation, its pods).
    /// False when the request failed.
    async fn delete(&mut self, grace: Option<Duration>) -> bool {
        let dp = DeleteParams {
            // Foreground: the object stays until its pods are gone, so
            // "object gone" means "nothing of the attempt runs".
            propagation_policy: Some(PropagationPolicy::Foreground),
            grace_period_seconds: grace.map(|g| u32::try_from(g.as_secs()).unwrap_or(u32::MAX)),
            ..DeleteParams::default()
        };
        match self.t.jobs.delete(&self.t.name, &dp).await {
            Ok(_) => true,
            Err(kube::Error::Api(s)) if s.code == 404 => true,
            Err(e) => {
                self.api_error("cannot delete the job", &e);
                false
            }
        }
    }

    async fn wait_inner(&mut self) -> std::io::Result<Termination> {
        if let Some(t) = self.ended {
            return Ok(t);
        }
        loop {
            match self.poll().await {
                Ok(Some(v)) => return Ok(self.finish(v).await),
                Ok(None) => {}
                Err(PollError::Gone) => {
                    self.logs.drain_master().await;
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!(
                            "{} {}/{} was deleted outside the runner",
                            self.t.kind.as_str(),
                            self.t.namespace,
                            self.t.name
                        ),
                    ));
                }
                Err(PollError::Api) => {}
            }
            tokio::time::sleep(self.cfg.poll_interval).await;
        }
    }

    async fn stop_inner(&mut self, grace: Duration) -> std::io::Result<Termination> {
        if let Some(t) = self.ended {
            return Ok(t);
        }
        let deadline = Instant::now() + grace + STOP_MARGIN;
        let interval = self.cfg.poll_interval.min(Duration::from_secs(1));
        let mut requested = false;
        let mut master_end: Option<i32> = None;
        let gone = loop {
            if !requested {
                requested = self.delete(Some(grace)).await;
            }
            match self.t.jobs.get_opt(&self.t.name).await {
                Ok(None) => break true,
                Ok(Some(_)) => {}
                Err(e) => {
                    self.api_error("cannot read the job", &e);
                }
            }
            // While pods terminate, the master's exit code is the
            // attempt's.
            let lp = ListParams::default().labels(&self.t.pod_selector);
            if let Ok(pods) = self.t.pods.list(&lp).await {
                let views = status::pod_views(&pods.items);
                if let Some(t) = views
                    .iter()
                    .find(|p| p.role == Role::Master)
                    .and_then(PodView::terminated)
                {
                    master_end = Some(t.exit_code);
                }
            }
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(interval).await;
        };
        self.logs.drain_master().await;
        let term = match (master_end, gone) {
            (Some(code), _) => Termination::Exited(code),
            (None, true) => Termination::Signaled(15),
            (None, false) => {
                tracing::warn!(object = %self.t.name,
                    "still there after the grace period; Kubernetes finishes deleting it");
                Termination::Signaled(9)
            }
        };
        self.output
            .line(format!(
                "[trainmesh] k8s: deleted {} {} (grace {}s){}",
                self.t.kind.as_str(),
                self.t.name,
                grace.as_secs(),
                if gone { "" } else { "; still terminating" }
            ))
            .await;
        self.ended = Some(term);
        Ok(term)
    }
}

fn failing_pod(c: &Cause) -> Option<&str> {
    match c {
        Cause::OomKilled { pod, .. } | Cause::UserCode { pod, .. } => Some(pod),
        _ => None,
    }
}

impl Workload for KubeWorkload {
    fn describe(&self) -> String {
        format!(
            "{} {}/{}",
            self.t.kind.as_str(),
            self.t.namespace,
            self.t.name
        )
    }

    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<Termination>> {
        Box::pin(self.wait_inner())
    }

    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, std::io::Result<Termination>> {
        Box::pin(self.stop_inner(grace))
    }

    fn failure(&self) -> Option<JobError> {
        self.failure.clone()
    }
}
