//! The scheduling decision as a pure function: `plan(&Snapshot) -> Plan`.
//!
//! No I/O, no clock, no randomness: the dispatcher builds a [`Snapshot`]
//! from the database (including "now"), calls [`plan`], and applies each
//! [`Placement`] in its own fenced transaction. `GetQueue` and `ExplainJob`
//! call the same function, so the reason a user sees is the reason the
//! dispatcher acts on. Public so benchmarks can time it on large snapshots.
//!
//! Order: effective priority (priority plus one per ageing step waited, so
//! nothing starves), then submit time, then job id. The scan goes past jobs
//! that cannot start (their user or org is at a limit, they are in backoff,
//! nothing fits), so one blocked user or one large job never blocks others.
//!
//! Limits: per user (the user's own row, else USER_DEFAULT, capped by the
//! org's row), per org (sum over its users) and global, each on running jobs
//! and GPUs in use. "Running" means SCHEDULED or RUNNING.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

#[path = "plan_causes.rs"]
mod causes;
use causes::{capacity_detail, excluded_detail, limit_causes};

pub use crate::domain::{Demand, GpuInfo, JobId, RunnerCapacity, RunnerId};
pub use crate::limits::{Bound, LimitKind, LimitTable, LimitValues, Scope};

/// A job waiting in the queue (QUEUED or AWAITING_APPROVAL).
#[derive(Clone, Debug)]
pub struct QueuedJob {
    pub job_id: JobId,
    pub owner: String,
    /// Empty: the job belongs to no org (no org limit applies).
    pub org: String,
    pub priority: i32,
    /// Microseconds since the epoch.
    pub submit_time: i64,
    pub demand: Demand,
    /// Retry backoff: not dispatched before this time (0: no backoff).
    pub not_before: i64,
    /// The approval rule the job waits on, if it awaits approval.
    pub approval_rule: Option<String>,
}

/// A live runner: its capacity and what its active attempts hold.
#[derive(Clone, Debug)]
pub struct RunnerState {
    pub runner_id: RunnerId,
    pub capacity: RunnerCapacity,
    pub used_gpus: BTreeSet<i32>,
    pub used_cpu_milli: i64,
    pub used_memory_mib: i64,
}

/// Running jobs and GPUs in use of one user, one org, or everyone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub running: u32,
    pub gpus: u32,
}

impl Usage {
    fn add(&mut self, d: &Demand) {
        self.running = self.running.saturating_add(1);
        self.gpus = self.gpus.saturating_add(d.gpus);
    }
}

/// Everything the decision depends on.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub queued: Vec<QueuedJob>,
    /// Usage per user (owner).
    pub users: HashMap<String, Usage>,
    /// Usage per org.
    pub orgs: HashMap<String, Usage>,
    pub global: Usage,
    pub runners: Vec<RunnerState>,
    pub limits: LimitTable,
    /// Microseconds since the epoch: ageing and backoff are measured to it.
    pub now: i64,
    /// One priority point per this many microseconds waited; 0: no ageing.
    pub ageing_step_micros: i64,
    /// `Some(description)` while an admin holds the queue.
    pub held: Option<String>,
    /// Runners that take no new work, with why (cordoned); they stay in
    /// `runners` so that explanations can name them.
    pub closed: HashMap<RunnerId, String>,
    /// Runners a job must not be placed on (after node faults there).
    pub avoid: HashMap<JobId, Vec<RunnerId>>,
    /// Runner names, for explanations.
    pub runner_names: HashMap<RunnerId, String>,
}

impl Snapshot {
    /// A snapshot with nothing running, no hold and no ageing.
    pub fn new(queued: Vec<QueuedJob>, runners: Vec<RunnerState>, limits: LimitTable) -> Self {
        Snapshot {
            queued,
            users: HashMap::new(),
            orgs: HashMap::new(),
            global: Usage::default(),
            runners,
            limits,
            now: 0,
            ageing_step_micros: 0,
            held: None,
            closed: HashMap::new(),
            avoid: HashMap::new(),
            runner_names: HashMap::new(),
        }
    }
}

