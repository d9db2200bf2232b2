use super::*;

fn default_policy() -> Policy {
    Policy::of(None, 3, Duration::from_secs(10), Duration::from_secs(600))
}

fn policy(p: RetryPolicy) -> Policy {
    Policy::of(
        Some(&p),
        3,
        Duration::from_secs(10),
        Duration::from_secs(600),
    )
}

fn failed(code: i32, cause: FailureCause) -> Ending {
    Ending::Failed {
        cause,
        exit_code: Some(code),
    }
}

/// Attempt `attempt` (started, the `attempt`th started) on `runner-a`,
/// with 2048 MiB and nothing avoided.
fn ended(ending: Ending, diagnosis: Diagnosis, attempt: i64) -> Ended<'static> {
    Ended {
        ending,
        diagnosis,
        attempt,
        this_started: true,
        started: attempt,
        runner: "runner-a",
        memory_mib: 2048,
        avoided: &[],
    }
}

fn plain(ending: Ending, this_started: bool, started: i64, attempt: i64) -> Ended<'static> {
    Ended {
        this_started,
        started,
        ..ended(ending, Diagnosis::Other, attempt)
    }
}

fn oom(attempt: i64, memory_mib: i64) -> Ended<'static> {
    Ended {
        memory_mib,
        ..ended(
            failed(137, FailureCause::Signal),
            Diagnosis::OomKilled,
            attempt,
        )
    }
}

