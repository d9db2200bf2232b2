//! The scheduling decision as a pure function: `plan(&Snapshot) -> Plan`.
//!
//! No I/O, no clock, no randomness: the dispatcher builds a [`Snapshot`]
//! from the database, calls [`plan`], and applies each [`Placement`] in its
//! own transaction. `GetQueue` calls the same function to explain why each
//! job waits, so the reason a user sees is the reason the dispatcher acts on.
//!
//! Order: priority (highest first), then submit time, then job id. The scan
//! goes past jobs that cannot start (their user is at the limit, or nothing
//! fits), so one blocked user or one large job never blocks the others.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

use crate::domain::{Demand, GpuInfo, JobId, RunnerCapacity, RunnerId};

/// Limits that apply to this plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Jobs a user may have scheduled or running at once; 0 means no limit.
    pub max_running_per_user: u32,
}

/// A job waiting in the queue.
#[derive(Clone, Debug)]
pub struct QueuedJob {
    pub job_id: JobId,
    pub owner: String,
    pub priority: i32,
    /// Microseconds since the epoch.
    pub submit_time: i64,
    pub demand: Demand,
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

/// Everything the decision depends on.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub queued: Vec<QueuedJob>,
    /// Scheduled or running jobs per owner.
    pub running_per_user: HashMap<String, u32>,
    pub runners: Vec<RunnerState>,
    pub limits: Limits,
}

/// Start `job_id` on `runner_id` with these GPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub job_id: JobId,
    pub runner_id: RunnerId,
    pub gpu_indexes: Vec<i32>,
}

/// Why a job keeps waiting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitReason {
    UserRunningLimit { running: u32, limit: u32 },
    NoRunnerCapacity { fits_any_idle_runner: bool },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub job_id: JobId,
    /// 1-based position among the jobs that keep waiting.
    pub position: u32,
    pub reason: WaitReason,
    pub detail: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// In queue order: the first is the highest-priority job that can start.
    pub placements: Vec<Placement>,
    /// In queue order.
    pub waiting: Vec<Waiting>,
}

/// Queue order: priority desc, submit time asc, job id asc.
pub fn queue_order(a: &QueuedJob, b: &QueuedJob) -> Ordering {
    b.priority
        .cmp(&a.priority)
        .then(a.submit_time.cmp(&b.submit_time))
        .then(a.job_id.cmp(&b.job_id))
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
    let mut order: Vec<&QueuedJob> = snapshot.queued.iter().collect();
    order.sort_by(|a, b| queue_order(a, b));

    let mut free: Vec<Free> = snapshot.runners.iter().map(Free::new).collect();
    free.sort_by_key(|a| a.runner_id);
    let limit = snapshot.limits.max_running_per_user;
    let mut running: HashMap<&str, u32> = snapshot
        .running_per_user
        .iter()
        .map(|(u, n)| (u.as_str(), *n))
        .collect();

    let mut out = Plan::default();
    for job in order {
        let now_running = running.get(job.owner.as_str()).copied().unwrap_or(0);
        if limit > 0 && now_running >= limit {
            let position = out.waiting.len() as u32 + 1;
            out.waiting.push(Waiting {
                job_id: job.job_id,
                position,
                reason: WaitReason::UserRunningLimit {
                    running: now_running,
                    limit,
                },
                detail: format!(
                    "user `{}` has {now_running} of {limit} allowed jobs scheduled or running",
                    job.owner
                ),
            });
            continue;
        }
        let wanted = job.demand.gpu_type.to_lowercase();
        // Best fit: the runner left with the fewest free GPUs, so large
        // runners stay whole for large jobs; ties by runner id for determinism.
        let best = free
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.fit(&job.demand, &wanted).map(|g| (i, g)))
            .min_by_key(|(i, g)| (free[*i].gpus.len() - g.len(), *i));
        match best {
            Some((i, gpus)) => {
                free[i].take(&job.demand, &gpus);
                *running.entry(job.owner.as_str()).or_insert(0) += 1;
                out.placements.push(Placement {
                    job_id: job.job_id,
                    runner_id: free[i].runner_id,
                    gpu_indexes: gpus,
                });
            }
            None => {
                let fits_any_idle_runner = free.iter().any(|f| f.fits_idle(&job.demand, &wanted));
                let position = out.waiting.len() as u32 + 1;
                out.waiting.push(Waiting {
                    job_id: job.job_id,
                    position,
                    reason: WaitReason::NoRunnerCapacity {
                        fits_any_idle_runner,
                    },
                    detail: capacity_detail(&job.demand, fits_any_idle_runner, free.len()),
                });
            }
        }
    }
    out
}

