//! Group commit: many small write transactions share one commit.
//!
//! With full durability every commit is an fsync, and on SQLite every write
//! also queues for the single writer connection; one commit per request
//! caps a service at the disk's fsync rate. A [`GroupCommit`] hands each
//! request's work to a writer task, which runs all the work waiting at that
//! moment in ONE transaction, commits once, and only then answers each
//! caller: an acknowledged write is always durable. There is no artificial
//! delay: while one batch commits, the next one gathers.
//!
//! A refused request must not take the others down with it. Savepoints
//! would isolate each, but every statement is a round trip (to sqlx's
//! SQLite thread, or to the PostgreSQL server), and a SAVEPOINT and its
//! RELEASE per request cost as much as the work itself. So a batch runs
//! all or nothing: when any request fails, the whole transaction is rolled
//! back and every request runs again in a transaction of its own.
//! Refusals are rare (stale or illegal updates, lost fences), so the common
//! case pays one BEGIN and one COMMIT per batch. Work must therefore be
//! re-runnable ([`Work`] is `Fn`), and anything it does besides writing on
//! the connection, such as logging, may happen twice.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sqlx::AnyConnection;

use crate::db::{Backend, Db};
use tokio::sync::{mpsc, oneshot, Mutex};

/// Most requests per transaction: bounds how long other writers wait for
/// the connection behind one batch.
const MAX_BATCH: usize = 64;
const QUEUE_DEPTH: usize = 1024;
/// Batches in flight at once on PostgreSQL. Its statements are network
/// round trips: one writer would leave the server idle while it waits on
/// each, and a few keep both the server's and this process's cores busy.
/// Batches of different writers touch different rows in practice (one
/// job's messages are delivered in order, one at a time); where they do
/// meet, the server's deadlock detection fails one, which then runs its
/// requests alone.
pub const PG_WRITERS: usize = 4;

/// One request's work: writes on the batch's transaction. May run more
/// than once (see the module docs); only the run that is committed counts.
pub type Work<T, E> = Box<
    dyn for<'c> Fn(&'c mut AnyConnection) -> Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>
        + Send
        + Sync,
>;

struct Request<T, E> {
    work: Work<T, E>,
    reply: oneshot::Sender<Result<T, E>>,
}

/// The handle requests submit through; the writer ends when every handle
/// is dropped.
pub struct GroupCommit<T, E> {
    tx: mpsc::Sender<Request<T, E>>,
}

