use super::*;

fn job(owner: &str, priority: i32, t: i64, gpus: u32) -> QueuedJob {
    QueuedJob {
        job_id: JobId::new(),
        owner: owner.into(),
        org: "ml".into(),
        priority,
        submit_time: t,
        demand: Demand {
            gpus,
            ..Default::default()
        },
        not_before: 0,
        approval_rule: None,
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
    Snapshot::new(queued, runners, LimitTable::per_user_running(limit))
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
            limit: 2,
            scope: Scope::UserDefault,
        }
    )));
    assert_eq!(
        p.waiting[0].detail,
        "user limit max_running_jobs=2 from USER_DEFAULT; alice has 2 running"
    );
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
            fits_any_idle_runner: false,
            largest_free_gpus: 0,
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

#[test]
fn org_and_global_gpu_limits_bind_and_every_cause_is_listed() {
    let mut limits = LimitTable::per_user_running(1);
    limits.global.max_gpus = Some(4);
    limits.orgs.insert(
        "ml".into(),
        LimitValues {
            max_running_jobs: Some(1),
            ..Default::default()
        },
    );
    let first = job("alice", 0, 0, 2);
    let second = job("alice", 0, 1, 4);
    let mut s = Snapshot::new(
        vec![first.clone(), second.clone()],
        vec![runner(2, "H100")],
        limits,
    );
    s.held = None;
    let p = plan(&s);
    assert_eq!(p.placements.len(), 1);
    let w = &p.waiting[0];
    let reasons: Vec<_> = w.causes.iter().map(|c| c.reason.clone()).collect();
    assert!(matches!(
        reasons[0],
        WaitReason::GlobalLimit {
            kind: LimitKind::Gpus,
            limit: 4,
            current: 2
        }
    ));
    assert!(matches!(
        reasons[1],
        WaitReason::OrgLimit {
            kind: LimitKind::RunningJobs,
            limit: 1,
            current: 1
        }
    ));
    assert!(matches!(
        reasons[2],
        WaitReason::UserRunningLimit {
            limit: 1,
            running: 1,
            scope: Scope::UserDefault
        }
    ));
    assert!(matches!(
        reasons[3],
        WaitReason::NoRunnerCapacity {
            largest_free_gpus: 0,
            ..
        }
    ));
}

#[test]
fn ageing_lifts_an_old_low_priority_job_over_a_new_one() {
    let old = job("a", 0, 0, 1);
    let new = job("b", 2, 25 * 60_000_000, 1);
    let mut s = snapshot(vec![new.clone(), old.clone()], vec![runner(1, "H100")], 0);
    s.now = 30 * 60_000_000;
    s.ageing_step_micros = 10 * 60_000_000;
    // old: 0 + 3 = 3 > new: 2 + 0 = 2.
    assert_eq!(plan(&s).placements[0].job_id, old.job_id);
    s.ageing_step_micros = 0;
    assert_eq!(plan(&s).placements[0].job_id, new.job_id);
}

#[test]
fn held_queue_backoff_and_approval_keep_jobs_waiting() {
    let mut backoff = job("a", 0, 0, 0);
    backoff.not_before = 5_000_000;
    let mut approval = job("b", 0, 1, 0);
    approval.approval_rule = Some("big".into());
    let free = job("c", 0, 2, 0);
    let mut s = snapshot(
        vec![backoff.clone(), approval.clone(), free.clone()],
        vec![runner(0, "")],
        0,
    );
    s.now = 1_000_000;
    let p = plan(&s);
    assert_eq!(p.placements.len(), 1);
    assert_eq!(p.placements[0].job_id, free.job_id);
    assert_eq!(
        p.waiting[0].reason,
        WaitReason::Backoff { until: 5_000_000 }
    );
    assert_eq!(p.waiting[0].detail, "in retry backoff for another 4s");
    assert_eq!(
        p.waiting[1].reason,
        WaitReason::AwaitingApproval { rule: "big".into() }
    );
    s.held = Some("held by admin: maintenance".into());
    let p = plan(&s);
    assert!(p.placements.is_empty());
    assert!(p.waiting.iter().all(|w| w.reason == WaitReason::Held));
}

#[test]
fn a_job_is_not_placed_on_a_runner_it_avoids() {
    let (a, b) = (runner(1, "H100"), runner(1, "H100"));
    let j = job("alice", 0, 0, 1);
    let mut s = snapshot(vec![j.clone()], vec![a.clone(), b.clone()], 0);
    s.avoid.insert(j.job_id, vec![a.runner_id]);
    let p = plan(&s);
    assert_eq!(p.placements.len(), 1);
    assert_eq!(p.placements[0].runner_id, b.runner_id);
}

#[test]
fn a_job_that_fits_only_on_runners_it_avoids_waits_and_says_so() {
    let a = runner(1, "H100");
    let j = job("alice", 0, 0, 1);
    let mut s = snapshot(vec![j.clone()], vec![a.clone()], 0);
    s.avoid.insert(j.job_id, vec![a.runner_id]);
    s.runner_names.insert(a.runner_id, "runner-a".into());
    let p = plan(&s);
    assert!(p.placements.is_empty());
    assert_eq!(p.waiting.len(), 1);
    let w = &p.waiting[0];
    assert_eq!(w.causes.len(), 1, "{:?}", w.causes);
    assert_eq!(
        w.reason,
        WaitReason::AvoidingRunners {
            avoided: vec!["runner-a".into()],
            cordoned: vec![],
            others_fit: false,
        }
    );
    assert_eq!(
        w.detail,
        "avoiding runner `runner-a` after a node fault there; no other runner has room for it"
    );
}

#[test]
fn a_cordoned_runner_gets_no_new_jobs_and_is_named_when_it_would_fit() {
    let (a, b) = (runner(1, "H100"), runner(1, "H100"));
    let (j1, j2) = (job("alice", 0, 0, 1), job("bob", 0, 1, 1));
    let mut s = snapshot(vec![j1.clone(), j2.clone()], vec![a.clone(), b.clone()], 0);
    s.closed
        .insert(a.runner_id, "cordoned after 3 node faults".into());
    s.runner_names.insert(a.runner_id, "runner-a".into());
    let p = plan(&s);
    assert_eq!(p.placements.len(), 1);
    assert_eq!(p.placements[0].runner_id, b.runner_id);
    // The second waits for `b` to free its GPU; `a` is named as cordoned.
    let w = &p.waiting[0];
    assert_eq!(w.job_id, j2.job_id);
    assert!(matches!(
        w.causes[0].reason,
        WaitReason::NoRunnerCapacity {
            fits_any_idle_runner: true,
            ..
        }
    ));
    assert_eq!(
        w.causes[1].detail,
        "runner `runner-a` is cordoned (cordoned after 3 node faults)"
    );
}
