//! The job event log: per-job `sequence`, global `id` (the watch cursor).

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use trainmesh_common::db::Backend;

use super::{Bind, Sql};
use crate::domain::{JobId, JobState};
use crate::error::{Error, Result};

/// Key of the PostgreSQL advisory lock that orders event commits.
pub(crate) const EVENT_ORDER_LOCK: i64 = 0x7472_6e6d_6576_7473; // "trnmevts"

/// An event to append.
#[derive(Clone, Debug)]
pub struct NewEvent<'a> {
    pub job_id: JobId,
    pub owner: &'a str,
    pub event_type: &'a str,
    pub state: JobState,
    pub previous_state: Option<JobState>,
    pub message: &'a str,
    pub attempt: i64,
    pub time: i64,
}

/// A stored event.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRecord {
    pub id: i64,
    pub job_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub state: Option<JobState>,
    pub previous_state: Option<JobState>,
    pub message: String,
    pub attempt: i64,
    pub time: i64,
}

/// The next per-job sequence of `job_id`'s events, reserved in the
/// caller's transaction ([`super::save_job`] reserves one itself).
pub async fn next_event_sequence(conn: &mut AnyConnection, job_id: JobId) -> Result<i64> {
    sqlx::query(
        "UPDATE jobs SET event_sequence = event_sequence + 1 WHERE id = $1 RETURNING event_sequence",
    )
    .bind(job_id.to_string())
    .fetch_optional(&mut *conn)
    .await?
    .map(|r| r.try_get(0))
    .transpose()?
    .ok_or_else(|| Error::JobNotFound(job_id.to_string()))
}

/// Appends an event with its reserved `sequence` in the caller's
/// transaction; returns its global id. Call it last in the transaction: on
/// PostgreSQL it takes a transaction-scoped lock so that event ids become
/// visible in id order (a watcher reading `id > cursor` can then never skip
/// an event that commits later with a smaller id). SQLite has one writer,
/// so ids are committed in order anyway.
pub async fn append_event(
    conn: &mut AnyConnection,
    backend: Backend,
    sequence: i64,
    ev: &NewEvent<'_>,
) -> Result<i64> {
    const COLUMNS: &str = "INSERT INTO job_events (job_id, owner, sequence, event_type, state, \
         previous_state, message, attempt, event_time) ";
    // On PostgreSQL the lock is taken by the same statement, before the
    // row (and its id) is made: one round trip instead of two.
    let sql = match backend {
        Backend::Postgres => format!(
            "{COLUMNS}SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 \
             FROM (SELECT pg_advisory_xact_lock($10)) AS ordered RETURNING id"
        ),
        Backend::Sqlite => {
            format!("{COLUMNS}VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id")
        }
    };
    let mut q = sqlx::query(&sql)
        .bind(ev.job_id.to_string())
        .bind(ev.owner)
        .bind(sequence)
        .bind(ev.event_type)
        .bind(ev.state.as_str())
        .bind(ev.previous_state.map(JobState::as_str).unwrap_or(""))
        .bind(ev.message)
        .bind(ev.attempt)
        .bind(ev.time);
    if backend == Backend::Postgres {
        q = q.bind(EVENT_ORDER_LOCK);
    }
    let row = q.fetch_one(&mut *conn).await?;
    Ok(row.try_get(0)?)
}

/// The `created` event (sequence 1) of each of `jobs`, just inserted with
/// [`super::insert_jobs`], in one statement. Same ordering rule as
/// [`append_event`]: call it last in the transaction.
pub async fn append_created_events(
    conn: &mut AnyConnection,
    backend: Backend,
    jobs: &[&super::JobRecord],
) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    if backend == Backend::Postgres {
        sqlx::query("SELECT CAST(pg_advisory_xact_lock($1) AS TEXT)")
            .bind(EVENT_ORDER_LOCK)
            .execute(&mut *conn)
            .await?;
    }
    for chunk in jobs.chunks(200) {
        let mut sql = Sql::new(
            "INSERT INTO job_events (job_id, owner, sequence, event_type, state, \
             previous_state, message, attempt, event_time) VALUES ",
        );
        for (i, job) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            sql.bind(Bind::Text(job.id.to_string())).push(", ");
            sql.bind(Bind::Text(job.owner.clone()))
                .push(", 1, 'created', ");
            sql.bind(Bind::Text(job.state.as_str().to_owned()))
                .push(", '', '', 0, ");
            sql.bind(Bind::I64(job.create_time)).push(")");
        }
        sql.query().execute(&mut *conn).await?;
    }
    Ok(())
}

/// The newest event id (0 when there is none).
pub async fn max_event_id(conn: &mut AnyConnection) -> Result<i64> {
    let row = sqlx::query("SELECT CAST(MAX(id) AS BIGINT) FROM job_events")
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.try_get::<Option<i64>, _>(0)?.unwrap_or(0))
}

fn event_from_row(r: &AnyRow) -> Result<EventRecord> {
    let state: String = r.try_get(4)?;
    let prev: String = r.try_get(5)?;
    Ok(EventRecord {
        id: r.try_get(0)?,
        job_id: r.try_get(1)?,
        sequence: r.try_get(2)?,
        event_type: r.try_get(3)?,
        state: JobState::parse(&state),
        previous_state: JobState::parse(&prev),
        message: r.try_get(6)?,
        attempt: r.try_get(7)?,
        time: r.try_get(8)?,
    })
}

/// Events with `after < id <= upto`, optionally only one owner's or one
/// job's, in id order.
pub async fn events_between(
    conn: &mut AnyConnection,
    after: i64,
    upto: i64,
    owner: Option<&str>,
    job_id: Option<JobId>,
    limit: i64,
) -> Result<Vec<EventRecord>> {
    let mut sql = Sql::new(
        "SELECT id, job_id, sequence, event_type, state, previous_state, message, attempt, \
         event_time FROM job_events WHERE id > ",
    );
    sql.bind(Bind::I64(after))
        .push(" AND id <= ")
        .bind(Bind::I64(upto));
    if let Some(o) = owner {
        sql.push(" AND owner = ").bind(Bind::Text(o.to_owned()));
    }
    if let Some(j) = job_id {
        sql.push(" AND job_id = ").bind(Bind::Text(j.to_string()));
    }
    sql.push(" ORDER BY id LIMIT ").bind(Bind::I64(limit));
    let rows = sql.query().fetch_all(&mut *conn).await?;
    rows.iter().map(event_from_row).collect()
}