/// Start `job_id` on `runner_id` with these GPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub job_id: JobId,
    pub runner_id: RunnerId,
    pub gpu_indexes: Vec<i32>,
}

/// One reason a job cannot start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitReason {
    Held,
    AwaitingApproval {
        rule: String,
    },
    Backoff {
        until: i64,
    },
    GlobalLimit {
        kind: LimitKind,
        limit: u32,
        current: u32,
    },
    OrgLimit {
        kind: LimitKind,
        limit: u32,
        current: u32,
    },
    UserRunningLimit {
        limit: u32,
        running: u32,
        scope: Scope,
    },
    UserGpuLimit {
        limit: u32,
        in_use: u32,
        scope: Scope,
    },
    NoRunnerCapacity {
        fits_any_idle_runner: bool,
        /// Most free GPUs of the wanted type on one runner now.
        largest_free_gpus: u32,
    },
    /// Runners the job would fit on are ones it may not use: it avoids
    /// them after node faults there, or they are cordoned.
    AvoidingRunners {
        avoided: Vec<String>,
        /// (name, why) of cordoned runners.
        cordoned: Vec<(String, String)>,
        /// Whether a runner it may use would fit it once free.
        others_fit: bool,
    },
}

/// A blocking cause with its human-readable detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    pub reason: WaitReason,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub job_id: JobId,
    /// 1-based position among the jobs that keep waiting, in queue order.
    pub position: u32,
    /// The first of `causes`, the one shown in queue listings.
    pub reason: WaitReason,
    pub detail: String,
    /// Every cause that blocks the job now (never empty).
    pub causes: Vec<Cause>,
    pub effective_priority: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// In queue order: the first is the highest-priority job that can start.
    pub placements: Vec<Placement>,
    /// In queue order.
    pub waiting: Vec<Waiting>,
}

/// Priority plus one point per `step` microseconds waited since submission.
pub fn effective_priority(job: &QueuedJob, now: i64, step: i64) -> i64 {
    let aged = if step > 0 {
        now.saturating_sub(job.submit_time).max(0) / step
    } else {
        0
    };
    i64::from(job.priority).saturating_add(aged)
}

/// Queue order of two jobs given their effective priorities: effective
/// priority desc, submit time asc, job id asc.
pub fn queue_order(a: (i64, &QueuedJob), b: (i64, &QueuedJob)) -> Ordering {
    b.0.cmp(&a.0)
        .then(a.1.submit_time.cmp(&b.1.submit_time))
        .then(a.1.job_id.cmp(&b.1.job_id))
}

/// Case-insensitive substring match of the wanted type in the GPU model.
pub fn gpu_matches(wanted_lower: &str, model: &str) -> bool {
    wanted_lower.is_empty() || model.to_lowercase().contains(wanted_lower)
}

/// Free resources of one runner while the plan is being made.
struct Free {
    runner_id: RunnerId,
    /// Free GPUs, lowest index first, with lower-cased models.
    gpus: Vec<(i32, String)>,
    all_gpus: Vec<GpuInfo>,
    cpu_milli: i64,
    memory_mib: i64,
    total_cpu_milli: i64,
    total_memory_mib: i64,
}

impl Free {
    fn new(r: &RunnerState) -> Self {
        let mut gpus: Vec<(i32, String)> = r
            .capacity
            .gpus
            .iter()
            .filter(|g| !r.used_gpus.contains(&g.index))
            .map(|g| (g.index, g.model.to_lowercase()))
            .collect();
        gpus.sort_by_key(|(i, _)| *i);
        Free {
            runner_id: r.runner_id,
            gpus,
            all_gpus: r.capacity.gpus.clone(),
            cpu_milli: r.capacity.cpu_milli - r.used_cpu_milli,
            memory_mib: r.capacity.memory_mib - r.used_memory_mib,
            total_cpu_milli: r.capacity.cpu_milli,
            total_memory_mib: r.capacity.memory_mib,
        }
    }

