//! The dispatch loop: woken by events (enqueue, finish, register,
//! heartbeat, acquire) with a periodic sweep as the safety net. Only the
//! leader replica (see [`crate::leader`]) runs rounds. Each round expires
//! dead runners' leases ([`crate::leases`]) and due approvals (so an
//! expired approval is closed exactly when dispatch looks at the queue),
//! then plans over the leader's copy of the waiting queue
//! ([`crate::queue_cache`]) and applies the plan, one fenced transaction per
//! batch of placements.

use std::collections::HashMap;
use std::sync::Arc;

use trainmesh_common::server::ShutdownWatch;

use crate::domain::{AttemptStatus, EntryState, JobId};
use crate::error::Result;
use crate::handoff;
use crate::leader;
use crate::plan::{plan, Placement};
use crate::repo::{self, Delivery, EntryRow, NewAssignment};
use crate::service::{job_span, status, Scheduler};

/// Placements applied per transaction.
const DISPATCH_BATCH: usize = 64;

impl Scheduler {
    /// Runs until shutdown. Only the leader dispatches and expires leases,
    /// so a plan is never applied against capacity that a concurrent
    /// dispatch took.
    pub async fn run_dispatcher(self: Arc<Self>, mut shutdown: ShutdownWatch) {
        let mut led = false;
        loop {
            let leads = self.ensure_leader().await;
            if !matches!(leads, Ok(true)) || !led {
                // Not leading, or newly leading: what the queue copy holds
                // may be old; the next round loads it whole.
                self.queue.lock().await.invalidate();
            }
            led = matches!(leads, Ok(true));
            match leads {
                Ok(true) => {
                    // Two reads that nearly always find nothing: together.
                    let (leases, approvals) =
                        tokio::join!(self.expire_leases(), self.expire_due_approvals());
                    if let Err(e) = leases {
                        tracing::warn!(error = %e, "lease expiry round failed");
                    }
                    if let Err(e) = approvals {
                        tracing::warn!(error = %e, "approval expiry round failed");
                    }
                    if let Err(e) = self.dispatch_once().await {
                        tracing::warn!(error = %e, "dispatch round failed");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader lease check failed"),
            }
            tokio::select! {
                _ = self.dispatch_wake.notified() => {}
                _ = tokio::time::sleep(self.settings.sweep_interval) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    /// One planning round; returns how many jobs were dispatched.
    pub async fn dispatch_once(&self) -> Result<usize> {
        let started = std::time::Instant::now();
        let mut queue = self.queue.lock().await;
        queue.refresh(&self.db).await?;
        let refreshed = started.elapsed();
        let snapshot = self.snapshot_of(queue.waiting().values(), true).await?;
        if snapshot.queued.is_empty() || snapshot.runners.is_empty() {
            return Ok(0);
        }
        let read = started.elapsed();
        let p = plan(&snapshot);
        let planned = started.elapsed();
        let mut done = 0;
        // Several placements per transaction: one fence and one commit
        // (fsync) for up to DISPATCH_BATCH jobs.
        for batch in p.placements.chunks(DISPATCH_BATCH) {
            match self.apply_batch(batch, queue.waiting()).await? {
                Some(n) => done += n,
                None => break,
            }
        }
        if done > 0 {
            self.relay.notify();
        }
        tracing::debug!(
            waiting = snapshot.queued.len(),
            planned = p.placements.len(),
            dispatched = done,
            refresh_ms = refreshed.as_secs_f64() * 1e3,
            snapshot_ms = (read - refreshed).as_secs_f64() * 1e3,
            plan_ms = (planned - read).as_secs_f64() * 1e3,
            apply_ms = (started.elapsed() - planned).as_secs_f64() * 1e3,
            "dispatch round"
        );
        Ok(done)
    }

    /// Applies placements in one fenced transaction; `None` when this
    /// replica is no longer the leader (nothing was applied). A handful of
    /// statements for the whole batch, whatever its size.
    async fn apply_batch(
        &self,
        batch: &[Placement],
        entries: &HashMap<JobId, EntryRow>,
    ) -> Result<Option<usize>> {
        let now = self.now();
        let mut tx = self.db.begin_write().await?;
        if !leader::fence(&mut tx, &self.leader.id, now).await? {
            self.leader.forget();
            tracing::warn!("dispatch refused: this replica no longer holds the leader lease");
            return Ok(None);
        }
        let mut live = HashMap::new();
        let mut wanted = Vec::with_capacity(batch.len());
        for p in batch {
            let Some(entry) = entries.get(&p.job_id) else {
                continue;
            };
            let name = match live.get(&p.runner_id) {
                Some(l) => l,
                None => {
                    // A draining runner takes nothing, however recent the plan.
                    let l =
                        repo::runner_takes_work(&mut tx, self.db.backend, p.runner_id, now).await?;
                    live.entry(p.runner_id).or_insert(l)
                }
            };
            if name.is_some() {
                wanted.push((p, entry));
            }
        }
        let pairs: Vec<_> = wanted
            .iter()
            .map(|(p, _)| (p.job_id, p.runner_id))
            .collect();
        // Entries cancelled since the snapshot do not move.
        let mut moved = repo::dispatch_entries(&mut tx, &pairs, now).await?;
        let mut applied: Vec<_> = wanted
            .into_iter()
            .filter_map(|(p, entry)| Some((p, entry, moved.remove(&p.job_id)?)))
            .collect();
        let (claims, handed) =
            handoff::claim_for(&self.waiters, applied.iter().map(|(p, _, _)| p.runner_id));
        let assignments: Vec<_> = applied
            .iter()
            .zip(&handed)
            .map(|((p, entry, d), &delivered)| NewAssignment {
                job_id: p.job_id,
                attempt: d.attempt,
                runner_id: p.runner_id,
                gpu_indexes: &p.gpu_indexes,
                demand: &entry.demand,
                waited: d.waited,
                delivered,
            })
            .collect();
        repo::insert_assignments(&mut tx, &assignments, now).await?;
        let updates: Vec<_> = applied
            .iter()
            .map(|(p, entry, d)| {
                let mut update = status(EntryState::Scheduled, d.attempt, now);
                update.attempt_state = AttemptStatus::Scheduled.proto() as i32;
                update.runner_id = p.runner_id.to_string();
                update.runner_name = live
                    .get(&p.runner_id)
                    .cloned()
                    .flatten()
                    .unwrap_or_default();
                update.job_id = p.job_id.to_string();
                update.scheduler_sequence = d.status_seq;
                (entry.correlation_id.as_str(), update)
            })
            .collect();
        repo::enqueue_statuses(&mut tx, &updates).await?;
        tx.commit().await?;
        for (claim, indexes) in claims {
            let deliveries = indexes
                .into_iter()
                .map(|i| {
                    let (p, entry, d) = &mut applied[i];
                    Delivery {
                        job_id: p.job_id,
                        attempt: d.attempt,
                        gpu_indexes: p.gpu_indexes.clone(),
                        owner: entry.owner.clone(),
                        org: entry.org.clone(),
                        spec: std::mem::take(&mut d.spec),
                        correlation_id: entry.correlation_id.clone(),
                    }
                })
                .collect();
            claim.hand(deliveries);
        }
        for (p, entry, d) in &applied {
            job_span(entry.job_id, &entry.correlation_id).in_scope(|| {
                tracing::info!(
                    runner_id = %p.runner_id,
                    attempt = d.attempt,
                    gpus = ?p.gpu_indexes,
                    owner = %entry.owner,
                    "job dispatched"
                )
            });
            self.wake_runner(p.runner_id);
        }
        Ok(Some(applied.len()))
    }
}