fn capacity_detail(d: &Demand, fits_idle: bool, runners: usize) -> String {
    let gpus = if d.gpu_type.is_empty() {
        format!("{} GPU(s)", d.gpus)
    } else {
        format!("{} `{}` GPU(s)", d.gpus, d.gpu_type)
    };
    let need = format!(
        "{gpus}, {} CPU, {} MiB memory",
        d.cpu_milli as f64 / 1000.0,
        d.memory_mib
    );
    if runners == 0 {
        format!("needs {need}; no runner is registered")
    } else if fits_idle {
        format!("needs {need}; waiting for a runner to free them")
    } else {
        format!("needs {need}; no registered runner has that much capacity")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(owner: &str, priority: i32, t: i64, gpus: u32) -> QueuedJob {
        QueuedJob {
            job_id: JobId::new(),
            owner: owner.into(),
            priority,
            submit_time: t,
            demand: Demand {
                gpus,
                ..Default::default()
            },
        }
    }

    fn runner(gpus: i32, model: &str) -> RunnerState {
        RunnerState {
            runner_id: RunnerId::new(),
            capacity: RunnerCapacity {
                gpus: (0..gpus)
                    .map(|index| GpuInfo {
                        index,
                        model: model.into(),
                    })
                    .collect(),
                cpu_milli: 16_000,
                memory_mib: 65_536,
            },
            used_gpus: BTreeSet::new(),
            used_cpu_milli: 0,
            used_memory_mib: 0,
        }
    }

    fn snapshot(queued: Vec<QueuedJob>, runners: Vec<RunnerState>, limit: u32) -> Snapshot {
        Snapshot {
            queued,
            running_per_user: HashMap::new(),
            runners,
            limits: Limits {
                max_running_per_user: limit,
            },
        }
    }

    #[test]
    fn skips_users_at_their_limit() {
        let a: Vec<_> = (0..5).map(|i| job("alice", 5, i, 1)).collect();
        let b = job("bob", 0, 10, 1);
        let mut q = a.clone();
        q.push(b.clone());
        let p = plan(&snapshot(q, vec![runner(8, "H100")], 2));
        let placed: Vec<_> = p.placements.iter().map(|p| p.job_id).collect();
        assert_eq!(placed, vec![a[0].job_id, a[1].job_id, b.job_id]);
        assert_eq!(p.waiting.len(), 3);
        assert!(p.waiting.iter().all(|w| matches!(
            w.reason,
            WaitReason::UserRunningLimit {
                running: 2,
                limit: 2
            }
        )));
        assert_eq!(
            p.waiting.iter().map(|w| w.position).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn allocates_distinct_gpus_of_the_wanted_type() {
        let mut j1 = job("a", 0, 0, 1);
        j1.demand.gpu_type = "h100".into();
        let j2 = job("b", 0, 1, 1);
        let mut j3 = job("c", 0, 2, 1);
        j3.demand.gpu_type = "a100".into();
        let p = plan(&snapshot(
            vec![j1, j2, j3.clone()],
            vec![runner(2, "NVIDIA H100 80GB HBM3")],
            0,
        ));
        assert_eq!(p.placements.len(), 2);
        assert_eq!(p.placements[0].gpu_indexes, vec![0]);
        assert_eq!(p.placements[1].gpu_indexes, vec![1]);
        assert_eq!(p.waiting[0].job_id, j3.job_id);
        assert_eq!(
            p.waiting[0].reason,
            WaitReason::NoRunnerCapacity {
                fits_any_idle_runner: false
            }
        );
    }

    #[test]
    fn prefers_the_runner_left_with_fewest_free_gpus() {
        let big = runner(8, "H100");
        let small = runner(1, "H100");
        let p = plan(&snapshot(
            vec![job("a", 0, 0, 1)],
            vec![big, small.clone()],
            0,
        ));
        assert_eq!(p.placements[0].runner_id, small.runner_id);
    }
}
