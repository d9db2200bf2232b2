//! Decisions people make about the queue: approve, reject, the expiry of
//! pending approvals, hold/release, and limits. Every change runs as a
//! compare-and-set in one transaction with its status update, so it is safe
//! on any replica.
//!
//! Status updates sent to job-service (exact strings, relied on by
//! job-service and the cross-service tests):
//! - approve: QUEUED, reason "approved by <user>: <note>" ("approved by
//!   <user>" without a note);
//! - reject: CANCELLED, failure_cause CANCELLED, reason "rejected by
//!   <user>: <note>";
//! - expiry: CANCELLED, failure_cause APPROVAL_EXPIRED, reason
//!   "approval-expired".

use std::sync::Arc;

use tracing::Instrument;
use trainmesh_common::audit::{AuditAction, AuditRecord, AuditTable};
use trainmesh_common::correlation;
use trainmesh_common::proto::job::v1::FailureCause;
use trainmesh_common::server::ShutdownWatch;
use trainmesh_common::time::to_timestamp;

use crate::domain::{EntryState, JobId};
use crate::error::{Error, Result};
use crate::limits::{self, LimitRow};
use crate::repo::{self, ApprovalRow, ApprovalState, Hold};
use crate::service::{job_span, retrying, status, Scheduler};

pub const APPROVAL_EXPIRED: &str = "approval-expired";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Approve,
    Reject,
}

fn decision_reason(verdict: Verdict, by: &str, note: &str) -> String {
    let verb = match verdict {
        Verdict::Approve => "approved",
        Verdict::Reject => "rejected",
    };
    if note.trim().is_empty() {
        format!("{verb} by {by}")
    } else {
        format!("{verb} by {by}: {}", note.trim())
    }
}

impl Scheduler {
    /// Approves or rejects a pending approval (compare-and-set on PENDING).
    /// A decision on an approval that is no longer pending, or that expired
    /// (it is closed then and there), is FAILED_PRECONDITION.
    pub async fn decide(
        &self,
        job_id: JobId,
        verdict: Verdict,
        by: &str,
        note: &str,
    ) -> Result<ApprovalRow> {
        retrying(|| self.decide_once(job_id, verdict, by, note)).await
    }

    async fn decide_once(
        &self,
        job_id: JobId,
        verdict: Verdict,
        by: &str,
        note: &str,
    ) -> Result<ApprovalRow> {
        let now = self.now();
        let mut tx = self.db.begin_write().await?;
        let approval = repo::get_approval(&mut tx, job_id)
            .await?
            .ok_or(Error::ApprovalNotFound(job_id))?;
        if approval.state != ApprovalState::Pending {
            return Err(Error::FailedPrecondition(format!(
                "the approval of job `{job_id}` is already {}{}",
                approval.state.as_str(),
                if approval.decided_by.is_empty() {
                    String::new()
                } else {
                    format!(" (by {})", approval.decided_by)
                }
            )));
        }
        let entry = repo::get_entry(&mut tx, job_id)
            .await?
            .ok_or(Error::JobNotFound(job_id))?;
        if approval.expires_at <= now {
            // Exact expiry: the sweep may not have run yet.
            self.expire_in(&mut tx, &entry, now).await?;
            tx.commit().await?;
            self.relay.notify();
            return Err(Error::FailedPrecondition(format!(
                "the approval of job `{job_id}` is EXPIRED (it expired before this decision)"
            )));
        }
        let to = match verdict {
            Verdict::Approve => ApprovalState::Approved,
            Verdict::Reject => ApprovalState::Rejected,
        };
        let note = note.trim();
        if !repo::decide_approval(&mut tx, job_id, to, by, note, now).await? {
            return Err(Error::Conflict(format!(
                "the approval of job `{job_id}` changed meanwhile"
            )));
        }
        let reason = decision_reason(verdict, by, note);
        let mut update = status(EntryState::Queued, entry.attempt, now);
        let moved = match verdict {
            Verdict::Approve => repo::approve_entry(&mut tx, job_id, &reason, now).await?,
            Verdict::Reject => {
                update = status(EntryState::Cancelled, entry.attempt, now);
                update.failure_cause = FailureCause::Cancelled as i32;
                repo::set_entry_state(
                    &mut tx,
                    job_id,
                    EntryState::AwaitingApproval,
                    EntryState::Cancelled,
                    &reason,
                    now,
                )
                .await?
            }
        };
        if !moved {
            return Err(Error::FailedPrecondition(format!(
                "job `{job_id}` is {}, not awaiting approval",
                entry.state.as_str()
            )));
        }
        update.reason = reason.clone();
        repo::push_status(&mut tx, job_id, &entry.correlation_id, update).await?;
        let action = match verdict {
            Verdict::Approve => AuditAction::ApproveJob,
            Verdict::Reject => AuditAction::RejectJob,
        };
        AuditRecord::new(by, action, &job_id.to_string())
            .detail("owner", &entry.owner)
            .detail("rule", &approval.rule)
            .detail("note", note)
            .write(&mut tx, AuditTable::SERVICE, now)
            .await?;
        let decided = repo::get_approval(&mut tx, job_id)
            .await?
            .ok_or(Error::ApprovalNotFound(job_id))?;
        tx.commit().await?;
        job_span(job_id, &entry.correlation_id).in_scope(|| {
            tracing::info!(by = %by, rule = %approval.rule, reason = %reason, "approval decided")
        });
        self.relay.notify();
        self.wake_dispatcher();
        Ok(decided)
    }

