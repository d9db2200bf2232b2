//! Jobs, labels, attempts and idempotency keys.

use std::collections::HashMap;

use prost::Message;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use trainmesh_common::db::Backend;
use trainmesh_common::proto::job::v1 as pb;

use super::{bool_to_db, Bind, Sql};
use crate::domain::{
    failure_cause_from_name, failure_cause_name, AttemptState, JobId, JobState, LabelSelector,
    PageToken,
};
use crate::error::{Error, Result};

/// One job row.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub owner: String,
    pub org: String,
    pub name: String,
    pub state: JobState,
    pub spec: pb::JobSpec,
    pub failure_cause: pb::FailureCause,
    pub error: Option<pb::JobError>,
    pub error_message: String,
    pub state_reason: String,
    pub create_time: i64,
    pub update_time: i64,
    pub start_time: i64,
    pub end_time: i64,
    pub correlation_id: String,
    pub cancel_requested: bool,
    pub scheduler_sequence: i64,
    pub current_attempt: i64,
    pub diagnosis: Option<pb::DiagnosisSummary>,
    pub pipeline_id: String,
    pub pipeline_stage: String,
}

impl JobRecord {
    /// A new PENDING job.
    pub fn new(
        id: JobId,
        owner: &str,
        org: &str,
        spec: pb::JobSpec,
        correlation_id: &str,
        now: i64,
    ) -> Self {
        Self {
            id,
            owner: owner.to_owned(),
            org: org.to_owned(),
            name: spec.name.clone(),
            state: JobState::Pending,
            spec,
            failure_cause: pb::FailureCause::Unspecified,
            error: None,
            error_message: String::new(),
            state_reason: String::new(),
            create_time: now,
            update_time: now,
            start_time: 0,
            end_time: 0,
            correlation_id: correlation_id.to_owned(),
            cancel_requested: false,
            scheduler_sequence: 0,
            current_attempt: 0,
            diagnosis: None,
            pipeline_id: String::new(),
            pipeline_stage: String::new(),
        }
    }
}

/// One attempt row.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptRecord {
    pub number: i64,
    pub runner_id: String,
    pub runner_name: String,
    pub state: AttemptState,
    pub create_time: i64,
    pub start_time: i64,
    pub end_time: i64,
    pub exit_code: Option<i64>,
    pub error: Option<pb::JobError>,
}

const JOB_COLUMNS: &str = "id, owner, org, name, state, spec, failure_cause, error, \
    error_message, state_reason, create_time, update_time, start_time, end_time, \
    correlation_id, cancel_requested, scheduler_sequence, current_attempt, diagnosis, \
    pipeline_id, pipeline_stage";

fn decode_opt<M: Message + Default>(bytes: Option<Vec<u8>>) -> Result<Option<M>> {
    bytes
        .map(|b| M::decode(b.as_slice()))
        .transpose()
        .map_err(Error::from)
}

fn job_from_row(r: &AnyRow) -> Result<JobRecord> {
    let id: String = r.try_get(0)?;
    let state: String = r.try_get(4)?;
    let spec: Vec<u8> = r.try_get(5)?;
    let cause: String = r.try_get(6)?;
    Ok(JobRecord {
        id: id
            .parse()
            .map_err(|_| Error::Corrupt(format!("job id `{id}`")))?,
        owner: r.try_get(1)?,
        org: r.try_get(2)?,
        name: r.try_get(3)?,
        state: JobState::parse(&state)
            .ok_or_else(|| Error::Corrupt(format!("job `{id}` has state `{state}`")))?,
        spec: pb::JobSpec::decode(spec.as_slice())?,
        failure_cause: failure_cause_from_name(&cause),
        error: decode_opt(r.try_get(7)?)?,
        error_message: r.try_get(8)?,
        state_reason: r.try_get(9)?,
        create_time: r.try_get(10)?,
        update_time: r.try_get(11)?,
        start_time: r.try_get(12)?,
        end_time: r.try_get(13)?,
        correlation_id: r.try_get(14)?,
        cancel_requested: r.try_get::<i64, _>(15)? != 0,
        scheduler_sequence: r.try_get(16)?,
        current_attempt: r.try_get(17)?,
        diagnosis: decode_opt(r.try_get(18)?)?,
        pipeline_id: r.try_get(19)?,
        pipeline_stage: r.try_get(20)?,
    })
}