impl<T, E> Clone for GroupCommit<T, E> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<T, E> std::fmt::Debug for GroupCommit<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl<T, E> GroupCommit<T, E>
where
    T: Send + 'static,
    E: From<sqlx::Error> + std::fmt::Display + Send + 'static,
{
    /// Starts the writers on the database's write pool: one on SQLite
    /// (it has one writer connection anyway), [`PG_WRITERS`] on
    /// PostgreSQL.
    pub fn start(db: &Db) -> Self {
        let (tx, rx) = mpsc::channel::<Request<T, E>>(QUEUE_DEPTH);
        let rx = Arc::new(Mutex::new(rx));
        let writers = match db.backend {
            Backend::Sqlite => 1,
            Backend::Postgres => PG_WRITERS,
        };
        for _ in 0..writers {
            let (db, rx) = (db.clone(), Arc::clone(&rx));
            tokio::spawn(async move {
                loop {
                    // Whoever is free takes everything waiting; the others
                    // meanwhile run their own batches.
                    let mut batch = Vec::with_capacity(MAX_BATCH);
                    if rx.lock().await.recv_many(&mut batch, MAX_BATCH).await == 0 {
                        return;
                    }
                    run_all_or_nothing(&db, batch).await;
                }
            });
        }
        Self { tx }
    }

    /// Runs `work`; returns once it is committed (or refused). `stopped` is
    /// the error for a writer that has gone away.
    pub async fn submit(&self, work: Work<T, E>, stopped: impl Fn() -> E) -> Result<T, E> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request { work, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The whole batch in one transaction; if any request fails, nothing of
/// it stays and each runs alone.
async fn run_all_or_nothing<T, E: From<sqlx::Error> + std::fmt::Display>(
    db: &Db,
    batch: Vec<Request<T, E>>,
) {
    if batch.len() > 1 {
        match try_together(db, &batch).await {
            Together::Committed(values) => {
                for (r, v) in batch.into_iter().zip(values) {
                    let _ = r.reply.send(Ok(v));
                }
                return;
            }
            Together::Unavailable(e) => return refuse_all(batch, &e),
            Together::RunAlone => {}
        }
    }
    for r in batch {
        let outcome = run_alone(db, &r.work).await;
        let _ = r.reply.send(outcome);
    }
}

enum Together<T> {
    Committed(Vec<T>),
    /// The database could not be reached, or the commit failed: running
    /// alone would only fail again, one timeout at a time.
    Unavailable(sqlx::Error),
    /// Some request failed: nothing was committed.
    RunAlone,
}

async fn try_together<T, E: std::fmt::Display>(db: &Db, batch: &[Request<T, E>]) -> Together<T> {
    let mut tx = match db.begin_write().await {
        Ok(tx) => tx,
        Err(e) => return Together::Unavailable(e),
    };
    let mut values = Vec::with_capacity(batch.len());
    for r in batch {
        match (r.work)(&mut tx).await {
            Ok(v) => values.push(v),
            Err(e) => {
                // A connection that cannot even roll back is gone: the
                // others would wait for it one at a time.
                if let Err(lost) = tx.rollback().await {
                    return Together::Unavailable(lost);
                }
                tracing::debug!(error = %e, requests = batch.len(),
                    "a request of the batch failed; running them one by one");
                return Together::RunAlone;
            }
        }
    }
    match tx.commit().await {
        Ok(()) => Together::Committed(values),
        // Whether it took is unknown: every caller retries (the work is
        // idempotent, as all deliveries between services are).
        Err(e) => Together::Unavailable(e),
    }
}

async fn run_alone<T, E: From<sqlx::Error>>(db: &Db, work: &Work<T, E>) -> Result<T, E> {
    let mut tx = db.begin_write().await?;
    let v = work(&mut tx).await?;
    tx.commit().await?;
    Ok(v)
}

fn refuse_all<T, E: From<sqlx::Error>>(batch: Vec<Request<T, E>>, e: &sqlx::Error) {
    let msg = e.to_string();
    for r in batch {
        let _ = r.reply.send(Err(unavailable(&msg)));
    }
}

/// A transient database error (callers map it to UNAVAILABLE and retry).
fn unavailable<E: From<sqlx::Error>>(msg: &str) -> E {
    E::from(sqlx::Error::Io(std::io::Error::other(format!(
        "the database did not take the write: {msg}"
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    #[tokio::test]
    async fn a_refused_request_is_rolled_back_alone_and_the_rest_commit() {
        for tdb in crate::testing::all_dbs().await {
            let db = crate::db::connect(&tdb.url, crate::db::Durability::Full)
                .await
                .unwrap();
            sqlx::query("CREATE TABLE t (k BIGINT PRIMARY KEY)")
                .execute(&db.write)
                .await
                .unwrap();
            let gc: GroupCommit<i64, sqlx::Error> = GroupCommit::start(&db);
            let calls = (0..20i64).map(|k| {
                let gc = gc.clone();
                async move {
                    let work: Work<i64, sqlx::Error> = Box::new(move |c| {
                        Box::pin(async move {
                            sqlx::query("INSERT INTO t VALUES ($1)")
                                .bind(k)
                                .execute(&mut *c)
                                .await?;
                            // Every fifth request fails after writing.
                            if k % 5 == 0 {
                                return Err(sqlx::Error::RowNotFound);
                            }
                            Ok(k)
                        })
                    });
                    gc.submit(work, || sqlx::Error::PoolClosed).await
                }
            });
            let results = futures::future::join_all(calls).await;
            for (k, r) in results.iter().enumerate() {
                assert_eq!(r.is_ok(), k % 5 != 0, "{}: {k}: {r:?}", tdb.label);
            }
            let stored: Vec<i64> = sqlx::query("SELECT k FROM t ORDER BY k")
                .fetch_all(&db.read)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<i64, _>(0))
                .collect();
            let expected: Vec<i64> = (0..20).filter(|k| k % 5 != 0).collect();
            assert_eq!(stored, expected, "{}", tdb.label);
        }
    }
}
