//! SQL for the scheduler's tables. Functions that take `&mut AnyConnection`
//! run inside the caller's transaction; those that take `&Db` stand alone.
//! The SQL is written once for SQLite and PostgreSQL (`$n` placeholders,
//! BIGINT, `ON CONFLICT`, `RETURNING`).

mod approvals;
mod assignments;
mod health;
mod retries;
mod runners;

pub use approvals::*;
pub use assignments::*;
pub use health::*;
pub use retries::*;
pub use runners::*;

use std::collections::HashMap;
use std::str::FromStr;

use prost::Message;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use trainmesh_common::db::{Backend, Db};
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
    /// Runner names the job is not placed on, after node faults there.
    pub avoid_runners: Vec<String>,
}

pub(crate) const ENTRY_COLS: &str = "job_id, owner, org, priority, gpus, gpu_type, cpu_milli, memory_mib, \
     correlation_id, submit_time, state, attempt, max_attempts, runner_id, cancel_requested, reason, \
     not_before, started_attempts, queued_at, avoid_runners";

pub(crate) fn parse_id<T: FromStr>(what: &str, s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| Error::Corrupt(format!("{what} `{s}` is not a valid id")))
}

fn entry_from_row(r: &AnyRow) -> Result<EntryRow> {
    entry_at(r, 0)
}

/// An entry from `ENTRY_COLS` starting at column `b`.
pub(crate) fn entry_at(r: &AnyRow, b: usize) -> Result<EntryRow> {
    let job_id: String = r.try_get(b)?;
    let state: String = r.try_get(b + 10)?;
    let runner_id: Option<String> = r.try_get(b + 13)?;
    Ok(EntryRow {
        job_id: parse_id("job id", &job_id)?,
        owner: r.try_get(b + 1)?,
        org: r.try_get(b + 2)?,
        priority: i32::try_from(r.try_get::<i64, _>(b + 3)?)
            .map_err(|_| Error::Corrupt(format!("priority of `{job_id}`")))?,
        demand: Demand {
            gpus: u32::try_from(r.try_get::<i64, _>(b + 4)?)
                .map_err(|_| Error::Corrupt(format!("gpus of `{job_id}`")))?,
            gpu_type: r.try_get(b + 5)?,
            cpu_milli: r.try_get(b + 6)?,
            memory_mib: r.try_get(b + 7)?,
        },
        correlation_id: r.try_get(b + 8)?,
        submit_time: r.try_get(b + 9)?,
        state: EntryState::parse(&state)
            .ok_or_else(|| Error::Corrupt(format!("state `{state}` of `{job_id}`")))?,
        attempt: r.try_get(b + 11)?,
        max_attempts: r.try_get(b + 12)?,
        runner_id: runner_id
            .as_deref()
            .map(|s| parse_id("runner id", s))
            .transpose()?,
        cancel_requested: r.try_get::<i64, _>(b + 14)? != 0,
        reason: r.try_get(b + 15)?,
        not_before: r.try_get(b + 16)?,
        started_attempts: r.try_get(b + 17)?,
        queued_at: r.try_get(b + 18)?,
        avoid_runners: names_from_json(&r.try_get::<String, _>(b + 19)?)
            .map_err(|e| Error::Corrupt(format!("avoided runners of `{job_id}`: {e}")))?,
    })
}

/// Inserts a new entry in `state` (QUEUED or AWAITING_APPROVAL); false
/// when the job is already known. A new entry's first status update has
/// sequence [`FIRST_STATUS_SEQ`], taken here: queue it with
/// [`enqueue_statuses`].
pub const FIRST_STATUS_SEQ: i64 = 1;

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
         queued_at, status_seq) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $14, $13, $12, $12, $15) \
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
    .bind(FIRST_STATUS_SEQ)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.is_some())
}

/// A placeholder for a job that ended before it was queued: cancelled
/// before its `EnqueueJob` arrived (which then finds it and does not queue
/// it), or refused at enqueue (so the queue says why it is not there).
pub async fn insert_tombstone(
    conn: &mut AnyConnection,
    job_id: JobId,
    state: EntryState,
    reason: &str,
    now: i64,
) -> Result<bool> {
    let row = sqlx::query(
        "INSERT INTO queue_entries (job_id, owner, org, priority, gpus, gpu_type, cpu_milli, \
         memory_mib, spec, correlation_id, submit_time, enqueued_at, state, max_attempts, reason, \
         cancel_requested, updated_at) \
         VALUES ($1, '', '', 0, 0, '', 0, 0, $2, '', $3, $3, $5, 0, $4, $6, $3) \
         ON CONFLICT (job_id) DO NOTHING RETURNING job_id",
    )
    .bind(job_id.to_string())
    .bind(Vec::<u8>::new())
    .bind(now)
    .bind(reason)
    .bind(state.as_str())
    .bind(i32::from(state == EntryState::Cancelled))
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
    entries_in_on(&mut *db.read.acquire().await?, states).await
}

/// Where a reader of queue changes stands after reading in `conn`'s
/// snapshot (see migration 0003): on SQLite the last stamp given, on
/// PostgreSQL the oldest transaction still running.
pub async fn queue_cursor(conn: &mut AnyConnection, backend: Backend) -> Result<i64> {
    let sql = match backend {
        Backend::Sqlite => "SELECT stamp FROM queue_change_counter WHERE id = 1",
        Backend::Postgres => "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
    };
    Ok(sqlx::query_scalar(sql).fetch_one(&mut *conn).await?)
}

