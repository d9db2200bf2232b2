//! Stored log lines per (job, attempt), idempotent on the line number and
//! capped per attempt.

use std::collections::HashSet;

use sqlx::{AnyConnection, Row};

use super::{Bind, Sql};
use crate::domain::JobId;
use crate::error::Result;

/// A stored line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub number: i64,
    pub text: String,
}

const INSERT_CHUNK: usize = 400;

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Highest line number stored or deliberately dropped: a sender can
    /// resume after it.
    pub last_number: i64,
    pub inserted: i64,
}

fn truncation_marker(cap: i64) -> String {
    format!(
        "[trainmesh] log truncated: this attempt reached the limit of {cap} stored lines; \
         later lines were dropped"
    )
}

/// Inserts `lines` (sorted, unique numbers ≥ 1) in the caller's
/// transaction. Re-sent numbers are ignored. Once `cap` lines are stored,
/// the first new line beyond is replaced by one marker line and every later
/// line is dropped.
pub async fn append_logs(
    conn: &mut AnyConnection,
    job: JobId,
    attempt: i64,
    lines: &[LogLine],
    cap: i64,
) -> Result<AppendOutcome> {
    let job_s = job.to_string();
    let stats = sqlx::query(
        "SELECT stored, last_number, truncated FROM job_log_stats WHERE job_id = $1 AND attempt = $2",
    )
    .bind(&job_s)
    .bind(attempt)
    .fetch_optional(&mut *conn)
    .await?;
    let (mut stored, mut last, mut truncated) = match stats {
        Some(r) => (
            r.try_get::<i64, _>(0)?,
            r.try_get::<i64, _>(1)?,
            r.try_get::<i64, _>(2)? != 0,
        ),
        None => (0, 0, false),
    };
    let mut inserted = 0;
    let mut rest = lines;
    while !rest.is_empty() && !truncated {
        let room = usize::try_from(cap - stored).unwrap_or(0);
        if room == 0 {
            // Lines already stored are retries, not overflow.
            let existing = existing_numbers(conn, &job_s, attempt, rest).await?;
            if let Some(first_new) = rest.iter().find(|l| !existing.contains(&l.number)) {
                let marker = LogLine {
                    number: first_new.number,
                    text: truncation_marker(cap),
                };
                insert_chunk(conn, &job_s, attempt, &[marker]).await?;
                truncated = true;
            }
            break;
        }
        let take = room.min(INSERT_CHUNK).min(rest.len());
        let (chunk, tail) = rest.split_at(take);
        let n = insert_chunk(conn, &job_s, attempt, chunk).await?;
        stored += n;
        inserted += n;
        rest = tail;
    }
    // Every line was stored, found stored already, or dropped past the cap.
    if let Some(max) = lines.iter().map(|l| l.number).max() {
        last = last.max(max);
    }
    sqlx::query(
        "INSERT INTO job_log_stats (job_id, attempt, stored, last_number, truncated) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (job_id, attempt) DO UPDATE SET \
         stored = excluded.stored, last_number = excluded.last_number, truncated = excluded.truncated",
    )
    .bind(&job_s)
    .bind(attempt)
    .bind(stored)
    .bind(last)
    .bind(i64::from(truncated))
    .execute(&mut *conn)
    .await?;
    Ok(AppendOutcome {
        last_number: last,
        inserted,
    })
}

async fn insert_chunk(
    conn: &mut AnyConnection,
    job: &str,
    attempt: i64,
    lines: &[LogLine],
) -> Result<i64> {
    let mut sql = Sql::new("INSERT INTO job_logs (job_id, attempt, number, text) VALUES ");
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        sql.push("(")
            .bind(Bind::Text(job.to_owned()))
            .push(", ")
            .bind(Bind::I64(attempt))
            .push(", ")
            .bind(Bind::I64(l.number))
            .push(", ")
            .bind(Bind::Text(l.text.clone()))
            .push(")");
    }
    sql.push(" ON CONFLICT (job_id, attempt, number) DO NOTHING");
    let res = sql.query().execute(&mut *conn).await?;
    Ok(i64::try_from(res.rows_affected()).unwrap_or(i64::MAX))
}

async fn existing_numbers(
    conn: &mut AnyConnection,
    job: &str,
    attempt: i64,
    lines: &[LogLine],
) -> Result<HashSet<i64>> {
    let (Some(lo), Some(hi)) = (lines.first(), lines.last()) else {
        return Ok(HashSet::new());
    };
    let rows = sqlx::query(
        "SELECT number FROM job_logs WHERE job_id = $1 AND attempt = $2 AND number >= $3 AND number <= $4",
    )
    .bind(job)
    .bind(attempt)
    .bind(lo.number)
    .bind(hi.number)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| r.try_get::<i64, _>(0).map_err(Into::into))
        .collect()
}

/// The highest attempt with stored lines (0 when none).
pub async fn latest_log_attempt(conn: &mut AnyConnection, job: JobId) -> Result<i64> {
    let row =
        sqlx::query("SELECT CAST(MAX(attempt) AS BIGINT) FROM job_log_stats WHERE job_id = $1")
            .bind(job.to_string())
            .fetch_one(&mut *conn)
            .await?;
    Ok(row.try_get::<Option<i64>, _>(0)?.unwrap_or(0))
}

/// The line number after which the last `n` lines start (0: the whole log).
pub async fn tail_start(conn: &mut AnyConnection, job: JobId, attempt: i64, n: i64) -> Result<i64> {
    let row = sqlx::query(
        "SELECT number FROM job_logs WHERE job_id = $1 AND attempt = $2 \
         ORDER BY number DESC LIMIT 1 OFFSET $3",
    )
    .bind(job.to_string())
    .bind(attempt)
    .bind(n.saturating_sub(1))
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(r.try_get::<i64, _>(0)? - 1),
        None => Ok(0),
    }
}

/// Lines numbered above `after`, in order, at most `limit`.
pub async fn logs_after(
    conn: &mut AnyConnection,
    job: JobId,
    attempt: i64,
    after: i64,
    limit: i64,
) -> Result<Vec<LogLine>> {
    let rows = sqlx::query(
        "SELECT number, text FROM job_logs WHERE job_id = $1 AND attempt = $2 AND number > $3 \
         ORDER BY number LIMIT $4",
    )
    .bind(job.to_string())
    .bind(attempt)
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(LogLine {
                number: r.try_get(0)?,
                text: r.try_get(1)?,
            })
        })
        .collect()
}
