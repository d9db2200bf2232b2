//! Attempts: one row per (job, attempt), holding runner resources while
//! SCHEDULED or RUNNING.

use std::collections::BTreeSet;

use prost::Message;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use trainmesh_common::db::Db;
use trainmesh_common::proto::job::v1::JobError;

use super::{parse_id, EntryRow};
use crate::domain::{AttemptStatus, Demand, JobId, RunnerId};
use crate::error::{Error, Result};

/// What an active attempt holds on its runner.
#[derive(Clone, Debug)]
pub struct Usage {
    pub runner_id: RunnerId,
    pub gpu_indexes: BTreeSet<i32>,
    pub cpu_milli: i64,
    pub memory_mib: i64,
}

fn gpus_from_json(s: &str) -> Result<BTreeSet<i32>> {
    serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("gpu indexes `{s}`: {e}")))
}

pub async fn active_usage(db: &Db) -> Result<Vec<Usage>> {
    let rows = sqlx::query(
        "SELECT runner_id, gpu_indexes, cpu_milli, memory_mib FROM assignments \
         WHERE state IN ('SCHEDULED', 'RUNNING')",
    )
    .fetch_all(&db.read)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Usage {
                runner_id: parse_id("runner id", &r.try_get::<String, _>(0)?)?,
                gpu_indexes: gpus_from_json(&r.try_get::<String, _>(1)?)?,
                cpu_milli: r.try_get(2)?,
                memory_mib: r.try_get(3)?,
            })
        })
        .collect()
}

/// An attempt to record as SCHEDULED.
#[derive(Debug)]
pub struct NewAssignment<'a> {
    pub job_id: JobId,
    pub attempt: i64,
    pub runner_id: RunnerId,
    pub gpu_indexes: &'a [i32],
    pub demand: &'a Demand,
    /// Micros the job waited in the queue.
    pub waited: i64,
    /// Handed to the runner's waiting call by the dispatch itself.
    pub delivered: bool,
}

