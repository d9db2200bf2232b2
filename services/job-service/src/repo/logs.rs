//! Stored log lines per (job, attempt), idempotent on the line number and
//! capped per attempt. A log longer than the cap keeps its beginning (how
//! the job started), its end (how it failed) and the telling lines from
//! between (errors, warnings about NCCL or CUDA: the first sign of a root
//! cause is often far from the final traceback), with one marker line
//! where the rest was dropped.

use sqlx::{AnyConnection, Row};
use trainmesh_common::logline::is_notable;

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

/// `job_logs.notable`: an ordinary line, a telling one (kept from the
/// dropped middle while there is room), the marker.
const PLAIN: i64 = 0;
const TELLING: i64 = 1;
const MARKER: i64 = 2;

/// How the cap splits a long log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogCap {
    /// Lines `1..=head` are always kept.
    pub head: i64,
    /// Telling lines kept from the dropped middle (the earliest ones).
    pub telling: i64,
    /// The last `tail` line numbers are kept.
    pub tail: i64,
}

impl LogCap {
    /// A quarter of `cap` for the head, a twentieth for telling lines, the
    /// rest (less the marker) for the tail.
    pub fn new(cap: i64) -> Self {
        let cap = cap.max(3);
        let head = (cap / 4).max(1);
        let telling = cap / 20;
        let tail = (cap - head - telling - 1).max(1);
        Self {
            head,
            telling,
            tail,
        }
    }

    /// The marker takes the number of the first line after the head.
    fn marker(&self) -> i64 {
        self.head + 1
    }
}

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Highest line number stored or deliberately dropped: a sender can
    /// resume after it.
    pub last_number: i64,
    pub inserted: i64,
}

fn marker_text(cap: LogCap, tail_from: i64) -> String {
    format!(
        "[trainmesh] log shortened: lines {}-{} were dropped, except up to {} lines that mention \
         an error; the first {} and the last {} lines are kept",
        cap.marker(),
        tail_from - 1,
        cap.telling,
        cap.head,
        cap.tail
    )
}

/// Stats of one attempt's stored log.
struct Stats {
    stored: i64,
    last: i64,
    /// Lines were dropped.
    truncated: bool,
    /// Lines from here on are the kept tail; 0 while nothing was dropped.
    tail_from: i64,
}

async fn stats(conn: &mut AnyConnection, job: &str, attempt: i64) -> Result<Stats> {
    let row = sqlx::query(
        "SELECT stored, last_number, truncated, tail_from FROM job_log_stats \
         WHERE job_id = $1 AND attempt = $2",
    )
    .bind(job)
    .bind(attempt)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        Some(r) => Stats {
            stored: r.try_get(0)?,
            last: r.try_get(1)?,
            truncated: r.try_get::<i64, _>(2)? != 0,
            tail_from: r.try_get(3)?,
        },
        None => Stats {
            stored: 0,
            last: 0,
            truncated: false,
            tail_from: 0,
        },
    })
}

/// Inserts `lines` (sorted, unique numbers ≥ 1) in the caller's
/// transaction. Re-sent numbers are ignored. Once the attempt's log is
/// longer than `cap` lines, the oldest lines after the head are dropped as
/// new ones arrive (see [`LogCap`]).
pub async fn append_logs(
    conn: &mut AnyConnection,
    job: JobId,
    attempt: i64,
    lines: &[LogLine],
    cap: i64,
) -> Result<AppendOutcome> {
    let cap = LogCap::new(cap);
    let job_s = job.to_string();
    let mut st = stats(conn, &job_s, attempt).await?;
    let newest = lines.iter().map(|l| l.number).max().unwrap_or(0);
    // A log cut by an earlier version (first lines only) stays that way.
    let legacy = st.truncated && st.tail_from == 0;
    let keep: Vec<&LogLine> = lines
        .iter()
        .filter(|l| !legacy && (l.number <= cap.head || st.tail_from == 0 || l.number >= st.tail_from))
        .collect();
    let mut inserted = 0;
    for chunk in keep.chunks(INSERT_CHUNK) {
        inserted += insert_chunk(conn, &job_s, attempt, chunk).await?;
    }
    st.stored += inserted;
    st.last = st.last.max(newest);
    let tail_from = st.last - cap.tail + 1;
    if !legacy && tail_from > cap.marker() + 1 && tail_from > st.tail_from {
        st.stored -= drop_middle(conn, &job_s, attempt, cap, tail_from).await?;
        st.tail_from = tail_from;
        st.truncated = true;
    }
    sqlx::query(
        "INSERT INTO job_log_stats (job_id, attempt, stored, last_number, truncated, tail_from) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job_id, attempt) DO UPDATE SET \
         stored = excluded.stored, last_number = excluded.last_number, \
         truncated = excluded.truncated, tail_from = excluded.tail_from",
    )
    .bind(&job_s)
    .bind(attempt)
    .bind(st.stored)
    .bind(st.last)
    .bind(i64::from(st.truncated))
    .bind(st.tail_from)
    .execute(&mut *conn)
    .await?;
    Ok(AppendOutcome {
        last_number: st.last,
        inserted,
    })
}

