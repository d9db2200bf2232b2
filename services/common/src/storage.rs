//! Write transactions that a storage error cannot leave half-open, and the
//! storage health that a service's gRPC health reports.
//!
//! sqlx keeps its own count of open transactions per connection. When the
//! database rolls a transaction back by itself (SQLite does on "disk full"
//! and some I/O errors), sqlx's ROLLBACK then fails, its count stays one too
//! high, and every later "BEGIN" on that connection silently becomes a
//! SAVEPOINT inside a transaction that never commits: each write answers OK
//! and nothing reaches the disk. [`WriteTx`] therefore issues BEGIN and
//! COMMIT itself and never hands a connection back to the pool unless it
//! knows the connection is outside any transaction: after a failed COMMIT
//! or ROLLBACK the connection is closed, and the pool opens a fresh one.
//!
//! [`StorageHealth`] is whether the database took the last write. A failed
//! commit with a storage error (disk full, I/O error, read-only or locked
//! database, lost connection) turns it unhealthy at once; a small probe
//! write, repeated while unhealthy and now and then while healthy, turns it
//! healthy again as soon as a write succeeds. The server maps it to
//! `grpc.health.v1` (NOT_SERVING while unhealthy).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Executor};
use tokio::sync::{watch, Notify};

use crate::db::Db;
use crate::server::ShutdownWatch;
use crate::time::now_micros;

/// How often the database is probed while writes work: a storage fault
/// that no request runs into (a quiet service) shows on health this late.
const PROBE_WHILE_HEALTHY: Duration = Duration::from_secs(2);
/// How often while they fail: how soon health recovers after the fault.
const PROBE_WHILE_FAILING: Duration = Duration::from_millis(250);
/// A probe that hangs (a server that stopped answering) counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// True for errors that say the database cannot take writes now: the disk
/// is full, an I/O error, a read-only, locked or corrupt database, a lost
/// connection, a server shutting down or out of resources. Refusals of the
/// statement itself (constraints, syntax) and contention that a retry
/// resolves (deadlocks, serialization failures) are not.
pub fn is_storage_failure(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // The primary result code is the low byte of the extended
                // one: BUSY 5, LOCKED 6, READONLY 8, IOERR 10, CORRUPT 11,
                // FULL 13, CANTOPEN 14, NOTADB 26.
                let primary = code.parse::<i64>().map(|n| n & 0xff).unwrap_or(0);
                matches!(primary, 5 | 6 | 8 | 10 | 11 | 13 | 14 | 26)
            } else {
                // PostgreSQL's SQLSTATE: connection exceptions (08),
                // insufficient resources such as disk_full (53), system and
                // I/O errors (58), the server shutting down (57P01-57P03),
                // and a read-only transaction (25006).
                code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("58")
                    || matches!(code.as_str(), "57P01" | "57P02" | "57P03" | "25006")
            }
        }
        _ => false,
    }
}

/// Whether the database took the last write; shared by every handle of one
/// [`Db`].
#[derive(Clone, Debug)]
pub struct StorageHealth {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    healthy: watch::Sender<bool>,
    /// Wakes the prober early: something failed that may be the storage.
    suspect: Notify,
}

impl Default for StorageHealth {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                healthy: watch::channel(true).0,
                suspect: Notify::new(),
            }),
        }
    }
}

impl StorageHealth {
    pub fn is_healthy(&self) -> bool {
        *self.inner.healthy.borrow()
    }

    /// Changes of [`is_healthy`](Self::is_healthy).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.inner.healthy.subscribe()
    }

    /// A write was committed.
    pub fn wrote(&self) {
        self.set(true, None);
    }

    /// A write failed with `err`: unhealthy if it is a storage failure; a
    /// probe runs soon either way.
    pub fn failed(&self, err: &sqlx::Error) {
        if is_storage_failure(err) {
            self.set(false, Some(err));
        }
        self.suspect();
    }

    /// Something failed that may have been the storage: probe it now.
    pub fn suspect(&self) {
        self.inner.suspect.notify_one();
    }

    fn set(&self, healthy: bool, err: Option<&sqlx::Error>) {
        let changed = self.inner.healthy.send_if_modified(|h| {
            let changed = *h != healthy;
            *h = healthy;
            changed
        });
        if changed {
            match err {
                Some(e) => tracing::error!(error = %e,
                    "the database cannot be written; health is NOT_SERVING until a write succeeds"),
                None if healthy => {
                    tracing::info!("the database takes writes again; health is SERVING")
                }
                None => tracing::error!("the database cannot be written; health is NOT_SERVING"),
            }
        }
    }
}

