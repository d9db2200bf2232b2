//! The scheduler's logic (no tonic types): the queue side here, runners in
//! [`crate::runners`], the dispatch loop and lease expiry in
//! [`crate::dispatch`].
//!
//! Every state change that job-service must learn about is written to the
//! outbox in the same transaction as the change itself, with the job's next
//! `scheduler_sequence`, so job-service sees them in order and exactly the
//! ones that happened.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::Instrument;
use trainmesh_common::correlation;
use trainmesh_common::db::Db;
use trainmesh_common::group_commit::{GroupCommit, Work};
use trainmesh_common::outbox::Relay;
use trainmesh_common::proto::job::v1::{FailureCause, UpdateJobStatusRequest};
use trainmesh_common::time::{to_timestamp, Clock};

use crate::approvals::{JobFacts, Rules};
use crate::domain::{AttemptStatus, EntryState, JobId, NewEntry, RunnerId};
use crate::error::{Error, Result};
use crate::leader::Leader;
use crate::limits::{self, LimitTable, LimitValues};
use crate::plan::{QueuedJob, RunnerState, Snapshot, Usage, Waiting};
use crate::queue_cache::{QueueCache, WAITING};
use crate::repo::{self, EntryRow};

/// Settings the logic needs (the part of `Config` that is not plumbing).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Seeds the USER_DEFAULT row at startup when none is stored.
    pub default_limits: LimitValues,
    /// One priority point per this long waited; zero: no ageing.
    pub ageing: Duration,
    pub approval_rules: Arc<Rules>,
    pub approval_ttl: Duration,
    pub approval_sweep: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub leader_ttl: Duration,
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub sweep_interval: Duration,
    /// Longest time `AcquireAssignments` holds a call open.
    pub max_long_poll: Duration,
    pub default_max_attempts: u32,
    /// Node faults after which a runner is cordoned (0: never).
    pub cordon_after_node_faults: u32,
    pub clock: Arc<dyn Clock>,
}

pub struct Scheduler {
    pub(crate) db: Db,
    pub(crate) settings: Settings,
    pub(crate) relay: Relay,
    /// Wakes the dispatch loop (enqueue, finish, register, heartbeat).
    pub(crate) dispatch_wake: Arc<Notify>,
    /// Wakes a runner's long-poll when something is assigned to it.
    runner_wake: Mutex<HashMap<RunnerId, Arc<Notify>>>,
    /// The name each registration was made under (it never changes), so a
    /// runner's calls are checked against its credential without a read.
    pub(crate) runner_names: Mutex<HashMap<RunnerId, String>>,
    /// Long-poll calls a dispatch can hand assignments to directly.
    pub(crate) waiters: crate::handoff::Waiters,
    pub(crate) leader: Leader,
    /// Runner reports share commits (one fsync for a burst of reports).
    pub(crate) reports: GroupCommit<crate::runners::ReportOutcome, Error>,
    /// So do enqueues.
    enqueues: GroupCommit<Enqueued, Error>,
    /// The leader's copy of the waiting queue (dispatch rounds only).
    pub(crate) queue: tokio::sync::Mutex<QueueCache>,
}

/// What an enqueue did, for the actions that follow its commit.
pub(crate) enum Enqueued {
    /// A redelivery: the job was known, in this state.
    Existing(EntryState),
    New {
        state: EntryState,
        rule: Option<String>,
        max_attempts: i64,
    },
}

/// The plan's input together with the rows it was built from.
pub(crate) struct Planned {
    pub snapshot: Snapshot,
    pub entries: HashMap<JobId, EntryRow>,
}

/// One entry of `GetQueue`.
#[derive(Clone, Debug)]
pub struct QueueItem {
    pub entry: EntryRow,
    /// 1-based among waiting jobs; 0 for jobs that are starting or running.
    pub position: u32,
    pub waiting: Option<Waiting>,
    pub effective_priority: i64,
    pub estimated_wait: Option<Duration>,
}

#[derive(Clone, Debug, Default)]
pub struct UserStats {
    pub queued: u32,
    pub running: u32,
    pub gpus_in_use: u32,
}

#[derive(Clone, Debug, Default)]
pub struct QueueStats {
    pub queued: u32,
    pub running: u32,
    pub awaiting_approval: u32,
    /// Mean time from queued to dispatched of attempts dispatched in the
    /// last hour; `None` when there were none.
    pub average_wait: Option<Duration>,
    pub held: bool,
    pub by_user: Vec<(String, UserStats)>,
    pub runners: i64,
    pub gpus_total: i64,
    pub gpus_in_use: i64,
}

pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A status update for job-service, filled in by the caller.
pub(crate) fn status(state: EntryState, attempt: i64, now: i64) -> UpdateJobStatusRequest {
    UpdateJobStatusRequest {
        state: state.proto() as i32,
        attempt: i32::try_from(attempt).unwrap_or(i32::MAX),
        time: Some(to_timestamp(now)),
        ..Default::default()
    }
}

/// Runs `op` again when it lost a race to a concurrent change (possible on
/// PostgreSQL, where writers do not queue behind one connection).
pub(crate) async fn retrying<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        match op().await {
            Err(Error::Conflict(why)) if tries < 5 => {
                tries += 1;
                tracing::debug!(%why, tries, "conflict; retrying");
            }
            other => return other,
        }
    }
}

/// The span every piece of work done for one job runs in.
pub(crate) fn job_span(job_id: JobId, correlation_id: &str) -> tracing::Span {
    tracing::info_span!("job", job_id = %job_id, correlation_id = %correlation_id)
}

impl Scheduler {
    pub fn new(db: Db, settings: Settings, relay: Relay) -> Self {
        Scheduler {
            reports: GroupCommit::start(&db),
            enqueues: GroupCommit::start(&db),
            queue: tokio::sync::Mutex::new(QueueCache::new()),
            db,
            settings,
            relay,
            dispatch_wake: Arc::new(Notify::new()),
            runner_wake: Mutex::new(HashMap::new()),
            runner_names: Mutex::new(HashMap::new()),
            waiters: crate::handoff::Waiters::default(),
            leader: Leader::new(),
        }
    }

    pub(crate) fn now(&self) -> i64 {
        self.settings.clock.now_micros()
    }

    pub fn wake_dispatcher(&self) {
        self.dispatch_wake.notify_one();
    }

    pub(crate) fn runner_notify(&self, id: RunnerId) -> Arc<Notify> {
        let mut map = self
            .runner_wake
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.entry(id).or_default().clone()
    }

    pub(crate) fn wake_runner(&self, id: RunnerId) {
        self.runner_notify(id).notify_waiters();
    }

