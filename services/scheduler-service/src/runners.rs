//! Runners: registration, lease renewal, assignment delivery (long-poll)
//! and attempt reports (fenced by runner, job and attempt).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyConnection;
use tracing::Instrument;
use trainmesh_common::correlation;
use trainmesh_common::group_commit::Work;
use trainmesh_common::proto::job::v1::FailureCause;
use trainmesh_common::server::ShutdownWatch;

use crate::attempt_end::AttemptEnd;
use crate::domain::{
    failure_cause, AttemptReport, AttemptStatus, EntryState, JobId, Registration, RunnerId,
};
use crate::error::{Error, Result};
use crate::leases::{self, give_back_budget, Loss};
use crate::repo::{self, Delivery, RunnerStanding};
use crate::retry::Ending;
use crate::service::{job_span, micros, retrying, status, Scheduler};

/// Consecutive heartbeats without an attempt after which it is LOST.
pub const MISSED_HEARTBEATS_LOST: i64 = 2;

/// Most assignments handed out by one `AcquireAssignments`.
pub const MAX_ASSIGNMENTS_PER_CALL: i64 = 64;

#[derive(Clone, Debug)]
pub struct Registered {
    pub runner_id: RunnerId,
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
}

#[derive(Clone, Debug)]
pub struct HeartbeatOutcome {
    pub lease_expires_at: i64,
    /// Attempts the runner must stop.
    pub cancel: Vec<(JobId, i64)>,
}

impl Scheduler {
    pub async fn register(&self, reg: Registration) -> Result<Registered> {
        let id = RunnerId::new();
        let now = self.now();
        if let Some(until) = repo::live_rival(&self.db, &reg.name, &reg.instance, now).await? {
            return Err(Error::NameTaken {
                name: reg.name,
                until: trainmesh_common::time::rfc3339_micros(until),
            });
        }
        let expires = now.saturating_add(micros(self.settings.lease_ttl));
        repo::insert_runner(&self.db, id, &reg, now, expires).await?;
        tracing::info!(
            runner_id = %id,
            name = %reg.name,
            backend = %reg.backend,
            gpus = reg.capacity.gpus.len(),
            cpu_milli = reg.capacity.cpu_milli,
            memory_mib = reg.capacity.memory_mib,
            "runner registered"
        );
        self.wake_dispatcher();
        Ok(Registered {
            runner_id: id,
            lease_ttl: self.settings.lease_ttl,
            heartbeat_interval: self.settings.heartbeat_interval,
        })
    }

    /// Refuses a call that `caller` (a runner's name, from its credential)
    /// makes for a registration of another runner.
    pub async fn check_runner(&self, caller: &str, id: RunnerId) -> Result<()> {
        /// Registrations accumulate slowly (one per runner start or lost
        /// lease); past this many the cache starts over.
        const MAX_CACHED: usize = 4096;
        let cached = self
            .runner_names
            .lock()
            .expect("poisoned")
            .get(&id)
            .cloned();
        let name = match cached {
            Some(n) => n,
            None => {
                let n = repo::runner_name(&self.db, id)
                    .await?
                    .ok_or(Error::RunnerNotFound(id))?;
                let mut names = self.runner_names.lock().expect("poisoned");
                if names.len() >= MAX_CACHED {
                    names.clear();
                }
                names.insert(id, n.clone());
                n
            }
        };
        if name == caller {
            Ok(())
        } else {
            Err(Error::OtherRunner {
                caller: caller.to_owned(),
                runner_id: id,
                name,
            })
        }
    }

    /// Renews the lease and returns the attempts the runner must stop: those
    /// with a cancel request, and those it runs that it no longer holds.
    /// Also syncs status from the runner's list of active attempts: one
    /// it held for a whole heartbeat interval yet leaves out of
    /// [`MISSED_HEARTBEATS_LOST`] consecutive heartbeats is LOST (then
    /// retried under the policy); a single miss changes nothing.
    pub async fn heartbeat(
        &self,
        runner_id: RunnerId,
        active: &[(JobId, i64)],
    ) -> Result<HeartbeatOutcome> {
        retrying(|| self.heartbeat_once(runner_id, active)).await
    }

