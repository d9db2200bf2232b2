//! Database pools for SQLite (the embedded default) and PostgreSQL.
//!
//! Services write SQL that both accept (`$1` placeholders, BIGINT, TEXT,
//! `ON CONFLICT`, `RETURNING`) against sqlx's `Any` driver, and keep one
//! migrations directory per backend. SQLite gets a single writer connection
//! (so writers queue in-process instead of failing with SQLITE_BUSY) and a
//! pool of readers over WAL. Write transactions begin with
//! [`Db::begin_write`].
//!
//! Several replicas of a service may start at the same moment against one
//! database (and, during an upgrade, a new version next to old ones). All
//! start-up DDL (migrations, the storage probe's table, the tokens table)
//! therefore runs under one exclusive lock, [`StartupLock`]: the first
//! replica builds the schema, the others wait and then find nothing left to
//! do. How a replica of an older version treats a schema that a newer one
//! migrated further: see [`migrate`].

use std::str::FromStr;
use std::sync::Once;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyTransactionManager};
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Executor, TransactionManager};

use crate::storage::{StorageHealth, WriteTx};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// How much an acknowledged commit is worth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync on every commit: an accepted submission is never lost.
    Full,
    /// May lose the last commits on power loss (metrics).
    Relaxed,
}

#[derive(Clone, Debug)]
pub struct Db {
    /// Use for reads.
    pub read: AnyPool,
    /// Use for every write and every transaction that writes.
    pub write: AnyPool,
    pub backend: Backend,
    /// Whether writes reach the database; see [`crate::storage`].
    pub storage: StorageHealth,
}

impl Db {
    /// Begins a write transaction. Every write transaction goes through
    /// here (not `write.begin()`): see [`WriteTx`] for why.
    pub async fn begin_write(&self) -> sqlx::Result<WriteTx> {
        WriteTx::begin(&self.write, &self.storage).await
    }
}

fn install_drivers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(sqlx::any::install_default_drivers);
}

pub fn backend_of(url: &str) -> anyhow::Result<Backend> {
    if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        anyhow::bail!("unsupported database url `{url}`: expected sqlite:PATH or postgres://…")
    }
}

/// The default SQLite URL for a service's file under `data_dir`.
pub fn sqlite_url(data_dir: &std::path::Path, file: &str) -> String {
    format!("sqlite://{}", data_dir.join(file).display())
}

pub async fn connect(url: &str, durability: Durability) -> anyhow::Result<Db> {
    install_drivers();
    match backend_of(url)? {
        Backend::Postgres => {
            let pool = AnyPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await
                .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {e}"))?;
            Ok(Db {
                read: pool.clone(),
                write: pool,
                backend: Backend::Postgres,
                storage: StorageHealth::default(),
            })
        }
        Backend::Sqlite => {
            let memory = url.contains(":memory:");
            let url = if memory || url.contains('?') {
                url.to_owned()
            } else {
                format!("{url}?mode=rwc")
            };
            if let Some(path) = url
                .strip_prefix("sqlite://")
                .map(|p| p.split('?').next().unwrap_or(p))
            {
                if let Some(parent) = std::path::Path::new(path).parent() {
                    if !parent.as_os_str().is_empty() {
                        std::fs::create_dir_all(parent)?;
                    }
                }
            }
            let sync = match durability {
                Durability::Full => "FULL",
                Durability::Relaxed => "NORMAL",
            };
            let opts = AnyConnectOptions::from_str(&url)?;
            let pragmas = format!(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; \
                 PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}; PRAGMA foreign_keys=ON;"
            );
            let make = |max: u32| {
                let pragmas = pragmas.clone();
                AnyPoolOptions::new()
                    .max_connections(max)
                    .min_connections(1)
                    .acquire_timeout(Duration::from_secs(10))
                    .after_connect(move |conn, _| {
                        let pragmas = pragmas.clone();
                        Box::pin(async move {
                            conn.execute(pragmas.as_str()).await?;
                            Ok(())
                        })
                    })
            };
            let write = make(1).connect_with(opts.clone()).await?;
            // An in-memory database exists once per connection: share it.
            let read = if memory {
                write.clone()
            } else {
                make(8).connect_with(opts).await?
            };
            Ok(Db {
                read,
                write,
                backend: Backend::Sqlite,
                storage: StorageHealth::default(),
            })
        }
    }
}

