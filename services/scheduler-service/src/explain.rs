//! "Why isn't my job running": the queue with positions, reasons and
//! estimated waits, per-job explanations listing every blocking cause with
//! what would unblock it, and queue statistics. All of it reads the same
//! [`crate::plan::plan`] the dispatcher acts on.
//!
//! Estimated wait (documented, deliberately simple): the mean run time of
//! attempts that finished in the last hour × ceil(position ÷ max(1, jobs
//! running now)). Unknown (unset) when nothing finished in the last hour,
//! or when the job waits on a person (approval, queue hold).

use std::time::Duration;

use crate::domain::{EntryState, JobId};
use crate::error::{Error, Result};
use crate::limits::{LimitKind, Scope};
use crate::plan::{plan, Cause, WaitReason};
use crate::repo::{self, EntryRow};
use crate::retry_record::Record;
use crate::service::{usage_of, QueueItem, QueueStats, Scheduler, UserStats};

const HOUR: i64 = 3_600_000_000;

/// A blocking cause with what would lift it.
#[derive(Clone, Debug)]
pub struct Explained {
    pub cause: Cause,
    pub unblock: String,
    pub scope: Option<Scope>,
    pub limit: i64,
    pub current: i64,
}

#[derive(Clone, Debug)]
pub struct Explanation {
    pub entry: EntryRow,
    pub causes: Vec<Explained>,
    pub position: u32,
    pub estimated_wait: Option<Duration>,
    pub summary: String,
    /// The decision after the job's latest failed attempt.
    pub last_retry: Option<Record>,
}

fn estimate(
    mean_run: Option<i64>,
    position: u32,
    running: u32,
    reason: &WaitReason,
) -> Option<Duration> {
    if matches!(
        reason,
        WaitReason::Held | WaitReason::AwaitingApproval { .. }
    ) {
        return None;
    }
    let mean = mean_run?;
    let slots = i64::from(running.max(1));
    let rounds = (i64::from(position) + slots - 1) / slots;
    Some(Duration::from_micros(
        u64::try_from(mean.saturating_mul(rounds)).unwrap_or(0),
    ))
}

