//! Runner registrations and their leases.
//!
//! A runner is `live` (takes work), `draining` (stopping: holds its lease,
//! heartbeats and reports, but nothing new is placed on it) or `dead`
//! (deregistered, or its lease ran out).

use prost::Message;
use sqlx::{AnyConnection, Row};
use trainmesh_common::db::{Backend, Db};
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
         registered_at, lease_expires_at, last_heartbeat_at, instance) \
         VALUES ($1, $2, $3, $4, $5, $6, 'live', $7, $8, $7, $9)",
    )
    .bind(id.to_string())
    .bind(&reg.name)
    .bind(&reg.backend)
    .bind(reg.capacity_proto.clone())
    .bind(reg.capacity.gpus.len() as i64)
    .bind(labels)
    .bind(now)
    .bind(lease_expires_at)
    .bind(&reg.instance)
    .execute(&db.write)
    .await?;
    Ok(())
}

/// The lease end of a live registration under `name` from another
/// installation than `instance` (any, when `instance` is empty).
pub async fn live_rival(db: &Db, name: &str, instance: &str, now: i64) -> Result<Option<i64>> {
    let row = sqlx::query(
        "SELECT MAX(lease_expires_at) FROM runners WHERE name = $1 AND state <> 'dead' \
         AND lease_expires_at > $2 AND (instance <> $3 OR instance = '')",
    )
    .bind(name)
    .bind(now)
    .bind(instance)
    .fetch_one(&db.read)
    .await?;
    Ok(row.try_get::<Option<i64>, _>(0)?)
}

/// The name a registration was made under (registrations never change
/// name), or `None` for an id never registered.
pub async fn runner_name(db: &Db, id: RunnerId) -> Result<Option<String>> {
    let row = sqlx::query("SELECT name FROM runners WHERE runner_id = $1")
        .bind(id.to_string())
        .fetch_optional(&db.read)
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// Renews a live lease; returns the previous heartbeat time and whether
/// the runner is draining, or `None` when it is unknown, dead or expired.
pub async fn renew_lease(
    conn: &mut AnyConnection,
    id: RunnerId,
    now: i64,
    expires_at: i64,
) -> Result<Option<(i64, bool)>> {
    let prev = sqlx::query(
        "SELECT last_heartbeat_at, state FROM runners WHERE runner_id = $1 \
         AND state IN ('live', 'draining') AND lease_expires_at > $2",
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
         WHERE runner_id = $3 AND state IN ('live', 'draining') AND lease_expires_at > $2",
    )
    .bind(expires_at)
    .bind(now)
    .bind(id.to_string())
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() != 1 {
        return Ok(None);
    }
    let state: String = prev.try_get(1)?;
    Ok(Some((prev.try_get(0)?, state == "draining")))
}

/// Where a registration stands, as far as taking work goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunnerStanding {
    /// Its lease is live and it takes work.
    Live,
    /// Its lease is live but it is stopping: nothing new goes to it.
    Draining,
}

/// The standing of a runner whose lease is live; `None` when it is
/// unknown, dead or expired.
pub async fn runner_standing(
    conn: &mut AnyConnection,
    id: RunnerId,
    now: i64,
) -> Result<Option<RunnerStanding>> {
    let row = sqlx::query(
        "SELECT state FROM runners WHERE runner_id = $1 AND state IN ('live', 'draining') \
         AND lease_expires_at > $2",
    )
    .bind(id.to_string())
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let state: String = row.try_get(0)?;
    Ok(Some(if state == "draining" {
        RunnerStanding::Draining
    } else {
        RunnerStanding::Live
    }))
}

/// Whether work may be placed on the runner now, inside the caller's
/// dispatch transaction. On PostgreSQL the row is share-locked until the
/// commit: a concurrent [`drain_runner`] then waits for this placement and
/// sees it (and sends it back), or this check waits for the drain and sees
/// the runner draining. SQLite runs one writer at a time.
pub async fn runner_takes_work(
    conn: &mut AnyConnection,
    backend: Backend,
    id: RunnerId,
    now: i64,
) -> Result<Option<String>> {
    let lock = match backend {
        Backend::Postgres => " FOR SHARE",
        Backend::Sqlite => "",
    };
    // A cordoned runner takes nothing either; `note_node_fault` writes the
    // row locked here when it cordons.
    let row = sqlx::query(&format!(
        "SELECT name FROM runners WHERE runner_id = $1 AND state = 'live' \
         AND lease_expires_at > $2 AND NOT EXISTS (SELECT 1 FROM runner_health h \
         WHERE h.name = runners.name AND h.cordoned = 1){lock}"
    ))
    .bind(id.to_string())
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// Marks a runner with a live lease as draining; false when it is unknown,
/// dead or expired. Draining again changes nothing.
pub async fn drain_runner(conn: &mut AnyConnection, id: RunnerId, now: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE runners SET state = 'draining' WHERE runner_id = $1 \
         AND state IN ('live', 'draining') AND lease_expires_at > $2",
    )
    .bind(id.to_string())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn expired_runners(db: &Db, now: i64) -> Result<Vec<RunnerId>> {
    let rows = sqlx::query(
        "SELECT runner_id FROM runners WHERE state IN ('live', 'draining') \
         AND lease_expires_at <= $1",
    )
    .bind(now)
    .fetch_all(&db.read)
    .await?;
    rows.iter()
        .map(|r| parse_id("runner id", &r.try_get::<String, _>(0)?))
        .collect()
}

/// Why a runner's registration ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retirement {
    /// Its lease ran out (only an expired lease is ended).
    LeaseExpired,
    /// It said it is gone.
    Deregistered,
}