    async fn heartbeat_once(
        &self,
        runner_id: RunnerId,
        active: &[(JobId, i64)],
    ) -> Result<HeartbeatOutcome> {
        let now = self.now();
        let expires = now.saturating_add(micros(self.settings.lease_ttl));
        let mut tx = self.db.begin_write().await?;
        let Some((previous, draining)) =
            repo::renew_lease(&mut tx, runner_id, now, expires).await?
        else {
            return Err(Error::RunnerNotFound(runner_id));
        };
        let held = repo::active_assignments_of(&mut tx, runner_id).await?;
        let listed: HashSet<(JobId, i64)> = active.iter().copied().collect();
        let mut lost = Vec::new();
        for a in &held {
            if listed.contains(&(a.job_id, a.attempt)) {
                if a.missed_heartbeats > 0 {
                    repo::note_heartbeat(&mut tx, a.job_id, a.attempt, true).await?;
                }
                continue;
            }
            // Only an attempt delivered before the previous heartbeat can
            // be expected in this one.
            if !a.delivered || a.delivered_at >= previous {
                continue;
            }
            let missed = repo::note_heartbeat(&mut tx, a.job_id, a.attempt, false).await?;
            if missed >= MISSED_HEARTBEATS_LOST {
                let why = format!(
                    "runner `{runner_id}` stopped listing attempt {} as active ({missed} heartbeats in a row)",
                    a.attempt
                );
                // A stopping runner whose final report did not get through:
                // the platform's doing, not the job's.
                let loss = if draining {
                    Loss::HandedBack {
                        state: AttemptStatus::Lost,
                        why,
                    }
                } else {
                    Loss::Lost(why)
                };
                if let Some(moved) = self.end_held_attempt(&mut tx, a, loss, now).await? {
                    lost.push(moved);
                }
            }
        }
        tx.commit().await?;
        for (entry, to, reason) in &lost {
            let span = job_span(entry.job_id, &entry.correlation_id);
            span.in_scope(|| {
                tracing::warn!(runner_id = %runner_id, attempt = entry.attempt,
                    state = to.as_str(), reason = %reason, "attempt lost: its runner no longer runs it")
            });
        }
        if !lost.is_empty() {
            self.relay.notify();
        }
        let lost_ids: HashSet<(JobId, i64)> =
            lost.iter().map(|(e, _, _)| (e.job_id, e.attempt)).collect();
        let held_set: HashSet<(JobId, i64)> = held
            .iter()
            .map(|a| (a.job_id, a.attempt))
            .filter(|k| !lost_ids.contains(k))
            .collect();
        let mut cancel: Vec<(JobId, i64)> = held
            .iter()
            .filter(|a| a.cancel_requested)
            .map(|a| (a.job_id, a.attempt))
            .collect();
        let stale: Vec<(JobId, i64)> = active
            .iter()
            .filter(|a| !held_set.contains(a) && !cancel.contains(a))
            .copied()
            .collect();
        self.explain_stale(runner_id, &stale).await;
        cancel.extend(stale);
        self.wake_dispatcher();
        Ok(HeartbeatOutcome {
            lease_expires_at: expires,
            cancel,
        })
    }

    /// Logs why the runner is told to stop attempts it listed but does not
    /// hold. Mostly a heartbeat sent just before the attempt's final report
    /// arrived: the stop is then moot and not worth a warning. An attempt
    /// declared lost, or held by another runner, is.
    async fn explain_stale(&self, runner_id: RunnerId, stale: &[(JobId, i64)]) {
        for &(job_id, attempt) in stale {
            let found = match self.db.read.acquire().await {
                Ok(mut conn) => repo::get_assignment(&mut conn, job_id, attempt).await,
                Err(e) => Err(e.into()),
            };
            match found {
                Ok(Some(a))
                    if a.runner_id == runner_id
                        && matches!(a.state, AttemptStatus::Succeeded | AttemptStatus::Failed) =>
                {
                    tracing::debug!(runner_id = %runner_id, job_id = %job_id, attempt,
                        state = a.state.as_str(),
                        "heartbeat listed an attempt the runner already reported ended")
                }
                _ => tracing::warn!(runner_id = %runner_id, job_id = %job_id, attempt,
                    "runner runs an attempt it does not hold; telling it to stop"),
            }
        }
    }