/// Rows per multi-row INSERT: keeps the bind count (15 per job, 3 per
/// label) far below SQLite's and PostgreSQL's limits.
const ROWS_PER_INSERT: usize = 200;

/// Inserts new jobs and their labels, a few statements for all of them.
/// Each is stored with `event_sequence = 1`: its `created` event must be
/// added in the same transaction with [`super::append_created_events`].
pub async fn insert_jobs(conn: &mut AnyConnection, jobs: &[&JobRecord]) -> Result<()> {
    for chunk in jobs.chunks(ROWS_PER_INSERT) {
        let mut sql = Sql::new(
            "INSERT INTO jobs (id, owner, org, name, state, spec, priority, failure_cause, \
             error_message, state_reason, create_time, update_time, correlation_id, \
             pipeline_id, pipeline_stage, event_sequence) VALUES ",
        );
        for (i, job) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            sql.bind(Bind::Text(job.id.to_string())).push(", ");
            sql.bind(Bind::Text(job.owner.clone())).push(", ");
            sql.bind(Bind::Text(job.org.clone())).push(", ");
            sql.bind(Bind::Text(job.name.clone())).push(", ");
            sql.bind(Bind::Text(job.state.as_str().to_owned()))
                .push(", ");
            sql.bind(Bind::Bytes(job.spec.encode_to_vec())).push(", ");
            sql.bind(Bind::I64(i64::from(job.spec.priority))).push(", ");
            sql.bind(Bind::Text(
                failure_cause_name(job.failure_cause as i32).to_owned(),
            ))
            .push(", ");
            sql.bind(Bind::Text(job.error_message.clone())).push(", ");
            sql.bind(Bind::Text(job.state_reason.clone())).push(", ");
            sql.bind(Bind::I64(job.create_time)).push(", ");
            sql.bind(Bind::I64(job.update_time)).push(", ");
            sql.bind(Bind::Text(job.correlation_id.clone())).push(", ");
            sql.bind(Bind::Text(job.pipeline_id.clone())).push(", ");
            sql.bind(Bind::Text(job.pipeline_stage.clone()))
                .push(", 1)");
        }
        sql.query().execute(&mut *conn).await?;
    }
    let mut labels: Vec<(String, &String, &String)> = Vec::new();
    for job in jobs {
        let id = job.id.to_string();
        let mut own: Vec<_> = job.spec.labels.iter().collect();
        own.sort();
        labels.extend(own.into_iter().map(|(k, v)| (id.clone(), k, v)));
    }
    for chunk in labels.chunks(ROWS_PER_INSERT * 5) {
        let mut sql = Sql::new("INSERT INTO job_labels (job_id, label_key, label_value) VALUES ");
        for (i, (id, k, v)) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            sql.bind(Bind::Text(id.clone())).push(", ");
            sql.bind(Bind::Text((*k).clone())).push(", ");
            sql.bind(Bind::Text((*v).clone())).push(")");
        }
        sql.query().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Writes every mutable field of `job` back.
/// Saves the job and reserves the sequence of the event that records the
/// change (every change is recorded), returned for
/// [`super::append_event`].
pub async fn save_job(conn: &mut AnyConnection, job: &JobRecord) -> Result<i64> {
    let row = sqlx::query(
        "UPDATE jobs SET state = $2, failure_cause = $3, error = $4, error_message = $5, \
         state_reason = $6, update_time = $7, start_time = $8, end_time = $9, \
         cancel_requested = $10, scheduler_sequence = $11, current_attempt = $12, \
         diagnosis = $13, event_sequence = event_sequence + 1 WHERE id = $1 \
         RETURNING event_sequence",
    )
    .bind(job.id.to_string())
    .bind(job.state.as_str())
    .bind(failure_cause_name(job.failure_cause as i32))
    .bind(job.error.as_ref().map(Message::encode_to_vec))
    .bind(&job.error_message)
    .bind(&job.state_reason)
    .bind(job.update_time)
    .bind(job.start_time)
    .bind(job.end_time)
    .bind(bool_to_db(job.cancel_requested))
    .bind(job.scheduler_sequence)
    .bind(job.current_attempt)
    .bind(job.diagnosis.as_ref().map(Message::encode_to_vec))
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| Error::JobNotFound(job.id.to_string()))?;
    Ok(row.try_get(0)?)
}

pub async fn get_job(conn: &mut AnyConnection, id: JobId) -> Result<Option<JobRecord>> {
    let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(job_from_row).transpose()
}

