//! Properties of the pure scheduling decision over random queues, limits
//! and runner capacities.

use std::collections::{BTreeSet, HashMap, HashSet};

use proptest::prelude::*;
use scheduler_service::domain::{Demand, GpuInfo, JobId, RunnerCapacity, RunnerId};
use scheduler_service::plan::{
    gpu_matches, plan, queue_order, Limits, Plan, QueuedJob, RunnerState, Snapshot, WaitReason,
};
use uuid::Uuid;

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
const MODELS: [&str; 2] = ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"];

fn arb_job() -> impl Strategy<Value = QueuedJob> {
    (
        any::<u128>(),
        0..USERS.len(),
        -2..3i32,
        0..20i64,
        0..4u32,
        prop_oneof![Just(""), Just("h100"), Just("A100"), Just("v100")],
        0..6_000i64,
        0..8_192i64,
    )
        .prop_map(|(id, user, priority, t, gpus, ty, cpu, mem)| QueuedJob {
            job_id: JobId(Uuid::from_u128(id)),
            owner: USERS[user].to_owned(),
            priority,
            submit_time: t,
            demand: Demand {
                gpus,
                gpu_type: ty.to_owned(),
                cpu_milli: cpu,
                memory_mib: mem,
            },
        })
}

fn arb_runner() -> impl Strategy<Value = RunnerState> {
    (
        any::<u128>(),
        proptest::collection::vec((0..MODELS.len(), any::<bool>()), 0..8),
        0..16_000i64,
        0..32_768i64,
        0..=100i64,
    )
        .prop_map(|(id, gpus, cpu, mem, used_pct)| {
            let capacity = RunnerCapacity {
                gpus: gpus
                    .iter()
                    .enumerate()
                    .map(|(i, (m, _))| GpuInfo {
                        index: i as i32 * 2, // sparse indexes, as after a GPU is drained
                        model: MODELS[*m].to_owned(),
                    })
                    .collect(),
                cpu_milli: cpu,
                memory_mib: mem,
            };
            let used_gpus = gpus
                .iter()
                .enumerate()
                .filter(|(_, (_, used))| *used)
                .map(|(i, _)| i as i32 * 2)
                .collect();
            RunnerState {
                runner_id: RunnerId(Uuid::from_u128(id)),
                capacity,
                used_gpus,
                used_cpu_milli: cpu * used_pct / 100,
                used_memory_mib: mem * used_pct / 100,
            }
        })
}

fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    (
        proptest::collection::vec(arb_job(), 0..40),
        proptest::collection::vec(arb_runner(), 0..4),
        proptest::collection::vec(0..4u32, USERS.len()),
        0..4u32,
    )
        .prop_map(|(queued, runners, running, limit)| Snapshot {
            queued,
            running_per_user: USERS
                .iter()
                .zip(running)
                .map(|(u, n)| (u.to_string(), n))
                .collect(),
            runners,
            limits: Limits {
                max_running_per_user: limit,
            },
        })
}

/// Free resources per runner after the plan, computed independently.
struct Leftover {
    gpus: HashMap<RunnerId, Vec<(i32, String)>>,
    cpu: HashMap<RunnerId, i64>,
    mem: HashMap<RunnerId, i64>,
}

fn fits(d: &Demand, runner: RunnerId, free: &Leftover) -> bool {
    let wanted = d.gpu_type.to_lowercase();
    let gpus = free.gpus[&runner]
        .iter()
        .filter(|(_, m)| gpu_matches(&wanted, m))
        .count();
    gpus >= d.gpus as usize && free.cpu[&runner] >= d.cpu_milli && free.mem[&runner] >= d.memory_mib
}

fn initial(s: &Snapshot) -> Leftover {
    let mut l = Leftover {
        gpus: HashMap::new(),
        cpu: HashMap::new(),
        mem: HashMap::new(),
    };
    for r in &s.runners {
        l.gpus.insert(
            r.runner_id,
            r.capacity
                .gpus
                .iter()
                .filter(|g| !r.used_gpus.contains(&g.index))
                .map(|g| (g.index, g.model.clone()))
                .collect(),
        );
        l.cpu
            .insert(r.runner_id, r.capacity.cpu_milli - r.used_cpu_milli);
        l.mem
            .insert(r.runner_id, r.capacity.memory_mib - r.used_memory_mib);
    }
    l
}

fn under_limit(s: &Snapshot, count: u32) -> bool {
    s.limits.max_running_per_user == 0 || count < s.limits.max_running_per_user
}

