//! Runner health, by name (a runner that restarts registers again under
//! the same name and keeps its record): node faults counted since the last
//! uncordon, and whether the runner is cordoned (takes no new work).

use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use trainmesh_common::db::Db;

use crate::error::Result;

/// One runner's record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub name: String,
    pub node_faults: i64,
    /// The last fault: job, attempt and error.
    pub last_fault: String,
    pub last_fault_at: i64,
    pub cordoned: bool,
    pub cordon_reason: String,
    pub cordoned_at: i64,
}

impl Health {
    /// Had a node fault since it was last uncordoned.
    pub fn suspect(&self) -> bool {
        self.node_faults > 0
    }
}

const HEALTH_COLS: &str =
    "name, node_faults, last_fault, last_fault_at, cordoned, cordon_reason, cordoned_at";

fn health_from_row(r: &AnyRow) -> Result<Health> {
    Ok(Health {
        name: r.try_get(0)?,
        node_faults: r.try_get(1)?,
        last_fault: r.try_get(2)?,
        last_fault_at: r.try_get(3)?,
        cordoned: r.try_get::<i64, _>(4)? != 0,
        cordon_reason: r.try_get(5)?,
        cordoned_at: r.try_get(6)?,
    })
}

/// Counts a node fault against runner `name`, cordoning it when this makes
/// `cordon_after` faults (0: never). Returns the record afterwards and
/// whether this fault cordoned it.
pub async fn note_node_fault(
    conn: &mut AnyConnection,
    name: &str,
    fault: &str,
    cordon_after: u32,
    now: i64,
) -> Result<(Health, bool)> {
    let row = sqlx::query(&format!(
        "INSERT INTO runner_health (name, node_faults, last_fault, last_fault_at, updated_at) \
         VALUES ($1, 1, $2, $3, $3) ON CONFLICT (name) DO UPDATE SET \
         node_faults = runner_health.node_faults + 1, last_fault = $2, last_fault_at = $3, \
         updated_at = $3 RETURNING {HEALTH_COLS}"
    ))
    .bind(name)
    .bind(fault)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    let mut h = health_from_row(&row)?;
    let due = cordon_after > 0 && h.node_faults >= i64::from(cordon_after);
    if h.cordoned || !due {
        return Ok((h, false));
    }
    let reason = format!(
        "cordoned after {} node faults (the last: {fault})",
        h.node_faults
    );
    sqlx::query(
        "UPDATE runner_health SET cordoned = 1, cordon_reason = $1, cordoned_at = $2 \
         WHERE name = $3",
    )
    .bind(&reason)
    .bind(now)
    .bind(name)
    .execute(&mut *conn)
    .await?;
    // Writes its registrations' rows, so that on PostgreSQL a dispatch
    // that share-locked one (`runner_takes_work`) is seen through, and one
    // that comes later waits for this commit and sees the cordon.
    sqlx::query("UPDATE runners SET state = state WHERE name = $1 AND state <> 'dead'")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    h.cordoned = true;
    h.cordon_reason = reason;
    h.cordoned_at = now;
    Ok((h, true))
}

/// Lets runner `name` take work again and forgets its faults. `None` when
/// it has no record (never had a fault); else the record as it was.
pub async fn uncordon(conn: &mut AnyConnection, name: &str, now: i64) -> Result<Option<Health>> {
    let before = sqlx::query(&format!(
        "SELECT {HEALTH_COLS} FROM runner_health WHERE name = $1"
    ))
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(before) = before.as_ref().map(health_from_row).transpose()? else {
        return Ok(None);
    };
    sqlx::query(
        "UPDATE runner_health SET node_faults = 0, cordoned = 0, cordon_reason = '', \
         cordoned_at = 0, updated_at = $1 WHERE name = $2",
    )
    .bind(now)
    .bind(name)
    .execute(&mut *conn)
    .await?;
    Ok(Some(before))
}

/// Every runner's record, by name.
pub async fn all_health(db: &Db) -> Result<HashMap<String, Health>> {
    let rows = sqlx::query(&format!("SELECT {HEALTH_COLS} FROM runner_health"))
        .fetch_all(&db.read)
        .await?;
    rows.iter()
        .map(|r| health_from_row(r).map(|h| (h.name.clone(), h)))
        .collect()
}

/// Names of the cordoned runners, with why.
pub async fn cordoned(db: &Db) -> Result<HashMap<String, String>> {
    let rows = sqlx::query("SELECT name, cordon_reason FROM runner_health WHERE cordoned = 1")
        .fetch_all(&db.read)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}