/// Reads the job and, on PostgreSQL, locks its row until the transaction
/// ends (SQLite has a single writer, so a write transaction is exclusive).
pub async fn lock_job(
    conn: &mut AnyConnection,
    backend: Backend,
    id: JobId,
) -> Result<Option<JobRecord>> {
    let lock = if backend == Backend::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    let row = sqlx::query(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1{lock}"
    ))
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(job_from_row).transpose()
}

/// [`lock_job`] for a change that appends an event: on PostgreSQL the
/// event-order lock (see [`super::append_event`]) is taken first, in the
/// same statement. Every transaction that holds it may lock job rows after
/// it, so taking it before the row keeps one lock order for all of them;
/// otherwise a batch of status updates (holding it from its first event)
/// and a single change (holding a row, waiting for it) could deadlock.
pub async fn lock_job_for_change(
    conn: &mut AnyConnection,
    backend: Backend,
    id: JobId,
) -> Result<Option<JobRecord>> {
    if backend != Backend::Postgres {
        return lock_job(conn, backend, id).await;
    }
    let row = sqlx::query(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs, (SELECT pg_advisory_xact_lock($2)) AS ordered \
         WHERE id = $1 FOR UPDATE OF jobs"
    ))
    .bind(id.to_string())
    .bind(super::EVENT_ORDER_LOCK)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(job_from_row).transpose()
}

