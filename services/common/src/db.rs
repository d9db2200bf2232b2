//! Database pools for SQLite (the embedded default) and PostgreSQL.
//!
//! Services write SQL that both accept (`$1` placeholders, BIGINT, TEXT,
//! `ON CONFLICT`, `RETURNING`) against sqlx's `Any` driver, and keep one
//! migrations directory per backend. SQLite gets a single writer connection
//! (so writers queue in-process instead of failing with SQLITE_BUSY) and a
//! pool of readers over WAL. Write transactions begin with
//! [`Db::begin_write`].

use std::str::FromStr;
use std::sync::Once;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};

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
                 PRAGMA busy_timeout=10000; PRAGMA foreign_keys=ON;"
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

/// Runs the migrations for the pool's backend.
pub async fn migrate(db: &Db, sqlite: &Migrator, postgres: &Migrator) -> anyhow::Result<()> {
    let m = match db.backend {
        Backend::Sqlite => sqlite,
        Backend::Postgres => postgres,
    };
    m.run(&db.write)
        .await
        .map_err(|e| anyhow::anyhow!("migrations failed: {e}"))
}

/// Connects and migrates, retrying while the database is unreachable, so a
/// service started before its database comes up waits instead of exiting.
pub async fn open(
    url: &str,
    durability: Durability,
    sqlite: &Migrator,
    postgres: &Migrator,
) -> anyhow::Result<Db> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut delay = Duration::from_millis(100);
    loop {
        match connect(url, durability).await {
            Ok(db) => {
                migrate(&db, sqlite, postgres).await?;
                crate::storage::prepare_probe(&db).await?;
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
