//! Group commit of new jobs. Every CreateJob/RetryJob hands its prepared
//! job to one writer task, which inserts all jobs waiting at that moment in
//! ONE transaction and answers each caller only after the commit: an
//! acknowledged job is always durable, and a burst of submissions costs one
//! fsync (and, on PostgreSQL, one pass through the event-order lock)
//! instead of one each. There is no artificial delay: while one batch
//! commits, the next one gathers.
//!
//! The queued-jobs limit is checked per job inside the batch's transaction,
//! so jobs earlier in the same batch are counted too.
//!
//! Status updates from the scheduler are grouped by the generic
//! `trainmesh_common::group_commit` instead: they need no batch-wide
//! bookkeeping, only a savepoint each.

use std::collections::{BTreeSet, HashMap};
use std::sync::Weak;

use sqlx::AnyConnection;
use tokio::sync::{mpsc, oneshot};
use trainmesh_common::db::Backend;
use trainmesh_common::error::{ErrorCode, ServiceError};

use crate::error::{Error, Result};
use crate::limits::{Ceiling, QueuedLimits};
use crate::repo::{self, JobRecord, OutboxRow, QueueScope};
use crate::service::{JobService, TOPIC_ENQUEUE};

/// Most jobs per transaction: bounds how long other writers wait for the
/// connection behind one batch.
const MAX_BATCH: usize = 64;
/// Submissions waiting for the writer; beyond this, callers wait to queue.
const QUEUE_DEPTH: usize = 1024;

/// A validated job, ready to insert.
#[derive(Debug)]
pub(crate) struct NewJob {
    pub job: JobRecord,
    pub key: Option<String>,
    pub limits: QueuedLimits,
    /// The `enqueue` outbox payload (EnqueueJobRequest, encoded).
    pub enqueue: Vec<u8>,
    /// Trace context of the submitting request, for the outbox delivery.
    pub traceparent: Option<String>,
}

/// What became of one job of a batch.
#[derive(Debug)]
pub(crate) enum Inserted {
    Created(Box<JobRecord>),
    /// Another job holds the idempotency key (found by the caller).
    KeyTaken,
}

struct Queued {
    item: NewJob,
    reply: oneshot::Sender<Result<Inserted>>,
}

/// The handle requests submit through.
#[derive(Clone, Debug)]
pub(crate) struct CreateQueue {
    tx: mpsc::Sender<Queued>,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued")
            .field("job", &self.item.job.id)
            .finish()
    }
}

impl CreateQueue {
    /// Starts the writer for `svc`; it ends when the service is dropped.
    pub fn start(svc: Weak<JobService>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(write_loop(svc, rx));
        Self { tx }
    }

