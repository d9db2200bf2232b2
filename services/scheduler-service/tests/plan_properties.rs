//! Properties of the pure scheduling decision over random queues, limits
//! (every scope) and runner capacities: no limit is ever exceeded, the
//! highest-priority admissible job is chosen, nothing that could start is
//! left waiting, and a user at their limit never changes others' placements.

use std::collections::{BTreeSet, HashMap, HashSet};

use proptest::prelude::*;
use scheduler_service::domain::{Demand, GpuInfo, JobId, RunnerCapacity, RunnerId};
use scheduler_service::plan::{
    effective_priority, gpu_matches, plan, queue_order, LimitTable, LimitValues, Plan, QueuedJob,
    RunnerState, Snapshot, Usage,
};
use uuid::Uuid;

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
/// alice and bob share an org; dave has none.
const ORGS: [&str; 4] = ["ml", "ml", "cv", ""];
const MODELS: [&str; 2] = ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"];
const NOW: i64 = 100;

fn arb_job() -> impl Strategy<Value = QueuedJob> {
    (
        any::<u128>(),
        0..USERS.len(),
        -2..3i32,
        0..20i64,
        0..4u32,
        prop_oneof![Just(""), Just("h100"), Just("A100"), Just("v100")],
        (0..6_000i64, 0..8_192i64),
        prop_oneof![6 => Just(0i64), 1 => Just(NOW - 1), 1 => Just(NOW + 5)],
        prop_oneof![12 => Just(None), 1 => Just(Some("big".to_owned()))],
    )
        .prop_map(
            |(id, user, priority, t, gpus, ty, (cpu, mem), not_before, approval_rule)| QueuedJob {
                job_id: JobId(Uuid::from_u128(id)),
                owner: USERS[user].to_owned(),
                org: ORGS[user].to_owned(),
                priority,
                submit_time: t,
                demand: Demand {
                    gpus,
                    gpu_type: ty.to_owned(),
                    cpu_milli: cpu,
                    memory_mib: mem,
                },
                not_before,
                approval_rule,
            },
        )
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

/// Mostly unset, sometimes tight.
fn arb_value(max: u32) -> impl Strategy<Value = Option<u32>> {
    prop_oneof![2 => Just(None), 1 => (0..=max).prop_map(Some)]
}

fn arb_values() -> impl Strategy<Value = LimitValues> {
    (arb_value(4), arb_value(10)).prop_map(|(r, g)| LimitValues {
        max_running_jobs: r,
        max_gpus: g,
        max_queued_jobs: None,
    })
}

fn arb_limits() -> impl Strategy<Value = LimitTable> {
    (
        arb_values(),
        arb_values(),
        proptest::collection::vec(arb_values(), 2),
        proptest::collection::vec(
            prop_oneof![Just(None), arb_values().prop_map(Some)],
            USERS.len(),
        ),
    )
        .prop_map(|(global, user_default, orgs, users)| LimitTable {
            global,
            user_default,
            orgs: ["ml", "cv"]
                .iter()
                .map(|o| o.to_string())
                .zip(orgs)
                .collect(),
            users: USERS
                .iter()
                .zip(users)
                .filter_map(|(u, v)| v.map(|v| (u.to_string(), v)))
                .collect(),
        })
}

fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    (
        proptest::collection::vec(arb_job(), 0..40),
        proptest::collection::vec(arb_runner(), 0..4),
        proptest::collection::vec((0..4u32, 0..6u32), USERS.len()),
        arb_limits(),
        prop_oneof![Just(0i64), Just(5i64)],
        prop_oneof![15 => Just(None), 1 => Just(Some("held by admin".to_owned()))],
    )
        .prop_map(|(queued, runners, usage, limits, ageing, held)| {
            let mut s = Snapshot::new(queued, runners, limits);
            for (i, (running, gpus)) in usage.into_iter().enumerate() {
                let u = Usage { running, gpus };
                s.users.insert(USERS[i].to_owned(), u);
                if !ORGS[i].is_empty() {
                    let o = s.orgs.entry(ORGS[i].to_owned()).or_default();
                    o.running += running;
                    o.gpus += gpus;
                }
                s.global.running += running;
                s.global.gpus += gpus;
            }
            s.now = NOW;
            s.ageing_step_micros = ageing;
            s.held = held;
            s
        })
}