/// Records SCHEDULED attempts, in one statement.
pub async fn insert_assignments(
    conn: &mut AnyConnection,
    new: &[NewAssignment<'_>],
    now: i64,
) -> Result<()> {
    if new.is_empty() {
        return Ok(());
    }
    // $1 is now; then nine per attempt.
    let values = (0..new.len())
        .map(|i| {
            let b = 2 + 9 * i;
            let p: Vec<String> = (b..b + 9).map(|n| format!("${n}")).collect();
            format!(
                "({}, {}, {}, {}, {}, {}, 'SCHEDULED', $1, {}, {}, {})",
                p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "INSERT INTO assignments (job_id, attempt, runner_id, gpu_indexes, cpu_milli, memory_mib, \
         state, created_at, waited, delivered, delivered_at) VALUES {values}"
    );
    let mut q = sqlx::query(&sql).bind(now);
    for a in new {
        let gpus = serde_json::to_string(a.gpu_indexes)
            .map_err(|e| Error::Corrupt(format!("gpu indexes: {e}")))?;
        q = q
            .bind(a.job_id.to_string())
            .bind(a.attempt)
            .bind(a.runner_id.to_string())
            .bind(gpus)
            .bind(a.demand.cpu_milli)
            .bind(a.demand.memory_mib)
            .bind(a.waited)
            .bind(i64::from(a.delivered))
            .bind(if a.delivered { now } else { 0 });
    }
    q.execute(&mut *conn).await?;
    Ok(())
}

/// An attempt as stored.
#[derive(Clone, Debug)]
pub struct AssignmentRow {
    pub job_id: JobId,
    pub attempt: i64,
    pub runner_id: RunnerId,
    pub state: AttemptStatus,
    pub delivered: bool,
    pub cancel_requested: bool,
    pub delivered_at: i64,
    /// Consecutive heartbeats of the runner that did not list it.
    pub missed_heartbeats: i64,
}

const ASSIGNMENT_COLS: &str =
    "job_id, attempt, runner_id, state, delivered, cancel_requested, delivered_at, missed_heartbeats";

fn assignment_from_row(r: &AnyRow) -> Result<AssignmentRow> {
    let state: String = r.try_get(3)?;
    Ok(AssignmentRow {
        job_id: parse_id("job id", &r.try_get::<String, _>(0)?)?,
        attempt: r.try_get(1)?,
        runner_id: parse_id("runner id", &r.try_get::<String, _>(2)?)?,
        state: AttemptStatus::parse(&state)
            .ok_or_else(|| Error::Corrupt(format!("attempt state `{state}`")))?,
        delivered: r.try_get::<i64, _>(4)? != 0,
        cancel_requested: r.try_get::<i64, _>(5)? != 0,
        delivered_at: r.try_get(6)?,
        missed_heartbeats: r.try_get(7)?,
    })
}

pub async fn get_assignment(
    conn: &mut AnyConnection,
    job_id: JobId,
    attempt: i64,
) -> Result<Option<AssignmentRow>> {
    let row = sqlx::query(&format!(
        "SELECT {ASSIGNMENT_COLS} FROM assignments WHERE job_id = $1 AND attempt = $2"
    ))
    .bind(job_id.to_string())
    .bind(attempt)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(assignment_from_row).transpose()
}

/// What a runner's report is checked against, in one read: the attempt,
/// whether `runner_id` holds a live lease, and the job's queue entry.
#[derive(Debug)]
pub struct ReportContext {
    pub attempt: AssignmentRow,
    pub runner_live: bool,
    pub entry: Option<EntryRow>,
}

pub async fn report_context(
    conn: &mut AnyConnection,
    job_id: JobId,
    attempt: i64,
    runner_id: RunnerId,
    now: i64,
) -> Result<Option<ReportContext>> {
    let prefixed = |cols: &str, p: &str| {
        cols.split(',')
            .map(|c| format!("{p}.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let row = sqlx::query(&format!(
        "SELECT {}, CASE WHEN EXISTS (SELECT 1 FROM runners r WHERE r.runner_id = $3 \
         AND r.state IN ('live', 'draining') AND r.lease_expires_at > $4) THEN 1 ELSE 0 END, {} \
         FROM assignments a LEFT JOIN queue_entries e ON e.job_id = a.job_id \
         WHERE a.job_id = $1 AND a.attempt = $2",
        prefixed(ASSIGNMENT_COLS, "a"),
        prefixed(super::ENTRY_COLS, "e"),
    ))
    .bind(job_id.to_string())
    .bind(attempt)
    .bind(runner_id.to_string())
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    const LIVE: usize = 8;
    let has_entry = r.try_get::<Option<String>, _>(LIVE + 1)?.is_some();
    Ok(Some(ReportContext {
        attempt: assignment_from_row(&r)?,
        runner_live: r.try_get::<i64, _>(LIVE)? != 0,
        entry: has_entry
            .then(|| super::entry_at(&r, LIVE + 1))
            .transpose()?,
    }))
}

/// Active attempts of a runner.
pub async fn active_assignments_of(
    conn: &mut AnyConnection,
    runner_id: RunnerId,
) -> Result<Vec<AssignmentRow>> {
    let rows = sqlx::query(&format!(
        "SELECT {ASSIGNMENT_COLS} FROM assignments \
         WHERE runner_id = $1 AND state IN ('SCHEDULED', 'RUNNING')"
    ))
    .bind(runner_id.to_string())
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(assignment_from_row).collect()
}

/// Moves an attempt from `from` to `to`; false when it was not in `from`.
#[allow(clippy::too_many_arguments)]
pub async fn set_assignment_state(
    conn: &mut AnyConnection,
    job_id: JobId,
    attempt: i64,
    from: AttemptStatus,
    to: AttemptStatus,
    exit_code: Option<i32>,
    error: Option<&JobError>,
    now: i64,
) -> Result<bool> {
    let (started, finished) = if to == AttemptStatus::Running {
        (now, 0)
    } else {
        (0, now)
    };
    let done = sqlx::query(
        "UPDATE assignments SET state = $1, \
         started_at = CASE WHEN $2 > 0 THEN $2 ELSE started_at END, \
         finished_at = CASE WHEN $3 > 0 THEN $3 ELSE finished_at END, \
         exit_code = COALESCE($4, exit_code), error = COALESCE($5, error) \
         WHERE job_id = $6 AND attempt = $7 AND state = $8",
    )
    .bind(to.as_str())
    .bind(started)
    .bind(finished)
    .bind(exit_code.map(i64::from))
    .bind(error.map(Message::encode_to_vec))
    .bind(job_id.to_string())
    .bind(attempt)
    .bind(from.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn request_assignment_cancel(
    conn: &mut AnyConnection,
    job_id: JobId,
    attempt: i64,
) -> Result<()> {
    sqlx::query("UPDATE assignments SET cancel_requested = 1 WHERE job_id = $1 AND attempt = $2")
        .bind(job_id.to_string())
        .bind(attempt)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// An assignment ready to hand to its runner.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub job_id: JobId,
    pub attempt: i64,
    pub gpu_indexes: Vec<i32>,
    pub owner: String,
    pub org: String,
    pub spec: Vec<u8>,
    pub correlation_id: String,
}

/// Claims up to `max` undelivered assignments of `runner_id`, marking them
/// delivered in the same transaction.
pub async fn take_undelivered(
    db: &Db,
    runner_id: RunnerId,
    max: i64,
    now: i64,
) -> Result<Vec<Delivery>> {
    let mut tx = db.begin_write().await?;
    let rows = sqlx::query(
        "SELECT a.job_id, a.attempt, a.gpu_indexes, q.owner, q.org, q.spec, q.correlation_id \
         FROM assignments a JOIN queue_entries q ON q.job_id = a.job_id \
         WHERE a.runner_id = $1 AND a.state = 'SCHEDULED' AND a.delivered = 0 \
         AND a.cancel_requested = 0 ORDER BY a.created_at, a.job_id LIMIT $2",
    )
    .bind(runner_id.to_string())
    .bind(max)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let job_id: String = r.try_get(0)?;
        let attempt: i64 = r.try_get(1)?;
        let claimed = sqlx::query(
            "UPDATE assignments SET delivered = 1, delivered_at = $3 WHERE job_id = $1 \
             AND attempt = $2 AND delivered = 0 AND state = 'SCHEDULED' AND cancel_requested = 0",
        )
        .bind(&job_id)
        .bind(attempt)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() != 1 {
            continue;
        }
        out.push(Delivery {
            job_id: parse_id("job id", &job_id)?,
            attempt,
            gpu_indexes: gpus_from_json(&r.try_get::<String, _>(2)?)?
                .into_iter()
                .collect(),
            owner: r.try_get(3)?,
            org: r.try_get(4)?,
            spec: r.try_get(5)?,
            correlation_id: r.try_get(6)?,
        });
    }
    tx.commit().await?;
    Ok(out)
}

/// Records whether the runner's latest heartbeat listed the attempt;
/// returns the consecutive misses now.
pub async fn note_heartbeat(
    conn: &mut AnyConnection,
    job_id: JobId,
    attempt: i64,
    listed: bool,
) -> Result<i64> {
    let row = sqlx::query(
        "UPDATE assignments SET missed_heartbeats = CASE WHEN $1 = 1 THEN 0 \
         ELSE missed_heartbeats + 1 END WHERE job_id = $2 AND attempt = $3 \
         RETURNING missed_heartbeats",
    )
    .bind(i64::from(listed))
    .bind(job_id.to_string())
    .bind(attempt)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row
        .map(|r| r.try_get::<i64, _>(0))
        .transpose()?
        .unwrap_or(0))
}

/// Mean (waited) of attempts dispatched since `since`, and mean run time
/// of attempts that started and finished since `since`.
pub async fn recent_times(db: &Db, since: i64) -> Result<(Option<i64>, Option<i64>)> {
    let wait = sqlx::query(
        "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(waited), 0) AS BIGINT) \
         FROM assignments WHERE created_at >= $1",
    )
    .bind(since)
    .fetch_one(&db.read)
    .await?;
    let run = sqlx::query(
        "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(finished_at - started_at), 0) AS BIGINT) \
         FROM assignments WHERE finished_at >= $1 AND started_at > 0 AND finished_at > started_at",
    )
    .bind(since)
    .fetch_one(&db.read)
    .await?;
    let mean = |r: &AnyRow| -> Result<Option<i64>> {
        let n: i64 = r.try_get(0)?;
        let sum: i64 = r.try_get(1)?;
        Ok((n > 0).then(|| sum / n))
    };
    Ok((mean(&wait)?, mean(&run)?))
}

/// Live-runner totals for queue statistics: (runners, GPUs).
pub async fn runner_totals(db: &Db, now: i64) -> Result<(i64, i64)> {
    let row = sqlx::query(
        "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(gpus_total), 0) AS BIGINT) \
         FROM runners WHERE state = 'live' AND lease_expires_at > $1",
    )
    .bind(now)
    .fetch_one(&db.read)
    .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