    pub(crate) fn forget_runner(&self, id: RunnerId) {
        let removed = self
            .runner_wake
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&id);
        if let Some(n) = removed {
            n.notify_waiters();
        }
    }

    /// Stores a job in the queue. A redelivery of the same job changes
    /// nothing and answers `created = false` with the state held now.
    pub async fn enqueue(self: &Arc<Self>, e: NewEntry) -> Result<(EntryState, bool)> {
        let cid = if e.correlation_id.is_empty() {
            correlation::current().unwrap_or_else(correlation::generate)
        } else {
            e.correlation_id.clone()
        };
        let span = job_span(e.job_id, &cid);
        correlation::scope(cid.clone(), self.enqueue_in_scope(e, cid).instrument(span)).await
    }

    /// Enqueues arriving together (the job-service relay delivers them
    /// concurrently) share one commit on SQLite.
    async fn enqueue_in_scope(
        self: &Arc<Self>,
        e: NewEntry,
        cid: String,
    ) -> Result<(EntryState, bool)> {
        let this = Arc::clone(self);
        let span = tracing::Span::current();
        let entry = e.clone();
        let work: Work<Enqueued, Error> = Box::new(move |tx| {
            let (this, entry, cid, span) =
                (Arc::clone(&this), entry.clone(), cid.clone(), span.clone());
            Box::pin(async move { this.enqueue_in(tx, &entry, &cid).instrument(span).await })
        });
        let out = self
            .enqueues
            .submit(work, || Error::Db(sqlx::Error::PoolClosed))
            .await?;
        match out {
            Enqueued::Existing(state) => {
                tracing::debug!(
                    state = state.as_str(),
                    "enqueue redelivered; nothing changed"
                );
                Ok((state, false))
            }
            Enqueued::New {
                state,
                rule,
                max_attempts,
            } => {
                tracing::info!(
                    owner = %e.owner,
                    priority = e.priority,
                    gpus = e.demand.gpus,
                    max_attempts,
                    approval_rule = rule.as_deref().unwrap_or(""),
                    "{}",
                    if rule.is_some() { "job awaits approval" } else { "job queued" }
                );
                self.relay.notify();
                self.wake_dispatcher();
                Ok((state, true))
            }
        }
    }

    /// The enqueue's writes on `tx` (a savepoint of a group commit).
    async fn enqueue_in(
        &self,
        tx: &mut sqlx::AnyConnection,
        e: &NewEntry,
        cid: &str,
    ) -> Result<Enqueued> {
        let now = self.now();
        let max_attempts = i64::from(e.max_attempts.unwrap_or(self.settings.default_max_attempts));
        let submit = e.submit_time.unwrap_or(now);
        let rule = self.approval_rule_for(&mut *tx, e).await?;
        let state = if rule.is_some() {
            EntryState::AwaitingApproval
        } else {
            EntryState::Queued
        };
        if !repo::insert_entry(&mut *tx, e, state, max_attempts, cid, submit, now).await? {
            let state = repo::get_entry(&mut *tx, e.job_id)
                .await?
                .map(|r| r.state)
                .unwrap_or(EntryState::Queued);
            return Ok(Enqueued::Existing(state));
        }
        let mut update = status(state, 0, now);
        if let Some(rule) = &rule {
            let expires = now.saturating_add(micros(self.settings.approval_ttl));
            repo::insert_approval(&mut *tx, e.job_id, &e.owner, rule, now, expires).await?;
            update.reason = format!("approval required by rule `{rule}`");
        }
        update.job_id = e.job_id.to_string();
        update.scheduler_sequence = repo::FIRST_STATUS_SEQ;
        repo::enqueue_statuses(&mut *tx, &[(cid, update)]).await?;
        Ok(Enqueued::New {
            state,
            rule,
            max_attempts,
        })
    }

    /// The first approval rule the new job matches, if any.
    async fn approval_rule_for(
        &self,
        conn: &mut sqlx::AnyConnection,
        e: &NewEntry,
    ) -> Result<Option<String>> {
        let rules = &self.settings.approval_rules;
        if rules.is_empty() {
            return Ok(None);
        }
        let first_job_of_user = if rules.needs_first_job() {
            !repo::owner_has_other_jobs(conn, &e.owner, e.job_id).await?
        } else {
            false
        };
        let facts = JobFacts {
            gpus: e.demand.gpus,
            deadline: e.deadline,
            image: &e.image,
            labels: &e.labels,
            first_job_of_user,
        };
        Ok(rules.first_match(&facts).map(|r| r.name.clone()))
    }

    /// Records that the job's enqueue was refused: the entry is FAILED with
    /// the reason, so the queue answers for it and a redelivery of the same
    /// enqueue does not queue it. An entry that exists already is kept.
    pub async fn refuse(&self, job_id: JobId, reason: &str) -> Result<()> {
        retrying(|| async {
            let mut tx = self.db.begin_write().await?;
            let stored =
                repo::insert_tombstone(&mut tx, job_id, EntryState::Failed, reason, self.now())
                    .await?;
            tx.commit().await?;
            if stored {
                tracing::warn!(job_id = %job_id, reason, "enqueue refused; the job is failed");
            }
            Ok(())
        })
        .await
    }

    /// Cancels a queued job at once; a dispatched one is cancelled by its
    /// runner (told in its next heartbeat) unless it was not yet delivered.
    /// Returns the state the scheduler holds afterwards.
    pub async fn cancel(&self, job_id: JobId, reason: &str) -> Result<EntryState> {
        let reason = if reason.trim().is_empty() {
            "cancelled by request".to_owned()
        } else {
            reason.trim().to_owned()
        };
        retrying(|| self.cancel_once(job_id, reason.clone())).await
    }

    async fn cancel_once(&self, job_id: JobId, reason: String) -> Result<EntryState> {
        let now = self.now();
        let mut tx = self.db.begin_write().await?;
        let Some(entry) = repo::get_entry(&mut tx, job_id).await? else {
            // Cancelled before its EnqueueJob arrived: remember it, so the
            // late enqueue does not queue it.
            if !repo::insert_tombstone(&mut tx, job_id, EntryState::Cancelled, &reason, now).await?
            {
                return Err(Error::Conflict(format!(
                    "job `{job_id}` was enqueued meanwhile"
                )));
            }
            tx.commit().await?;
            tracing::info!(job_id = %job_id, "job cancelled before it was queued");
            return Ok(EntryState::Cancelled);
        };
        let span = job_span(job_id, &entry.correlation_id);
        let cid = entry.correlation_id.clone();
        let fut = async move {
            if entry.state.is_terminal() {
                tx.commit().await?;
                return Ok(entry.state);
            }
            repo::request_entry_cancel(&mut tx, job_id, &reason, now).await?;
            let mut update = status(EntryState::Cancelled, entry.attempt, now);
            update.failure_cause = FailureCause::Cancelled as i32;
            update.reason = reason.clone();
            if matches!(
                entry.state,
                EntryState::Queued | EntryState::AwaitingApproval
            ) {
                if entry.state == EntryState::AwaitingApproval {
                    // Closed with the job, so ListApprovals shows no
                    // pending approval for a cancelled job.
                    repo::close_approval(&mut tx, job_id, &reason, now).await?;
                }
                if !repo::set_entry_state(
                    &mut tx,
                    job_id,
                    entry.state,
                    EntryState::Cancelled,
                    &reason,
                    now,
                )
                .await?
                {
                    return Err(Error::Conflict(format!(
                        "job `{job_id}` was dispatched meanwhile"
                    )));
                }
                repo::push_status(&mut tx, job_id, &entry.correlation_id, update).await?;
                tx.commit().await?;
                tracing::info!(reason = %reason, "queued job cancelled");
                self.relay.notify();
                return Ok(EntryState::Cancelled);
            }
            let assignment = repo::get_assignment(&mut tx, job_id, entry.attempt).await?;
            match assignment {
                Some(a) if a.state == AttemptStatus::Scheduled && !a.delivered => {
                    // The runner never saw it: cancel here, free its slot.
                    let moved = repo::set_assignment_state(
                        &mut tx,
                        job_id,
                        a.attempt,
                        AttemptStatus::Scheduled,
                        AttemptStatus::Cancelled,
                        None,
                        None,
                        now,
                    )
                    .await?
                        && repo::set_entry_state(
                            &mut tx,
                            job_id,
                            entry.state,
                            EntryState::Cancelled,
                            &reason,
                            now,
                        )
                        .await?;
                    if !moved {
                        return Err(Error::Conflict(format!("job `{job_id}` changed meanwhile")));
                    }
                    update.attempt_state = AttemptStatus::Cancelled.proto() as i32;
                    update.runner_id = a.runner_id.to_string();
                    repo::push_status(&mut tx, job_id, &entry.correlation_id, update).await?;
                    tx.commit().await?;
                    tracing::info!(reason = %reason, runner_id = %a.runner_id, "undelivered job cancelled");
                    self.relay.notify();
                    self.wake_dispatcher();
                    Ok(EntryState::Cancelled)
                }
                Some(a) => {
                    repo::request_assignment_cancel(&mut tx, job_id, a.attempt).await?;
                    tx.commit().await?;
                    tracing::info!(
                        reason = %reason,
                        runner_id = %a.runner_id,
                        attempt = a.attempt,
                        "cancel requested; the runner is told in its next heartbeat"
                    );
                    Ok(entry.state)
                }
                None => {
                    tx.commit().await?;
                    Ok(entry.state)
                }
            }
        };
        correlation::scope(cid, fut.instrument(span)).await
    }

    /// Reads what the plan depends on. Every concurrent change other than a
    /// dispatch only frees capacity or adds work, so a snapshot read in
    /// several statements is conservative; dispatches come from the leader
    /// alone (see [`crate::leader`]).
    pub(crate) async fn snapshot(&self) -> Result<Planned> {
        let waiting: HashMap<JobId, EntryRow> = repo::entries_in(&self.db, &WAITING)
            .await?
            .into_iter()
            .filter(|e| !e.cancel_requested)
            .map(|e| (e.job_id, e))
            .collect();
        let snapshot = self.snapshot_of(waiting.values(), false).await?;
        Ok(Planned {
            snapshot,
            entries: waiting,
        })
    }

    /// The plan's input over `waiting` entries: limits, usage and runners
    /// read now. `for_dispatch` leaves the queue out when no runner is
    /// live: nothing can be placed then, and copying a long queue into the
    /// snapshot on every wake-up (each submission wakes the dispatcher)
    /// would be the dispatcher's main cost.
    pub(crate) async fn snapshot_of<'a>(
        &self,
        waiting: impl ExactSizeIterator<Item = &'a EntryRow> + Clone,
        for_dispatch: bool,
    ) -> Result<Snapshot> {
        let now = self.now();
        let mut snapshot = Snapshot::new(Vec::new(), Vec::new(), LimitTable::default());
        snapshot.now = now;
        snapshot.ageing_step_micros = micros(self.settings.ageing);
        if waiting.len() == 0 {
            // The common idle sweep: nothing to plan, nothing else to read.
            let (limit_rows, hold) =
                tokio::try_join!(limits::load(&self.db), repo::get_hold(&self.db))?;
            snapshot.limits = LimitTable::from_rows(&limit_rows);
            snapshot.held = hold.map(|h| h.describe());
            return Ok(snapshot);
        }
        let need_rules = waiting
            .clone()
            .any(|e| e.state == EntryState::AwaitingApproval);
        // Independent reads, all at once: on the dispatch path their round
        // trips add up to most of a round.
        let (limit_rows, hold, running, runners, usage, rules, cordoned) = tokio::try_join!(
            limits::load(&self.db),
            repo::get_hold(&self.db),
            repo::running_usage(&self.db),
            repo::live_runners(&self.db, now),
            repo::active_usage(&self.db),
            async {
                if need_rules {
                    repo::pending_approval_rules(&self.db).await
                } else {
                    Ok(HashMap::new())
                }
            },
            repo::cordoned(&self.db),
        )?;
        snapshot.limits = LimitTable::from_rows(&limit_rows);
        snapshot.held = hold.map(|h| h.describe());
        if for_dispatch && runners.is_empty() {
            return Ok(snapshot);
        }
        for (owner, org, u) in running {
            let user = snapshot.users.entry(owner).or_default();
            user.running += u.running;
            user.gpus += u.gpus;
            if !org.is_empty() {
                let o = snapshot.orgs.entry(org).or_default();
                o.running += u.running;
                o.gpus += u.gpus;
            }
            snapshot.global.running += u.running;
            snapshot.global.gpus += u.gpus;
        }
        let mut by_name: HashMap<&str, Vec<RunnerId>> = HashMap::new();
        for r in &runners {
            by_name.entry(&r.name).or_default().push(r.runner_id);
            if let Some(why) = cordoned.get(&r.name) {
                snapshot.closed.insert(r.runner_id, why.clone());
            }
        }
        for e in waiting.clone().filter(|e| !e.avoid_runners.is_empty()) {
            let ids: Vec<RunnerId> = e
                .avoid_runners
                .iter()
                .filter_map(|n| by_name.get(n.as_str()))
                .flatten()
                .copied()
                .collect();
            if !ids.is_empty() {
                snapshot.avoid.insert(e.job_id, ids);
            }
        }
        let mut states: HashMap<RunnerId, RunnerState> = HashMap::with_capacity(runners.len());
        for r in runners {
            snapshot.runner_names.insert(r.runner_id, r.name);
            states.insert(
                r.runner_id,
                RunnerState {
                    runner_id: r.runner_id,
                    capacity: r.capacity,
                    used_gpus: BTreeSet::new(),
                    used_cpu_milli: 0,
                    used_memory_mib: 0,
                },
            );
        }
        for u in usage {
            if let Some(r) = states.get_mut(&u.runner_id) {
                r.used_gpus.extend(u.gpu_indexes);
                r.used_cpu_milli += u.cpu_milli;
                r.used_memory_mib += u.memory_mib;
            }
        }
        snapshot.queued = waiting
            .map(|e| QueuedJob {
                job_id: e.job_id,
                owner: e.owner.clone(),
                org: e.org.clone(),
                priority: e.priority,
                submit_time: e.submit_time,
                demand: e.demand.clone(),
                not_before: e.not_before,
                approval_rule: (e.state == EntryState::AwaitingApproval).then(|| {
                    rules
                        .get(&e.job_id)
                        .cloned()
                        .unwrap_or_else(|| "unknown".to_owned())
                }),
            })
            .collect();
        snapshot.runners = states.into_values().collect();
        Ok(snapshot)
    }
}

/// Usage counts as the plan sees them, for callers outside it.
pub(crate) fn usage_of(s: &Snapshot, owner: &str) -> Usage {
    s.users.get(owner).copied().unwrap_or_default()
}
