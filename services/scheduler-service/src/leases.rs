//! How a runner's hold on its attempts ends without a report from it:
//! its lease runs out, it drains (stops taking work, and gives back what it
//! holds but does not run), or it deregisters.
//!
//! A lost runner says nothing good about the platform but nothing bad
//! about the job: its attempts are retried at once and count when they had
//! started. A runner the platform stops (draining, deregistered, or whose
//! lease ran out while it was draining) hands its attempts back: retried
//! at once, and they do not use their jobs' budget (cause PREEMPTED).

use std::collections::HashSet;

use sqlx::AnyConnection;
use tracing::Instrument;
use trainmesh_common::correlation;
use trainmesh_common::proto::job::v1::{FailureCause, JobError};

use crate::attempt_end::AttemptEnd;
use crate::domain::{AttemptReport, AttemptStatus, EntryState, JobId, RunnerId};
use crate::error::{Error, Result};
use crate::repo::{self, AssignmentRow, EntryRow, Retirement};
use crate::retry::Ending;
use crate::service::{job_span, retrying, Scheduler};

/// The error category of an attempt its runner handed back because it was
/// stopped; the runner uses the same one.
pub const CATEGORY_RUNNER_SHUTDOWN: &str = "runner-shutdown";

/// Why an attempt held by a runner ends without the runner's report.
#[derive(Clone, Debug)]
pub(crate) enum Loss {
    /// The runner stopped renewing its lease or listing the attempt.
    Lost(String),
    /// The platform took it back; `state` is the attempt's end as recorded.
    HandedBack { state: AttemptStatus, why: String },
}

/// An attempt whose end the caller logs after the commit.
pub(crate) type Ended = (EntryRow, EntryState, String);

/// The error of an attempt handed back because its runner stopped.
pub fn handed_back_error(message: String) -> JobError {
    JobError {
        r#type: "RunnerShutdown".into(),
        message,
        exit_code: -1,
        category: CATEGORY_RUNNER_SHUTDOWN.into(),
        retryable: true,
        hint: "the attempt runs again at once and does not use one of the job's attempts".into(),
        ..Default::default()
    }
}

/// A runner does not cancel attempts on its own: a CANCELLED report nobody
/// asked for comes from a runner that stopped it for its own reasons (an
/// older runner shutting down), so it is read as a hand-back.
pub(crate) fn unasked_cancel_is_handback(
    mut r: AttemptReport,
    held: &AssignmentRow,
    entry: Option<&EntryRow>,
) -> AttemptReport {
    let asked = held.cancel_requested || entry.is_some_and(|e| e.cancel_requested);
    if r.state != AttemptStatus::Cancelled || asked {
        return r;
    }
    r.state = AttemptStatus::Failed;
    let is_handback = r
        .error
        .as_ref()
        .is_some_and(|e| e.category == CATEGORY_RUNNER_SHUTDOWN);
    if !is_handback {
        r.error = Some(handed_back_error(format!(
            "runner `{}` stopped attempt {} without being asked to",
            r.runner_id, r.attempt
        )));
    }
    r
}

/// Keeps the stored count of started attempts in line with
/// `retry::decide`: an attempt the platform took back gives back its place
/// in the budget. `counted` says whether the count includes it.
pub(crate) async fn give_back_budget(
    tx: &mut AnyConnection,
    job_id: JobId,
    cause: FailureCause,
    counted: bool,
) -> Result<()> {
    if cause == FailureCause::Preempted && counted {
        repo::uncount_started(tx, job_id).await?;
    }
    Ok(())
}

impl Scheduler {
    /// Marks the runner draining: nothing more is placed on it, and what it
    /// holds but does not list in `active` goes back to the queue now.
    /// Returns the attempts sent back.
    pub async fn drain(
        &self,
        runner_id: RunnerId,
        active: &[(JobId, i64)],
    ) -> Result<Vec<(JobId, i64)>> {
        let ended = retrying(|| self.drain_once(runner_id, active)).await?;
        tracing::info!(runner_id = %runner_id, running = active.len(), requeued = ended.len(),
            "runner draining: nothing more is placed on it");
        Ok(self.after_ended(runner_id, ended).await)
    }

    async fn drain_once(&self, runner_id: RunnerId, active: &[(JobId, i64)]) -> Result<Vec<Ended>> {
        let now = self.now();
        let mut tx = self.db.begin_write().await?;
        if !repo::drain_runner(&mut tx, runner_id, now).await? {
            return Err(Error::RunnerNotFound(runner_id));
        }
        let listed: HashSet<(JobId, i64)> = active.iter().copied().collect();
        let mut ended = Vec::new();
        for a in repo::active_assignments_of(&mut tx, runner_id).await? {
            if listed.contains(&(a.job_id, a.attempt)) {
                continue;
            }
            let loss = Loss::HandedBack {
                state: AttemptStatus::Failed,
                why: format!(
                    "runner `{runner_id}` is stopping and was not running attempt {}; it goes \
                     back to the queue",
                    a.attempt
                ),
            };
            if let Some(e) = self.end_held_attempt(&mut tx, &a, loss, now).await? {
                ended.push(e);
            }
        }
        tx.commit().await?;
        Ok(ended)
    }