    /// Closes an expired approval and cancels its job, in the caller's
    /// transaction.
    async fn expire_in(
        &self,
        tx: &mut sqlx::AnyConnection,
        entry: &repo::EntryRow,
        now: i64,
    ) -> Result<bool> {
        if !repo::expire_approval(tx, entry.job_id, now).await? {
            return Ok(false);
        }
        if !repo::set_entry_state(
            tx,
            entry.job_id,
            EntryState::AwaitingApproval,
            EntryState::Cancelled,
            APPROVAL_EXPIRED,
            now,
        )
        .await?
        {
            // Cancelled by its owner meanwhile: nothing more to tell.
            return Ok(true);
        }
        let mut update = status(EntryState::Cancelled, entry.attempt, now);
        update.failure_cause = FailureCause::ApprovalExpired as i32;
        update.reason = APPROVAL_EXPIRED.to_owned();
        repo::push_status(tx, entry.job_id, &entry.correlation_id, update).await?;
        Ok(true)
    }

    /// Expires every pending approval past its TTL; returns how many.
    pub async fn expire_due_approvals(&self) -> Result<usize> {
        let now = self.now();
        let due = repo::due_approvals(&self.db, now).await?;
        let mut count = 0;
        for job_id in due {
            let mut tx = self.db.begin_write().await?;
            let Some(entry) = repo::get_entry(&mut tx, job_id).await? else {
                continue;
            };
            let span = job_span(job_id, &entry.correlation_id);
            let cid = entry.correlation_id.clone();
            let expired = self.expire_in(&mut tx, &entry, now).await?;
            tx.commit().await?;
            if expired {
                count += 1;
                correlation::scope(
                    cid,
                    async { tracing::info!("approval expired; job cancelled") }.instrument(span),
                )
                .await;
            }
        }
        if count > 0 {
            self.relay.notify();
        }
        Ok(count)
    }

    /// The periodic expiry sweep (`--approval-sweep-secs`), on the leader;
    /// dispatch rounds also expire due approvals, so expiry is exact.
    pub async fn run_approval_sweep(self: Arc<Self>, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.approval_sweep) => {}
                _ = shutdown.wait() => return,
            }
            if !self.is_leader() {
                continue;
            }
            if let Err(e) = self.expire_due_approvals().await {
                tracing::warn!(error = %e, "approval sweep failed");
            }
        }
    }

    pub async fn list_approvals(
        &self,
        state: Option<ApprovalState>,
        owner: Option<&str>,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<ApprovalRow>> {
        repo::list_approvals(&self.db, state, owner, limit, offset).await
    }

    pub async fn approval_owner(&self, job_id: JobId) -> Result<Option<String>> {
        let mut conn = self.db.read.acquire().await?;
        Ok(repo::get_approval(&mut conn, job_id)
            .await?
            .map(|a| a.owner))
    }

    /// Holds (`Some`) or releases (`None`) the queue for every replica.
    pub async fn set_hold(&self, by: &str, reason: Option<&str>) -> Result<bool> {
        let now = self.now();
        let hold = reason.map(|r| Hold {
            reason: r.trim().to_owned(),
            by: by.to_owned(),
            since: now,
        });
        let mut tx = self.db.begin_write().await?;
        repo::set_hold(&mut tx, hold.as_ref()).await?;
        let record = match &hold {
            Some(h) => {
                AuditRecord::new(by, AuditAction::HoldQueue, "queue").detail("reason", &h.reason)
            }
            None => AuditRecord::new(by, AuditAction::ReleaseQueue, "queue"),
        };
        record.write(&mut tx, AuditTable::SERVICE, now).await?;
        tx.commit().await?;
        tracing::info!(by = %by, held = hold.is_some(), "queue hold changed");
        self.wake_dispatcher();
        Ok(hold.is_some())
    }

    pub async fn hold(&self) -> Result<Option<Hold>> {
        repo::get_hold(&self.db).await
    }

    pub async fn set_limits(&self, by: &str, row: &LimitRow) -> Result<()> {
        let now = self.now();
        let mut tx = self.db.begin_write().await?;
        limits::store(&mut tx, row, now).await?;
        let target = if row.subject.is_empty() {
            row.scope.name().to_owned()
        } else {
            format!("{} {}", row.scope.name(), row.subject)
        };
        let value = |v: Option<u32>| v.map_or_else(|| "none".to_owned(), |n| n.to_string());
        AuditRecord::new(by, AuditAction::SetLimits, &target)
            .detail("max_running_jobs", value(row.values.max_running_jobs))
            .detail("max_gpus", value(row.values.max_gpus))
            .detail("max_queued_jobs", value(row.values.max_queued_jobs))
            .write(&mut tx, AuditTable::SERVICE, now)
            .await?;
        tx.commit().await?;
        tracing::info!(scope = row.scope.name(), subject = %row.subject, values = ?row.values, "limits set");
        self.wake_dispatcher();
        Ok(())
    }

    pub async fn limit_rows(&self) -> Result<Vec<LimitRow>> {
        limits::load(&self.db).await
    }
}

/// The proto form of an approval.
pub fn approval_proto(a: &ApprovalRow) -> trainmesh_common::proto::scheduler::v1::Approval {
    use trainmesh_common::proto::scheduler::v1 as pb;
    let state = match a.state {
        ApprovalState::Pending => pb::ApprovalState::Pending,
        ApprovalState::Approved => pb::ApprovalState::Approved,
        ApprovalState::Rejected => pb::ApprovalState::Rejected,
        ApprovalState::Expired => pb::ApprovalState::Expired,
    };
    pb::Approval {
        job_id: a.job_id.to_string(),
        owner: a.owner.clone(),
        state: state as i32,
        rule: a.rule.clone(),
        decided_by: a.decided_by.clone(),
        note: a.note.clone(),
        create_time: Some(to_timestamp(a.created_at)),
        expire_time: Some(to_timestamp(a.expires_at)),
        decide_time: trainmesh_common::time::to_opt_timestamp(a.decided_at),
    }
}