/// Drops the lines between the head and `tail_from`, but for the earliest
/// telling ones, and writes the marker. Returns how many rows fewer there
/// are.
async fn drop_middle(
    conn: &mut AnyConnection,
    job: &str,
    attempt: i64,
    cap: LogCap,
    tail_from: i64,
) -> Result<i64> {
    // Telling lines past the first `cap.telling` of the middle go too.
    let keep_until = if cap.telling == 0 {
        cap.head
    } else {
        let row = sqlx::query(
            "SELECT number FROM job_logs WHERE job_id = $1 AND attempt = $2 AND number > $3 \
             AND number < $4 AND notable = $5 ORDER BY number LIMIT 1 OFFSET $6",
        )
        .bind(job)
        .bind(attempt)
        .bind(cap.marker())
        .bind(tail_from)
        .bind(TELLING)
        .bind(cap.telling - 1)
        .fetch_optional(&mut *conn)
        .await?;
        match row {
            Some(r) => r.try_get(0)?,
            None => i64::MAX,
        }
    };
    let deleted = sqlx::query(
        "DELETE FROM job_logs WHERE job_id = $1 AND attempt = $2 AND number > $3 AND number < $4 \
         AND (notable = $5 OR (notable = $6 AND number > $7))",
    )
    .bind(job)
    .bind(attempt)
    .bind(cap.marker())
    .bind(tail_from)
    .bind(PLAIN)
    .bind(TELLING)
    .bind(keep_until)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    // The marker replaces whatever line had its number.
    sqlx::query(
        "INSERT INTO job_logs (job_id, attempt, number, text, notable) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (job_id, attempt, number) DO UPDATE SET text = excluded.text, \
         notable = excluded.notable",
    )
    .bind(job)
    .bind(attempt)
    .bind(cap.marker())
    .bind(marker_text(cap, tail_from))
    .bind(MARKER)
    .execute(&mut *conn)
    .await?;
    Ok(i64::try_from(deleted).unwrap_or(i64::MAX))
}

async fn insert_chunk(
    conn: &mut AnyConnection,
    job: &str,
    attempt: i64,
    lines: &[&LogLine],
) -> Result<i64> {
    let mut sql = Sql::new("INSERT INTO job_logs (job_id, attempt, number, text, notable) VALUES ");
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        let notable = if is_notable(&l.text) { TELLING } else { PLAIN };
        sql.push("(")
            .bind(Bind::Text(job.to_owned()))
            .push(", ")
            .bind(Bind::I64(attempt))
            .push(", ")
            .bind(Bind::I64(l.number))
            .push(", ")
            .bind(Bind::Text(l.text.clone()))
            .push(", ")
            .bind(Bind::I64(notable))
            .push(")");
    }
    sql.push(" ON CONFLICT (job_id, attempt, number) DO NOTHING");
    let res = sql.query().execute(&mut *conn).await?;
    Ok(i64::try_from(res.rows_affected()).unwrap_or(i64::MAX))
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