/// A write transaction on the database's write pool. Statements run on it
/// through `&mut *tx` (it dereferences to the connection). Dropped without
/// [`commit`](Self::commit), it is rolled back before the connection is
/// used again, or the connection is closed if that fails.
#[derive(Debug)]
pub struct WriteTx {
    conn: Option<PoolConnection<Any>>,
    health: StorageHealth,
}

impl WriteTx {
    pub(crate) async fn begin(pool: &AnyPool, health: &StorageHealth) -> sqlx::Result<Self> {
        let mut conn = pool.acquire().await.inspect_err(|e| health.failed(e))?;
        if let Err(e) = conn.execute("BEGIN").await {
            conn.close_on_drop();
            health.failed(&e);
            return Err(e);
        }
        Ok(Self {
            conn: Some(conn),
            health: health.clone(),
        })
    }

    /// Commits. On an error, whether the transaction took is unknown (a
    /// lost connection) or it did not: callers answer UNAVAILABLE and the
    /// client retries, idempotently.
    pub async fn commit(mut self) -> sqlx::Result<()> {
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        match conn.execute("COMMIT").await {
            Ok(_) => {
                self.health.wrote();
                Ok(())
            }
            Err(e) => {
                conn.close_on_drop();
                self.health.failed(&e);
                Err(e)
            }
        }
    }

    /// Rolls back now (rather than when dropped).
    pub async fn rollback(mut self) -> sqlx::Result<()> {
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        conn.execute("ROLLBACK").await.map(|_| ()).inspect_err(|e| {
            conn.close_on_drop();
            self.health.failed(e);
        })
    }
}

impl Deref for WriteTx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        self.conn
            .as_deref()
            .expect("a WriteTx holds its connection until it ends")
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        self.conn
            .as_deref_mut()
            .expect("a WriteTx holds its connection until it ends")
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Ended by an error or a refusal. A ROLLBACK that fails says the
        // connection or the database is in trouble (or that the database
        // already ended the transaction itself): the connection goes.
        let health = self.health.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                // The connection returns to the pool only after the
                // ROLLBACK, so nobody can run statements inside this
                // transaction.
                rt.spawn(async move {
                    if let Err(e) = conn.execute("ROLLBACK").await {
                        conn.close_on_drop();
                        health.failed(&e);
                    }
                });
            }
            Err(_) => conn.close_on_drop(),
        }
    }
}

/// The table the probe writes: created by [`prepare_probe`], one row.
const PROBE_TABLE: &str = "storage_probe";

/// Creates the probe's table and row if missing. Runs on `conn` under the
/// start-up lock ([`crate::db::StartupLock`]): replicas that start
/// together would otherwise race on the `CREATE TABLE`.
pub(crate) async fn prepare_probe(conn: &mut AnyConnection) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {PROBE_TABLE} (id BIGINT PRIMARY KEY, written_at BIGINT NOT NULL)"
    ))
    .execute(&mut *conn)
    .await
    .map_err(|e| anyhow::anyhow!("cannot create the `{PROBE_TABLE}` table: {e}"))?;
    sqlx::query(&format!(
        "INSERT INTO {PROBE_TABLE} (id, written_at) VALUES (1, 0) ON CONFLICT (id) DO NOTHING"
    ))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// One small write transaction, like every real one.
