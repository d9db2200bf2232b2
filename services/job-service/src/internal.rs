//! What other services call (JobInternalService): status updates from the
//! scheduler, log lines from runners, diagnoses.

use std::sync::Arc;

use prost::Message;
use sqlx::AnyConnection;
use tracing::Instrument;
use trainmesh_common::correlation;
use trainmesh_common::error::FieldError;
use trainmesh_common::group_commit::Work;
use trainmesh_common::proto::diagnosis::v1 as dpb;
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::time::now_micros;

use crate::domain::{
    error_message, failure_cause_for_exit, AttemptState, JobId, JobState, StatusUpdate,
};
use crate::error::{Error, Result};
use crate::repo::{self, AttemptRecord, JobRecord, NewEvent};
use crate::service::{JobService, JobView, Signals, TOPIC_DIAGNOSE};

/// Event recorded when the scheduler puts a job up for approval.
pub const EVENT_APPROVAL_REQUESTED: &str = "approval_requested";
/// Event recorded when a job is cancelled because its approval expired.
pub const EVENT_APPROVAL_EXPIRED: &str = "approval_expired";
/// The job's `state_reason` after its approval expired.
pub const APPROVAL_EXPIRED_REASON: &str = "approval-expired";

impl JobService {
    /// UpdateJobStatus: applies a legal, newer update;
    /// acknowledges stale ones and updates to finished jobs without change.
    ///
    /// Updates arriving together share one commit on SQLite (one fsync;
    /// `trainmesh_common::group_commit`); on PostgreSQL each has its own.
    pub async fn update_status(self: &Arc<Self>, u: StatusUpdate) -> Result<JobView> {
        let span = tracing::info_span!("status", job_id = %u.job_id, attempt = u.attempt);
        let traceparent = correlation::traceparent();
        let this = Arc::clone(self);
        let work: Work<(JobView, Option<bool>), Error> = Box::new(move |tx| {
            let (this, u, traceparent, span) = (
                Arc::clone(&this),
                u.clone(),
                traceparent.clone(),
                span.clone(),
            );
            Box::pin(async move {
                this.apply_status(tx, u, traceparent.as_deref())
                    .instrument(span)
                    .await
            })
        });
        let (view, applied) = self
            .statuses
            .submit(work, || {
                Error::Retry("job-service is shutting down; retry".into())
            })
            .await?;
        if let Some(diagnose) = applied {
            self.committed(diagnose);
        }
        Ok(view)
    }

    /// Ends a job the scheduler refused to queue: FAILED with its reason,
    /// so it does not wait for a queue that will never hold it. A job
    /// already finished (cancelled meanwhile) stays as it is.
    pub async fn refuse(self: &Arc<Self>, raw_id: &str, why: &str) -> Result<()> {
        let job_id = JobId::parse_field("job_id", raw_id)?;
        let reason = format!("the scheduler refused the job: {why}");
        self.update_status(StatusUpdate {
            job_id,
            attempt: 0,
            state: JobState::Failed,
            attempt_state: None,
            runner_id: String::new(),
            runner_name: String::new(),
            exit_code: None,
            error: Some(pb::JobError {
                r#type: "JobRefused".into(),
                message: reason.clone(),
                category: "refused".into(),
                retryable: false,
                hint: "change what the reason names and submit the job again".into(),
                ..Default::default()
            }),
            failure_cause: Some(pb::FailureCause::Refused),
            reason,
            time: None,
            // After anything the scheduler could have sent: it holds nothing.
            sequence: i64::MAX,
        })
        .await?;
        tracing::warn!(job_id = %job_id, error = why, "the scheduler refused the job; it failed");
        Ok(())
    }