/// A read-only transaction whose statements all see one snapshot, for reads
/// that span several statements (a job and its attempts). SQLite's WAL gives
/// that to any transaction; PostgreSQL needs REPEATABLE READ.
pub async fn snapshot(db: &Db) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Any>> {
    let mut tx = db.read.begin().await?;
    if db.backend == Backend::Postgres {
        tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await?;
    }
    Ok(tx)
}

/// How long start-up waits for a database that is not reachable yet, or
/// for a SQLite file whose write lock another process holds.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// How long a SQLite statement waits for a lock another connection holds
/// before it fails with SQLITE_BUSY, outside start-up.
const SQLITE_BUSY_TIMEOUT_MS: u64 = 10_000;

/// The PostgreSQL advisory lock held around start-up DDL. Any fixed number
/// does: advisory locks are per database, and every trainmesh process that
/// runs DDL on a database takes this one. It is not the lock sqlx's
/// migrator takes (that one covers the migrations only, not the DDL after
/// them); sqlx takes its own inside this one, on the same session.
const STARTUP_LOCK_KEY: i64 = 0x7472_6169_6e6d_6573; // "trainmes"

/// Held while a process runs start-up DDL on a database (migrations, the
/// storage probe's table, the tokens table), so that no other process runs
/// any at the same time: a session advisory lock on PostgreSQL, an open
/// `BEGIN IMMEDIATE` transaction (the file's write lock) on SQLite. Without
/// it, replicas starting together race: two SQLite processes both apply a
/// migration and one fails ("table already exists"), and two PostgreSQL
/// sessions running `CREATE TABLE IF NOT EXISTS` can both miss the other's
/// table, and one fails on a duplicate key in `pg_type`.
///
/// Statements run on [`conn`](Self::conn). On SQLite they are inside the
/// transaction (sqlx turns the migrator's own transactions into savepoints)
/// and take effect at [`release`](Self::release). Dropped without
/// `release` (start-up failed), the connection is closed instead of going
/// back to the pool, so neither the lock nor the transaction outlives it.
///
/// On PostgreSQL the wait has no deadline: the holder is running a
/// migration, which may legitimately take long, and a holder that dies
/// releases the lock with its session. On SQLite it ends with SQLITE_BUSY
/// after [`STARTUP_DEADLINE`].
pub struct StartupLock {
    conn: Option<PoolConnection<Any>>,
    backend: Backend,
}

impl StartupLock {
    pub async fn acquire(db: &Db) -> anyhow::Result<Self> {
        let conn =
            db.write.acquire().await.map_err(|e| {
                anyhow::anyhow!("cannot get a database connection for start-up: {e}")
            })?;
        // From here on, a failure drops the guard and closes the connection.
        let mut lock = Self {
            conn: Some(conn),
            backend: db.backend,
        };
        let conn = lock.conn();
        match db.backend {
            Backend::Postgres => {
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(STARTUP_LOCK_KEY)
                    .fetch_one(&mut *conn)
                    .await?;
                if !locked {
                    tracing::info!(
                        "another process is running start-up migrations; waiting for it"
                    );
                    sqlx::query("SELECT pg_advisory_lock($1)")
                        .bind(STARTUP_LOCK_KEY)
                        .execute(&mut *conn)
                        .await?;
                }
            }
            Backend::Sqlite => {
                // BEGIN IMMEDIATE waits for the write lock as long as the
                // busy timeout says: up to the start-up deadline here, the
                // usual timeout again at release.
                conn.execute(
                    format!("PRAGMA busy_timeout = {}", STARTUP_DEADLINE.as_millis()).as_str(),
                )
                .await?;
                // Through sqlx's transaction manager rather than a plain
                // statement, so that sqlx knows the connection is in a
                // transaction and the migrator nests savepoints in it.
                AnyTransactionManager::begin(conn, Some("BEGIN IMMEDIATE".into()))
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("cannot lock the database file for start-up: {e}")
                    })?;
            }
        }
        Ok(lock)
    }

    pub fn conn(&mut self) -> &mut AnyConnection {
        self.conn.as_mut().expect("held until released")
    }

    /// Commits what ran under the lock (SQLite) and lets the next process in.
    pub async fn release(mut self) -> anyhow::Result<()> {
        let backend = self.backend;
        let conn = self.conn();
        match backend {
            Backend::Postgres => {
                sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(STARTUP_LOCK_KEY)
                    .execute(&mut *conn)
                    .await?;
            }
            Backend::Sqlite => {
                AnyTransactionManager::commit(conn).await?;
                conn.execute(format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}").as_str())
                    .await?;
            }
        }
        // Released: the connection goes back to the pool.
        drop(self.conn.take());
        Ok(())
    }
}