    fn free_of_type(&self, wanted: &str) -> usize {
        self.gpus
            .iter()
            .filter(|(_, model)| wanted.is_empty() || model.contains(wanted))
            .count()
    }

    /// The free GPUs this job would get here, if it fits now.
    fn fit(&self, d: &Demand, wanted: &str) -> Option<Vec<i32>> {
        if d.cpu_milli > self.cpu_milli || d.memory_mib > self.memory_mib {
            return None;
        }
        let picked: Vec<i32> = self
            .gpus
            .iter()
            .filter(|(_, model)| wanted.is_empty() || model.contains(wanted))
            .take(d.gpus as usize)
            .map(|(i, _)| *i)
            .collect();
        (picked.len() == d.gpus as usize).then_some(picked)
    }

    /// Whether the job fits in what is free now ([`Free::fit`] without
    /// picking the GPUs).
    fn fits_now(&self, d: &Demand, wanted: &str) -> bool {
        d.cpu_milli <= self.cpu_milli
            && d.memory_mib <= self.memory_mib
            && self.free_of_type(wanted) >= d.gpus as usize
    }

    /// Whether the job would fit if nothing ran here.
    fn fits_idle(&self, d: &Demand, wanted: &str) -> bool {
        d.cpu_milli <= self.total_cpu_milli
            && d.memory_mib <= self.total_memory_mib
            && self
                .all_gpus
                .iter()
                .filter(|g| gpu_matches(wanted, &g.model))
                .count()
                >= d.gpus as usize
    }

    fn take(&mut self, d: &Demand, gpus: &[i32]) {
        self.gpus.retain(|(i, _)| !gpus.contains(i));
        self.cpu_milli -= d.cpu_milli;
        self.memory_mib -= d.memory_mib;
    }
}