    /// Inserts `item`; returns once it is committed (or refused).
    pub async fn submit(&self, item: NewJob) -> Result<Inserted> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Error::Retry("job-service is shutting down; retry".into());
        self.tx
            .send(Queued { item, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn write_loop(svc: Weak<JobService>, mut rx: mpsc::Receiver<Queued>) {
    let mut buf = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut buf, MAX_BATCH).await > 0 {
        let Some(svc) = svc.upgrade() else {
            return;
        };
        svc.write_batch(std::mem::take(&mut buf)).await;
    }
}

impl JobService {
    async fn write_batch(&self, batch: Vec<Queued>) {
        let items: Vec<&NewJob> = batch.iter().map(|q| &q.item).collect();
        match self.insert_batch(&items).await {
            Ok(outcomes) => {
                let created = outcomes.iter().any(|o| matches!(o, Ok(true)));
                if created {
                    self.committed(true);
                }
                if batch.len() > 1 {
                    tracing::debug!(jobs = batch.len(), "new jobs committed together");
                }
                for (q, o) in batch.into_iter().zip(outcomes) {
                    let _ = q.reply.send(o.map(|created| {
                        if created {
                            Inserted::Created(Box::new(q.item.job))
                        } else {
                            Inserted::KeyTaken
                        }
                    }));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(q) = batch.into_iter().next() {
                    let _ = q.reply.send(Err(e));
                }
            }
            Err(e) if e.code() == ErrorCode::Unavailable => {
                // The database is unreachable: one at a time would only
                // make every caller wait out the timeout again.
                for q in batch {
                    let _ = q.reply.send(Err(Error::Retry(format!(
                        "the database is unavailable ({e}); retry"
                    ))));
                }
            }
            Err(e) => {
                // One job's failure must not fail the others: each alone.
                tracing::warn!(error = %e, jobs = batch.len(), "batched insert failed; inserting one at a time");
                for q in batch {
                    let result = self.insert_batch(&[&q.item]).await.and_then(|mut v| {
                        v.pop()
                            .unwrap_or_else(|| Err(Error::Corrupt("empty batch result".into())))
                    });
                    if matches!(result, Ok(true)) {
                        self.committed(true);
                    }
                    let _ = q.reply.send(result.map(|created| {
                        if created {
                            Inserted::Created(Box::new(q.item.job))
                        } else {
                            Inserted::KeyTaken
                        }
                    }));
                }
            }
        }
    }

    /// One transaction for `items`. The outer error means nothing was
    /// committed; per item: `Ok(true)` inserted, `Ok(false)` key taken,
    /// `Err` refused by a limit.
    async fn insert_batch(&self, items: &[&NewJob]) -> Result<Vec<Result<bool>>> {
        let mut tx = self.db.begin_write().await?;
        let claims: Vec<_> = items
            .iter()
            .filter_map(|it| {
                let j = &it.job;
                it.key
                    .as_deref()
                    .map(|k| (j.owner.as_str(), k, j.id, j.create_time))
            })
            .collect();
        let won = if claims.is_empty() {
            Default::default()
        } else {
            repo::claim_idempotency_many(&mut tx, &claims).await?
        };
        let mut out: Vec<Result<bool>> = items
            .iter()
            .map(|it| Ok(it.key.is_none() || won.contains(&it.job.id)))
            .collect();
        if items.iter().any(|it| !it.limits.is_empty()) {
            let mut counts = QueueCounts::take(&mut tx, self.db.backend, items, &out).await?;
            for (it, o) in items.iter().zip(out.iter_mut()) {
                if !matches!(o, Ok(true)) {
                    continue;
                }
                if let Err(e) = counts.admit(&it.job.owner, &it.job.org, &it.limits) {
                    if let Some(k) = &it.key {
                        repo::release_idempotency(&mut tx, &it.job.owner, k).await?;
                    }
                    *o = Err(e);
                }
            }
        }
        let accepted: Vec<&NewJob> = items
            .iter()
            .zip(&out)
            .filter(|(_, o)| matches!(o, Ok(true)))
            .map(|(it, _)| *it)
            .collect();
        let jobs: Vec<&JobRecord> = accepted.iter().map(|it| &it.job).collect();
        repo::insert_jobs(&mut tx, &jobs).await?;
        let messages: Vec<OutboxRow<'_>> = accepted
            .iter()
            .map(|it| OutboxRow {
                topic: TOPIC_ENQUEUE,
                key: it.job.id.to_string(),
                payload: &it.enqueue,
                correlation_id: &it.job.correlation_id,
                traceparent: it.traceparent.as_deref(),
            })
            .collect();
        repo::enqueue_outbox(&mut tx, &messages).await?;
        repo::append_created_events(&mut tx, self.db.backend, &jobs).await?;
        tx.commit().await?;
        Ok(out)
    }
}

/// A scope a queued-jobs count is kept for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum ScopeKey {
    // Declared in lock order: global, then orgs, then users.
    Global,
    Org(String),
    User(String),
}

/// Queued jobs per scope for one batch: counted once under the scopes'
/// locks, then advanced as the batch admits jobs.
struct QueueCounts {
    counts: HashMap<ScopeKey, i64>,
}

impl QueueCounts {
    /// Locks (PostgreSQL) and counts every scope some claimed job of the
    /// batch has a ceiling in. Locks are taken in one global order, so two
    /// writers (two job-service processes on one database) cannot deadlock.
    async fn take(
        conn: &mut AnyConnection,
        backend: Backend,
        items: &[&NewJob],
        claimed: &[Result<bool>],
    ) -> Result<Self> {
        let mut scopes = BTreeSet::new();
        for (it, c) in items.iter().zip(claimed) {
            if !matches!(c, Ok(true)) {
                continue;
            }
            if it.limits.global.is_some() {
                scopes.insert(ScopeKey::Global);
            }
            if it.limits.org.is_some() {
                scopes.insert(ScopeKey::Org(it.job.org.clone()));
            }
            if it.limits.user.is_some() {
                scopes.insert(ScopeKey::User(it.job.owner.clone()));
            }
        }
        let mut counts = HashMap::new();
        for key in &scopes {
            let scope = match key {
                ScopeKey::Global => QueueScope::All,
                ScopeKey::Org(o) => QueueScope::Org(o),
                ScopeKey::User(u) => QueueScope::Owner(u),
            };
            repo::lock_queue_scope(conn, backend, scope).await?;
        }
        for key in scopes {
            let scope = match &key {
                ScopeKey::Global => QueueScope::All,
                ScopeKey::Org(o) => QueueScope::Org(o),
                ScopeKey::User(u) => QueueScope::Owner(u),
            };
            let n = repo::count_queued(conn, scope).await?;
            counts.insert(key, n);
        }
        Ok(Self { counts })
    }

    /// Admits one job or refuses it naming the ceiling (the user's first:
    /// the one most worth naming).
    fn admit(&mut self, owner: &str, org: &str, limits: &QueuedLimits) -> Result<()> {
        let keys = [
            (ScopeKey::User(owner.to_owned()), limits.user),
            (ScopeKey::Org(org.to_owned()), limits.org),
            (ScopeKey::Global, limits.global),
        ];
        for (key, ceiling) in &keys {
            let Some(Ceiling { value, scope: from }) = ceiling else {
                continue;
            };
            let have = self.counts.get(key).copied().unwrap_or(0);
            if have >= *value {
                let who = match key {
                    ScopeKey::User(u) => format!("user `{u}`"),
                    ScopeKey::Org(o) => format!("org `{o}`"),
                    ScopeKey::Global => "the platform".to_owned(),
                };
                return Err(Error::ResourceExhausted(format!(
                    "queued-jobs limit reached: {who} has {have} of {value} (limit from {from})"
                )));
            }
        }
        // Every counted scope the job belongs to grows, limited for it or not.
        for (key, _) in keys {
            if let Some(n) = self.counts.get_mut(&key) {
                *n += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(user: Option<i64>, org: Option<i64>, global: Option<i64>) -> QueuedLimits {
        let c = |scope| move |value| Ceiling { value, scope };
        QueuedLimits {
            user: user.map(c("USER_DEFAULT")),
            org: org.map(c("ORG")),
            global: global.map(c("GLOBAL")),
        }
    }

    #[test]
    fn counts_advance_for_every_scope_a_job_is_in() {
        let mut c = QueueCounts {
            counts: HashMap::from([
                (ScopeKey::User("alice".into()), 1),
                (ScopeKey::Org("ml".into()), 3),
                (ScopeKey::Global, 0),
            ]),
        };
        // bob has no user limit, but his job still fills the org.
        c.admit("bob", "ml", &limits(None, Some(5), None)).unwrap();
        c.admit("alice", "ml", &limits(Some(2), None, None))
            .unwrap();
        let e = c
            .admit("alice", "ml", &limits(Some(2), Some(5), None))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "queued-jobs limit reached: user `alice` has 2 of 2 (limit from USER_DEFAULT)"
        );
        let e = c
            .admit("carol", "ml", &limits(None, Some(5), None))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "queued-jobs limit reached: org `ml` has 5 of 5 (limit from ORG)"
        );
        assert_eq!(c.counts[&ScopeKey::Global], 2);
    }
}
