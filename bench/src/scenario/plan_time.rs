//! The pure decision, `scheduler_service::plan::plan`, timed on a snapshot
//! shaped like the dispatch scenario's queue: N jobs from U users, nobody
//! running yet, runners with spare GPUs. No I/O: this is the floor under
//! one dispatch round.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use scheduler_service::domain::{Demand, GpuInfo, JobId, RunnerCapacity, RunnerId};
use scheduler_service::plan::{plan, LimitTable, QueuedJob, RunnerState, Snapshot};

use crate::report::Row;
use crate::stats::{ms, percentile};

const NAME: &str = "dispatch";
const ROUNDS: usize = 15;

pub fn snapshot(jobs: usize, users: usize, limit: u32, runners: usize, gpus: i32) -> Snapshot {
    let users = users.max(1);
    let queued = (0..jobs)
        .map(|i| QueuedJob {
            job_id: JobId::new(),
            owner: format!("user-{:03}", i % users),
            org: "ml".into(),
            priority: 0,
            submit_time: i as i64,
            demand: Demand {
                gpus: 1,
                gpu_type: String::new(),
                cpu_milli: 1000,
                memory_mib: 1024,
            },
            not_before: 0,
            approval_rule: None,
        })
        .collect();
    let runners = (0..runners)
        .map(|_| RunnerState {
            runner_id: RunnerId::new(),
            capacity: RunnerCapacity {
                gpus: (0..gpus)
                    .map(|index| GpuInfo {
                        index,
                        model: "NVIDIA H100 80GB HBM3".into(),
                    })
                    .collect(),
                cpu_milli: i64::from(gpus) * 4000,
                memory_mib: i64::from(gpus) * 16 * 1024,
            },
            used_gpus: BTreeSet::new(),
            used_cpu_milli: 0,
            used_memory_mib: 0,
        })
        .collect();
    let mut snap = Snapshot::new(queued, runners, LimitTable::per_user_running(limit));
    // As the dispatcher runs it: ageing on (the default step), now after
    // every submission.
    snap.now = jobs as i64 + 60_000_000;
    snap.ageing_step_micros = 10 * 60 * 1_000_000;
    snap
}

/// The median time of `plan()` over several rounds, as a row.
pub fn measure(jobs: usize, users: usize, limit: u32) -> Vec<Row> {
    let slots = (users as i64 * i64::from(limit.max(1)) * 5 / 4).max(1);
    let runners = usize::try_from((slots + 31) / 32).unwrap_or(1).max(1);
    let snap = snapshot(jobs, users, limit, runners, 32);
    let first = plan(&snap);
    let mut times: Vec<Duration> = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let p = plan(&snap);
        times.push(t.elapsed());
        std::hint::black_box(p);
    }
    let median = percentile(&times, 50.0).map(ms).unwrap_or(f64::NAN);
    vec![Row::info(
        NAME,
        "none",
        format!("plan() on {jobs} queued, {users} users (pure, median)"),
        median,
        "ms",
    )
    .with_note(format!(
        "{} placements, {} waiting; {ROUNDS} rounds",
        first.placements.len(),
        first.waiting.len()
    ))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_places_at_most_the_limit_per_user() {
        let snap = snapshot(1000, 10, 2, 1, 32);
        let p = plan(&snap);
        assert_eq!(p.placements.len(), 20);
        assert_eq!(p.waiting.len(), 980);
    }
}