/// Decides which queued jobs start where, and why the others wait.
pub fn plan(snapshot: &Snapshot) -> Plan {
    let s = snapshot;
    let mut order: Vec<(i64, &QueuedJob)> = s
        .queued
        .iter()
        .map(|j| (effective_priority(j, s.now, s.ageing_step_micros), j))
        .collect();
    order.sort_by(|a, b| queue_order(*a, *b));

    let (closed, open): (Vec<&RunnerState>, Vec<&RunnerState>) = s
        .runners
        .iter()
        .partition(|r| s.closed.contains_key(&r.runner_id));
    let mut free: Vec<Free> = open.into_iter().map(Free::new).collect();
    free.sort_by_key(|a| a.runner_id);
    let closed: Vec<Free> = closed.into_iter().map(Free::new).collect();
    let mut users: HashMap<&str, Usage> = s.users.iter().map(|(u, n)| (u.as_str(), *n)).collect();
    let mut orgs: HashMap<&str, Usage> = s.orgs.iter().map(|(o, n)| (o.as_str(), *n)).collect();
    let mut global = s.global;

    let mut out = Plan::default();
    for (eff, job) in order {
        let mut causes = Vec::new();
        if let Some(why) = &s.held {
            causes.push(Cause {
                reason: WaitReason::Held,
                detail: format!("the queue is held ({why})"),
            });
        }
        if let Some(rule) = &job.approval_rule {
            causes.push(Cause {
                reason: WaitReason::AwaitingApproval { rule: rule.clone() },
                detail: format!("approval required by rule `{rule}`"),
            });
        }
        if job.not_before > s.now {
            let secs = (job.not_before - s.now + 999_999) / 1_000_000;
            causes.push(Cause {
                reason: WaitReason::Backoff {
                    until: job.not_before,
                },
                detail: format!("in retry backoff for another {secs}s"),
            });
        }
        let user = users.get(job.owner.as_str()).copied().unwrap_or_default();
        let org = orgs.get(job.org.as_str()).copied().unwrap_or_default();
        causes.extend(limit_causes(s, job, user, org, global));

        let wanted = if job.demand.gpu_type.is_empty() {
            std::borrow::Cow::Borrowed("")
        } else {
            std::borrow::Cow::Owned(job.demand.gpu_type.to_lowercase())
        };
        let avoid: &[RunnerId] = if s.avoid.is_empty() {
            &[]
        } else {
            s.avoid.get(&job.job_id).map_or(&[], Vec::as_slice)
        };
        let usable = |f: &&Free| !avoid.contains(&f.runner_id);
        if causes.is_empty() {
            // Best fit: the runner left with the fewest free GPUs, so large
            // runners stay whole for large jobs; ties by runner id.
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, f)| usable(f))
                .filter_map(|(i, f)| f.fit(&job.demand, &wanted).map(|g| (i, g)))
                .min_by_key(|(i, g)| (free[*i].gpus.len() - g.len(), *i));
            if let Some((i, gpus)) = best {
                free[i].take(&job.demand, &gpus);
                users
                    .entry(job.owner.as_str())
                    .or_default()
                    .add(&job.demand);
                if !job.org.is_empty() {
                    orgs.entry(job.org.as_str()).or_default().add(&job.demand);
                }
                global.add(&job.demand);
                out.placements.push(Placement {
                    job_id: job.job_id,
                    runner_id: free[i].runner_id,
                    gpu_indexes: gpus,
                });
                continue;
            }
        }
        // Blocked (or nothing fits): only whether it would fit matters, for
        // the explanation; checked without allocating, as most of a long
        // queue takes this path.
        if !free
            .iter()
            .filter(usable)
            .any(|f| f.fits_now(&job.demand, &wanted))
        {
            let fits_any_idle_runner = free
                .iter()
                .filter(usable)
                .any(|f| f.fits_idle(&job.demand, &wanted));
            // Runners it would fit on but may not use, named.
            let fits = |f: &&Free| f.fits_idle(&job.demand, &wanted);
            let name = |f: &Free| {
                s.runner_names
                    .get(&f.runner_id)
                    .cloned()
                    .unwrap_or_default()
            };
            let avoided: Vec<String> = free
                .iter()
                .filter(|f| !usable(f))
                .filter(fits)
                .map(name)
                .collect();
            let cordoned: Vec<(String, String)> = closed
                .iter()
                .filter(fits)
                .map(|f| {
                    (
                        name(f),
                        s.closed.get(&f.runner_id).cloned().unwrap_or_default(),
                    )
                })
                .collect();
            let excluded = !avoided.is_empty() || !cordoned.is_empty();
            if fits_any_idle_runner || !excluded {
                let largest_free_gpus = free
                    .iter()
                    .filter(usable)
                    .map(|f| f.free_of_type(&wanted))
                    .max()
                    .unwrap_or(0) as u32;
                causes.push(Cause {
                    reason: WaitReason::NoRunnerCapacity {
                        fits_any_idle_runner,
                        largest_free_gpus,
                    },
                    detail: capacity_detail(
                        &job.demand,
                        fits_any_idle_runner,
                        free.len() + closed.len(),
                        largest_free_gpus,
                    ),
                });
            }
            if excluded {
                causes.push(Cause {
                    detail: excluded_detail(&avoided, &cordoned, fits_any_idle_runner),
                    reason: WaitReason::AvoidingRunners {
                        avoided,
                        cordoned,
                        others_fit: fits_any_idle_runner,
                    },
                });
            }
        }
        let first = causes[0].clone();
        out.waiting.push(Waiting {
            job_id: job.job_id,
            position: out.waiting.len() as u32 + 1,
            reason: first.reason,
            detail: first.detail,
            causes,
            effective_priority: eff,
        });
    }
    out
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