/// Checks every property; returns the leftover capacity.
fn check(s: &Snapshot, p: &Plan) -> Result<(), TestCaseError> {
    let jobs: HashMap<JobId, &QueuedJob> = s.queued.iter().map(|j| (j.job_id, j)).collect();

    // Every job is either placed or waiting, once.
    let mut seen = HashSet::new();
    for id in p
        .placements
        .iter()
        .map(|x| x.job_id)
        .chain(p.waiting.iter().map(|w| w.job_id))
    {
        prop_assert!(seen.insert(id), "job {id} appears twice");
    }
    prop_assert_eq!(seen.len(), jobs.len());

    // Per-user limit never exceeded.
    let mut count: HashMap<&str, u32> = s
        .running_per_user
        .iter()
        .map(|(u, n)| (u.as_str(), *n))
        .collect();
    for pl in &p.placements {
        let owner = jobs[&pl.job_id].owner.as_str();
        let c = count.entry(owner).or_insert(0);
        prop_assert!(under_limit(s, *c), "user {owner} placed beyond the limit");
        *c += 1;
    }

    // No GPU allocated twice, nor one in use, nor one of the wrong type;
    // CPU and memory within what is free.
    let mut free = initial(s);
    let mut taken: HashSet<(RunnerId, i32)> = HashSet::new();
    for pl in &p.placements {
        let job = jobs[&pl.job_id];
        prop_assert_eq!(pl.gpu_indexes.len(), job.demand.gpus as usize);
        let wanted = job.demand.gpu_type.to_lowercase();
        let runner_free = free
            .gpus
            .get_mut(&pl.runner_id)
            .expect("placed on a known runner");
        for g in &pl.gpu_indexes {
            prop_assert!(taken.insert((pl.runner_id, *g)), "GPU {g} allocated twice");
            let pos = runner_free.iter().position(|(i, _)| i == g);
            prop_assert!(pos.is_some(), "GPU {g} is not free on the runner");
            let (_, model) = runner_free.remove(pos.unwrap_or_default());
            prop_assert!(
                gpu_matches(&wanted, &model),
                "GPU {g} ({model}) is not a {wanted}"
            );
        }
        *free.cpu.get_mut(&pl.runner_id).unwrap() -= job.demand.cpu_milli;
        *free.mem.get_mut(&pl.runner_id).unwrap() -= job.demand.memory_mib;
        prop_assert!(free.cpu[&pl.runner_id] >= 0, "CPU overcommitted");
        prop_assert!(free.mem[&pl.runner_id] >= 0, "memory overcommitted");
    }

    // Placements and waiting jobs are each in queue order; positions 1..n.
    for w in p.placements.windows(2) {
        prop_assert!(queue_order(jobs[&w[0].job_id], jobs[&w[1].job_id]).is_lt());
    }
    for (i, w) in p.waiting.iter().enumerate() {
        prop_assert_eq!(w.position as usize, i + 1);
    }

    // Nothing is left waiting that could start: a waiting job's user is at
    // the limit, or the job fits on no runner's leftover capacity.
    for w in &p.waiting {
        let job = jobs[&w.job_id];
        let final_count = count.get(job.owner.as_str()).copied().unwrap_or(0);
        match &w.reason {
            WaitReason::UserRunningLimit { .. } => {
                prop_assert!(
                    !under_limit(s, final_count),
                    "job waits for a limit its user is under"
                );
            }
            WaitReason::NoRunnerCapacity { .. } => {
                for r in &s.runners {
                    prop_assert!(
                        !fits(&job.demand, r.runner_id, &free),
                        "job {} waits though runner {} has room",
                        job.job_id,
                        r.runner_id
                    );
                }
            }
        }
    }

    // The first placement is the highest-priority admissible job.
    let start = initial(s);
    let mut order: Vec<&QueuedJob> = s.queued.iter().collect();
    order.sort_by(|a, b| queue_order(a, b));
    let first_admissible = order.iter().find(|j| {
        under_limit(s, s.running_per_user.get(&j.owner).copied().unwrap_or(0))
            && s.runners
                .iter()
                .any(|r| fits(&j.demand, r.runner_id, &start))
    });
    prop_assert_eq!(
        p.placements.first().map(|x| x.job_id),
        first_admissible.map(|j| j.job_id)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn plan_respects_limits_capacity_and_order(s in arb_snapshot()) {
        let p = plan(&s);
        check(&s, &p)?;
    }

    /// A user at the limit never blocks anyone: removing that user's jobs
    /// changes nothing for the others.
    #[test]
    fn users_at_the_limit_do_not_change_others_placements(s in arb_snapshot()) {
        let limit = s.limits.max_running_per_user;
        prop_assume!(limit > 0);
        let blocked: BTreeSet<&str> = s
            .running_per_user
            .iter()
            .filter(|(_, n)| **n >= limit)
            .map(|(u, _)| u.as_str())
            .collect();
        let mut without = s.clone();
        without.queued.retain(|j| !blocked.contains(j.owner.as_str()));
        prop_assert_eq!(plan(&s).placements, plan(&without).placements);
    }

    #[test]
    fn plan_is_deterministic(s in arb_snapshot()) {
        let mut shuffled = s.clone();
        shuffled.queued.reverse();
        shuffled.runners.reverse();
        prop_assert_eq!(plan(&s), plan(&shuffled));
    }
}
