//! Approvals, the queue hold flag, and first-job lookups.

use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use trainmesh_common::db::Db;

use super::parse_id;
use crate::domain::JobId;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApprovalState {
    Pending,
    Approved,
    Rejected,
    Expired,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "PENDING",
            ApprovalState::Approved => "APPROVED",
            ApprovalState::Rejected => "REJECTED",
            ApprovalState::Expired => "EXPIRED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "PENDING" => ApprovalState::Pending,
            "APPROVED" => ApprovalState::Approved,
            "REJECTED" => ApprovalState::Rejected,
            "EXPIRED" => ApprovalState::Expired,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug)]
pub struct ApprovalRow {
    pub job_id: JobId,
    pub owner: String,
    pub rule: String,
    pub state: ApprovalState,
    pub decided_by: String,
    pub note: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub decided_at: i64,
}

const APPROVAL_COLS: &str =
    "job_id, owner, rule, state, decided_by, note, created_at, expires_at, decided_at";

fn approval_from_row(r: &AnyRow) -> Result<ApprovalRow> {
    let state: String = r.try_get(3)?;
    Ok(ApprovalRow {
        job_id: parse_id("job id", &r.try_get::<String, _>(0)?)?,
        owner: r.try_get(1)?,
        rule: r.try_get(2)?,
        state: ApprovalState::parse(&state)
            .ok_or_else(|| Error::Corrupt(format!("approval state `{state}`")))?,
        decided_by: r.try_get(4)?,
        note: r.try_get(5)?,
        created_at: r.try_get(6)?,
        expires_at: r.try_get(7)?,
        decided_at: r.try_get(8)?,
    })
}

