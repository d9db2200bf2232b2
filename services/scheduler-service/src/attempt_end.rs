//! The end of an attempt that did not succeed: the retry decision
//! ([`crate::retry`]) applied in the caller's transaction. A retry changes
//! the job as the decision says (more memory: the stored spec and demand
//! the next attempt is placed with and handed; another runner: the names
//! it avoids), a node fault is counted against its runner (which may
//! cordon it), and the decision is kept for ExplainJob.

use sqlx::AnyConnection;
use trainmesh_common::proto::job::v1::{FailureCause, JobError, JobSpec};

use crate::domain::{AttemptStatus, EntryState, JobId, RunnerId};
use crate::error::{Error, Result};
use crate::repo::{self, EntryRow};
use crate::retry::{self, Change, Decision, Diagnosis, Ended, Ending, Policy};
use crate::retry_record::Record;
use crate::service::{micros, status, Scheduler};

pub const RUNNER_LOST: &str = "runner lost";

/// How an attempt ended without success, as [`Scheduler::end_attempt`]
/// needs it.
pub(crate) struct AttemptEnd {
    pub runner_id: RunnerId,
    pub attempt: i64,
    pub ending: Ending,
    /// FAILED or LOST, as sent to job-service.
    pub attempt_state: AttemptStatus,
    pub this_started: bool,
    /// Started attempts including this one when it started.
    pub started: i64,
    pub exit_code: Option<i32>,
    pub error: Option<JobError>,
}

impl Scheduler {
    /// Requeues the job under its retry policy or ends it, with the status
    /// update for job-service, inside the caller's transaction. Returns the
    /// state the job moved to and the reason sent.
    pub(crate) async fn end_attempt(
        &self,
        tx: &mut AnyConnection,
        entry: &EntryRow,
        end: AttemptEnd,
        now: i64,
    ) -> Result<(EntryState, String)> {
        let spec = repo::get_spec(tx, entry.job_id).await?;
        let mut spec = <JobSpec as prost::Message>::decode(spec.as_slice()).unwrap_or_default();
        let policy = Policy::of(
            spec.retry_policy.as_ref(),
            entry.max_attempts,
            self.settings.initial_backoff,
            self.settings.max_backoff,
        );
        let cause = match end.ending {
            Ending::Failed { cause, .. } => cause,
            Ending::Lost => FailureCause::Platform,
        };
        let runner = repo::runner_name_on(tx, end.runner_id)
            .await?
            .unwrap_or_else(|| end.runner_id.to_string());
        let diagnosis = match end.ending {
            Ending::Failed { .. } => Diagnosis::of(end.error.as_ref()),
            Ending::Lost => Diagnosis::Other,
        };
        if diagnosis == Diagnosis::NodeFault {
            self.count_node_fault(tx, entry.job_id, &runner, &end, now)
                .await?;
        }
        let memory_mib = spec.resources.as_ref().map_or(0, |r| r.memory_mib);
        let decision = if entry.cancel_requested {
            None
        } else {
            Some(retry::decide(
                &policy,
                &Ended {
                    ending: end.ending,
                    diagnosis,
                    attempt: end.attempt,
                    this_started: end.this_started,
                    started: end.started,
                    runner: &runner,
                    memory_mib,
                    avoided: &entry.avoid_runners,
                },
            ))
        };
        let (to, reason, sent_cause, not_before) = match &decision {
            None => (
                EntryState::Cancelled,
                entry.reason.clone(),
                FailureCause::Cancelled,
                0,
            ),
            Some(Decision::Retry {
                backoff, reason, ..
            }) => (
                EntryState::Queued,
                reason.clone(),
                FailureCause::Unspecified,
                if backoff.is_zero() {
                    0
                } else {
                    now.saturating_add(micros(*backoff))
                },
            ),
            Some(Decision::Final { why }) => {
                let reason = match (end.ending, why.is_empty()) {
                    (Ending::Lost, true) => RUNNER_LOST.to_owned(),
                    (Ending::Lost, false) => format!("{RUNNER_LOST}; {why}"),
                    (_, _) => why.clone(),
                };
                (EntryState::Failed, reason, cause, 0)
            }
        };
        let moved = if to == EntryState::Queued {
            repo::requeue_entry(tx, entry.job_id, end.attempt, &reason, not_before, now).await?
        } else {
            repo::set_entry_state(tx, entry.job_id, entry.state, to, &reason, now).await?
        };
        if !moved {
            return Err(Error::Conflict(format!(
                "job `{}` changed meanwhile",
                entry.job_id
            )));
        }
        if let Some(d) = &decision {
            if let Decision::Retry { change, .. } = d {
                self.apply_change(tx, entry, &mut spec, &policy, change, &end)
                    .await?;
            }
            let category = end.error.as_ref().map_or("", |e| e.category.as_str());
            let record = Record::of(d, end.attempt, &reason, &runner, category, now);
            repo::set_last_retry(tx, entry.job_id, &record.to_json()?).await?;
        }
        let mut update = status(to, end.attempt, now);
        update.attempt_state = end.attempt_state.proto() as i32;
        update.runner_id = end.runner_id.to_string();
        update.reason = reason.clone();
        update.failure_cause = sent_cause as i32;
        update.exit_code = end.exit_code;
        update.error = end.error;
        repo::push_status(tx, entry.job_id, &entry.correlation_id, update).await?;
        Ok((to, reason))
    }