impl Drop for StartupLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// Runs the migrations for the pool's backend, then the storage probe's
/// DDL, all under the [`StartupLock`].
///
/// A database that a newer version migrated further than this build knows
/// (it has migrations newer than this build's newest, and all of this
/// build's with their recorded checksums) is left as it is, with a warning,
/// and start-up goes on: during a rolling upgrade, or a rollback, the
/// previous version runs against the new schema anyway, so a migration has
/// to keep it working whether it restarts or not. Any other difference (a
/// migration this build lacks that is older than its newest, one of its own
/// missing next to newer ones, one of its own edited) means the histories
/// diverged, and start-up fails naming the versions.
pub async fn migrate(db: &Db, sqlite: &Migrator, postgres: &Migrator) -> anyhow::Result<()> {
    let m = match db.backend {
        Backend::Sqlite => sqlite,
        Backend::Postgres => postgres,
    };
    let mut lock = StartupLock::acquire(db).await?;
    run_migrations(lock.conn(), m).await?;
    crate::storage::prepare_probe(lock.conn()).await?;
    lock.release().await
}

async fn run_migrations(conn: &mut AnyConnection, m: &Migrator) -> anyhow::Result<()> {
    let failed = |e: MigrateError| anyhow::anyhow!("migrations failed: {e}");
    conn.ensure_migrations_table().await.map_err(failed)?;
    // A migration left half-applied is sqlx's to report.
    if conn.dirty_version().await.map_err(failed)?.is_none() {
        let applied = conn.list_applied_migrations().await.map_err(failed)?;
        if check_history(m, &applied)? {
            return Ok(());
        }
    }
    // `run_direct` is what `run` does after acquiring; `run` on a borrowed
    // connection makes every task that awaits start-up fail to compile
    // ("Acquire is not general enough"), which sqlx keeps `run_direct`
    // public for.
    m.run_direct(conn).await.map_err(|e| match e {
        MigrateError::VersionMismatch(v) => changed(v),
        e => failed(e),
    })
}

fn changed(version: i64) -> anyhow::Error {
    anyhow::anyhow!(
        "migrations failed: migration {version} was applied with a different text than \
         this build's migration {version} (a migration file was changed after release)"
    )
}

/// Compares what the database has applied with this build's migrations.
/// Ok(true): the database is ahead of this build (a newer version migrated
/// it) and has everything this build has: nothing to run. Ok(false): sqlx
/// runs what is missing. Err: the histories diverged.
fn check_history(
    m: &Migrator,
    applied: &[sqlx::migrate::AppliedMigration],
) -> anyhow::Result<bool> {
    let ours: Vec<_> = m
        .iter()
        .filter(|x| !x.migration_type.is_down_migration())
        .collect();
    let newest = ours.iter().map(|x| x.version).max().unwrap_or(0);
    let unknown: Vec<i64> = applied
        .iter()
        .map(|a| a.version)
        .filter(|v| !m.version_exists(*v))
        .collect();
    if unknown.is_empty() {
        return Ok(false);
    }
    let unapplied: Vec<i64> = ours
        .iter()
        .map(|x| x.version)
        .filter(|v| !applied.iter().any(|a| a.version == *v))
        .collect();
    if unknown.iter().any(|v| *v < newest) || !unapplied.is_empty() {
        anyhow::bail!(
            "migrations failed: the database's migration history differs from this build's: \
             it has migration(s) {unknown:?}, which this build does not have{}; this build's \
             newest is {newest}. It was migrated by a build with different migrations; \
             start that build or one that has all of them",
            if unapplied.is_empty() {
                String::new()
            } else {
                format!(", and lacks this build's {unapplied:?}")
            }
        );
    }
    if let Some(edited) = ours.iter().find(|x| {
        applied
            .iter()
            .any(|a| a.version == x.version && a.checksum != x.checksum)
    }) {
        return Err(changed(edited.version));
    }
    let latest = unknown.iter().max().copied().unwrap_or(newest);
    tracing::warn!(
        database = latest,
        build = newest,
        "the database was migrated by a newer version (up to migration {latest}; this \
         build's newest is {newest}); starting on the newer schema without migrating"
    );
    Ok(true)
}

