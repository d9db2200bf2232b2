//! Hands new assignments straight to a runner's waiting long-poll.
//!
//! Without it, an assignment reaches its runner in two writes: the
//! dispatch that creates it, then the long-poll's own transaction that
//! marks it delivered. When the runner is already waiting, the dispatch
//! claims the waiting call, creates the assignments it hands over as
//! delivered in its own transaction, and gives them to the call after the
//! commit: one write (and one fsync) less on the way from submit to
//! runner.
//!
//! Delivery stays at least once, as before: a call that goes away after
//! it was claimed (its client disconnected) loses what it was handed, as a
//! lost response would; the runner's heartbeats then stop listing those
//! attempts and they are declared lost and retried.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::domain::RunnerId;
use crate::repo::Delivery;

/// The long-poll calls waiting for assignments, one per runner (a newer
/// call of the same runner replaces an older one, which then reads from
/// the database as it did before).
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<RunnerId, Waiter>>,
    next_token: AtomicU64,
}

#[derive(Debug)]
struct Waiter {
    token: u64,
    max: usize,
    tx: oneshot::Sender<Vec<Delivery>>,
}

/// A waiting call's place in [`Waiters`]; leaving it on drop.
#[derive(Debug)]
pub(crate) struct Registration<'a> {
    waiters: &'a Waiters,
    runner: RunnerId,
    token: u64,
    /// `None` once it has answered (a oneshot must not be polled again).
    rx: Option<oneshot::Receiver<Vec<Delivery>>>,
}

/// A claimed call: what the dispatch may hand it, once committed.
#[derive(Debug)]
pub(crate) struct Claim {
    pub max: usize,
    tx: oneshot::Sender<Vec<Delivery>>,
}

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, HashMap<RunnerId, Waiter>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a call of `runner` in line for at most `max` assignments.
    pub fn register(&self, runner: RunnerId, max: usize) -> Registration<'_> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(runner, Waiter { token, max, tx });
        Registration {
            waiters: self,
            runner,
            token,
            rx: Some(rx),
        }
    }

    /// Takes `runner`'s waiting call out of line, if there is one still
    /// listening.
    pub fn claim(&self, runner: RunnerId) -> Option<Claim> {
        let w = self.lock().remove(&runner)?;
        if w.tx.is_closed() || w.max == 0 {
            return None;
        }
        Some(Claim {
            max: w.max,
            tx: w.tx,
        })
    }
}

/// Claims the waiting call of each runner in `runners` (the runner of
/// each new attempt, in order). Returns the claims, each with the indexes
/// of the attempts it takes (at most its `max`, first ones first), and per
/// attempt whether it is handed over, so stored as delivered.
pub(crate) fn claim_for(
    waiters: &Waiters,
    runners: impl Iterator<Item = RunnerId>,
) -> (Vec<(Claim, Vec<usize>)>, Vec<bool>) {
    let mut by_runner: HashMap<RunnerId, Vec<usize>> = HashMap::new();
    let mut handed = Vec::new();
    for (i, runner) in runners.enumerate() {
        by_runner.entry(runner).or_default().push(i);
        handed.push(false);
    }
    let mut claims = Vec::new();
    for (runner, mut indexes) in by_runner {
        let Some(claim) = waiters.claim(runner) else {
            continue;
        };
        indexes.truncate(claim.max);
        for &i in &indexes {
            handed[i] = true;
        }
        claims.push((claim, indexes));
    }
    (claims, handed)
}

impl Claim {
    /// Gives the call its assignments (after they were committed).
    /// Dropping a claim instead tells the call to look in the database.
    pub fn hand(self, deliveries: Vec<Delivery>) {
        let _ = self.tx.send(deliveries);
    }
}

