//! Transactional outbox: a message to another service is written in the same
//! transaction as the state change that causes it, and a relay delivers it
//! afterwards, retrying with backoff, in order per key. The receiving RPCs
//! are idempotent, so a redelivery after a crash changes nothing.
//!
//! Each service's migrations create the table:
//!
//! ```sql
//! CREATE TABLE outbox (
//!     id <autoincrement primary key>, topic TEXT NOT NULL, msg_key TEXT NOT NULL,
//!     payload <blob> NOT NULL, correlation_id TEXT NOT NULL,
//!     created_at BIGINT NOT NULL, attempts BIGINT NOT NULL DEFAULT 0,
//!     next_attempt_at BIGINT NOT NULL DEFAULT 0, last_error TEXT,
//!     traceparent TEXT);
//! ```

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{AnyConnection, Row};
use tokio::sync::Notify;

use crate::db::Db;
use crate::server::ShutdownWatch;
use crate::time::now_micros;

#[derive(Clone, Debug)]
pub struct OutboxMessage {
    pub id: i64,
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    pub correlation_id: String,
    /// Trace context of the request that caused the message, so the
    /// delivery joins its trace.
    pub traceparent: Option<String>,
    pub attempts: i64,
}

/// What happened to one delivery.
#[derive(Debug)]
pub enum Delivery {
    Done,
    /// Transient failure: try again later.
    Retry(String),
    /// Permanent failure: log and drop (retrying cannot help).
    Drop(String),
}

pub type Deliver =
    Arc<dyn Fn(OutboxMessage) -> Pin<Box<dyn Future<Output = Delivery> + Send>> + Send + Sync>;

/// Writes a message inside the caller's transaction, with the current trace
/// context.
pub async fn enqueue(
    conn: &mut AnyConnection,
    topic: &str,
    key: &str,
    payload: &[u8],
    correlation_id: &str,
) -> sqlx::Result<()> {
    enqueue_many(
        conn,
        topic,
        &[Message {
            key,
            payload,
            correlation_id,
        }],
    )
    .await
}

/// One message for [`enqueue_many`].
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    pub key: &'a str,
    pub payload: &'a [u8],
    pub correlation_id: &'a str,
}