    /// Returns the runner's undelivered assignments at once, else waits up
    /// to `wait` (capped) for one; empty on timeout or shutdown.
    pub async fn acquire(
        &self,
        runner_id: RunnerId,
        max: i64,
        wait: Duration,
        mut shutdown: ShutdownWatch,
    ) -> Result<Vec<Delivery>> {
        {
            let mut conn = self.db.read.acquire().await?;
            match repo::runner_standing(&mut conn, runner_id, self.now()).await? {
                Some(RunnerStanding::Live) => {}
                Some(RunnerStanding::Draining) => {
                    return Err(Error::FailedPrecondition(format!(
                        "runner `{runner_id}` is draining: nothing more is placed on it"
                    )))
                }
                None => return Err(Error::RunnerNotFound(runner_id)),
            }
        }
        let max = if max <= 0 {
            MAX_ASSIGNMENTS_PER_CALL
        } else {
            max.min(MAX_ASSIGNMENTS_PER_CALL)
        };
        let deadline = tokio::time::Instant::now() + wait.min(self.settings.max_long_poll);
        let notify = self.runner_notify(runner_id);
        self.wake_dispatcher();
        loop {
            // Registered before the read, so an assignment committed between
            // the read and the wait still wakes this call; in line for a
            // dispatch to hand assignments over directly (crate::handoff).
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut waiting = self.waiters.register(runner_id, max as usize);
            let mut got = repo::take_undelivered(&self.db, runner_id, max, self.now()).await?;
            if got.is_empty()
                && tokio::time::Instant::now() < deadline
                && !shutdown.is_shutting_down()
            {
                // Assignments made by another replica (the leader) wake
                // nothing here: poll for them while this replica is not the
                // leader.
                let poll = if self.is_leader() {
                    deadline
                } else {
                    tokio::time::Instant::now() + crate::REPLICA_POLL
                };
                tokio::select! {
                    handed = waiting.handed() => got = handed,
                    _ = &mut notified => {}
                    _ = tokio::time::sleep_until(poll.min(deadline)) => {}
                    _ = shutdown.wait() => {}
                }
            }
            // Whatever a dispatch handed over meanwhile is this call's too.
            got.extend(waiting.withdraw().await);
            if !got.is_empty() {
                for d in &got {
                    let span = job_span(d.job_id, &d.correlation_id);
                    span.in_scope(|| {
                        tracing::info!(runner_id = %runner_id, attempt = d.attempt, "assignment delivered")
                    });
                }
                return Ok(got);
            }
            if tokio::time::Instant::now() >= deadline || shutdown.is_shutting_down() {
                return Ok(Vec::new());
            }
        }
    }

    /// Applies a runner's report. Fenced: only the runner that holds the
    /// attempt may change it. Returns false for a duplicate or stale report.
    /// Reports share commits with the reports arriving at the same moment
    /// (see `trainmesh_common::group_commit`).
    pub async fn report(self: &Arc<Self>, r: AttemptReport) -> Result<bool> {
        retrying(|| self.report_once(r.clone())).await
    }

    async fn report_once(self: &Arc<Self>, r: AttemptReport) -> Result<bool> {
        let this = Arc::clone(self);
        let work: Work<ReportOutcome, Error> = Box::new(move |tx| {
            let (this, r) = (Arc::clone(&this), r.clone());
            Box::pin(async move { this.report_in(tx, r).await })
        });
        let outcome = self
            .reports
            .submit(work, || Error::Db(sqlx::Error::PoolClosed))
            .await?;
        let ReportOutcome::Changed {
            to,
            attempt,
            runner_id,
            exit_code,
            span,
            correlation_id,
        } = outcome
        else {
            return Ok(false);
        };
        let log = async {
            if to.is_terminal() || to == EntryState::Queued {
                tracing::info!(
                    state = to.as_str(),
                    attempt,
                    runner_id = %runner_id,
                    exit_code,
                    "job finished"
                );
                self.wake_dispatcher();
            } else {
                tracing::info!(attempt, runner_id = %runner_id, "job running");
            }
        };
        correlation::scope(correlation_id, log.instrument(span)).await;
        self.relay.notify();
        Ok(true)
    }