    /// What a retry changes about the job before its next attempt.
    async fn apply_change(
        &self,
        tx: &mut AnyConnection,
        entry: &EntryRow,
        spec: &mut JobSpec,
        policy: &Policy,
        change: &Change,
        end: &AttemptEnd,
    ) -> Result<()> {
        match change {
            Change::Same => {}
            Change::Memory { mib } => {
                let resources = spec.resources.get_or_insert_with(Default::default);
                let first = resources.memory_mib;
                resources.memory_mib = *mib;
                // The default ceiling is 4 × the first request: written
                // into the spec at the first raise, so later raises (which
                // no longer know the first request) stop at it too.
                let rp = spec.retry_policy.get_or_insert_with(Default::default);
                if rp.max_memory_mib == 0 {
                    rp.max_memory_mib = policy.memory_ceiling(first);
                }
                let replicas = 1 + i64::from(spec.replicas.map_or(0, |r| r.workers.max(0)));
                let demand = mib.saturating_mul(replicas);
                repo::raise_memory(
                    tx,
                    entry.job_id,
                    prost::Message::encode_to_vec(&*spec),
                    demand,
                )
                .await?;
            }
            Change::AvoidRunner { name } => {
                let mut avoided = entry.avoid_runners.clone();
                if !avoided.contains(name) {
                    avoided.push(name.clone());
                }
                repo::set_avoid_runners(tx, entry.job_id, &avoided).await?;
                // A node fault is the runner's doing: the attempt gives its
                // place in the budget back.
                if end.this_started {
                    repo::uncount_started(tx, entry.job_id).await?;
                }
            }
        }
        Ok(())
    }

    /// Counts a node fault against runner `name`; the fault that makes
    /// `cordon_after_node_faults` cordons it.
    async fn count_node_fault(
        &self,
        tx: &mut AnyConnection,
        job_id: JobId,
        name: &str,
        end: &AttemptEnd,
        now: i64,
    ) -> Result<()> {
        let error = end
            .error
            .as_ref()
            .map(|e| format!("{}: {}", e.r#type, e.message))
            .unwrap_or_default();
        let fault = format!("job `{job_id}` attempt {}: {error}", end.attempt);
        let (health, cordoned) = repo::note_node_fault(
            tx,
            name,
            &fault,
            self.settings.cordon_after_node_faults,
            now,
        )
        .await?;
        if cordoned {
            tracing::warn!(runner = name, node_faults = health.node_faults, reason = %health.cordon_reason,
                "runner cordoned: nothing new is placed on it until an admin uncordons it");
        } else {
            tracing::warn!(runner = name, node_faults = health.node_faults, fault = %fault,
                "node fault counted against the runner; it is suspect");
        }
        Ok(())
    }
}
