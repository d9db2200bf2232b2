//! Fencing: a runner cut off from the scheduler stops its attempts before
//! the scheduler declares them lost and runs them on another runner, so
//! that a job never runs twice at once.
//!
//! The scheduler declares a runner lost `lease_ttl` after it *received*
//! the runner's last heartbeat. The runner cannot know that moment, but it
//! knows when it *sent* that heartbeat, which was earlier: a deadline
//! measured from the send time is never later than the scheduler's.
//!
//! - At [`FENCE_AT`] of the TTL after the last successful renewal was sent,
//!   the runner fences itself: it stops every attempt (reason lease lost),
//!   starts none, and asks for no work. With the default 15 s TTL and 5 s
//!   heartbeats, that is 10 s: two heartbeats have failed by then, so a
//!   single lost packet does not stop training.
//! - The attempts get SIGTERM at once and SIGKILL by [`KILL_BY`] of the TTL
//!   (12.5 s at 15 s), however long their own grace: a job that saves a
//!   checkpoint on SIGTERM gets what time there is.
//! - The last sixth (2.5 s at 15 s) is for the kill to take effect, for
//!   backends that count the grace in whole seconds and round it up, and
//!   for a late timer; the scheduler checks leases on a sweep, which only
//!   adds to it.
//!
//! Fencing earlier would stop attempts on brief blips; later would leave
//! no time for a grace. A scheduler that answers NOT_FOUND has already
//! let the lease go, and fences at once, with no grace.
//!
//! The fence lifts when a renewal succeeds again (a heartbeat, or the
//! registration that follows a NOT_FOUND): the runner then takes new work.
//! Stopped attempts are reported FAILED (`runner-lost`), never SUCCEEDED;
//! the scheduler may refuse those reports (the attempt is already lost),
//! which ends them (see `attempt::Reporter`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use super::{lock, ActiveMap};
use crate::attempt::StopReason;
use crate::health::Health;

/// Fraction of the lease TTL, as (numerator, denominator), after which an
/// unrenewed lease fences the runner.
pub const FENCE_AT: (u32, u32) = (2, 3);
/// Fraction of the lease TTL by which fenced attempts are killed.
pub const KILL_BY: (u32, u32) = (5, 6);

/// A successful renewal of the lease: when its call was sent, and the TTL
/// the scheduler gave (zero: it named none, and nothing is fenced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewal {
    pub sent: Instant,
    pub ttl: Duration,
}

impl Renewal {
    /// When the runner fences itself unless renewed; `None` without a TTL.
    pub fn fence_at(&self) -> Option<Instant> {
        self.at(FENCE_AT)
    }

    /// By when fenced attempts must be dead.
    pub fn kill_by(&self) -> Option<Instant> {
        self.at(KILL_BY)
    }

    fn at(&self, (num, den): (u32, u32)) -> Option<Instant> {
        if self.ttl.is_zero() {
            return None;
        }
        self.sent.checked_add(self.ttl * num / den)
    }
}

/// The runner's hold on its lease, as far as it can tell.
pub(super) struct Lease {
    renewal: watch::Sender<Option<Renewal>>,
    /// `Some(kill_by)` while fenced.
    fenced: watch::Sender<Option<Instant>>,
    active: ActiveMap,
    health: Health,
}

impl Lease {
    pub(super) fn new(active: ActiveMap, health: Health) -> Self {
        Self {
            renewal: watch::channel(None).0,
            fenced: watch::channel(None).0,
            active,
            health,
        }
    }

    /// A call that renews the lease, sent at `sent`, succeeded.
    pub(super) fn renewed(&self, sent: Instant, ttl: Duration) {
        self.renewal.send_if_modified(|r| {
            // Concurrent calls may answer out of order; the lease runs
            // from the latest one sent.
            if r.is_some_and(|r| r.sent >= sent) {
                return false;
            }
            *r = Some(Renewal { sent, ttl });
            true
        });
        self.health.set_lease(true);
    }

    /// A call that renews the lease failed.
    pub(super) fn renewal_failed(&self) {
        self.health.set_lease(false);
    }