    /// The body of UpdateJobStatus inside the caller's transaction. Returns
    /// the job as it is then and, when something changed, whether a
    /// diagnosis message was queued (`None`: ignored as stale).
    pub(crate) async fn apply_status(
        &self,
        tx: &mut AnyConnection,
        u: StatusUpdate,
        traceparent: Option<&str>,
    ) -> Result<(JobView, Option<bool>)> {
        let Some(mut job) = repo::lock_job_for_change(tx, self.db.backend, u.job_id).await? else {
            return Err(Error::JobNotFound(u.job_id.to_string()));
        };
        if job.state.is_terminal() || u.sequence <= job.scheduler_sequence {
            tracing::debug!(state = %job.state, to = %u.state, sequence = u.sequence,
                applied = job.scheduler_sequence, "status update ignored (stale or job finished)");
            let view = self.load_view(tx, job).await?;
            return Ok((view, None));
        }
        if !job.state.can_become(u.state) {
            return Err(Error::FailedPrecondition(format!(
                "job `{}` cannot go from {} to {}",
                job.id, job.state, u.state
            )));
        }
        let now = now_micros();
        let at = u.time.unwrap_or(now);
        let prev = job.state;
        job.state = u.state;
        job.scheduler_sequence = u.sequence;
        job.update_time = now;
        let approval_expired = u.state == JobState::Cancelled
            && u.failure_cause == Some(pb::FailureCause::ApprovalExpired);
        if approval_expired {
            // One spelling everywhere (ISSUE 3 "Approvals"), whatever
            // detail the scheduler adds (kept in the event's message).
            job.state_reason = APPROVAL_EXPIRED_REASON.to_owned();
        } else if !u.reason.is_empty() {
            job.state_reason = u.reason.clone();
        } else if u.state != JobState::Cancelled {
            job.state_reason.clear();
        }
        let attempt_no = if u.attempt > 0 {
            u.attempt
        } else {
            job.current_attempt
        };
        if attempt_no > 0 {
            self.apply_attempt(tx, &job, attempt_no, u.attempt > 0, &u, at)
                .await?;
            job.current_attempt = job.current_attempt.max(attempt_no);
        }
        if u.state == JobState::Running && job.start_time == 0 {
            job.start_time = at;
        }
        if u.state.is_terminal() {
            job.end_time = at;
        }
        match u.state {
            JobState::Failed => {
                let err = u.error.clone().unwrap_or_else(|| pb::JobError {
                    r#type: "UnknownError".into(),
                    message: if u.reason.is_empty() {
                        "the job failed without an error report".into()
                    } else {
                        u.reason.clone()
                    },
                    exit_code: u.exit_code.unwrap_or(0),
                    ..Default::default()
                });
                let exit = u
                    .exit_code
                    .or((err.exit_code != 0).then_some(err.exit_code));
                job.failure_cause = u
                    .failure_cause
                    .unwrap_or_else(|| failure_cause_for_exit(exit));
                job.error_message = error_message(&err);
                job.error = Some(err);
            }
            JobState::Cancelled => {
                job.failure_cause = u.failure_cause.unwrap_or(pb::FailureCause::Cancelled);
            }
            _ => {}
        }
        let sequence = repo::save_job(tx, &job).await?;
        let diagnose = u.state == JobState::Failed && self.settings.auto_diagnose;
        if diagnose {
            let msg = dpb::DiagnoseJobRequest {
                job_id: job.id.to_string(),
                use_llm: true,
            };
            // Its own key: a diagnosis need not wait behind undelivered
            // scheduler messages of the same job.
            let payload = msg.encode_to_vec();
            repo::enqueue_outbox(
                tx,
                &[repo::OutboxRow {
                    topic: TOPIC_DIAGNOSE,
                    key: format!("diagnose:{}", job.id),
                    payload: &payload,
                    correlation_id: &job.correlation_id,
                    traceparent,
                }],
            )
            .await?;
        }
        let event_type = if approval_expired {
            EVENT_APPROVAL_EXPIRED
        } else if u.state == JobState::AwaitingApproval && prev != JobState::AwaitingApproval {
            EVENT_APPROVAL_REQUESTED
        } else {
            "state_changed"
        };
        let message = if approval_expired && u.reason.is_empty() {
            APPROVAL_EXPIRED_REASON
        } else {
            u.reason.as_str()
        };
        repo::append_event(
            tx,
            self.db.backend,
            sequence,
            &NewEvent {
                job_id: job.id,
                owner: &job.owner,
                event_type,
                state: job.state,
                previous_state: Some(prev),
                message,
                attempt: attempt_no,
                time: now,
            },
        )
        .await?;
        let view = self.load_view(tx, job).await?;
        tracing::info!(from = %prev, to = %u.state, attempt = attempt_no, sequence = u.sequence, event_type, "job state changed");
        Ok((view, Some(diagnose)))
    }

    async fn apply_attempt(
        &self,
        conn: &mut AnyConnection,
        job: &JobRecord,
        number: i64,
        named: bool,
        u: &StatusUpdate,
        at: i64,
    ) -> Result<()> {
        let existing = repo::get_attempt(conn, job.id, number).await?;
        let finished = existing.as_ref().is_some_and(|a| a.state.is_terminal());
        if finished && (!named || u.attempt_state.is_none()) {
            // An update that does not name an attempt, or its state, leaves
            // a finished one alone: a later QUEUED (backoff over) must not
            // turn a FAILED attempt into LOST.
            return Ok(());
        }
        let mut a = existing.unwrap_or(AttemptRecord {
            number,
            runner_id: String::new(),
            runner_name: String::new(),
            state: AttemptState::Scheduled,
            create_time: at,
            start_time: 0,
            end_time: 0,
            exit_code: None,
            error: None,
        });
        if !u.runner_id.is_empty() {
            a.runner_id = u.runner_id.clone();
        }
        if !u.runner_name.is_empty() {
            a.runner_name = u.runner_name.clone();
        }
        a.state = u
            .attempt_state
            .unwrap_or_else(|| AttemptState::implied_by(u.state, u.error.is_some()));
        if a.state == AttemptState::Running && a.start_time == 0 {
            a.start_time = at;
        }
        if a.state.is_terminal() {
            if a.end_time == 0 {
                a.end_time = at;
            }
            if let Some(c) = u.exit_code {
                a.exit_code = Some(i64::from(c));
            }
            if u.error.is_some() {
                a.error = u.error.clone();
            }
        }
        repo::upsert_attempt(conn, job.id, &a).await
    }

