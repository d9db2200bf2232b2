//! What a retry decision changes in a queue entry: the runners the job
//! avoids, the memory it runs with, and the decision itself (for
//! ExplainJob). Inside the caller's transaction, beside the requeue.

use sqlx::{AnyConnection, Row};
use trainmesh_common::db::Db;

use crate::domain::JobId;
use crate::error::{Error, Result};

/// A JSON array of names; the empty string is the empty list.
pub(crate) fn names_from_json(s: &str) -> std::result::Result<Vec<String>, serde_json::Error> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(s)
}

fn names_to_json(names: &[String]) -> Result<String> {
    if names.is_empty() {
        return Ok(String::new());
    }
    serde_json::to_string(names).map_err(|e| Error::Corrupt(format!("runner names: {e}")))
}

/// Replaces the runners the job avoids.
pub async fn set_avoid_runners(
    conn: &mut AnyConnection,
    job_id: JobId,
    names: &[String],
) -> Result<()> {
    sqlx::query("UPDATE queue_entries SET avoid_runners = $1 WHERE job_id = $2")
        .bind(names_to_json(names)?)
        .bind(job_id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Stores the job's spec with more memory: `spec` (encoded) is what the
/// next attempt is handed, `memory_mib` the demand over all replicas that
/// placement reserves.
pub async fn raise_memory(
    conn: &mut AnyConnection,
    job_id: JobId,
    spec: Vec<u8>,
    memory_mib: i64,
) -> Result<()> {
    sqlx::query("UPDATE queue_entries SET spec = $1, memory_mib = $2 WHERE job_id = $3")
        .bind(spec)
        .bind(memory_mib)
        .bind(job_id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The decision after the job's latest failed attempt, as a retry
/// decision's JSON ([`crate::retry_record::Record`]).
pub async fn set_last_retry(conn: &mut AnyConnection, job_id: JobId, json: &str) -> Result<()> {
    sqlx::query("UPDATE queue_entries SET last_retry = $1 WHERE job_id = $2")
        .bind(json)
        .bind(job_id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The stored last decision (JSON; empty before any).
pub async fn last_retry(db: &Db, job_id: JobId) -> Result<String> {
    let row = sqlx::query("SELECT last_retry FROM queue_entries WHERE job_id = $1")
        .bind(job_id.to_string())
        .fetch_optional(&db.read)
        .await?;
    Ok(row
        .map(|r| r.try_get::<String, _>(0))
        .transpose()?
        .unwrap_or_default())
}

/// Waiting jobs that avoid `name`, with the runners each avoids.
pub async fn waiting_avoiding(
    conn: &mut AnyConnection,
    name: &str,
) -> Result<Vec<(JobId, Vec<String>)>> {
    let rows = sqlx::query(
        "SELECT job_id, avoid_runners FROM queue_entries \
         WHERE state IN ('QUEUED', 'AWAITING_APPROVAL') AND avoid_runners <> ''",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::new();
    for r in rows {
        let id: String = r.try_get(0)?;
        let names = names_from_json(&r.try_get::<String, _>(1)?)
            .map_err(|e| Error::Corrupt(format!("avoided runners of `{id}`: {e}")))?;
        if names.iter().any(|n| n == name) {
            out.push((super::parse_id("job id", &id)?, names));
        }
    }
    Ok(out)
}
