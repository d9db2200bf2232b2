//! Runner registrations and their leases.

use prost::Message;
use sqlx::{AnyConnection, Row};
use trainmesh_common::db::Db;
use trainmesh_common::proto::runner::v1 as runner_pb;

use super::parse_id;
use crate::domain::{Registration, RunnerCapacity, RunnerId};
use crate::error::{Error, Result};

pub async fn insert_runner(
    db: &Db,
    id: RunnerId,
    reg: &Registration,
    now: i64,
    lease_expires_at: i64,
) -> Result<()> {
    let labels =
        serde_json::to_string(&reg.labels).map_err(|e| Error::Corrupt(format!("labels: {e}")))?;
    sqlx::query(
        "INSERT INTO runners (runner_id, name, backend, capacity, gpus_total, labels, state, \
         registered_at, lease_expires_at, last_heartbeat_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'live', $7, $8, $7)",
    )
    .bind(id.to_string())
    .bind(&reg.name)
    .bind(&reg.backend)
    .bind(reg.capacity_proto.clone())
    .bind(reg.capacity.gpus.len() as i64)
    .bind(labels)
    .bind(now)
    .bind(lease_expires_at)
    .execute(&db.write)
    .await?;
    Ok(())
}

/// Renews a live lease and returns the previous heartbeat time; `None`
/// when the runner is unknown, dead or expired.
pub async fn renew_lease(
    conn: &mut AnyConnection,
    id: RunnerId,
    now: i64,
    expires_at: i64,
) -> Result<Option<i64>> {
    let prev = sqlx::query(
        "SELECT last_heartbeat_at FROM runners WHERE runner_id = $1 AND state = 'live' \
         AND lease_expires_at > $2",
    )
    .bind(id.to_string())
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(prev) = prev else {
        return Ok(None);
    };
    let done = sqlx::query(
        "UPDATE runners SET lease_expires_at = $1, last_heartbeat_at = $2 \
         WHERE runner_id = $3 AND state = 'live' AND lease_expires_at > $2",
    )
    .bind(expires_at)
    .bind(now)
    .bind(id.to_string())
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() != 1 {
        return Ok(None);
    }
    Ok(Some(prev.try_get(0)?))
}

pub async fn runner_is_live(conn: &mut AnyConnection, id: RunnerId, now: i64) -> Result<bool> {
    let row = sqlx::query(
        "SELECT runner_id FROM runners WHERE runner_id = $1 AND state = 'live' AND lease_expires_at > $2",
    )
    .bind(id.to_string())
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.is_some())
}

pub async fn expired_runners(db: &Db, now: i64) -> Result<Vec<RunnerId>> {
    let rows = sqlx::query(
        "SELECT runner_id FROM runners WHERE state = 'live' AND lease_expires_at <= $1",
    )
    .bind(now)
    .fetch_all(&db.read)
    .await?;
    rows.iter()
        .map(|r| parse_id("runner id", &r.try_get::<String, _>(0)?))
        .collect()
}

/// Marks an expired runner dead; false when it renewed or was already dead.
pub async fn mark_runner_dead(conn: &mut AnyConnection, id: RunnerId, now: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE runners SET state = 'dead' WHERE runner_id = $1 AND state = 'live' \
         AND lease_expires_at <= $2",
    )
    .bind(id.to_string())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Runners whose lease is live, with their capacity.
pub async fn live_runners(db: &Db, now: i64) -> Result<Vec<(RunnerId, RunnerCapacity)>> {
    let rows = sqlx::query(
        "SELECT runner_id, capacity FROM runners WHERE state = 'live' AND lease_expires_at > $1",
    )
    .bind(now)
    .fetch_all(&db.read)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: String = r.try_get(0)?;
        let bytes: Vec<u8> = r.try_get(1)?;
        let cap = runner_pb::Capacity::decode(bytes.as_slice())
            .map_err(|e| Error::Corrupt(format!("capacity of runner `{id}`: {e}")))
            .and_then(|c| {
                RunnerCapacity::from_proto(&c)
                    .map_err(|e| Error::Corrupt(format!("capacity of runner `{id}`: {e}")))
            })?;
        out.push((parse_id("runner id", &id)?, cap));
    }
    Ok(out)
}
