//! SQL for the scheduler's tables. Functions that take `&mut AnyConnection`
//! run inside the caller's transaction; those that take `&Db` stand alone.
//! The SQL is written once for SQLite and PostgreSQL (`$n` placeholders,
//! BIGINT, `ON CONFLICT`, `RETURNING`).

mod approvals;
mod assignments;
mod runners;

pub use approvals::*;
pub use assignments::*;
pub use runners::*;

use std::str::FromStr;

use prost::Message;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use trainmesh_common::db::Db;
use trainmesh_common::proto::job::v1::UpdateJobStatusRequest;

use crate::domain::{Demand, EntryState, JobId, NewEntry, RunnerId};
use crate::error::{Error, Result};

pub const STATUS_TOPIC: &str = "status";

/// A queue entry as stored (without the spec).
#[derive(Clone, Debug)]
pub struct EntryRow {
    pub job_id: JobId,
    pub owner: String,
    pub org: String,
    pub priority: i32,
    pub demand: Demand,
    pub correlation_id: String,
    pub submit_time: i64,
    pub state: EntryState,
    pub attempt: i64,
    pub max_attempts: i64,
    pub runner_id: Option<RunnerId>,
    pub cancel_requested: bool,
    pub reason: String,
    /// Retry backoff: not dispatched before this time (0: none).
    pub not_before: i64,
    /// Attempts that reached RUNNING (the retry budget counts these).
    pub started_attempts: i64,
    /// When the entry last became QUEUED.
    pub queued_at: i64,
}

const ENTRY_COLS: &str = "job_id, owner, org, priority, gpus, gpu_type, cpu_milli, memory_mib, \
     correlation_id, submit_time, state, attempt, max_attempts, runner_id, cancel_requested, reason, \
     not_before, started_attempts, queued_at";

pub(crate) fn parse_id<T: FromStr>(what: &str, s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| Error::Corrupt(format!("{what} `{s}` is not a valid id")))
}

fn entry_from_row(r: &AnyRow) -> Result<EntryRow> {
    let job_id: String = r.try_get(0)?;
    let state: String = r.try_get(10)?;
    let runner_id: Option<String> = r.try_get(13)?;
    Ok(EntryRow {
        job_id: parse_id("job id", &job_id)?,
        owner: r.try_get(1)?,
        org: r.try_get(2)?,
        priority: i32::try_from(r.try_get::<i64, _>(3)?)
            .map_err(|_| Error::Corrupt(format!("priority of `{job_id}`")))?,
        demand: Demand {
            gpus: u32::try_from(r.try_get::<i64, _>(4)?)
                .map_err(|_| Error::Corrupt(format!("gpus of `{job_id}`")))?,
            gpu_type: r.try_get(5)?,
            cpu_milli: r.try_get(6)?,
            memory_mib: r.try_get(7)?,
        },
        correlation_id: r.try_get(8)?,
        submit_time: r.try_get(9)?,
        state: EntryState::parse(&state)
            .ok_or_else(|| Error::Corrupt(format!("state `{state}` of `{job_id}`")))?,
        attempt: r.try_get(11)?,
        max_attempts: r.try_get(12)?,
        runner_id: runner_id
            .as_deref()
            .map(|s| parse_id("runner id", s))
            .transpose()?,
        cancel_requested: r.try_get::<i64, _>(14)? != 0,
        reason: r.try_get(15)?,
        not_before: r.try_get(16)?,
        started_attempts: r.try_get(17)?,
        queued_at: r.try_get(18)?,
    })
}

/// Inserts a new entry in `state` (QUEUED or AWAITING_APPROVAL); false
/// when the job is already known.
#[allow(clippy::too_many_arguments)]
pub async fn insert_entry(
    conn: &mut AnyConnection,
    e: &NewEntry,
    state: EntryState,
    max_attempts: i64,
    correlation_id: &str,
    submit_time: i64,
    now: i64,
) -> Result<bool> {
    let row = sqlx::query(
        "INSERT INTO queue_entries (job_id, owner, org, priority, gpus, gpu_type, cpu_milli, \
         memory_mib, spec, correlation_id, submit_time, enqueued_at, state, max_attempts, updated_at, \
         queued_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $14, $13, $12, $12) \
         ON CONFLICT (job_id) DO NOTHING RETURNING job_id",
    )
    .bind(e.job_id.to_string())
    .bind(&e.owner)
    .bind(&e.org)
    .bind(i64::from(e.priority))
    .bind(i64::from(e.demand.gpus))
    .bind(&e.demand.gpu_type)
    .bind(e.demand.cpu_milli)
    .bind(e.demand.memory_mib)
    .bind(e.spec.clone())
    .bind(correlation_id)
    .bind(submit_time)
    .bind(now)
    .bind(max_attempts)
    .bind(state.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.is_some())
}

/// A placeholder for a job cancelled before it was enqueued, so that a
/// late `EnqueueJob` finds it and does not queue it.
pub async fn insert_cancelled_tombstone(
    conn: &mut AnyConnection,
    job_id: JobId,
    reason: &str,
    now: i64,
) -> Result<bool> {
    let row = sqlx::query(
        "INSERT INTO queue_entries (job_id, owner, org, priority, gpus, gpu_type, cpu_milli, \
         memory_mib, spec, correlation_id, submit_time, enqueued_at, state, max_attempts, reason, \
         cancel_requested, updated_at) \
         VALUES ($1, '', '', 0, 0, '', 0, 0, $2, '', $3, $3, 'CANCELLED', 0, $4, 1, $3) \
         ON CONFLICT (job_id) DO NOTHING RETURNING job_id",
    )
    .bind(job_id.to_string())
    .bind(Vec::<u8>::new())
    .bind(now)
    .bind(reason)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.is_some())
}