fn node_fault(avoided: &'static [String]) -> Ended<'static> {
    Ended {
        avoided,
        ..ended(failed(1, FailureCause::Platform), Diagnosis::NodeFault, 1)
    }
}

fn reason_of(d: Decision) -> (Duration, String, Change) {
    match d {
        Decision::Retry {
            backoff,
            reason,
            change,
        } => (backoff, reason, change),
        d => panic!("expected a retry: {d:?}"),
    }
}

fn why_of(d: Decision) -> String {
    match d {
        Decision::Final { why } => why,
        d => panic!("expected no retry: {d:?}"),
    }
}

#[test]
fn signal_exits_retry_with_doubling_backoff_until_the_budget_ends() {
    let p = default_policy();
    let killed = |n| plain(failed(139, FailureCause::Signal), true, n, n);
    assert_eq!(
        decide(&p, &killed(1)),
        Decision::Retry {
            backoff: Duration::from_secs(10),
            reason: "retrying after exit 139 (attempt 1 of 3) in 10s".into(),
            change: Change::Same,
        }
    );
    assert_eq!(reason_of(decide(&p, &killed(2))).0, Duration::from_secs(20));
    assert!(matches!(decide(&p, &killed(3)), Decision::Final { .. }));
    assert_eq!(p.backoff(10), Duration::from_secs(600));
    assert_eq!(human(Duration::from_secs(80)), "1m20s");
}

#[test]
fn user_errors_and_setup_failures_are_final_by_default() {
    let p = default_policy();
    let why = why_of(decide(
        &p,
        &plain(failed(1, FailureCause::UserCode), true, 1, 1),
    ));
    assert!(why.contains("own code failed (exit 1)"), "{why}");
    assert!(why.contains("retry_user_errors"), "{why}");
    assert!(matches!(
        decide(&p, &plain(failed(-1, FailureCause::Setup), false, 0, 1)),
        Decision::Final { .. }
    ));
    let lenient = policy(RetryPolicy {
        retry_user_errors: true,
        ..Default::default()
    });
    assert!(matches!(
        decide(
            &lenient,
            &plain(failed(1, FailureCause::UserCode), true, 1, 1)
        ),
        Decision::Retry { .. }
    ));
}

#[test]
fn an_unschedulable_attempt_is_retried_without_using_the_budget() {
    let p = Policy::of(None, 1, Duration::from_secs(10), Duration::from_secs(600));
    let unplaced = |n| plain(failed(-1, FailureCause::NoCapacity), false, 0, n);
    assert!(matches!(decide(&p, &unplaced(1)), Decision::Retry { .. }));
    assert!(matches!(
        decide(&p, &unplaced(1 + NEVER_STARTED_ALLOWANCE)),
        Decision::Final { .. }
    ));
}

#[test]
fn a_preempted_attempt_is_retried_at_once_without_using_the_budget() {
    let p = Policy::of(None, 1, Duration::from_secs(10), Duration::from_secs(600));
    let preempted = failed(143, FailureCause::Preempted);
    // Attempt 1 started, the only one the budget allows, and was
    // preempted: it does not count.
    let (backoff, reason, _) = reason_of(decide(&p, &plain(preempted, true, 1, 1)));
    assert_eq!(backoff, Duration::ZERO);
    assert!(reason.contains("preemption"), "{reason}");
    assert!(reason.contains("does not count"), "{reason}");
    // Preempted again and again: bounded like attempts that never start.
    assert!(matches!(
        decide(&p, &plain(preempted, true, 1, 1 + NEVER_STARTED_ALLOWANCE)),
        Decision::Final { .. }
    ));
}

#[test]
fn lost_attempts_that_never_started_do_not_use_the_budget() {
    let p = Policy::of(None, 1, Duration::from_secs(10), Duration::from_secs(600));
    let (backoff, reason, _) = reason_of(decide(&p, &plain(Ending::Lost, false, 0, 1)));
    assert_eq!(backoff, Duration::ZERO);
    assert!(reason.contains("does not count"), "{reason}");
    assert!(matches!(
        decide(&p, &plain(Ending::Lost, true, 1, 1)),
        Decision::Final { .. }
    ));
    assert!(matches!(
        decide(
            &p,
            &plain(Ending::Lost, false, 0, 1 + NEVER_STARTED_ALLOWANCE)
        ),
        Decision::Final { .. }
    ));
}

#[test]
fn an_out_of_memory_kill_is_retried_at_once_with_half_as_much_memory_again() {
    let (backoff, reason, change) = reason_of(decide(&default_policy(), &oom(1, 2048)));
    assert_eq!(backoff, Duration::ZERO);
    assert_eq!(change, Change::Memory { mib: 3072 });
    assert_eq!(
        reason,
        "retrying with memory 3072 MiB (1.5 × 2048 MiB) after the out-of-memory killer \
         stopped attempt 1 (attempt 1 of 3)"
    );
    // Rounded up to a MiB, and a factor of 1.1 is exact.
    assert_eq!(
        reason_of(decide(&default_policy(), &oom(1, 1001))).2,
        Change::Memory { mib: 1502 }
    );
    let p = policy(RetryPolicy {
        memory_factor: 1.1,
        ..Default::default()
    });
    assert_eq!(
        reason_of(decide(&p, &oom(1, 100))).2,
        Change::Memory { mib: 110 }
    );
}

#[test]
fn more_memory_stops_at_the_ceiling() {
    // 4 × 2048 by default: 3072 → 4608 → 6912 → 8192 (capped) → final.
    let p = Policy {
        max_attempts: 10,
        ..default_policy()
    };
    let ceiling = p.memory_ceiling(2048);
    assert_eq!(ceiling, 8192);
    let capped = Policy {
        max_memory_mib: ceiling,
        ..p.clone()
    };
    let (_, reason, change) = reason_of(decide(&capped, &oom(4, 6912)));
    assert_eq!(change, Change::Memory { mib: 8192 });
    assert!(
        reason.contains("capped by retry_policy.max_memory_mib"),
        "{reason}"
    );
    let why = why_of(decide(&capped, &oom(5, 8192)));
    assert!(
        why.contains("at 8192 MiB, the most this job may ask for"),
        "{why}"
    );
    assert!(why.contains("retry_policy.max_memory_mib"), "{why}");
    // The job's own ceiling.
    let own = policy(RetryPolicy {
        max_memory_mib: 2500,
        ..Default::default()
    });
    assert_eq!(
        reason_of(decide(&own, &oom(1, 2048))).2,
        Change::Memory { mib: 2500 }
    );
}

#[test]
fn an_out_of_memory_kill_is_never_retried_unchanged() {
    // No memory asked for: nothing to raise.
    let why = why_of(decide(&default_policy(), &oom(1, 0)));
    assert!(why.contains("set spec.resources.memory_mib"), "{why}");
    // The job says fail.
    let fail = policy(RetryPolicy {
        on_oom_killed: OomKilledAction::Fail as i32,
        ..Default::default()
    });
    let why = why_of(decide(&fail, &oom(1, 2048)));
    assert!(why.contains("on_oom_killed is FAIL"), "{why}");
    // The budget is spent.
    let why = why_of(decide(&default_policy(), &oom(3, 4608)));
    assert!(why.contains("no attempts left (3 of 3 started)"), "{why}");
}

#[test]
fn memory_arithmetic_saturates_on_huge_numbers() {
    let p = policy(RetryPolicy {
        memory_factor: 4.0,
        ..Default::default()
    });
    assert_eq!(p.raised(i64::MAX), i64::MAX / 1000);
    assert!(p.memory_ceiling(i64::MAX) <= MAX_MEMORY_MIB);
    let (_, _, change) = reason_of(decide(&p, &oom(1, MAX_MEMORY_MIB / 2)));
    assert_eq!(
        change,
        Change::Memory {
            mib: MAX_MEMORY_MIB
        }
    );
}

#[test]
fn a_cuda_out_of_memory_error_is_final_even_for_lenient_policies() {
    let lenient = policy(RetryPolicy {
        retry_user_errors: true,
        ..Default::default()
    });
    let cuda = ended(failed(1, FailureCause::UserCode), Diagnosis::CudaOom, 1);
    let why = why_of(decide(&lenient, &cuda));
    assert!(why.contains("CUDA out of memory"), "{why}");
    assert!(why.contains("not retried"), "{why}");
}

#[test]
fn a_node_fault_moves_the_job_to_another_runner_without_using_the_budget() {
    let one = Policy::of(None, 1, Duration::from_secs(10), Duration::from_secs(600));
    let (backoff, reason, change) = reason_of(decide(&one, &node_fault(&[])));
    assert_eq!(backoff, Duration::ZERO);
    assert_eq!(
        change,
        Change::AvoidRunner {
            name: "runner-a".into()
        }
    );
    assert!(
        reason.starts_with(
            "retrying on another runner after a node fault on runner `runner-a` stopped attempt 1"
        ),
        "{reason}"
    );
    assert!(reason.contains("does not count"), "{reason}");
}

#[test]
fn node_faults_on_too_many_runners_end_the_job() {
    static THREE: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| vec!["b".into(), "c".into(), "d".into()]);
    let why = why_of(decide(&default_policy(), &node_fault(&THREE)));
    assert!(why.contains("on 4 runners"), "{why}");
    assert!(why.contains("`runner-a`"), "{why}");
    static TWO: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| vec!["b".into(), "c".into()]);
    assert!(matches!(
        decide(&default_policy(), &node_fault(&TWO)),
        Decision::Retry { .. }
    ));
    let fail = policy(RetryPolicy {
        on_node_fault: NodeFaultAction::Fail as i32,
        ..Default::default()
    });
    let why = why_of(decide(&fail, &node_fault(&[])));
    assert!(why.contains("on_node_fault is FAIL"), "{why}");
}