/// Adds messages, in order, in one statement (many small inserts cost a
/// round trip each).
pub async fn enqueue_many(
    conn: &mut AnyConnection,
    topic: &str,
    messages: &[Message<'_>],
) -> sqlx::Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    // $1 topic, $2 created_at, $3 traceparent; then three per message.
    let values = (0..messages.len())
        .map(|i| {
            let b = 4 + 3 * i;
            format!("($1, ${b}, ${}, ${}, $2, $3)", b + 1, b + 2)
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "INSERT INTO outbox (topic, msg_key, payload, correlation_id, created_at, traceparent) \
         VALUES {values}"
    );
    let mut q = sqlx::query(&sql)
        .bind(topic)
        .bind(now_micros())
        .bind(crate::correlation::traceparent());
    for m in messages {
        q = q
            .bind(m.key)
            .bind(m.payload.to_vec())
            .bind(m.correlation_id);
    }
    q.execute(conn).await?;
    Ok(())
}

/// Delivers outbox messages. Call [`Relay::notify`] after a commit that
/// enqueued something to deliver at once; a periodic sweep catches the rest.
#[derive(Clone)]
pub struct Relay {
    db: Db,
    wake: Arc<Notify>,
    sweep: Duration,
}

const BATCH: i64 = 256;
const MAX_BACKOFF_MICROS: i64 = 30_000_000;

impl Relay {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            wake: Arc::new(Notify::new()),
            sweep: Duration::from_millis(500),
        }
    }

    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Runs until shutdown.
    pub async fn run(self, deliver: Deliver, mut shutdown: ShutdownWatch) {
        loop {
            let more = match self.round(&deliver).await {
                Ok(more) => more,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox round failed");
                    false
                }
            };
            if more {
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {},
                _ = tokio::time::sleep(self.sweep) => {},
                _ = shutdown.wait() => return,
            }
        }
    }

    /// One pass; true when a full batch was delivered (more may be waiting).
    async fn round(&self, deliver: &Deliver) -> sqlx::Result<bool> {
        let rows = sqlx::query(
            "SELECT id, topic, msg_key, payload, correlation_id, attempts, next_attempt_at, \
             traceparent FROM outbox ORDER BY id LIMIT $1",
        )
        .bind(BATCH)
        .fetch_all(&self.db.read)
        .await?;
        if rows.is_empty() {
            return Ok(false);
        }
        let now = now_micros();
        let mut blocked = HashSet::new();
        // Per key, in id order; keys are delivered concurrently.
        let mut chains: BTreeMap<String, Vec<OutboxMessage>> = BTreeMap::new();
        let full = rows.len() as i64 == BATCH;
        for r in rows {
            let msg = OutboxMessage {
                id: r.try_get(0)?,
                topic: r.try_get(1)?,
                key: r.try_get(2)?,
                payload: r.try_get(3)?,
                correlation_id: r.try_get(4)?,
                attempts: r.try_get(5)?,
                traceparent: r.try_get(7)?,
            };
            let next: i64 = r.try_get(6)?;
            if blocked.contains(&msg.key) {
                continue;
            }
            if next > now {
                blocked.insert(msg.key.clone());
                continue;
            }
            chains.entry(msg.key.clone()).or_default().push(msg);
        }
        let mut done = Vec::new();
        let results = futures::future::join_all(chains.into_values().map(|chain| {
            let deliver = deliver.clone();
            async move {
                let mut out = Vec::new();
                for msg in chain {
                    // `deliver` is called inside the scope, so spans it
                    // opens belong to the message's trace.
                    let outcome = crate::correlation::scope_traced(
                        msg.correlation_id.clone(),
                        msg.traceparent.clone(),
                        "outbox delivery",
                        async { deliver(msg.clone()).await },
                    )
                    .await;
                    let stop = matches!(outcome, Delivery::Retry(_));
                    out.push((msg, outcome));
                    if stop {
                        break;
                    }
                }
                out
            }
        }))
        .await;
        for (msg, outcome) in results.into_iter().flatten() {
            match outcome {
                Delivery::Done => done.push(msg.id),
                Delivery::Drop(why) => {
                    tracing::error!(topic = %msg.topic, key = %msg.key, correlation_id = %msg.correlation_id, error = %why, "outbox message dropped");
                    done.push(msg.id);
                }
                Delivery::Retry(why) => {
                    let backoff = (100_000i64 << msg.attempts.clamp(0, 16)).min(MAX_BACKOFF_MICROS);
                    tracing::debug!(topic = %msg.topic, key = %msg.key, error = %why, "outbox delivery will be retried");
                    sqlx::query(
                        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2 WHERE id = $3",
                    )
                    .bind(now_micros() + backoff)
                    .bind(why)
                    .bind(msg.id)
                    .execute(&self.db.write)
                    .await?;
                }
            }
        }
        let progressed = !done.is_empty();
        self.delete(&done).await?;
        Ok(full && progressed)
    }

    /// One statement for the whole round: a commit (and on SQLite the
    /// single writer) per message would cap delivery at the fsync rate.
    async fn delete(&self, ids: &[i64]) -> sqlx::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        sqlx::query(&format!("DELETE FROM outbox WHERE id IN ({list})"))
            .execute(&self.db.write)
            .await?;
        Ok(())
    }
}

/// Maps a gRPC failure to a delivery outcome: codes that a retry can fix
/// are retried; the rest are permanent.
pub fn classify(status: &tonic::Status) -> Delivery {
    use tonic::Code::*;
    match status.code() {
        Unavailable | DeadlineExceeded | ResourceExhausted | Aborted | Internal | Unknown
        | Cancelled | Unauthenticated => Delivery::Retry(status.to_string()),
        _ => Delivery::Drop(status.to_string()),
    }
}