    /// Ends the runner's registration at once; attempts it still holds are
    /// handed back. Returns them.
    pub async fn deregister(&self, runner_id: RunnerId) -> Result<Vec<(JobId, i64)>> {
        let Some(ended) = self.retire(runner_id, Retirement::Deregistered).await? else {
            return Err(Error::RunnerNotFound(runner_id));
        };
        tracing::info!(runner_id = %runner_id, handed_back = ended.len(), "runner deregistered");
        Ok(self.after_ended(runner_id, ended).await)
    }

    /// Marks runners whose lease expired as dead; their active attempts are
    /// lost (handed back, if the runner was draining) and the jobs requeued
    /// under the retry policy, else failed.
    pub async fn expire_leases(&self) -> Result<usize> {
        let now = self.now();
        let expired = repo::expired_runners(&self.db, now).await?;
        let mut count = 0;
        for runner_id in expired {
            if let Some(ended) = self.retire(runner_id, Retirement::LeaseExpired).await? {
                tracing::warn!(runner_id = %runner_id, attempts_lost = ended.len(), "runner lease expired");
                self.after_ended(runner_id, ended).await;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Marks the runner dead and ends the attempts it held; `None` when
    /// there was nothing to end.
    async fn retire(&self, runner_id: RunnerId, why: Retirement) -> Result<Option<Vec<Ended>>> {
        retrying(|| async {
            let now = self.now();
            let mut tx = self.db.begin_write().await?;
            let Some(draining) = repo::retire_runner(&mut tx, runner_id, why, now).await? else {
                return Ok(None);
            };
            let mut ended = Vec::new();
            for a in repo::active_assignments_of(&mut tx, runner_id).await? {
                let n = a.attempt;
                let loss = match (why, draining) {
                    (Retirement::Deregistered, _) => Loss::HandedBack {
                        state: AttemptStatus::Lost,
                        why: format!("runner `{runner_id}` left while attempt {n} was on it"),
                    },
                    (Retirement::LeaseExpired, true) => Loss::HandedBack {
                        state: AttemptStatus::Lost,
                        why: format!(
                            "runner `{runner_id}` was stopping and stopped renewing its lease \
                             while attempt {n} was on it"
                        ),
                    },
                    (Retirement::LeaseExpired, false) => Loss::Lost(format!(
                        "runner `{runner_id}` stopped renewing its lease while attempt {n} was on it"
                    )),
                };
                if let Some(e) = self.end_held_attempt(&mut tx, &a, loss, now).await? {
                    ended.push(e);
                }
            }
            tx.commit().await?;
            Ok(Some(ended))
        })
        .await
    }

    /// Logs each ended attempt in its job's span, tells job-service and the
    /// dispatcher; returns the attempts. The runner takes no more work, so
    /// a long-poll still open for it is woken and sent away empty.
    async fn after_ended(&self, runner_id: RunnerId, ended: Vec<Ended>) -> Vec<(JobId, i64)> {
        drop(self.waiters.claim(runner_id));
        self.forget_runner(runner_id);
        for (entry, to, reason) in &ended {
            let span = job_span(entry.job_id, &entry.correlation_id);
            correlation::scope(
                entry.correlation_id.clone(),
                async {
                    tracing::info!(runner_id = %runner_id, attempt = entry.attempt,
                        state = to.as_str(), reason = %reason, "attempt ended without its runner's report");
                }
                .instrument(span),
            )
            .await;
        }
        self.relay.notify();
        self.wake_dispatcher();
        ended
            .into_iter()
            .map(|(e, _, _)| (e.job_id, e.attempt))
            .collect()
    }

    /// Ends an active attempt by `loss` and applies the retry policy;
    /// `None` when its final report won the race or it is no longer
    /// current.
    pub(crate) async fn end_held_attempt(
        &self,
        tx: &mut AnyConnection,
        a: &AssignmentRow,
        loss: Loss,
        now: i64,
    ) -> Result<Option<Ended>> {
        let (state, ending, error) = match loss {
            Loss::Lost(why) => (
                AttemptStatus::Lost,
                Ending::Lost,
                JobError {
                    r#type: "RunnerLost".into(),
                    message: why,
                    category: "runner-lost".into(),
                    retryable: true,
                    hint: "the job is retried on another runner while attempts remain".into(),
                    ..Default::default()
                },
            ),
            Loss::HandedBack { state, why } => (
                state,
                Ending::Failed {
                    cause: FailureCause::Preempted,
                    exit_code: None,
                },
                handed_back_error(why),
            ),
        };
        if !repo::set_assignment_state(tx, a.job_id, a.attempt, a.state, state, None, None, now)
            .await?
        {
            return Ok(None);
        }
        let Some(entry) = repo::get_entry(tx, a.job_id).await? else {
            return Ok(None);
        };
        if entry.attempt != a.attempt || entry.state.is_terminal() {
            return Ok(None);
        }
        let this_started = a.state == AttemptStatus::Running;
        if let Ending::Failed { cause, .. } = ending {
            if !entry.cancel_requested {
                give_back_budget(tx, a.job_id, cause, this_started).await?;
            }
        }
        let end = AttemptEnd {
            runner_id: a.runner_id,
            attempt: a.attempt,
            ending,
            attempt_state: state,
            this_started,
            started: entry.started_attempts,
            exit_code: None,
            error: Some(error),
        };
        let (to, reason) = self.end_attempt(tx, &entry, end, now).await?;
        Ok(Some((entry, to, reason)))
    }
}
