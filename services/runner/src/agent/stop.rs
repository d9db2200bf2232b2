//! A stopped runner: drain, hand back, deregister — and, while it runs,
//! the sweep of ended attempts' directories.

use std::time::Duration;

use tokio::task::JoinSet;
use tracing::Instrument;
use trainmesh_common::proto::runner::v1::{DeregisterRunnerRequest, DrainRunnerRequest};

use super::{lock, log_join, Agent};
use crate::attempt::StopReason;
use crate::config::OnStop;
use crate::domain::AttemptKey;
use crate::retention;
use crate::rpc::{is_permanent, request, Backoff, Peers};

/// Per-call deadline of the calls a stopping runner makes: it should not
/// hang on a scheduler that is going away too.
const STOP_CALL_TIMEOUT: Duration = Duration::from_secs(5);

impl Agent {
    /// A stopped runner takes no more work (the acquire loop has ended),
    /// tells the scheduler, which then places nothing more here and takes
    /// back what it placed but this runner does not run; then lets the
    /// attempts end or hands them back, by `on_stop`. Nothing is cancelled:
    /// a handed-back attempt runs again without using its job's budget.
    pub(super) async fn drain(&self, attempts: &mut JoinSet<()>) {
        // Probes see it first: a draining runner takes no work, however
        // long its attempts take to end.
        self.health.set_stopping();
        let running: Vec<AttemptKey> = lock(&self.active).keys().copied().collect();
        tracing::info!(
            attempts = running.len(),
            on_stop = self.config.on_stop.as_str(),
            "runner stopping: draining"
        );
        if let Some(reg) = self.registrar.current() {
            drain_at_scheduler(&self.ctx.peers, &reg.runner_id, &running).await;
        }
        if self.config.on_stop == OnStop::Wait && !attempts.is_empty() {
            let wait = self.config.drain_timeout;
            tracing::info!(
                attempts = attempts.len(),
                wait_s = wait.as_secs_f64(),
                "waiting for running attempts to end"
            );
            let all_done = async {
                while let Some(r) = attempts.join_next().await {
                    log_join(r);
                }
            };
            // A timeout too large for the clock means waiting for good.
            match tokio::time::Instant::now().checked_add(wait) {
                Some(deadline) => {
                    let _ = tokio::time::timeout_at(deadline, all_done).await;
                }
                None => all_done.await,
            }
        }
        let left: Vec<AttemptKey> = lock(&self.active).keys().copied().collect();
        if !left.is_empty() {
            tracing::info!(
                attempts = left.len(),
                "handing back the attempts still running"
            );
        }
        for a in lock(&self.active).values() {
            a.stop.send_if_modified(|r| {
                let first = r.is_none();
                if first {
                    *r = Some(StopReason::HandBack);
                }
                first
            });
        }
        while let Some(r) = attempts.join_next().await {
            log_join(r);
        }
    }

    /// Ends the registration, so the scheduler frees the runner now rather
    /// than when its lease runs out. Best effort: the lease does it anyway.
    pub(super) async fn deregister(&self) {
        let Some(reg) = self.registrar.current() else {
            return;
        };
        let req = DeregisterRunnerRequest {
            runner_id: reg.runner_id.clone(),
        };
        match self
            .ctx
            .peers
            .scheduler
            .clone()
            .deregister_runner(request(req, STOP_CALL_TIMEOUT))
            .await
        {
            Ok(resp) => {
                let left = resp.into_inner().requeued.len();
                tracing::info!(
                    runner_id = %reg.runner_id,
                    handed_back = left,
                    "deregistered from the scheduler"
                );
            }
            Err(s) => tracing::warn!(code = ?s.code(), detail = s.message(),
                "cannot deregister; the scheduler frees this runner when its lease runs out"),
        }
    }

    /// Sweeps ended attempts' directories while the runner runs.
    pub(super) fn spawn_retention(&self) -> tokio::task::JoinHandle<()> {
        let keep = self.config.attempt_dir_keep;
        let work_dir = self.ctx.work_dir.clone();
        let active = self.active.clone();
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(retention::interval(keep));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let (dir, active) = (work_dir.clone(), active.clone());
                    let swept = tokio::task::spawn_blocking(move || {
                        retention::sweep(&dir, keep, std::time::SystemTime::now(), |k| {
                            lock(&active).contains_key(k)
                        })
                    })
                    .await;
                    match swept {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(
                            removed = n,
                            keep_s = keep.as_secs(),
                            "removed ended attempts' directories"
                        ),
                        Err(e) => tracing::error!(error = %e, "attempt directory sweep failed"),
                    }
                }
            }
            .in_current_span(),
        )
    }
}

/// Tells the scheduler this runner takes no more work, listing what it
/// runs; retried briefly. Without it the scheduler learns only from the
/// deregistration or the lease, and may place work here meanwhile.
async fn drain_at_scheduler(peers: &Peers, runner_id: &str, running: &[AttemptKey]) {
    let req = DrainRunnerRequest {
        runner_id: runner_id.to_owned(),
        active: running.iter().map(|k| k.to_ref()).collect(),
    };
    let started = tokio::time::Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        let call = peers
            .scheduler
            .clone()
            .drain_runner(request(req.clone(), STOP_CALL_TIMEOUT))
            .await;
        match call {
            Ok(resp) => {
                let requeued = resp.into_inner().requeued;
                tracing::info!(
                    runner_id,
                    requeued = requeued.len(),
                    "the scheduler places nothing more on this runner"
                );
                return;
            }
            Err(s) if is_permanent(s.code()) => {
                tracing::warn!(code = ?s.code(), detail = s.message(), "the scheduler refused the drain");
                return;
            }
            Err(s) => {
                let delay = backoff.next_delay();
                if started.elapsed() + delay > STOP_CALL_TIMEOUT {
                    tracing::warn!(code = ?s.code(), detail = s.message(),
                        "cannot tell the scheduler this runner is draining; going on");
                    return;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}