impl Registration<'_> {
    /// Assignments handed to this call, once a dispatch claimed it and
    /// committed; empty when the claim came to nothing (the call should
    /// look in the database again).
    /// Cancel-safe: dropped before it answers, it can be awaited again.
    pub async fn handed(&mut self) -> Vec<Delivery> {
        let Some(rx) = self.rx.as_mut() else {
            return Vec::new();
        };
        let got = rx.await.unwrap_or_default();
        self.rx = None;
        got
    }

    /// Leaves the line. If a dispatch claimed this call meanwhile, waits
    /// for what it hands over (it is committing), so nothing handed is
    /// dropped.
    pub async fn withdraw(mut self) -> Vec<Delivery> {
        if self.leave() {
            return Vec::new();
        }
        self.handed().await
    }

    /// Removes this call's entry; false when it is no longer there
    /// (claimed, or replaced by a newer call).
    fn leave(&self) -> bool {
        let mut map = self.waiters.lock();
        match map.get(&self.runner) {
            Some(w) if w.token == self.token => {
                map.remove(&self.runner);
                true
            }
            _ => false,
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::JobId;

    fn delivery() -> Delivery {
        Delivery {
            job_id: JobId::new(),
            attempt: 1,
            gpu_indexes: vec![0],
            owner: "alice".into(),
            org: "ml".into(),
            spec: Vec::new(),
            correlation_id: "c".into(),
        }
    }

    #[tokio::test]
    async fn a_claimed_call_gets_what_is_handed_even_while_withdrawing() {
        let w = Waiters::default();
        let runner = RunnerId::new();
        let reg = w.register(runner, 4);
        let claim = w.claim(runner).expect("a waiting call");
        assert_eq!(claim.max, 4);
        let d = delivery();
        let job = d.job_id;
        // The claim is handed only after the call started to withdraw.
        let (got, ()) = tokio::join!(reg.withdraw(), async move {
            tokio::task::yield_now().await;
            claim.hand(vec![d]);
        });
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].job_id, job);
    }

    #[tokio::test]
    async fn an_unclaimed_call_withdraws_with_nothing_and_cannot_be_claimed_after() {
        let w = Waiters::default();
        let runner = RunnerId::new();
        let reg = w.register(runner, 4);
        assert!(reg.withdraw().await.is_empty());
        assert!(w.claim(runner).is_none());
    }

    #[tokio::test]
    async fn a_dropped_claim_sends_the_call_back_to_the_database() {
        let w = Waiters::default();
        let runner = RunnerId::new();
        let mut reg = w.register(runner, 4);
        drop(w.claim(runner));
        assert!(reg.handed().await.is_empty());
    }

    #[tokio::test]
    async fn a_call_that_was_answered_withdraws_with_nothing_more() {
        let w = Waiters::default();
        let runner = RunnerId::new();
        let mut reg = w.register(runner, 4);
        w.claim(runner).expect("waiting").hand(vec![delivery()]);
        assert_eq!(reg.handed().await.len(), 1);
        assert!(
            reg.handed().await.is_empty(),
            "asked again after the answer"
        );
        assert!(reg.withdraw().await.is_empty());
    }

    #[test]
    fn attempts_go_to_waiting_runners_up_to_their_max_and_the_rest_stay() {
        let w = Waiters::default();
        let (a, b, c) = (RunnerId::new(), RunnerId::new(), RunnerId::new());
        let _waits_for_one = w.register(a, 1);
        let _waits_for_many = w.register(c, 8);
        // b has no waiting call.
        let (claims, handed) = claim_for(&w, [a, b, a, c, c].into_iter());
        assert_eq!(handed, [true, false, false, true, true]);
        let mut taken: Vec<(usize, Vec<usize>)> =
            claims.into_iter().map(|(c, i)| (c.max, i)).collect();
        taken.sort();
        assert_eq!(taken, [(1, vec![0]), (8, vec![3, 4])]);
        assert!(w.claim(a).is_none(), "a claimed call is out of line");
    }

    #[test]
    fn a_gone_or_replaced_call_is_not_claimed() {
        let w = Waiters::default();
        let runner = RunnerId::new();
        drop(w.register(runner, 4));
        assert!(w.claim(runner).is_none(), "the dropped call left the line");
        let old = w.register(runner, 4);
        let _new = w.register(runner, 2);
        let claim = w.claim(runner).expect("the newer call");
        assert_eq!(claim.max, 2);
        drop(old);
    }
}
