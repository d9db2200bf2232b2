//! Transactional outbox: a message to another service is written in the same
//! transaction as the state change that causes it, and a relay delivers it
//! afterwards, in order per key. The receiving RPCs are idempotent, so a
//! redelivery after a crash changes nothing.
//!
//! Two kinds of failure are retried differently. A message the destination
//! answered but could not take yet backs off on its own. A destination that
//! cannot be reached at all (down, overloaded, its database failing) backs
//! off as a whole: one message probes it at short intervals, and once it
//! answers its whole backlog goes at full speed ([`destinations`]).
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

mod destinations;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::{AnyConnection, Row};
use tokio::sync::Notify;
use tokio::time::Instant;

use destinations::{Destinations, Gate};

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
    /// The destination took the call but could not act on it yet: this
    /// message tries again later.
    Retry(String),
    /// The destination could not be reached (or is shedding load, or its
    /// storage fails): every message for it waits until a probe gets
    /// through.
    Unreachable(String),
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
    route: Route,
    destinations: Arc<Mutex<Destinations>>,
}

/// Names the destination of a topic's messages.
pub type Route = Arc<dyn Fn(&str) -> &'static str + Send + Sync>;

const BATCH: i64 = 256;
const MAX_BACKOFF_MICROS: i64 = 30_000_000;

impl Relay {
    /// A relay whose topics all go to one destination.
    pub fn new(db: Db) -> Self {
        Self {
            db,
            wake: Arc::new(Notify::new()),
            sweep: Duration::from_millis(500),
            route: Arc::new(|_| "peer"),
            destinations: Arc::default(),
        }
    }

    /// Says which destination each topic goes to, so that one that is down
    /// holds back only its own messages.
    pub fn with_route(
        mut self,
        route: impl Fn(&str) -> &'static str + Send + Sync + 'static,
    ) -> Self {
        self.route = Arc::new(route);
        self
    }

    pub fn notify(&self) {
        self.wake.notify_one();
    }

    fn destinations(&self) -> std::sync::MutexGuard<'_, Destinations> {
        // Every operation on it is a single map update.
        self.destinations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs until shutdown.
    pub async fn run(self, deliver: Deliver, mut shutdown: ShutdownWatch) {
        loop {
            let more = match self.round(&deliver).await {
                Ok(more) => more,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox round failed");
                    self.db.storage.suspect();
                    false
                }
            };
            if more {
                continue;
            }
            let pause = match self.destinations().next_probe() {
                Some(at) => at.saturating_duration_since(Instant::now()).min(self.sweep),
                None => self.sweep,
            };
            tokio::select! {
                _ = self.wake.notified() => {},
                _ = tokio::time::sleep(pause) => {},
                _ = shutdown.wait() => return,
            }
        }
    }

    /// One pass; true when more may be waiting: a full batch was delivered,
    /// or a destination that was down answered again.
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
        let full = rows.len() as i64 == BATCH;
        let (chains, probed) = self.chains(rows)?;
        let results = futures::future::join_all(chains.into_values().map(|chain| {
            let deliver = deliver.clone();
            async move {
                let mut out = Vec::new();
                for msg in chain {
                    let dest = (self.route)(&msg.topic);
                    // Another chain may have found it down meanwhile.
                    if self.destinations().gate(dest, Instant::now()) == Gate::Closed {
                        break;
                    }
                    // `deliver` is called inside the scope, so spans it
                    // opens belong to the message's trace.
                    let outcome = crate::correlation::scope_traced(
                        msg.correlation_id.clone(),
                        msg.traceparent.clone(),
                        "outbox delivery",
                        async { deliver(msg.clone()).await },
                    )
                    .await;
                    match &outcome {
                        Delivery::Unreachable(why) => {
                            self.destinations().unreachable(dest, why, Instant::now())
                        }
                        _ => self.destinations().reached(dest),
                    }
                    let stop = matches!(outcome, Delivery::Retry(_) | Delivery::Unreachable(_));
                    out.push((msg, outcome));
                    if stop {
                        break;
                    }
                }
                out
            }
        }))
        .await;
        let mut done = Vec::new();
        for (msg, outcome) in results.into_iter().flatten() {
            match outcome {
                Delivery::Done => done.push(msg.id),
                Delivery::Drop(why) => {
                    tracing::error!(topic = %msg.topic, key = %msg.key, correlation_id = %msg.correlation_id, error = %why, "outbox message dropped");
                    done.push(msg.id);
                }
                // Nothing to store: the destination's state says it all.
                Delivery::Unreachable(why) => {
                    tracing::debug!(topic = %msg.topic, key = %msg.key, error = %why, "outbox destination unreachable");
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
        let now = Instant::now();
        let recovered = probed
            .iter()
            .any(|d| self.destinations().gate(d, now) == Gate::Open);
        Ok((full && progressed) || recovered)
    }

    /// This round's work: per key, in id order, the messages that may go
    /// now. A key stops at its first message that must wait (its own
    /// backoff, or its destination down), so order per key holds; of a
    /// destination that is down and due for a probe, one key goes (the
    /// destinations probed are returned too).
    #[allow(clippy::type_complexity)]
    fn chains(
        &self,
        rows: Vec<sqlx::any::AnyRow>,
    ) -> sqlx::Result<(BTreeMap<String, Vec<OutboxMessage>>, Vec<&'static str>)> {
        let now_us = now_micros();
        let now = Instant::now();
        let dests = self.destinations();
        let mut blocked = HashSet::new();
        let mut probes: HashMap<&'static str, String> = HashMap::new();
        let mut chains: BTreeMap<String, Vec<OutboxMessage>> = BTreeMap::new();
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
            let dest = (self.route)(&msg.topic);
            let admit = next <= now_us
                && match dests.gate(dest, now) {
                    Gate::Open => true,
                    Gate::Closed => false,
                    Gate::Probe => {
                        probes.entry(dest).or_insert_with(|| msg.key.clone()) == &msg.key
                    }
                };
            if !admit {
                blocked.insert(msg.key.clone());
                continue;
            }
            chains.entry(msg.key.clone()).or_default().push(msg);
        }
        Ok((chains, probes.into_keys().collect()))
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

/// Maps a gRPC failure to a delivery outcome: a destination that is down,
/// too slow or shedding load is unreachable; other codes that a retry can
/// fix are retried, including a refused credential (the sender's
/// configuration, not the message, is wrong); the rest are permanent.
pub fn classify(status: &tonic::Status) -> Delivery {
    use tonic::Code::*;
    match status.code() {
        Unavailable | DeadlineExceeded | ResourceExhausted => {
            Delivery::Unreachable(status.to_string())
        }
        Aborted | Internal | Unknown | Cancelled | Unauthenticated | PermissionDenied => {
            Delivery::Retry(status.to_string())
        }
        _ => Delivery::Drop(status.to_string()),
    }
}