/// Removes everything stored for the job except its row and its events.
pub async fn delete_job_data(conn: &mut AnyConnection, id: JobId) -> Result<()> {
    for table in [
        "DELETE FROM job_labels WHERE job_id = $1",
        "DELETE FROM attempts WHERE job_id = $1",
        "DELETE FROM job_logs WHERE job_id = $1",
        "DELETE FROM job_log_stats WHERE job_id = $1",
        "DELETE FROM idempotency WHERE job_id = $1",
    ] {
        sqlx::query(table)
            .bind(id.to_string())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

pub async fn delete_job_row(conn: &mut AnyConnection, id: JobId) -> Result<()> {
    sqlx::query("DELETE FROM jobs WHERE id = $1")
        .bind(id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// What ListJobs filters on.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub owner: Option<String>,
    pub states: Vec<JobState>,
    pub labels: Vec<LabelSelector>,
    pub after: Option<PageToken>,
    pub limit: i64,
}

/// Newest first, keyset-paged on (create_time, id): a page never shifts
/// when jobs are created meanwhile.
pub async fn list_jobs(conn: &mut AnyConnection, f: &JobFilter) -> Result<Vec<JobRecord>> {
    let mut sql = Sql::new(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1"));
    if let Some(owner) = &f.owner {
        sql.push(" AND owner = ").bind(Bind::Text(owner.clone()));
    }
    if !f.states.is_empty() {
        sql.push(" AND state IN (");
        for (i, s) in f.states.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.bind(Bind::Text(s.as_str().to_owned()));
        }
        sql.push(")");
    }
    for l in &f.labels {
        sql.push(
            " AND EXISTS (SELECT 1 FROM job_labels l WHERE l.job_id = jobs.id AND l.label_key = ",
        )
        .bind(Bind::Text(l.key.clone()))
        .push(" AND l.label_value = ")
        .bind(Bind::Text(l.value.clone()))
        .push(")");
    }
    if let Some(t) = &f.after {
        sql.push(" AND (create_time < ")
            .bind(Bind::I64(t.create_time))
            .push(" OR (create_time = ")
            .bind(Bind::I64(t.create_time))
            .push(" AND id < ")
            .bind(Bind::Text(t.id.clone()))
            .push("))");
    }
    sql.push(" ORDER BY create_time DESC, id DESC LIMIT ")
        .bind(Bind::I64(f.limit));
    let rows = sql.query().fetch_all(&mut *conn).await?;
    rows.iter().map(job_from_row).collect()
}

fn attempt_from_row(r: &AnyRow) -> Result<(String, AttemptRecord)> {
    let state: String = r.try_get(3)?;
    Ok((
        r.try_get(0)?,
        AttemptRecord {
            number: r.try_get(1)?,
            runner_id: r.try_get(2)?,
            state: AttemptState::parse(&state)
                .ok_or_else(|| Error::Corrupt(format!("attempt state `{state}`")))?,
            create_time: r.try_get(4)?,
            start_time: r.try_get(5)?,
            end_time: r.try_get(6)?,
            exit_code: r.try_get(7)?,
            error: decode_opt(r.try_get(8)?)?,
            runner_name: r.try_get(9)?,
        },
    ))
}

const ATTEMPT_COLUMNS: &str =
    "job_id, number, runner_id, state, create_time, start_time, end_time, exit_code, error, \
     runner_name";

/// Attempts of each of `ids`, in attempt order.
pub async fn attempts_of(
    conn: &mut AnyConnection,
    ids: &[JobId],
) -> Result<HashMap<JobId, Vec<AttemptRecord>>> {
    let mut out: HashMap<JobId, Vec<AttemptRecord>> = HashMap::new();
    for chunk in ids.chunks(500) {
        let mut sql = Sql::new(&format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE job_id IN ("
        ));
        for (i, id) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.bind(Bind::Text(id.to_string()));
        }
        sql.push(") ORDER BY job_id, number");
        for r in sql.query().fetch_all(&mut *conn).await? {
            let (job, a) = attempt_from_row(&r)?;
            let id = job
                .parse()
                .map_err(|_| Error::Corrupt(format!("attempt of job `{job}`")))?;
            out.entry(id).or_default().push(a);
        }
    }
    Ok(out)
}

pub async fn get_attempt(
    conn: &mut AnyConnection,
    id: JobId,
    number: i64,
) -> Result<Option<AttemptRecord>> {
    let row = sqlx::query(&format!(
        "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE job_id = $1 AND number = $2"
    ))
    .bind(id.to_string())
    .bind(number)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref()
        .map(|r| attempt_from_row(r).map(|(_, a)| a))
        .transpose()
}

pub async fn upsert_attempt(conn: &mut AnyConnection, id: JobId, a: &AttemptRecord) -> Result<()> {
    sqlx::query(
        "INSERT INTO attempts (job_id, number, runner_id, state, create_time, start_time, \
         end_time, exit_code, error, runner_name) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (job_id, number) DO UPDATE SET runner_id = excluded.runner_id, \
         runner_name = excluded.runner_name, \
         state = excluded.state, start_time = excluded.start_time, \
         end_time = excluded.end_time, exit_code = excluded.exit_code, error = excluded.error",
    )
    .bind(id.to_string())
    .bind(a.number)
    .bind(&a.runner_id)
    .bind(a.state.as_str())
    .bind(a.create_time)
    .bind(a.start_time)
    .bind(a.end_time)
    .bind(a.exit_code)
    .bind(a.error.as_ref().map(Message::encode_to_vec))
    .bind(&a.runner_name)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub async fn find_idempotent(
    conn: &mut AnyConnection,
    owner: &str,
    key: &str,
) -> Result<Option<JobId>> {
    let row = sqlx::query("SELECT job_id FROM idempotency WHERE owner = $1 AND idem_key = $2")
        .bind(owner)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        None => Ok(None),
        Some(r) => {
            let id: String = r.try_get(0)?;
            id.parse()
                .map(Some)
                .map_err(|_| Error::Corrupt(format!("idempotency job id `{id}`")))
        }
    }
}

/// Claims (owner, key) for each job, in one statement; returns the jobs
/// that got theirs (another job may hold a key already, possibly in an
/// uncommitted transaction, which the insert then waits for). When two
/// jobs of the list share one, the first gets it.
pub async fn claim_idempotency_many(
    conn: &mut AnyConnection,
    claims: &[(&str, &str, JobId, i64)],
) -> Result<std::collections::HashSet<JobId>> {
    let mut won = std::collections::HashSet::new();
    for chunk in claims.chunks(ROWS_PER_INSERT) {
        let mut sql =
            Sql::new("INSERT INTO idempotency (owner, idem_key, job_id, create_time) VALUES ");
        for (i, (owner, key, job, now)) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            sql.bind(Bind::Text((*owner).to_owned())).push(", ");
            sql.bind(Bind::Text((*key).to_owned())).push(", ");
            sql.bind(Bind::Text(job.to_string())).push(", ");
            sql.bind(Bind::I64(*now)).push(")");
        }
        sql.push(" ON CONFLICT (owner, idem_key) DO NOTHING RETURNING job_id");
        for r in sql.query().fetch_all(&mut *conn).await? {
            let id: String = r.try_get(0)?;
            won.insert(
                id.parse()
                    .map_err(|_| Error::Corrupt(format!("idempotency job id `{id}`")))?,
            );
        }
    }
    Ok(won)
}

/// Gives up a claim made in this transaction (the job was refused).
pub async fn release_idempotency(conn: &mut AnyConnection, owner: &str, key: &str) -> Result<()> {
    sqlx::query("DELETE FROM idempotency WHERE owner = $1 AND idem_key = $2")
        .bind(owner)
        .bind(key)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// One outbox message to write with [`enqueue_outbox`].
#[derive(Clone, Debug)]
pub struct OutboxRow<'a> {
    pub topic: &'a str,
    pub key: String,
    pub payload: &'a [u8],
    pub correlation_id: &'a str,
    pub traceparent: Option<&'a str>,
}

/// `trainmesh_common::outbox::enqueue` for many messages in one statement,
/// with each one's trace context given explicitly: the group-commit writer
/// inserts on behalf of requests whose task-local context it does not run
/// in. Rows get ids in slice order (the relay delivers per key in id order).
pub async fn enqueue_outbox(conn: &mut AnyConnection, rows: &[OutboxRow<'_>]) -> Result<()> {
    let now = trainmesh_common::time::now_micros();
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut sql = Sql::new(
            "INSERT INTO outbox (topic, msg_key, payload, correlation_id, created_at, \
             traceparent) VALUES ",
        );
        for (i, r) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            sql.bind(Bind::Text(r.topic.to_owned())).push(", ");
            sql.bind(Bind::Text(r.key.clone())).push(", ");
            sql.bind(Bind::Bytes(r.payload.to_vec())).push(", ");
            sql.bind(Bind::Text(r.correlation_id.to_owned())).push(", ");
            sql.bind(Bind::I64(now)).push(", ");
            sql.bind(Bind::OptText(r.traceparent.map(str::to_owned)))
                .push(")");
        }
        sql.query().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Which not-yet-dispatched jobs to count against a queued-jobs limit.
#[derive(Clone, Copy, Debug)]
pub enum QueueScope<'a> {
    Owner(&'a str),
    Org(&'a str),
    All,
}

/// States counted as queued: submitted and not yet given to a runner.
const QUEUED_STATES: &str = "('PENDING', 'QUEUED', 'AWAITING_APPROVAL')";

/// Namespace of the advisory locks that serialise submissions per scope
/// (the two-key form, so it never collides with single-key locks).
const QUEUE_LOCK_CLASS: i64 = 0x746d_7171; // "tmqq"

impl QueueScope<'_> {
    fn lock_key(&self) -> String {
        match self {
            QueueScope::Owner(o) => format!("user:{o}"),
            QueueScope::Org(o) => format!("org:{o}"),
            QueueScope::All => "global".into(),
        }
    }
}

/// On PostgreSQL, takes a transaction-scoped lock on `scope` so that
/// concurrent submissions in it count and insert one after another. SQLite
/// has a single writer, so its write transactions are serial already.
/// Callers lock in the order All, Org, Owner (no deadlocks).
pub async fn lock_queue_scope(
    conn: &mut AnyConnection,
    backend: Backend,
    scope: QueueScope<'_>,
) -> Result<()> {
    if backend == Backend::Postgres {
        // `void` is not decodable by the Any driver: cast it.
        sqlx::query(
            "SELECT CAST(pg_advisory_xact_lock(CAST($1 AS INTEGER), hashtext($2)) AS TEXT)",
        )
        .bind(QUEUE_LOCK_CLASS)
        .bind(scope.lock_key())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// How many jobs in `scope` are PENDING, QUEUED or AWAITING_APPROVAL.
pub async fn count_queued(conn: &mut AnyConnection, scope: QueueScope<'_>) -> Result<i64> {
    let mut sql =
        format!("SELECT CAST(COUNT(*) AS BIGINT) FROM jobs WHERE state IN {QUEUED_STATES}");
    let subject = match scope {
        QueueScope::Owner(o) => {
            sql.push_str(" AND owner = $1");
            Some(o)
        }
        QueueScope::Org(o) => {
            sql.push_str(" AND org = $1");
            Some(o)
        }
        QueueScope::All => None,
    };
    let mut q = sqlx::query(&sql);
    if let Some(s) = subject {
        q = q.bind(s);
    }
    Ok(q.fetch_one(&mut *conn).await?.try_get(0)?)
}