impl Scheduler {
    /// Waiting jobs in queue order with the plan's reason, then the ones
    /// that are starting, scheduled or running. `owner` restricts the result.
    pub async fn queue(&self, owner: Option<&str>) -> Result<Vec<QueueItem>> {
        let planned = self.snapshot().await?;
        let p = plan(&planned.snapshot);
        let (_, mean_run) = repo::recent_times(&self.db, self.now() - HOUR).await?;
        let running = planned.snapshot.global.running;
        let mut entries = planned.entries;
        let mut items = Vec::new();
        for w in &p.waiting {
            if let Some(entry) = entries.remove(&w.job_id) {
                items.push(QueueItem {
                    entry,
                    position: w.position,
                    estimated_wait: estimate(mean_run, w.position, running, &w.reason),
                    effective_priority: w.effective_priority,
                    waiting: Some(w.clone()),
                });
            }
        }
        for s in &p.placements {
            if let Some(entry) = entries.remove(&s.job_id) {
                let effective_priority = i64::from(entry.priority);
                items.push(QueueItem {
                    entry,
                    position: 0,
                    waiting: None,
                    effective_priority,
                    estimated_wait: Some(Duration::ZERO),
                });
            }
        }
        let mut active =
            repo::entries_in(&self.db, &[EntryState::Scheduled, EntryState::Running]).await?;
        active.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.submit_time.cmp(&b.submit_time))
                .then(a.job_id.cmp(&b.job_id))
        });
        items.extend(active.into_iter().map(|entry| QueueItem {
            effective_priority: i64::from(entry.priority),
            entry,
            position: 0,
            waiting: None,
            estimated_wait: None,
        }));
        if let Some(owner) = owner {
            items.retain(|i| i.entry.owner == owner);
        }
        Ok(items)
    }

    /// Every cause that keeps `job_id` from starting, with what would
    /// unblock each.
    pub async fn explain(&self, job_id: JobId) -> Result<Explanation> {
        let mut x = self.explain_waiting(job_id).await?;
        x.last_retry = Record::from_json(&repo::last_retry(&self.db, job_id).await?)?;
        Ok(x)
    }

    async fn explain_waiting(&self, job_id: JobId) -> Result<Explanation> {
        let entry = {
            let mut conn = self.db.read.acquire().await?;
            repo::get_entry(&mut conn, job_id)
                .await?
                .ok_or(Error::JobNotFound(job_id))?
        };
        if !matches!(
            entry.state,
            EntryState::Queued | EntryState::AwaitingApproval
        ) || entry.cancel_requested
        {
            let summary = match entry.state {
                EntryState::Scheduled | EntryState::Running => format!(
                    "job `{job_id}` is {} (attempt {}); nothing blocks it",
                    entry.state.as_str(),
                    entry.attempt
                ),
                s if s.is_terminal() => {
                    format!("job `{job_id}` is {}; it no longer waits", s.as_str())
                }
                _ => format!("job `{job_id}` is being cancelled"),
            };
            return Ok(Explanation {
                entry,
                causes: Vec::new(),
                position: 0,
                estimated_wait: None,
                summary,
                last_retry: None,
            });
        }
        let planned = self.snapshot().await?;
        let p = plan(&planned.snapshot);
        let Some(w) = p.waiting.iter().find(|w| w.job_id == job_id) else {
            return Ok(Explanation {
                entry,
                causes: Vec::new(),
                position: 0,
                estimated_wait: Some(Duration::ZERO),
                summary: format!(
                    "job `{job_id}` can start now: a runner has capacity and no limit blocks it"
                ),
                last_retry: None,
            });
        };
        let (_, mean_run) = repo::recent_times(&self.db, self.now() - HOUR).await?;
        let running = planned.snapshot.global.running;
        let hold = repo::get_hold(&self.db).await?;
        let active =
            repo::entries_in(&self.db, &[EntryState::Scheduled, EntryState::Running]).await?;
        let mut causes = Vec::with_capacity(w.causes.len());
        for c in &w.causes {
            let (unblock, scope, limit, current) = match &c.reason {
                WaitReason::Held => (
                    format!(
                        "the queue is {}: release with `trainctl queue release` (role admin)",
                        hold.as_ref().map(|h| h.describe()).unwrap_or_else(|| "held".into())
                    ),
                    None,
                    0,
                    0,
                ),
                WaitReason::AwaitingApproval { rule } => (
                    format!(
                        "an approver (role approver) runs `trainctl approve {job_id}` (rule `{rule}`); \
                         unapproved, the job is cancelled when the approval expires"
                    ),
                    None,
                    0,
                    0,
                ),
                WaitReason::Backoff { until } => (
                    format!(
                        "the retry backoff ends in {}s; then it is dispatched like any queued job",
                        ((until - planned.snapshot.now).max(0) + 999_999) / 1_000_000
                    ),
                    None,
                    0,
                    0,
                ),
                WaitReason::GlobalLimit { kind, limit, current } => (
                    format!(
                        "{}; or an admin raises it: `trainctl limits set --scope global {}`",
                        frees(*kind, &jobs_of(&active, |_| true)),
                        flag(*kind)
                    ),
                    Some(Scope::Global),
                    i64::from(*limit),
                    i64::from(*current),
                ),
                WaitReason::OrgLimit { kind, limit, current } => (
                    format!(
                        "{}; or an admin raises it: `trainctl limits set --scope org --subject {} {}`",
                        frees(*kind, &jobs_of(&active, |e| e.org == entry.org)),
                        entry.org,
                        flag(*kind)
                    ),
                    Some(Scope::Org),
                    i64::from(*limit),
                    i64::from(*current),
                ),
                WaitReason::UserRunningLimit { limit, running, scope } => (
                    user_unblock(LimitKind::RunningJobs, &entry, &active, *scope),
                    Some(*scope),
                    i64::from(*limit),
                    i64::from(*running),
                ),
                WaitReason::UserGpuLimit { limit, in_use, scope } => (
                    user_unblock(LimitKind::Gpus, &entry, &active, *scope),
                    Some(*scope),
                    i64::from(*limit),
                    i64::from(*in_use),
                ),
                WaitReason::NoRunnerCapacity {
                    fits_any_idle_runner,
                    largest_free_gpus,
                } => {
                    let ty = if entry.demand.gpu_type.is_empty() {
                        String::new()
                    } else {
                        format!(" of type {}", entry.demand.gpu_type)
                    };
                    let base = format!(
                        "no runner has {} free GPU(s){ty} with {} CPU and {} MiB; largest free: {largest_free_gpus}",
                        entry.demand.gpus,
                        entry.demand.cpu_milli as f64 / 1000.0,
                        entry.demand.memory_mib
                    );
                    let then = if *fits_any_idle_runner {
                        "a running job finishing on a large enough runner frees room"
                    } else {
                        "a runner that large registering (no registered runner has that much in total)"
                    };
                    (format!("{base}; {then}"), None, 0, 0)
                }
                WaitReason::AvoidingRunners {
                    avoided,
                    cordoned,
                    others_fit,
                } => (avoid_unblock(avoided, cordoned, *others_fit), None, 0, 0),
            };
            causes.push(Explained {
                cause: c.clone(),
                unblock,
                scope,
                limit,
                current,
            });
        }
        let user = usage_of(&planned.snapshot, &entry.owner);
        let summary = format!(
            "job `{job_id}` waits at position {} ({} blocking cause(s)); first: {}. {} has {} running, {} GPU(s) in use",
            w.position,
            causes.len(),
            w.detail,
            entry.owner,
            user.running,
            user.gpus
        );
        Ok(Explanation {
            estimated_wait: estimate(mean_run, w.position, running, &w.reason),
            position: w.position,
            entry,
            causes,
            summary,
            last_retry: None,
        })
    }

    pub async fn stats(&self) -> Result<QueueStats> {
        let now = self.now();
        let waiting = repo::entries_in(
            &self.db,
            &[EntryState::Queued, EntryState::AwaitingApproval],
        )
        .await?;
        let active =
            repo::entries_in(&self.db, &[EntryState::Scheduled, EntryState::Running]).await?;
        let (runners, gpus_total) = repo::runner_totals(&self.db, now).await?;
        let usage = repo::active_usage(&self.db).await?;
        let (mean_wait, _) = repo::recent_times(&self.db, now - HOUR).await?;
        let held = repo::get_hold(&self.db).await?.is_some();
        let mut by_user: std::collections::HashMap<String, UserStats> = Default::default();
        let (mut queued, mut awaiting) = (0u32, 0u32);
        for e in &waiting {
            by_user.entry(e.owner.clone()).or_default().queued += 1;
            if e.state == EntryState::AwaitingApproval {
                awaiting += 1;
            } else {
                queued += 1;
            }
        }
        for e in &active {
            let u = by_user.entry(e.owner.clone()).or_default();
            u.running += 1;
            u.gpus_in_use += e.demand.gpus;
        }
        let mut by_user: Vec<(String, UserStats)> = by_user.into_iter().collect();
        by_user.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(QueueStats {
            queued,
            running: active.len() as u32,
            awaiting_approval: awaiting,
            average_wait: mean_wait.map(|m| Duration::from_micros(u64::try_from(m).unwrap_or(0))),
            held,
            by_user,
            runners,
            gpus_total,
            gpus_in_use: usage.iter().map(|u| u.gpu_indexes.len() as i64).sum(),
        })
    }
}