/// Marks a runner dead. Returns whether it was draining, or `None` when
/// there was nothing to end (unknown, already dead, or — for a lease
/// expiry — renewed). A concurrent change between its read and its write
/// is a [`Error::Conflict`], for the caller to run it again.
pub async fn retire_runner(
    conn: &mut AnyConnection,
    id: RunnerId,
    why: Retirement,
    now: i64,
) -> Result<Option<bool>> {
    // A deregistration ends the lease whenever it would have run out.
    let expired_by = match why {
        Retirement::LeaseExpired => now,
        Retirement::Deregistered => i64::MAX,
    };
    let row = sqlx::query(
        "SELECT state FROM runners WHERE runner_id = $1 AND state IN ('live', 'draining') \
         AND lease_expires_at <= $2",
    )
    .bind(id.to_string())
    .bind(expired_by)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let state: String = row.try_get(0)?;
    let done = sqlx::query(
        "UPDATE runners SET state = 'dead' WHERE runner_id = $1 AND state = $2 \
         AND lease_expires_at <= $3",
    )
    .bind(id.to_string())
    .bind(&state)
    .bind(expired_by)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() != 1 {
        return Err(Error::Conflict(format!("runner `{id}` changed meanwhile")));
    }
    Ok(Some(state == "draining"))
}

/// A live registration as placement sees it.
#[derive(Clone, Debug)]
pub struct LiveRunner {
    pub runner_id: RunnerId,
    pub name: String,
    pub capacity: RunnerCapacity,
}

fn capacity_of(id: &str, bytes: &[u8]) -> Result<(runner_pb::Capacity, RunnerCapacity)> {
    let corrupt = |e: String| Error::Corrupt(format!("capacity of runner `{id}`: {e}"));
    let proto = runner_pb::Capacity::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    let cap = RunnerCapacity::from_proto(&proto).map_err(|e| corrupt(e.to_string()))?;
    Ok((proto, cap))
}

/// Runners whose lease is live (not draining), with their capacity.
pub async fn live_runners(db: &Db, now: i64) -> Result<Vec<LiveRunner>> {
    let rows = sqlx::query(
        "SELECT runner_id, capacity, name FROM runners \
         WHERE state = 'live' AND lease_expires_at > $1",
    )
    .bind(now)
    .fetch_all(&db.read)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: String = r.try_get(0)?;
        let bytes: Vec<u8> = r.try_get(1)?;
        out.push(LiveRunner {
            runner_id: parse_id("runner id", &id)?,
            capacity: capacity_of(&id, &bytes)?.1,
            name: r.try_get(2)?,
        });
    }
    Ok(out)
}

/// A registration with a live lease, for listing.
#[derive(Clone, Debug)]
pub struct RegisteredRunner {
    pub runner_id: RunnerId,
    pub name: String,
    pub backend: String,
    pub draining: bool,
    pub capacity: runner_pb::Capacity,
    pub registered_at: i64,
    pub last_heartbeat_at: i64,
    /// Attempts scheduled or running on it.
    pub active_attempts: i64,
}

/// Registrations whose lease is live (ready or draining), by name.
pub async fn registered_runners(db: &Db, now: i64) -> Result<Vec<RegisteredRunner>> {
    let rows = sqlx::query(
        "SELECT r.runner_id, r.name, r.backend, r.state, r.capacity, r.registered_at, \
         r.last_heartbeat_at, (SELECT CAST(COUNT(*) AS BIGINT) FROM assignments a \
         WHERE a.runner_id = r.runner_id AND a.state IN ('SCHEDULED', 'RUNNING')) \
         FROM runners r WHERE r.state IN ('live', 'draining') AND r.lease_expires_at > $1 \
         ORDER BY r.name, r.registered_at",
    )
    .bind(now)
    .fetch_all(&db.read)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: String = r.try_get(0)?;
        let state: String = r.try_get(3)?;
        let bytes: Vec<u8> = r.try_get(4)?;
        out.push(RegisteredRunner {
            runner_id: parse_id("runner id", &id)?,
            name: r.try_get(1)?,
            backend: r.try_get(2)?,
            draining: state == "draining",
            capacity: capacity_of(&id, &bytes)?.0,
            registered_at: r.try_get(5)?,
            last_heartbeat_at: r.try_get(6)?,
            active_attempts: r.try_get(7)?,
        });
    }
    Ok(out)
}

/// The name of registration `id`, read inside the caller's transaction.
pub async fn runner_name_on(conn: &mut AnyConnection, id: RunnerId) -> Result<Option<String>> {
    let row = sqlx::query("SELECT name FROM runners WHERE runner_id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// Whether any runner ever registered as `name`.
pub async fn runner_known(conn: &mut AnyConnection, name: &str) -> Result<bool> {
    let row = sqlx::query("SELECT 1 FROM runners WHERE name = $1 LIMIT 1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.is_some())
}