/// Entries changed since `cursor` (a [`queue_cursor`] read earlier). On
/// PostgreSQL this includes changes of transactions that were running
/// then, seen again or for the first time.
pub async fn entries_changed_since(
    conn: &mut AnyConnection,
    backend: Backend,
    cursor: i64,
) -> Result<Vec<EntryRow>> {
    let op = match backend {
        Backend::Sqlite => ">",
        Backend::Postgres => ">=",
    };
    let rows = sqlx::query(&format!(
        "SELECT {ENTRY_COLS} FROM queue_entries WHERE change_stamp {op} $1"
    ))
    .bind(cursor)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(entry_from_row).collect()
}

/// Entries in any of `states` read on `conn`, in no particular order.
pub async fn entries_in_on(
    conn: &mut AnyConnection,
    states: &[EntryState],
) -> Result<Vec<EntryRow>> {
    let rows = sqlx::query(&entries_in_sql(states))
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(entry_from_row).collect()
}

fn entries_in_sql(states: &[EntryState]) -> String {
    let list = states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT {ENTRY_COLS} FROM queue_entries WHERE state IN ({list})")
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

/// A job the dispatcher moved to SCHEDULED.
#[derive(Clone, Debug)]
pub struct Dispatched {
    pub attempt: i64,
    /// Micros since the entry last became QUEUED.
    pub waited: i64,
    /// The status sequence number taken for the SCHEDULED update.
    pub status_seq: i64,
    /// The job's spec (encoded), for handing the attempt to its runner.
    pub spec: Vec<u8>,
}

/// Moves each entry still QUEUED (not cancelled, past its backoff) to
/// SCHEDULED on its runner, in one statement; the ones that moved, each
/// with its new attempt and a status sequence number taken for the update.
pub async fn dispatch_entries(
    conn: &mut AnyConnection,
    placements: &[(JobId, RunnerId)],
    now: i64,
) -> Result<HashMap<JobId, Dispatched>> {
    if placements.is_empty() {
        return Ok(HashMap::new());
    }
    // $1 is now; then (job, runner) pairs. `state || ''` keeps SQLite from
    // scanning the state index (every QUEUED row) instead of the keys.
    let cases: String = (0..placements.len())
        .map(|i| format!(" WHEN ${} THEN ${}", 2 + 2 * i, 3 + 2 * i))
        .collect();
    let ids = (0..placements.len())
        .map(|i| format!("${}", 2 + 2 * i))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "UPDATE queue_entries SET state = 'SCHEDULED', attempt = attempt + 1, \
         runner_id = CASE job_id{cases} END, reason = '', not_before = 0, updated_at = $1, \
         status_seq = status_seq + 1 \
         WHERE job_id IN ({ids}) AND state || '' = 'QUEUED' AND cancel_requested = 0 \
         AND not_before <= $1 \
         RETURNING job_id, attempt, queued_at, status_seq, spec"
    );
    let mut q = sqlx::query(&sql).bind(now);
    for (job, runner) in placements {
        q = q.bind(job.to_string()).bind(runner.to_string());
    }
    let rows = q.fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|r| {
            let job_id: String = r.try_get(0)?;
            let queued_at: i64 = r.try_get(2)?;
            Ok((
                parse_id("job id", &job_id)?,
                Dispatched {
                    attempt: r.try_get(1)?,
                    waited: (now - queued_at).max(0),
                    status_seq: r.try_get(3)?,
                    spec: r.try_get(4)?,
                },
            ))
        })
        .collect()
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

/// Gives back what [`count_started`] took, for an attempt the platform
/// preempted.
pub async fn uncount_started(conn: &mut AnyConnection, job_id: JobId) -> Result<()> {
    sqlx::query(
        "UPDATE queue_entries SET started_attempts = started_attempts - 1 \
         WHERE job_id = $1 AND started_attempts > 0",
    )
    .bind(job_id.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Moves an entry from `from` to `to` and takes `statuses` status sequence
/// numbers, counting a started attempt when `started`; the last number
/// taken, or `None` when the entry was not in `from`. One statement for
/// what a runner's report changes in the entry.
#[allow(clippy::too_many_arguments)]
pub async fn move_entry_with_statuses(
    conn: &mut AnyConnection,
    job_id: JobId,
    from: EntryState,
    to: EntryState,
    reason: &str,
    started: bool,
    statuses: i64,
    now: i64,
) -> Result<Option<i64>> {
    let row = sqlx::query(
        "UPDATE queue_entries SET state = $1, reason = $2, updated_at = $3, \
         started_attempts = started_attempts + $4, status_seq = status_seq + $5 \
         WHERE job_id = $6 AND state = $7 RETURNING status_seq",
    )
    .bind(to.as_str())
    .bind(reason)
    .bind(now)
    .bind(i64::from(started))
    .bind(statuses)
    .bind(job_id.to_string())
    .bind(from.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| r.try_get::<i64, _>(0))
        .transpose()
        .map_err(Into::into)
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
    enqueue_statuses(conn, &[(correlation_id, update)]).await?;
    Ok(seq)
}

/// Queues status updates for job-service whose `job_id` and
/// `scheduler_sequence` are set (taken from `status_seq`), in one statement.
pub async fn enqueue_statuses(
    conn: &mut AnyConnection,
    updates: &[(&str, UpdateJobStatusRequest)],
) -> Result<()> {
    let payloads: Vec<Vec<u8>> = updates.iter().map(|(_, u)| u.encode_to_vec()).collect();
    let messages: Vec<_> = updates
        .iter()
        .zip(&payloads)
        .map(|((cid, u), payload)| trainmesh_common::outbox::Message {
            key: &u.job_id,
            payload,
            correlation_id: cid,
        })
        .collect();
    trainmesh_common::outbox::enqueue_many(conn, STATUS_TOPIC, &messages).await?;
    Ok(())
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

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod dispatch_tests;
