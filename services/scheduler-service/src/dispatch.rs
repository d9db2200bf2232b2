//! The dispatch loop: woken by events (enqueue, finish, register,
//! heartbeat, acquire) with a periodic sweep as the safety net. Each round
//! first expires dead runners' leases, then plans and applies the plan, one
//! transaction per placement.

use std::sync::Arc;

use tracing::Instrument;
use trainmesh_common::correlation;
use trainmesh_common::proto::job::v1::{FailureCause, JobError};
use trainmesh_common::server::ShutdownWatch;

use crate::domain::{AttemptStatus, EntryState, RunnerId};
use crate::error::{Error, Result};
use crate::plan::{plan, Placement};
use crate::repo::{self, EntryRow};
use crate::service::{job_span, status, Scheduler};

pub const RUNNER_LOST: &str = "runner lost";

impl Scheduler {
    /// Runs until shutdown. Only this task dispatches and expires leases,
    /// so a plan is never applied against capacity that a concurrent
    /// dispatch took.
    pub async fn run_dispatcher(self: Arc<Self>, mut shutdown: ShutdownWatch) {
        loop {
            if let Err(e) = self.expire_leases().await {
                tracing::warn!(error = %e, "lease expiry round failed");
            }
            if let Err(e) = self.dispatch_once().await {
                tracing::warn!(error = %e, "dispatch round failed");
            }
            tokio::select! {
                _ = self.dispatch_wake.notified() => {}
                _ = tokio::time::sleep(self.settings.sweep_interval) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    /// One planning round; returns how many jobs were dispatched.
    pub async fn dispatch_once(&self) -> Result<usize> {
        let planned = self.snapshot().await?;
        if planned.snapshot.queued.is_empty() || planned.snapshot.runners.is_empty() {
            return Ok(0);
        }
        let p = plan(&planned.snapshot);
        let mut done = 0;
        for placement in &p.placements {
            let Some(entry) = planned.entries.get(&placement.job_id) else {
                continue;
            };
            let span = job_span(entry.job_id, &entry.correlation_id);
            let applied = correlation::scope(
                entry.correlation_id.clone(),
                self.apply(placement, entry).instrument(span),
            )
            .await?;
            if applied {
                done += 1;
            }
        }
        if done > 0 {
            self.relay.notify();
        }
        Ok(done)
    }

    async fn apply(&self, p: &Placement, entry: &EntryRow) -> Result<bool> {
        let now = self.now();
        let mut tx = self.db.write.begin().await?;
        if !repo::runner_is_live(&mut tx, p.runner_id, now).await? {
            return Ok(false);
        }
        let Some(attempt) = repo::dispatch_entry(&mut tx, p.job_id, p.runner_id, now).await? else {
            // Cancelled since the snapshot.
            return Ok(false);
        };
        repo::insert_assignment(
            &mut tx,
            p.job_id,
            attempt,
            p.runner_id,
            &p.gpu_indexes,
            &entry.demand,
            now,
        )
        .await?;
        let mut update = status(EntryState::Scheduled, attempt, now);
        update.attempt_state = AttemptStatus::Scheduled.proto() as i32;
        update.runner_id = p.runner_id.to_string();
        repo::push_status(&mut tx, p.job_id, &entry.correlation_id, update).await?;
        tx.commit().await?;
        tracing::info!(
            runner_id = %p.runner_id,
            attempt,
            gpus = ?p.gpu_indexes,
            owner = %entry.owner,
            "job dispatched"
        );
        self.wake_runner(p.runner_id);
        Ok(true)
    }

    /// Marks runners whose lease expired as dead; their active attempts are
    /// lost and the jobs requeued while attempts remain, else failed.
    pub async fn expire_leases(&self) -> Result<usize> {
        let now = self.now();
        let expired = repo::expired_runners(&self.db, now).await?;
        let mut count = 0;
        for runner_id in expired {
            if self.expire_runner(runner_id, now).await? {
                count += 1;
            }
        }
        if count > 0 {
            self.relay.notify();
            self.wake_dispatcher();
        }
        Ok(count)
    }

    async fn expire_runner(&self, runner_id: RunnerId, now: i64) -> Result<bool> {
        let mut tx = self.db.write.begin().await?;
        if !repo::mark_runner_dead(&mut tx, runner_id, now).await? {
            return Ok(false);
        }
        let held = repo::active_assignments_of(&mut tx, runner_id).await?;
        let mut lost = Vec::new();
        for a in &held {
            if !repo::set_assignment_state(
                &mut tx,
                a.job_id,
                a.attempt,
                a.state,
                AttemptStatus::Lost,
                None,
                None,
                now,
            )
            .await?
            {
                // Its final report won the race: nothing was lost.
                continue;
            }
            let Some(entry) = repo::get_entry(&mut tx, a.job_id).await? else {
                continue;
            };
            if entry.attempt != a.attempt || entry.state.is_terminal() {
                continue;
            }
            let error = JobError {
                r#type: "RunnerLost".into(),
                message: format!(
                    "runner `{runner_id}` stopped renewing its lease while attempt {} was on it",
                    a.attempt
                ),
                category: "runner-lost".into(),
                retryable: true,
                hint: "the job is retried on another runner while attempts remain".into(),
                ..Default::default()
            };
            let (to, reason, cause) = if entry.cancel_requested {
                (
                    EntryState::Cancelled,
                    entry.reason.clone(),
                    FailureCause::Cancelled,
                )
            } else if entry.attempt < entry.max_attempts {
                (
                    EntryState::Queued,
                    RUNNER_LOST.to_owned(),
                    FailureCause::Unspecified,
                )
            } else {
                (
                    EntryState::Failed,
                    format!(
                        "{RUNNER_LOST}; no attempts left ({} of {})",
                        entry.attempt, entry.max_attempts
                    ),
                    FailureCause::Platform,
                )
            };
            let moved = if to == EntryState::Queued {
                repo::requeue_entry(&mut tx, a.job_id, a.attempt, &reason, now).await?
            } else {
                repo::set_entry_state(&mut tx, a.job_id, entry.state, to, &reason, now).await?
            };
            if !moved {
                // Rolled back; the next sweep sees the runner expired again.
                return Err(Error::Conflict(format!(
                    "job `{}` changed meanwhile",
                    a.job_id
                )));
            }
            let mut update = status(to, a.attempt, now);
            update.attempt_state = AttemptStatus::Lost.proto() as i32;
            update.runner_id = runner_id.to_string();
            update.reason = reason.clone();
            update.failure_cause = cause as i32;
            update.error = Some(error);
            repo::push_status(&mut tx, a.job_id, &entry.correlation_id, update).await?;
            lost.push((entry, to, reason));
        }
        tx.commit().await?;
        tracing::warn!(runner_id = %runner_id, attempts_lost = lost.len(), "runner lease expired");
        for (entry, to, reason) in lost {
            let span = job_span(entry.job_id, &entry.correlation_id);
            correlation::scope(
                entry.correlation_id.clone(),
                async {
                    tracing::info!(
                        runner_id = %runner_id,
                        attempt = entry.attempt,
                        state = to.as_str(),
                        reason = %reason,
                        "attempt lost with its runner"
                    );
                }
                .instrument(span),
            )
            .await;
        }
        self.forget_runner(runner_id);
        Ok(true)
    }
}
