//! Which replica dispatches when several share one PostgreSQL database.
//!
//! Choice: a leader lease row (`leader_lease`, name `dispatch`: holder id
//! and expiry, TTL `--leader-lease-ttl-secs`, default 5 s, renewed every
//! fifth of it). Only the leader runs dispatch rounds, runner-lease expiry
//! and the approval sweep. Each dispatch transaction starts with a fenced
//! write — `UPDATE leader_lease … WHERE holder = me AND expires_at > now` —
//! and gives up unless it touched the row. That row lock is held until the
//! dispatch commits, so a takeover by another replica waits for it, and a
//! deposed leader can never commit a dispatch after the new leader read its
//! snapshot: no double dispatch, no limit exceeded. (SKIP LOCKED row claims
//! would let two replicas plan against the same limits concurrently, and
//! limits are sums over many rows, which row locks do not protect.)
//!
//! RPC handlers (enqueue, reports, heartbeats, approvals, cancels) run on
//! any replica with compare-and-set updates; they only add work or free
//! capacity, which a leader's snapshot can safely miss until its next round.
//! On a replica that is not the leader, a runner's long-poll re-reads its
//! assignments every [`crate::REPLICA_POLL`] (100 ms), since the leader's
//! in-process wake-ups do not cross processes; likewise the leader notices
//! work enqueued on another replica at its next sweep (`--sweep-interval-ms`).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use sqlx::AnyConnection;
use trainmesh_common::server::ShutdownWatch;

use crate::error::Result;
use crate::service::{micros, Scheduler};

const LEASE: &str = "dispatch";

/// This replica's identity and its belief about holding the lease.
#[derive(Debug)]
pub struct Leader {
    pub id: String,
    /// Until when (scheduler clock, µs) this replica believes it leads; the
    /// fenced write, not this belief, is what makes dispatch safe.
    until: AtomicI64,
}

impl Default for Leader {
    fn default() -> Self {
        Self::new()
    }
}

impl Leader {
    pub fn new() -> Self {
        Leader {
            id: uuid::Uuid::new_v4().to_string(),
            until: AtomicI64::new(0),
        }
    }

    pub fn believes(&self, now: i64) -> bool {
        self.until.load(Ordering::SeqCst) > now
    }

    pub(crate) fn forget(&self) {
        self.until.store(0, Ordering::SeqCst);
    }
}

/// The fenced write at the start of a dispatch transaction: true while
/// this replica holds the lease; the row stays locked until commit.
pub async fn fence(conn: &mut AnyConnection, me: &str, now: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE leader_lease SET expires_at = expires_at \
         WHERE name = $1 AND holder = $2 AND expires_at > $3",
    )
    .bind(LEASE)
    .bind(me)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

impl Scheduler {
    pub fn is_leader(&self) -> bool {
        self.leader.believes(self.now())
    }

    /// Takes or renews the lease; true when this replica holds it now.
    pub async fn try_lead(&self) -> Result<bool> {
        let now = self.now();
        let ttl = micros(self.settings.leader_ttl);
        let expires = now.saturating_add(ttl);
        let row = sqlx::query(
            "INSERT INTO leader_lease (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at \
             WHERE leader_lease.holder = excluded.holder OR leader_lease.expires_at <= $4 \
             RETURNING holder",
        )
        .bind(LEASE)
        .bind(&self.leader.id)
        .bind(expires)
        .bind(now)
        .fetch_optional(&self.db.write)
        .await?;
        let won = row.is_some();
        let was = self.leader.believes(now);
        if won {
            // Believe a little less than the lease so a slow renewal ends
            // the belief before the lease ends for others.
            self.leader
                .until
                .store(now.saturating_add(ttl * 4 / 5), Ordering::SeqCst);
            if !was {
                tracing::info!(replica = %self.leader.id, "this replica now dispatches (leader)");
                self.wake_dispatcher();
            }
        } else {
            if was {
                tracing::warn!(replica = %self.leader.id, "lost the dispatch leadership");
            }
            self.leader.forget();
        }
        Ok(won)
    }

    /// Leads when it can; true when this replica may run a dispatch round.
    pub(crate) async fn ensure_leader(&self) -> Result<bool> {
        let now = self.now();
        let half = micros(self.settings.leader_ttl) / 2;
        if self.leader.believes(now.saturating_add(half)) {
            return Ok(true);
        }
        self.try_lead().await
    }

    /// Renews the lease every fifth of its TTL until shutdown. A replica
    /// that does not lead tries again as soon as the holder's lease runs
    /// out (when that is sooner), so a dead leader is replaced within a
    /// TTL of its last renewal rather than up to a fifth later.
    pub async fn run_leader_lease(self: Arc<Self>, mut shutdown: ShutdownWatch) {
        let every = self.settings.leader_ttl / 5;
        loop {
            let next = match self.try_lead().await {
                Ok(true) => every,
                Ok(false) => self.until_lease_ends().await.unwrap_or(every).min(every),
                Err(e) => {
                    tracing::warn!(error = %e, "leader lease renewal failed");
                    every
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    /// How long until the current holder's lease ends (a millisecond past
    /// it), or `None` when that cannot be read.
    async fn until_lease_ends(&self) -> Option<std::time::Duration> {
        let expires: i64 =
            sqlx::query_scalar("SELECT expires_at FROM leader_lease WHERE name = $1")
                .bind(LEASE)
                .fetch_optional(&self.db.read)
                .await
                .ok()??;
        let micros_left = expires.saturating_sub(self.now()).max(0);
        Some(std::time::Duration::from_micros(micros_left as u64 + 1_000))
    }

    /// Gives the lease up at shutdown so another replica takes over at once.
    pub async fn resign(&self) {
        self.leader.forget();
        let res =
            sqlx::query("UPDATE leader_lease SET expires_at = 0 WHERE name = $1 AND holder = $2")
                .bind(LEASE)
                .bind(&self.leader.id)
                .execute(&self.db.write)
                .await;
        if let Err(e) = res {
            tracing::debug!(error = %e, "could not resign the leader lease");
        }
    }
}