    /// The report's changes, on `tx` (a savepoint of a group commit); the
    /// caller acts on the outcome once the batch has committed.
    async fn report_in(&self, tx: &mut AnyConnection, r: AttemptReport) -> Result<ReportOutcome> {
        let now = self.now();
        let Some(ctx) =
            repo::report_context(&mut *tx, r.job_id, r.attempt, r.runner_id, now).await?
        else {
            return Err(Error::NotHolder {
                runner_id: r.runner_id,
                job_id: r.job_id,
                attempt: r.attempt,
                why: "no such attempt".into(),
            });
        };
        let (runner_id, job_id, attempt) = (r.runner_id, r.job_id, r.attempt);
        let not_holder = |why: &str| Error::NotHolder {
            runner_id,
            job_id,
            attempt,
            why: why.into(),
        };
        let a = ctx.attempt;
        if a.runner_id != r.runner_id {
            return Err(not_holder("it is assigned to another runner"));
        }
        let r = leases::unasked_cancel_is_handback(r, &a, ctx.entry.as_ref());
        // Fenced by the lease too: once it has run out, the attempt belongs
        // to the expiry (which may not have swept yet), not to the runner.
        if a.state.is_active() && !ctx.runner_live {
            return Err(not_holder("the runner's lease expired"));
        }
        if a.state == r.state {
            return Ok(ReportOutcome::Unchanged);
        }
        if a.state == AttemptStatus::Lost {
            return Err(not_holder("it was lost when the runner's lease expired"));
        }
        if r.state.rank() < a.state.rank() {
            // A retried RUNNING that arrives after the final report.
            return Ok(ReportOutcome::Unchanged);
        }
        if !a.state.is_active() {
            return Err(Error::FailedPrecondition(format!(
                "attempt {} of job `{}` already ended as {}",
                r.attempt,
                r.job_id,
                a.state.as_str()
            )));
        }
        let entry = ctx.entry.ok_or(Error::JobNotFound(r.job_id))?;
        let span = job_span(r.job_id, &entry.correlation_id);
        let cid = entry.correlation_id.clone();
        let log_span = span.clone();
        let fut = async move {
            if !repo::set_assignment_state(
                &mut *tx,
                r.job_id,
                r.attempt,
                a.state,
                r.state,
                r.exit_code,
                r.error.as_ref(),
                now,
            )
            .await?
            {
                return Err(Error::Conflict(format!(
                    "attempt {} of job `{}` changed meanwhile",
                    r.attempt, r.job_id
                )));
            }
            let mut to = r.state.job_state();
            let current_attempt = entry.attempt == r.attempt;
            // Started: reported RUNNING, or exited with a code of its own.
            let counts_now = a.state == AttemptStatus::Scheduled
                && (r.state == AttemptStatus::Running
                    || r.exit_code.is_some_and(|c| c != 0 && c != -1));
            if current_attempt && r.state == AttemptStatus::Failed && !entry.cancel_requested {
                let cause = failure_cause(r.exit_code, r.error.as_ref());
                let was_running = a.state == AttemptStatus::Running;
                if cause == FailureCause::Preempted {
                    give_back_budget(&mut *tx, r.job_id, cause, was_running).await?;
                } else if counts_now {
                    repo::count_started(&mut *tx, r.job_id).await?;
                }
                let end = AttemptEnd {
                    runner_id: r.runner_id,
                    attempt: r.attempt,
                    ending: Ending::Failed {
                        cause,
                        exit_code: r.exit_code,
                    },
                    attempt_state: AttemptStatus::Failed,
                    this_started: was_running || counts_now,
                    started: entry.started_attempts + i64::from(counts_now),
                    exit_code: r.exit_code,
                    error: r.error.clone(),
                };
                let (moved_to, reason) = self.end_attempt(&mut *tx, &entry, end, now).await?;
                to = moved_to;
                if to == EntryState::Queued {
                    tracing::info!(attempt = r.attempt, reason = %reason, "attempt failed; job requeued");
                }
            } else if current_attempt {
                let mut updates = Vec::with_capacity(2);
                if a.state == AttemptStatus::Scheduled && r.state == AttemptStatus::Succeeded {
                    // A job too quick for its RUNNING report still ran:
                    // job-service only accepts SUCCEEDED after RUNNING.
                    let mut running = status(EntryState::Running, r.attempt, now);
                    running.attempt_state = AttemptStatus::Running.proto() as i32;
                    running.runner_id = r.runner_id.to_string();
                    updates.push(running);
                }
                let mut update = status(to, r.attempt, now);
                update.attempt_state = r.state.proto() as i32;
                update.runner_id = r.runner_id.to_string();
                update.exit_code = r.exit_code;
                update.error = r.error.clone();
                match r.state {
                    AttemptStatus::Failed => {
                        update.failure_cause = failure_cause(r.exit_code, r.error.as_ref()) as i32;
                        update.reason = entry.reason.clone();
                    }
                    AttemptStatus::Cancelled => {
                        update.failure_cause = FailureCause::Cancelled as i32;
                        update.reason = entry.reason.clone();
                    }
                    _ => {}
                }
                updates.push(update);
                let n = updates.len() as i64;
                let Some(last) = repo::move_entry_with_statuses(
                    &mut *tx,
                    r.job_id,
                    entry.state,
                    to,
                    &entry.reason,
                    counts_now,
                    n,
                    now,
                )
                .await?
                else {
                    return Err(Error::Conflict(format!(
                        "job `{}` changed meanwhile",
                        r.job_id
                    )));
                };
                let updates: Vec<_> = updates
                    .into_iter()
                    .zip(last - n + 1..)
                    .map(|(mut u, seq)| {
                        u.job_id = r.job_id.to_string();
                        u.scheduler_sequence = seq;
                        (entry.correlation_id.as_str(), u)
                    })
                    .collect();
                repo::enqueue_statuses(&mut *tx, &updates).await?;
            }
            Ok(ReportOutcome::Changed {
                to,
                attempt: r.attempt,
                runner_id: r.runner_id,
                exit_code: r.exit_code,
                span: log_span,
                correlation_id: cid.clone(),
            })
        };
        fut.instrument(span).await
    }
}

/// What a report changed, for the actions that follow its commit.
pub(crate) enum ReportOutcome {
    Unchanged,
    Changed {
        to: EntryState,
        attempt: i64,
        runner_id: RunnerId,
        exit_code: Option<i32>,
        span: tracing::Span,
        correlation_id: String,
    },
}