pub async fn get_entry(conn: &mut AnyConnection, job_id: JobId) -> Result<Option<EntryRow>> {
    let row = sqlx::query(&format!(
        "SELECT {ENTRY_COLS} FROM queue_entries WHERE job_id = $1"
    ))
    .bind(job_id.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(entry_from_row).transpose()
}

/// Entries in any of `states`, in no particular order.
pub async fn entries_in(db: &Db, states: &[EntryState]) -> Result<Vec<EntryRow>> {
    let list = states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = sqlx::query(&format!(
        "SELECT {ENTRY_COLS} FROM queue_entries WHERE state IN ({list})"
    ))
    .fetch_all(&db.read)
    .await?;
    rows.iter().map(entry_from_row).collect()
}

/// Moves an entry from `from` to `to`; false when it was not in `from`.
pub async fn set_entry_state(
    conn: &mut AnyConnection,
    job_id: JobId,
    from: EntryState,
    to: EntryState,
    reason: &str,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE queue_entries SET state = $1, reason = $2, updated_at = $3 \
         WHERE job_id = $4 AND state = $5",
    )
    .bind(to.as_str())
    .bind(reason)
    .bind(now)
    .bind(job_id.to_string())
    .bind(from.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Requeues an entry whose attempt `attempt` ended but may be retried
/// (clears its runner; `not_before` is the backoff, 0 for none); false when
/// the entry moved on meanwhile.
pub async fn requeue_entry(
    conn: &mut AnyConnection,
    job_id: JobId,
    attempt: i64,
    reason: &str,
    not_before: i64,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE queue_entries SET state = 'QUEUED', runner_id = NULL, reason = $1, updated_at = $2, \
         queued_at = $2, not_before = $5 \
         WHERE job_id = $3 AND attempt = $4 AND state IN ('SCHEDULED', 'RUNNING')",
    )
    .bind(reason)
    .bind(now)
    .bind(job_id.to_string())
    .bind(attempt)
    .bind(not_before)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn request_entry_cancel(
    conn: &mut AnyConnection,
    job_id: JobId,
    reason: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE queue_entries SET cancel_requested = 1, reason = $1, updated_at = $2 WHERE job_id = $3",
    )
    .bind(reason)
    .bind(now)
    .bind(job_id.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Marks a queued entry dispatched to `runner_id` as the next attempt;
/// `None` when it is no longer dispatchable (cancelled meanwhile, or still
/// in backoff). Returns the new attempt number and how long it waited.
pub async fn dispatch_entry(
    conn: &mut AnyConnection,
    job_id: JobId,
    runner_id: RunnerId,
    now: i64,
) -> Result<Option<(i64, i64)>> {
    let row = sqlx::query(
        "UPDATE queue_entries SET state = 'SCHEDULED', attempt = attempt + 1, runner_id = $1, \
         reason = '', not_before = 0, updated_at = $2 \
         WHERE job_id = $3 AND state = 'QUEUED' AND cancel_requested = 0 AND not_before <= $2 \
         RETURNING attempt, queued_at",
    )
    .bind(runner_id.to_string())
    .bind(now)
    .bind(job_id.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        None => Ok(None),
        Some(r) => {
            let attempt: i64 = r.try_get(0)?;
            let queued_at: i64 = r.try_get(1)?;
            Ok(Some((attempt, (now - queued_at).max(0))))
        }
    }
}

/// Counts an attempt that reached RUNNING against the retry budget.
pub async fn count_started(conn: &mut AnyConnection, job_id: JobId) -> Result<()> {
    sqlx::query(
        "UPDATE queue_entries SET started_attempts = started_attempts + 1 WHERE job_id = $1",
    )
    .bind(job_id.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The stored spec of a job (for its retry policy).
pub async fn get_spec(conn: &mut AnyConnection, job_id: JobId) -> Result<Vec<u8>> {
    let row = sqlx::query("SELECT spec FROM queue_entries WHERE job_id = $1")
        .bind(job_id.to_string())
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.try_get(0)?)
}

/// Writes a status update for job-service into the outbox with the job's
/// next `scheduler_sequence`.
pub async fn push_status(
    conn: &mut AnyConnection,
    job_id: JobId,
    correlation_id: &str,
    mut update: UpdateJobStatusRequest,
) -> Result<i64> {
    let row = sqlx::query(
        "UPDATE queue_entries SET status_seq = status_seq + 1 WHERE job_id = $1 RETURNING status_seq",
    )
    .bind(job_id.to_string())
    .fetch_one(&mut *conn)
    .await?;
    let seq: i64 = row.try_get(0)?;
    update.job_id = job_id.to_string();
    update.scheduler_sequence = seq;
    trainmesh_common::outbox::enqueue(
        conn,
        STATUS_TOPIC,
        &job_id.to_string(),
        &update.encode_to_vec(),
        correlation_id,
    )
    .await?;
    Ok(seq)
}

/// Scheduled-or-running jobs and their GPUs per (owner, org).
pub async fn running_usage(db: &Db) -> Result<Vec<(String, String, crate::plan::Usage)>> {
    let rows = sqlx::query(
        "SELECT owner, org, CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(gpus), 0) AS BIGINT) \
         FROM queue_entries WHERE state IN ('SCHEDULED', 'RUNNING') GROUP BY owner, org",
    )
    .fetch_all(&db.read)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let n: i64 = r.try_get(2)?;
        let g: i64 = r.try_get(3)?;
        out.push((
            r.try_get(0)?,
            r.try_get(1)?,
            crate::plan::Usage {
                running: u32::try_from(n).unwrap_or(u32::MAX),
                gpus: u32::try_from(g).unwrap_or(u32::MAX),
            },
        ));
    }
    Ok(out)
}
