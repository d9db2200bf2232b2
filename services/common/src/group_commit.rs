//! Group commit: many small write transactions share one commit.
//!
//! With full durability every commit is an fsync, and on SQLite every write
//! also queues for the single writer connection; one commit per request
//! caps a service at the disk's fsync rate. A [`GroupCommit`] hands each
//! request's work to one writer task, which runs all the work waiting at
//! that moment in ONE transaction, each piece in its own savepoint (so a
//! refused request is rolled back alone), commits once, and only then
//! answers each caller: an acknowledged write is always durable. There is
//! no artificial delay: while one batch commits, the next one gathers.
//!
//! On PostgreSQL each request runs in its own transaction instead: the
//! server already flushes concurrent commits together, and savepoints there
//! cost round trips (measured slower with batching).

use std::future::Future;
use std::pin::Pin;

use sqlx::{Acquire, AnyConnection, AnyPool};

use crate::db::{Backend, Db};
use tokio::sync::{mpsc, oneshot};

/// Most requests per transaction: bounds how long other writers wait for
/// the connection behind one batch.
const MAX_BATCH: usize = 64;
const QUEUE_DEPTH: usize = 1024;

/// One request's work: runs on a savepoint of the batch's transaction.
pub type Work<T, E> = Box<
    dyn for<'c> FnOnce(
            &'c mut AnyConnection,
        ) -> Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>
        + Send,
>;

struct Request<T, E> {
    work: Work<T, E>,
    reply: oneshot::Sender<Result<T, E>>,
}

/// The handle requests submit through; the writer ends when every handle
/// is dropped.
pub struct GroupCommit<T, E> {
    mode: Mode<T, E>,
}

enum Mode<T, E> {
    Batched(mpsc::Sender<Request<T, E>>),
    Direct(AnyPool),
}

impl<T, E> Clone for GroupCommit<T, E> {
    fn clone(&self) -> Self {
        let mode = match &self.mode {
            Mode::Batched(tx) => Mode::Batched(tx.clone()),
            Mode::Direct(pool) => Mode::Direct(pool.clone()),
        };
        Self { mode }
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
    E: From<sqlx::Error> + Send + 'static,
{
    /// Starts the writer on the database's write pool (SQLite); on
    /// PostgreSQL requests run directly.
    pub fn start(db: &Db) -> Self {
        if db.backend == Backend::Postgres {
            return Self {
                mode: Mode::Direct(db.write.clone()),
            };
        }
        let pool = db.write.clone();
        let (tx, mut rx) = mpsc::channel::<Request<T, E>>(QUEUE_DEPTH);
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut buf, MAX_BATCH).await > 0 {
                run_batch(&pool, std::mem::take(&mut buf)).await;
            }
        });
        Self {
            mode: Mode::Batched(tx),
        }
    }

    /// Runs `work`; returns once it is committed (or refused). `stopped` is
    /// the error for a writer that has gone away.
    pub async fn submit(&self, work: Work<T, E>, stopped: impl Fn() -> E) -> Result<T, E> {
        match &self.mode {
            Mode::Direct(pool) => {
                let mut tx = pool.begin().await?;
                let v = work(&mut tx).await?;
                tx.commit().await?;
                Ok(v)
            }
            Mode::Batched(sender) => {
                let (reply, answer) = oneshot::channel();
                sender
                    .send(Request { work, reply })
                    .await
                    .map_err(|_| stopped())?;
                answer.await.map_err(|_| stopped())?
            }
        }
    }
}

async fn run_batch<T, E: From<sqlx::Error>>(pool: &AnyPool, batch: Vec<Request<T, E>>) {
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            let msg = e.to_string();
            for r in batch {
                let _ = r.reply.send(Err(unavailable(&msg)));
            }
            return;
        }
    };
    let mut done = Vec::with_capacity(batch.len());
    for r in batch {
        let outcome = match tx.begin().await {
            Ok(mut sp) => match (r.work)(&mut sp).await {
                Ok(v) => sp.commit().await.map(|()| v).map_err(E::from),
                Err(e) => {
                    let _ = sp.rollback().await;
                    Err(e)
                }
            },
            Err(e) => Err(E::from(e)),
        };
        done.push((r.reply, outcome));
    }
    match tx.commit().await {
        Ok(()) => {
            for (reply, outcome) in done {
                let _ = reply.send(outcome);
            }
        }
        Err(e) => {
            // Nothing of the batch is durable: every caller may retry.
            let msg = e.to_string();
            for (reply, _) in done {
                let _ = reply.send(Err(unavailable(&msg)));
            }
        }
    }
}

/// A transient database error (callers map it to UNAVAILABLE and retry).
fn unavailable<E: From<sqlx::Error>>(msg: &str) -> E {
    E::from(sqlx::Error::Io(std::io::Error::other(format!(
        "the batch's commit failed: {msg}"
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