    /// AttachDiagnosis, and where the relay stores DiagnoseJob's answer.
    pub async fn attach_diagnosis(&self, raw_id: &str, d: pb::DiagnosisSummary) -> Result<()> {
        let id = JobId::parse_field("job_id", raw_id)?;
        let mut tx = self.db.begin_write().await?;
        let Some(mut job) = repo::lock_job_for_change(&mut tx, self.db.backend, id).await? else {
            return Err(Error::JobNotFound(id.to_string()));
        };
        let now = now_micros();
        let message = d.error.chars().take(512).collect::<String>();
        job.diagnosis = Some(d);
        job.update_time = now;
        let sequence = repo::save_job(&mut tx, &job).await?;
        repo::append_event(
            &mut tx,
            self.db.backend,
            sequence,
            &NewEvent {
                job_id: id,
                owner: &job.owner,
                event_type: "diagnosis_attached",
                state: job.state,
                previous_state: Some(job.state),
                message: &message,
                attempt: job.current_attempt,
                time: now,
            },
        )
        .await?;
        tx.commit().await?;
        self.committed(false);
        Ok(())
    }

    /// AppendJobLogs: stores lines idempotently; returns the number after
    /// which the sender may continue.
    /// Appends the lines `runner` shipped for an attempt placed on it.
    pub async fn append_logs(
        &self,
        runner: &str,
        raw_id: &str,
        attempt: i32,
        lines: Vec<pb::LogLine>,
    ) -> Result<i64> {
        let id = JobId::parse_field("job_id", raw_id)?;
        if attempt < 1 {
            return Err(FieldError::new("attempt", "must be at least 1").into());
        }
        let mut clean = Vec::with_capacity(lines.len());
        for (i, l) in lines.into_iter().enumerate() {
            if l.number < 1 {
                return Err(
                    FieldError::new(format!("lines[{i}].number"), "must be at least 1").into(),
                );
            }
            clean.push(repo::LogLine {
                number: l.number,
                text: clean_log_text(l.text),
            });
        }
        clean.sort_by_key(|l| l.number);
        clean.dedup_by_key(|l| l.number);
        let mut tx = self.db.begin_write().await?;
        if repo::lock_job(&mut tx, self.db.backend, id)
            .await?
            .is_none()
        {
            return Err(Error::JobNotFound(id.to_string()));
        }
        placed_on(
            runner,
            id,
            attempt,
            repo::get_attempt(&mut tx, id, i64::from(attempt)).await?,
        )?;
        let out = repo::append_logs(
            &mut tx,
            id,
            i64::from(attempt),
            &clean,
            self.settings.max_log_lines_per_attempt,
        )
        .await?;
        tx.commit().await?;
        if out.inserted > 0 {
            Signals::bump(&self.signals.logs);
        }
        Ok(out.last_number)
    }
}

/// Longest stored log line; longer ones are cut (at a char boundary).
pub const MAX_LOG_LINE_BYTES: usize = 64 * 1024;

fn clean_log_text(mut text: String) -> String {
    if text.len() > MAX_LOG_LINE_BYTES {
        let mut cut = MAX_LOG_LINE_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    if text.contains('\0') {
        text = text.replace('\0', "\u{fffd}");
    }
    text
}

/// Refuses what a runner sends for an attempt that was not placed on it.
/// An attempt job-service has not heard of yet is a retry: the scheduler's
/// word that it was placed may still be on its way.
fn placed_on(runner: &str, job: JobId, attempt: i32, known: Option<AttemptRecord>) -> Result<()> {
    match known {
        None => Err(Error::Retry(format!(
            "attempt {attempt} of job `{job}` is not known here yet; retry"
        ))),
        Some(a) if a.runner_name == runner => Ok(()),
        Some(a) => Err(Error::PermissionDenied(format!(
            "attempt {attempt} of job `{job}` was not placed on runner `{runner}`{}",
            if a.runner_name.is_empty() {
                String::new()
            } else {
                format!(" but on `{}`", a.runner_name)
            }
        ))),
    }
}