/// What lets a job onto runners it avoids or that are cordoned.
fn avoid_unblock(avoided: &[String], cordoned: &[(String, String)], others_fit: bool) -> String {
    let mut ways = Vec::new();
    if !avoided.is_empty() || !cordoned.is_empty() {
        let names: Vec<String> = avoided
            .iter()
            .chain(cordoned.iter().map(|(n, _)| n))
            .map(|n| format!("`trainctl runners uncordon {n}`"))
            .collect();
        ways.push(format!(
            "once the node is fixed, an admin runs {} (the job then may use it again)",
            names.join(" or ")
        ));
    }
    ways.push(if others_fit {
        "a runner it may use freeing room".to_owned()
    } else {
        "another runner large enough registering".to_owned()
    });
    ways.join("; or ")
}

fn flag(kind: LimitKind) -> &'static str {
    match kind {
        LimitKind::RunningJobs => "--max-running N",
        LimitKind::Gpus => "--max-gpus N",
        LimitKind::QueuedJobs => "--max-queued N",
    }
}

fn jobs_of(active: &[EntryRow], keep: impl Fn(&EntryRow) -> bool) -> Vec<&EntryRow> {
    let mut v: Vec<&EntryRow> = active.iter().filter(|e| keep(e)).collect();
    v.sort_by_key(|e| (e.submit_time, e.job_id));
    v
}

/// "job `a` or `b` finishing frees a slot" (at most three named).
fn frees(kind: LimitKind, jobs: &[&EntryRow]) -> String {
    let what = match kind {
        LimitKind::Gpus => "frees GPUs",
        _ => "frees a slot",
    };
    if jobs.is_empty() {
        return format!("a running job finishing {what}");
    }
    let names: Vec<String> = jobs
        .iter()
        .take(3)
        .map(|e| format!("`{}`", e.job_id))
        .collect();
    let more = if jobs.len() > 3 {
        format!(" (or one of {} others)", jobs.len() - 3)
    } else {
        String::new()
    };
    format!("job {}{more} finishing {what}", names.join(" or "))
}

fn user_unblock(kind: LimitKind, entry: &EntryRow, active: &[EntryRow], scope: Scope) -> String {
    let mine = jobs_of(active, |e| e.owner == entry.owner);
    let (scope_flag, subject) = match scope {
        Scope::Org => ("org", entry.org.as_str()),
        Scope::UserDefault => ("user-default", ""),
        _ => ("user", entry.owner.as_str()),
    };
    let subject = if subject.is_empty() {
        String::new()
    } else {
        format!(" --subject {subject}")
    };
    format!(
        "{}; or an admin raises the limit: `trainctl limits set --scope {scope_flag}{subject} {}`",
        frees(kind, &mine),
        flag(kind)
    )
}