async fn probe(db: &Db) -> sqlx::Result<()> {
    let mut tx = db.begin_write().await?;
    sqlx::query(&format!(
        "UPDATE {PROBE_TABLE} SET written_at = $1 WHERE id = 1"
    ))
    .bind(now_micros())
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Probes `db` until shutdown: now and then while writes work, often
/// while they fail, and at once when something looks like a failure.
pub async fn run_prober(db: Db, mut shutdown: ShutdownWatch) {
    let health = db.storage.clone();
    let prober = async {
        loop {
            let every = if health.is_healthy() {
                PROBE_WHILE_HEALTHY
            } else {
                PROBE_WHILE_FAILING
            };
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = health.inner.suspect.notified() => {}
            }
            match tokio::time::timeout(PROBE_TIMEOUT, probe(&db)).await {
                // A commit records its own outcome.
                Ok(Ok(())) => {}
                // Any failure to write counts here, whatever its kind.
                Ok(Err(e)) => health.set(false, Some(&e)),
                Err(_) => health.set(false, None),
            }
            // A burst of suspicions (or the probe's own) costs one probe
            // per pause, not one each.
            tokio::time::sleep(PROBE_WHILE_FAILING).await;
        }
    };
    tokio::select! {
        _ = prober => {}
        _ = shutdown.wait() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{connect, Durability};
    use crate::testing::{all_dbs, postgres_db, wait_for};
    use sqlx::Row;

    async fn count(db: &Db, k: i64) -> i64 {
        sqlx::query("SELECT COUNT(*) FROM t WHERE k = $1")
            .bind(k)
            .fetch_one(&db.read)
            .await
            .unwrap()
            .get(0)
    }

    async fn insert(db: &Db, k: i64) -> sqlx::Result<WriteTx> {
        let mut tx = db.begin_write().await?;
        sqlx::query("INSERT INTO t (k) VALUES ($1)")
            .bind(k)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    #[tokio::test]
    async fn a_dropped_transaction_is_rolled_back_before_its_connection_is_reused() {
        for tdb in all_dbs().await {
            let db = connect(&tdb.url, Durability::Full).await.unwrap();
            sqlx::query("CREATE TABLE t (k BIGINT PRIMARY KEY)")
                .execute(&db.write)
                .await
                .unwrap();
            drop(insert(&db, 1).await.unwrap());
            // On SQLite the next transaction gets the very same connection.
            insert(&db, 2).await.unwrap().commit().await.unwrap();
            assert_eq!(count(&db, 1).await, 0, "{}", tdb.label);
            assert_eq!(count(&db, 2).await, 1, "{}", tdb.label);
            insert(&db, 3).await.unwrap().rollback().await.unwrap();
            assert_eq!(count(&db, 3).await, 0, "{}", tdb.label);
            assert!(db.storage.is_healthy(), "{}", tdb.label);
        }
    }

    #[tokio::test]
    async fn a_connection_cut_inside_a_transaction_fails_it_and_the_next_one_commits() {
        let Some(tdb) = postgres_db().await else {
            return;
        };
        let db = connect(&tdb.url, Durability::Full).await.unwrap();
        prepare_probe(&mut db.write.acquire().await.unwrap())
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (k BIGINT PRIMARY KEY)")
            .execute(&db.write)
            .await
            .unwrap();
        let mut tx = insert(&db, 1).await.unwrap();
        let pid: i32 = sqlx::query("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await
            .unwrap()
            .get(0);
        let admin = connect(&tdb.url, Durability::Full).await.unwrap();
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&admin.write)
            .await
            .unwrap();
        let err = tx.commit().await.expect_err("a commit on a cut connection");
        assert!(is_storage_failure(&err), "{err:?}");
        assert!(!db.storage.is_healthy());
        assert_eq!(count(&db, 1).await, 0);
        // The probe finds the database writable again through a new
        // connection.
        let (_trigger, watch) = crate::server::shutdown_pair();
        let prober = tokio::spawn(run_prober(db.clone(), watch));
        wait_for("a probe to succeed", Duration::from_secs(10), || async {
            db.storage.is_healthy().then_some(())
        })
        .await;
        prober.abort();
        insert(&db, 2).await.unwrap().commit().await.unwrap();
        assert_eq!(count(&db, 2).await, 1);
    }

    #[tokio::test]
    async fn refusals_of_a_statement_are_not_storage_failures() {
        for tdb in all_dbs().await {
            let db = connect(&tdb.url, Durability::Full).await.unwrap();
            sqlx::query("CREATE TABLE t (k BIGINT PRIMARY KEY)")
                .execute(&db.write)
                .await
                .unwrap();
            insert(&db, 1).await.unwrap().commit().await.unwrap();
            let dup = match insert(&db, 1).await {
                Err(e) => e,
                Ok(_) => panic!("{}: a duplicate key was taken", tdb.label),
            };
            assert!(!is_storage_failure(&dup), "{}: {dup:?}", tdb.label);
            let bad = sqlx::query("SELECT * FROM no_such_table")
                .execute(&db.read)
                .await
                .unwrap_err();
            assert!(!is_storage_failure(&bad), "{}: {bad:?}", tdb.label);
        }
    }
}