/// The per-user limit computed independently: min(own else default, org).
fn user_limit(
    s: &Snapshot,
    user: &str,
    org: &str,
    pick: fn(&LimitValues) -> Option<u32>,
) -> Option<u32> {
    let own = s
        .limits
        .users
        .get(user)
        .and_then(pick)
        .or_else(|| pick(&s.limits.user_default));
    let ceiling = (!org.is_empty())
        .then(|| s.limits.orgs.get(org).and_then(pick))
        .flatten();
    match (own, ceiling) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Usage of a user, its org and everyone.
#[derive(Clone, Default)]
struct Counts {
    users: HashMap<String, Usage>,
    orgs: HashMap<String, Usage>,
    global: Usage,
}

impl Counts {
    fn of(s: &Snapshot) -> Self {
        Counts {
            users: s.users.clone(),
            orgs: s.orgs.clone(),
            global: s.global,
        }
    }

    fn add(&mut self, j: &QueuedJob) {
        for u in [
            self.users.entry(j.owner.clone()).or_default(),
            &mut self.global,
        ] {
            u.running += 1;
            u.gpus += j.demand.gpus;
        }
        if !j.org.is_empty() {
            let o = self.orgs.entry(j.org.clone()).or_default();
            o.running += 1;
            o.gpus += j.demand.gpus;
        }
    }

    /// Whether the limits allow starting `j` on top of these counts.
    fn allows(&self, s: &Snapshot, j: &QueuedJob) -> bool {
        let ok = |u: Usage, v: Option<&LimitValues>| {
            v.is_none_or(|v| {
                v.max_running_jobs.is_none_or(|m| u.running < m)
                    && v.max_gpus.is_none_or(|m| u.gpus + j.demand.gpus <= m)
            })
        };
        let user = self.users.get(&j.owner).copied().unwrap_or_default();
        let org = self.orgs.get(&j.org).copied().unwrap_or_default();
        ok(self.global, Some(&s.limits.global))
            && (j.org.is_empty() || ok(org, s.limits.orgs.get(&j.org)))
            && user_limit(s, &j.owner, &j.org, |v| v.max_running_jobs)
                .is_none_or(|m| user.running < m)
            && user_limit(s, &j.owner, &j.org, |v| v.max_gpus)
                .is_none_or(|m| user.gpus + j.demand.gpus <= m)
    }
}

/// Not held, not awaiting approval, not in backoff.
fn eligible(s: &Snapshot, j: &QueuedJob) -> bool {
    s.held.is_none() && j.approval_rule.is_none() && j.not_before <= s.now
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

/// Checks every property.
fn check(s: &Snapshot, p: &Plan) -> Result<(), TestCaseError> {
    let jobs: HashMap<JobId, &QueuedJob> = s.queued.iter().map(|j| (j.job_id, j)).collect();
    let eff = |j: &QueuedJob| effective_priority(j, s.now, s.ageing_step_micros);

    // Every job is either placed or waiting, once; waiting jobs say why.
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
    prop_assert!(p.waiting.iter().all(|w| !w.causes.is_empty()));

    // No limit of any scope is exceeded by a placement; nothing held, in
    // backoff or awaiting approval starts.
    let mut counts = Counts::of(s);
    for pl in &p.placements {
        let job = jobs[&pl.job_id];
        prop_assert!(
            eligible(s, job),
            "job {} started while held/backoff/approval",
            job.job_id
        );
        prop_assert!(
            counts.allows(s, job),
            "placing {} exceeds a limit",
            job.job_id
        );
        counts.add(job);
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
        let (a, b) = (jobs[&w[0].job_id], jobs[&w[1].job_id]);
        prop_assert!(queue_order((eff(a), a), (eff(b), b)).is_lt());
    }
    for w in p.waiting.windows(2) {
        let (a, b) = (jobs[&w[0].job_id], jobs[&w[1].job_id]);
        prop_assert!(queue_order((eff(a), a), (eff(b), b)).is_lt());
    }
    for (i, w) in p.waiting.iter().enumerate() {
        prop_assert_eq!(w.position as usize, i + 1);
    }

    // Nothing is left waiting that could start now: usage only grows and
    // capacity only shrinks during a plan, so a waiting job must be
    // inadmissible against the final state.
    for w in &p.waiting {
        let job = jobs[&w.job_id];
        let fits_somewhere = s
            .runners
            .iter()
            .any(|r| fits(&job.demand, r.runner_id, &free));
        prop_assert!(
            !(eligible(s, job) && counts.allows(s, job) && fits_somewhere),
            "job {} waits ({:?}) though it could start",
            job.job_id,
            w.reason
        );
    }

    // The first placement is the highest-priority admissible job.
    let start = initial(s);
    let before = Counts::of(s);
    let mut order: Vec<&QueuedJob> = s.queued.iter().collect();
    order.sort_by(|a, b| queue_order((eff(a), a), (eff(b), b)));
    let first_admissible = order.iter().find(|j| {
        eligible(s, j)
            && before.allows(s, j)
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

    /// A user at their running-jobs limit never blocks anyone: removing
    /// that user's jobs changes nothing for the others.
    #[test]
    fn users_at_the_limit_do_not_change_others_placements(s in arb_snapshot()) {
        let blocked: BTreeSet<String> = USERS
            .iter()
            .zip(ORGS)
            .filter(|(u, o)| {
                let running = s.users.get(**u).map(|x| x.running).unwrap_or(0);
                user_limit(&s, u, o, |v| v.max_running_jobs).is_some_and(|m| running >= m)
            })
            .map(|(u, _)| u.to_string())
            .collect();
        prop_assume!(!blocked.is_empty());
        let mut without = s.clone();
        without.queued.retain(|j| !blocked.contains(&j.owner));
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