pub async fn insert_approval(
    conn: &mut AnyConnection,
    job_id: JobId,
    owner: &str,
    rule: &str,
    now: i64,
    expires_at: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO approvals (job_id, owner, rule, state, created_at, expires_at) \
         VALUES ($1, $2, $3, 'PENDING', $4, $5) ON CONFLICT (job_id) DO NOTHING",
    )
    .bind(job_id.to_string())
    .bind(owner)
    .bind(rule)
    .bind(now)
    .bind(expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub async fn get_approval(conn: &mut AnyConnection, job_id: JobId) -> Result<Option<ApprovalRow>> {
    let row = sqlx::query(&format!(
        "SELECT {APPROVAL_COLS} FROM approvals WHERE job_id = $1"
    ))
    .bind(job_id.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(approval_from_row).transpose()
}

/// Compare-and-set PENDING → `to` while the approval has not expired;
/// false when someone decided first or it expired.
pub async fn decide_approval(
    conn: &mut AnyConnection,
    job_id: JobId,
    to: ApprovalState,
    by: &str,
    note: &str,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE approvals SET state = $1, decided_by = $2, note = $3, decided_at = $4 \
         WHERE job_id = $5 AND state = 'PENDING' AND expires_at > $4",
    )
    .bind(to.as_str())
    .bind(by)
    .bind(note)
    .bind(now)
    .bind(job_id.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// PENDING → EXPIRED once past its expiry; false otherwise.
pub async fn expire_approval(conn: &mut AnyConnection, job_id: JobId, now: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE approvals SET state = 'EXPIRED', decided_at = $1 \
         WHERE job_id = $2 AND state = 'PENDING' AND expires_at <= $1",
    )
    .bind(now)
    .bind(job_id.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Closes a pending approval because its job was cancelled (recorded as
/// REJECTED with the cancel reason, by nobody).
pub async fn close_approval(
    conn: &mut AnyConnection,
    job_id: JobId,
    reason: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE approvals SET state = 'REJECTED', note = $1, decided_at = $2 \
         WHERE job_id = $3 AND state = 'PENDING'",
    )
    .bind(format!("job cancelled: {reason}"))
    .bind(now)
    .bind(job_id.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Jobs whose pending approval is past its expiry.
pub async fn due_approvals(db: &Db, now: i64) -> Result<Vec<JobId>> {
    let rows =
        sqlx::query("SELECT job_id FROM approvals WHERE state = 'PENDING' AND expires_at <= $1")
            .bind(now)
            .fetch_all(&db.read)
            .await?;
    rows.iter()
        .map(|r| parse_id("job id", &r.try_get::<String, _>(0)?))
        .collect()
}

pub async fn pending_approval_rules(db: &Db) -> Result<HashMap<JobId, String>> {
    let rows = sqlx::query("SELECT job_id, rule FROM approvals WHERE state = 'PENDING'")
        .fetch_all(&db.read)
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                parse_id("job id", &r.try_get::<String, _>(0)?)?,
                r.try_get(1)?,
            ))
        })
        .collect()
}

/// Approvals, oldest first; `state`/`owner` filter when given.
pub async fn list_approvals(
    db: &Db,
    state: Option<ApprovalState>,
    owner: Option<&str>,
    limit: i64,
    offset: i64,
) -> Result<Vec<ApprovalRow>> {
    let rows = sqlx::query(&format!(
        "SELECT {APPROVAL_COLS} FROM approvals \
         WHERE ($1 = '' OR state = $1) AND ($2 = '' OR owner = $2) \
         ORDER BY created_at, job_id LIMIT $3 OFFSET $4"
    ))
    .bind(state.map(|s| s.as_str()).unwrap_or(""))
    .bind(owner.unwrap_or(""))
    .bind(limit)
    .bind(offset)
    .fetch_all(&db.read)
    .await?;
    rows.iter().map(approval_from_row).collect()
}

/// Whether `owner` has any job other than `job_id` (first-job rule).
pub async fn owner_has_other_jobs(
    conn: &mut AnyConnection,
    owner: &str,
    job_id: JobId,
) -> Result<bool> {
    let row =
        sqlx::query("SELECT job_id FROM queue_entries WHERE owner = $1 AND job_id <> $2 LIMIT 1")
            .bind(owner)
            .bind(job_id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
    Ok(row.is_some())
}

/// The admin's hold on the queue.
#[derive(Clone, Debug)]
pub struct Hold {
    pub reason: String,
    pub by: String,
    pub since: i64,
}

impl Hold {
    pub fn describe(&self) -> String {
        if self.reason.is_empty() {
            format!("held by {}", self.by)
        } else {
            format!("held by {}: {}", self.by, self.reason)
        }
    }
}

pub async fn get_hold(db: &Db) -> Result<Option<Hold>> {
    let row =
        sqlx::query("SELECT value, set_by, updated_at FROM scheduler_flags WHERE name = 'hold'")
            .fetch_optional(&db.read)
            .await?;
    row.map(|r| {
        Ok(Hold {
            reason: r.try_get(0)?,
            by: r.try_get(1)?,
            since: r.try_get(2)?,
        })
    })
    .transpose()
}

/// Sets or clears the hold, in the caller's transaction.
pub async fn set_hold(conn: &mut AnyConnection, hold: Option<&Hold>) -> Result<()> {
    match hold {
        None => {
            sqlx::query("DELETE FROM scheduler_flags WHERE name = 'hold'")
                .execute(&mut *conn)
                .await?;
        }
        Some(h) => {
            sqlx::query(
                "INSERT INTO scheduler_flags (name, value, set_by, updated_at) \
                 VALUES ('hold', $1, $2, $3) ON CONFLICT (name) DO UPDATE SET \
                 value = excluded.value, set_by = excluded.set_by, updated_at = excluded.updated_at",
            )
            .bind(&h.reason)
            .bind(&h.by)
            .bind(h.since)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// AWAITING_APPROVAL → QUEUED (the wait for dispatch starts now); false
/// when the entry is not awaiting approval.
pub async fn approve_entry(
    conn: &mut AnyConnection,
    job_id: JobId,
    reason: &str,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE queue_entries SET state = 'QUEUED', reason = $1, updated_at = $2, queued_at = $2 \
         WHERE job_id = $3 AND state = 'AWAITING_APPROVAL' AND cancel_requested = 0",
    )
    .bind(reason)
    .bind(now)
    .bind(job_id.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