/// Connects and migrates, retrying while the database is unreachable, so a
/// service started before its database comes up waits instead of exiting.
pub async fn open(
    url: &str,
    durability: Durability,
    sqlite: &Migrator,
    postgres: &Migrator,
) -> anyhow::Result<Db> {
    let deadline = tokio::time::Instant::now() + STARTUP_DEADLINE;
    let mut delay = Duration::from_millis(100);
    loop {
        match connect(url, durability).await {
            Ok(db) => {
                migrate(&db, sqlite, postgres).await?;
                return Ok(db);
            }
            Err(e)
                if tokio::time::Instant::now() < deadline
                    && backend_of(url)? == Backend::Postgres =>
            {
                tracing::warn!(error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::all_dbs;
    use sqlx::Row;

    /// Migrations that read the same on both backends, by version.
    fn sql(version: i64) -> &'static str {
        match version {
            1 => "CREATE TABLE a (k BIGINT PRIMARY KEY)",
            2 => "ALTER TABLE a ADD COLUMN v BIGINT NOT NULL DEFAULT 0",
            3 => "CREATE TABLE b (k BIGINT PRIMARY KEY)",
            4 => "CREATE TABLE c (k BIGINT PRIMARY KEY)",
            _ => unreachable!(),
        }
    }

    /// A build's migrations: `versions`, with the text of `changed` (if
    /// any) edited after release.
    async fn build(versions: &[i64], changed: Option<i64>) -> (Migrator, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        for &v in versions {
            let mut text = sql(v).to_owned();
            if changed == Some(v) {
                text.push_str("; -- edited");
            }
            std::fs::write(dir.path().join(format!("{v}_m{v}.sql")), text).unwrap();
        }
        let m = Migrator::new(dir.path().to_path_buf()).await.unwrap();
        (m, dir)
    }

    async fn open_with(url: &str, m: &Migrator) -> anyhow::Result<Db> {
        // Bounded: a start-up lock left held by a failed start would make
        // the next start wait for ever.
        tokio::time::timeout(Duration::from_secs(30), open(url, Durability::Full, m, m))
            .await
            .expect("start-up waited 30 s for the start-up lock")
    }

    async fn applied(db: &Db) -> Vec<i64> {
        sqlx::query("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&db.read)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    #[tokio::test]
    async fn an_older_build_starts_on_a_schema_a_newer_one_migrated_further() {
        for tdb in all_dbs().await {
            let (newer, _d1) = build(&[1, 2, 3], None).await;
            let (older, _d2) = build(&[1, 2], None).await;
            open_with(&tdb.url, &newer).await.unwrap();
            let db = open_with(&tdb.url, &older)
                .await
                .unwrap_or_else(|e| panic!("{}: the older build refused: {e:#}", tdb.label));
            assert_eq!(applied(&db).await, [1, 2, 3], "{}", tdb.label);
            // It works on the newer schema: its own tables and the probe's.
            sqlx::query("INSERT INTO a (k) VALUES (1)")
                .execute(&db.write)
                .await
                .unwrap();
            db.begin_write().await.unwrap().commit().await.unwrap();
            // And the newer build still starts after it.
            open_with(&tdb.url, &newer).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_build_whose_migrations_diverge_from_the_database_refuses_to_start() {
        for tdb in all_dbs().await {
            let (current, _d) = build(&[1, 2, 3], None).await;
            open_with(&tdb.url, &current).await.unwrap();
            let refused = |versions: &'static [i64], changed: Option<i64>| {
                let url = tdb.url.clone();
                async move {
                    let (m, _d) = build(versions, changed).await;
                    match open_with(&url, &m).await {
                        Ok(_) => panic!("a build with {versions:?} (changed {changed:?}) started"),
                        Err(e) => format!("{e:#}"),
                    }
                }
            };
            // Lacks 2, which is older than its newest: not an older build.
            let e = refused(&[1, 3], None).await;
            assert!(e.contains("history differs") && e.contains("[2]"), "{e}");
            // Has a 4 where the database has a 3.
            let e = refused(&[1, 2, 4], None).await;
            assert!(
                e.contains("[3]") && e.contains("lacks this build's [4]"),
                "{e}"
            );
            // An older build whose migration 2 was edited after release.
            let e = refused(&[1, 2], Some(2)).await;
            assert!(
                e.contains("migration 2 was applied with a different text"),
                "{e}"
            );
            // The same build, edited.
            let e = refused(&[1, 2, 3], Some(3)).await;
            assert!(
                e.contains("migration 3 was applied with a different text"),
                "{e}"
            );
            // None of them changed anything, or kept the start-up lock.
            let db = open_with(&tdb.url, &current).await.unwrap();
            assert_eq!(applied(&db).await, [1, 2, 3], "{}", tdb.label);
        }
    }
}