    /// The scheduler no longer knows this runner: it has let the lease go
    /// and may already run these attempts elsewhere.
    pub(super) fn lost(&self) {
        self.fence(Instant::now(), "the scheduler no longer knows this runner");
    }

    /// While fenced, what an attempt starting now must be stopped with.
    pub(super) fn fenced(&self) -> Option<StopReason> {
        (*self.fenced.borrow()).map(|kill_by| StopReason::LeaseLost { kill_by })
    }

    /// Resolves once the runner is not fenced.
    pub(super) async fn unfenced(&self) {
        let mut f = self.fenced.subscribe();
        let _ = f.wait_for(Option::is_none).await;
    }

    /// Stops every running attempt; attempts started from now on are
    /// stopped as they start (see `Agent::start`), until a renewal.
    fn fence(&self, kill_by: Instant, why: &str) {
        // Also when a renewal did arrive, but too late to count: a fenced
        // runner takes no work.
        self.health.set_lease(false);
        let fresh = self.fenced.send_if_modified(|f| {
            let first = f.is_none();
            if first {
                *f = Some(kill_by);
            }
            first
        });
        let reason = StopReason::LeaseLost { kill_by };
        // The fence is up before the attempts are read, and they are read
        // under the lock `start` reads the fence under: an attempt started
        // meanwhile is either seen here or sees the fence.
        let stopped = lock(&self.active)
            .values()
            .filter(|a| {
                a.stop.send_if_modified(|r| {
                    let first = r.is_none();
                    if first {
                        *r = Some(reason);
                    }
                    first
                })
            })
            .count();
        if fresh || stopped > 0 {
            tracing::warn!(
                reason = why,
                attempts = stopped,
                kill_in_ms = kill_by
                    .saturating_duration_since(Instant::now())
                    .as_millis() as u64,
                "lease lost: stopping every attempt, taking no work until the scheduler answers"
            );
        }
    }

    fn unfence(&self) {
        let lifted = self.fenced.send_if_modified(|f| f.take().is_some());
        if lifted {
            tracing::info!("the lease is renewed: taking work again");
        }
    }

    /// Fences the runner when its lease goes unrenewed past
    /// [`Renewal::fence_at`], and lifts the fence on a renewal. Runs until
    /// aborted.
    pub(super) fn spawn_enforcer(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let lease = self.clone();
        tokio::spawn(async move { lease.enforce().await }.in_current_span())
    }

    async fn enforce(&self) {
        let mut renewals = self.renewal.subscribe();
        loop {
            let renewal = *renewals.borrow_and_update();
            if let Some((fence_at, kill_by)) =
                renewal.and_then(|r| Some((r.fence_at()?, r.kill_by()?)))
            {
                if fence_at > Instant::now() {
                    self.unfence();
                    tokio::select! {
                        _ = tokio::time::sleep_until(fence_at) => {}
                        changed = renewals.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                }
                let silent = renewal
                    .map(|r| r.sent.elapsed().as_secs_f64())
                    .unwrap_or_default();
                self.fence(
                    kill_by,
                    &format!("no heartbeat has succeeded for {silent:.1}s"),
                );
            } else if renewal.is_some() {
                // The scheduler names no TTL: nothing to fence against.
                self.unfence();
            }
            if renewals.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_lease_fences_at_ten_seconds_and_kills_by_twelve_and_a_half() {
        let sent = Instant::now();
        let r = Renewal {
            sent,
            ttl: Duration::from_secs(15),
        };
        assert_eq!(r.fence_at(), Some(sent + Duration::from_secs(10)));
        assert_eq!(r.kill_by(), Some(sent + Duration::from_millis(12_500)));
        // Both before the earliest moment the scheduler can let it go.
        assert!(r.kill_by().unwrap() < sent + r.ttl);
    }

    #[test]
    fn a_lease_without_a_ttl_is_never_fenced() {
        let r = Renewal {
            sent: Instant::now(),
            ttl: Duration::ZERO,
        };
        assert_eq!(r.fence_at(), None);
        assert_eq!(r.kill_by(), None);
    }
}