#[test]
fn image_pulls_retry_with_backoff_only_when_transient() {
    let pull = |transient| Ended {
        this_started: false,
        started: 0,
        ..ended(
            failed(-1, FailureCause::ImagePull),
            Diagnosis::ImagePull { transient },
            1,
        )
    };
    let (backoff, reason, _) = reason_of(decide(&default_policy(), &pull(true)));
    assert_eq!(backoff, Duration::from_secs(10));
    assert!(reason.contains("failed image pull"), "{reason}");
    let why = why_of(decide(&default_policy(), &pull(false)));
    assert!(why.contains("fix spec.image"), "{why}");
}

#[test]
fn a_lost_runner_is_the_platforms_whatever_the_diagnosis() {
    let lost = Ended {
        ending: Ending::Lost,
        ..oom(1, 2048)
    };
    let (backoff, reason, change) = reason_of(decide(&default_policy(), &lost));
    assert_eq!((backoff, change), (Duration::ZERO, Change::Same));
    assert!(reason.starts_with("retrying after runner lost"), "{reason}");
}

#[test]
fn the_diagnosis_comes_from_the_runners_error() {
    let err = |category: &str, retryable, node_fault| JobError {
        category: category.into(),
        retryable,
        node_fault,
        ..Default::default()
    };
    assert_eq!(Diagnosis::of(None), Diagnosis::Other);
    assert_eq!(
        Diagnosis::of(Some(&err("oom-killed", true, false))),
        Diagnosis::OomKilled
    );
    assert_eq!(
        Diagnosis::of(Some(&err("cuda-oom", false, false))),
        Diagnosis::CudaOom
    );
    assert_eq!(
        Diagnosis::of(Some(&err("gpu-unavailable", true, true))),
        Diagnosis::NodeFault
    );
    assert_eq!(
        Diagnosis::of(Some(&err("image-pull", false, false))),
        Diagnosis::ImagePull { transient: false }
    );
    assert_eq!(
        Diagnosis::of(Some(&err("user-code", false, false))),
        Diagnosis::Other
    );
}
