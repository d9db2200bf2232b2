//! The retry policy as a pure decision: after an attempt ends without
//! success, is the job queued again (and after what backoff) or final?
//!
//! - exit codes 1–127 (the job's own code) are final unless the policy
//!   sets `retry_user_errors`; 128–255 (signals, the OOM killer), a lost
//!   runner, platform failures and a cluster without room for the pods
//!   (no capacity) are retried; setup, image-pull and
//!   deadline failures are final (running again would fail the same way);
//! - `max_attempts` counts attempts that started (reached RUNNING); an
//!   attempt lost or failed by the platform before it started, and an
//!   attempt the platform preempted (a pod preempted or evicted), do not use
//!   the budget, but at most [`NEVER_STARTED_ALLOWANCE`] such attempts are
//!   added on top so a job that can never run to its end still ends;
//! - a failed attempt waits `initial_backoff` doubled per started attempt
//!   (10 s, 20 s, 40 s … capped at `max_backoff`, 10 min) before it may be
//!   dispatched again; a lost runner or a preemption says nothing about
//!   the job, so such an attempt is retried at once.
//!
//! The scheduler itself does not preempt (yet); preemption reaches it from
//! a backend (Kubernetes) or from a runner that was stopped and handed its
//! attempts back ([`crate::leases`]), as an attempt that ended with cause
//! PREEMPTED.

use std::time::Duration;

use trainmesh_common::proto::job::v1::{FailureCause, RetryPolicy};
use trainmesh_common::time::from_duration;

/// Extra dispatches allowed for attempts that never started.
pub const NEVER_STARTED_ALLOWANCE: i64 = 5;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub max_attempts: i64,
    pub retry_user_errors: bool,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Policy {
    /// The job's policy with the scheduler's defaults filled in.
    pub fn of(
        p: Option<&RetryPolicy>,
        max_attempts: i64,
        initial: Duration,
        max: Duration,
    ) -> Self {
        let initial_backoff = p
            .and_then(|p| p.initial_backoff.as_ref())
            .and_then(from_duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(initial);
        let max_backoff = p
            .and_then(|p| p.max_backoff.as_ref())
            .and_then(from_duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(max)
            .max(initial_backoff);
        Policy {
            max_attempts: max_attempts.max(1),
            retry_user_errors: p.is_some_and(|p| p.retry_user_errors),
            initial_backoff,
            max_backoff,
        }
    }

    /// Backoff before the retry that follows `started` started attempts.
    pub fn backoff(&self, started: i64) -> Duration {
        let doublings = u32::try_from(started.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The runner reported FAILED with this cause and exit code.
    Failed {
        cause: FailureCause,
        exit_code: Option<i32>,
    },
    /// The runner's lease expired, or it stopped listing the attempt.
    Lost,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Retry {
        /// Zero: dispatch again at once.
        backoff: Duration,
        /// The status update's reason, e.g. "retrying after exit 137
        /// (attempt 1 of 3) in 10s".
        reason: String,
    },
    Final {
        /// Why no retry; empty when the cause itself is final.
        why: String,
    },
}

/// "10s", "1m20s", "10m".
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 60, s % 60) {
        (0, s) => format!("{s}s"),
        (m, 0) => format!("{m}m"),
        (m, s) => format!("{m}m{s}s"),
    }
}

fn retryable(cause: FailureCause, policy: &Policy) -> bool {
    match cause {
        FailureCause::UserCode => policy.retry_user_errors,
        // A pod the cluster could not place may fit later or elsewhere; it
        // never started, so the never-started allowance bounds the retries.
        FailureCause::Signal
        | FailureCause::Platform
        | FailureCause::NoCapacity
        | FailureCause::Preempted
        | FailureCause::Unspecified => true,
        _ => false,
    }
}

/// `attempt` is the number of the attempt that ended; `started` counts the
/// started attempts including this one if it started.
pub fn decide(
    policy: &Policy,
    ending: Ending,
    this_started: bool,
    started: i64,
    attempt: i64,
) -> Decision {
    let preempted = matches!(
        ending,
        Ending::Failed {
            cause: FailureCause::Preempted,
            ..
        }
    );
    // A preempted attempt ran, but the platform ended it: it counts as one
    // that never started (the caller gives its place in the stored count
    // back), so the allowance below bounds repeated preemptions.
    let (this_started, started) = if preempted {
        (false, started - i64::from(this_started))
    } else {
        (this_started, started)
    };
    let what = match ending {
        Ending::Lost => "runner lost".to_owned(),
        _ if preempted => "preemption".to_owned(),
        Ending::Failed {
            exit_code: Some(c), ..
        } => format!("exit {c}"),
        Ending::Failed { cause, .. } => cause
            .as_str_name()
            .trim_start_matches("FAILURE_CAUSE_")
            .to_lowercase()
            .replace('_', " "),
    };
    if let Ending::Failed { cause, .. } = ending {
        if !retryable(cause, policy) {
            return Decision::Final { why: String::new() };
        }
    }
    if this_started && started >= policy.max_attempts {
        return Decision::Final {
            why: format!(
                "no attempts left ({started} of {} started)",
                policy.max_attempts
            ),
        };
    }
    if !this_started && attempt >= policy.max_attempts + NEVER_STARTED_ALLOWANCE {
        return Decision::Final {
            why: format!("{attempt} attempts dispatched, none of the last ones started"),
        };
    }
    let counted = if this_started {
        format!("attempt {started} of {}", policy.max_attempts)
    } else if preempted {
        "a preempted attempt does not count".to_owned()
    } else {
        "the attempt never started and does not count".to_owned()
    };
    if preempted || ending == Ending::Lost {
        return Decision::Retry {
            backoff: Duration::ZERO,
            reason: format!("retrying after {what} ({counted})"),
        };
    }
    let backoff = policy.backoff(started.max(1));
    Decision::Retry {
        backoff,
        reason: format!("retrying after {what} ({counted}) in {}", human(backoff)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_policy() -> Policy {
        Policy::of(None, 3, Duration::from_secs(10), Duration::from_secs(600))
    }

    fn failed(code: i32, cause: FailureCause) -> Ending {
        Ending::Failed {
            cause,
            exit_code: Some(code),
        }
    }

    #[test]
    fn signal_exits_retry_with_doubling_backoff_until_the_budget_ends() {
        let p = default_policy();
        assert_eq!(
            decide(&p, failed(137, FailureCause::Signal), true, 1, 1),
            Decision::Retry {
                backoff: Duration::from_secs(10),
                reason: "retrying after exit 137 (attempt 1 of 3) in 10s".into()
            }
        );
        match decide(&p, failed(137, FailureCause::Signal), true, 2, 2) {
            Decision::Retry { backoff, .. } => assert_eq!(backoff, Duration::from_secs(20)),
            d => panic!("{d:?}"),
        }
        assert!(matches!(
            decide(&p, failed(137, FailureCause::Signal), true, 3, 3),
            Decision::Final { .. }
        ));
        assert_eq!(p.backoff(10), Duration::from_secs(600));
        assert_eq!(human(Duration::from_secs(80)), "1m20s");
    }

    #[test]
    fn user_errors_and_setup_failures_are_final_by_default() {
        let p = default_policy();
        assert_eq!(
            decide(&p, failed(1, FailureCause::UserCode), true, 1, 1),
            Decision::Final { why: String::new() }
        );
        assert!(matches!(
            decide(&p, failed(-1, FailureCause::Setup), false, 0, 1),
            Decision::Final { .. }
        ));
        let lenient = Policy::of(
            Some(&RetryPolicy {
                retry_user_errors: true,
                ..Default::default()
            }),
            3,
            Duration::from_secs(10),
            Duration::from_secs(600),
        );
        assert!(matches!(
            decide(&lenient, failed(1, FailureCause::UserCode), true, 1, 1),
            Decision::Retry { .. }
        ));
    }

    #[test]
    fn an_unschedulable_attempt_is_retried_without_using_the_budget() {
        let p = Policy::of(None, 1, Duration::from_secs(10), Duration::from_secs(600));
        assert!(matches!(
            decide(&p, failed(-1, FailureCause::NoCapacity), false, 0, 1),
            Decision::Retry { .. }
        ));
        assert!(matches!(
            decide(
                &p,
                failed(-1, FailureCause::NoCapacity),
                false,
                0,
                1 + NEVER_STARTED_ALLOWANCE
            ),
            Decision::Final { .. }
        ));
    }

    #[test]
    fn a_preempted_attempt_is_retried_at_once_without_using_the_budget() {
        let p = Policy::of(None, 1, Duration::from_secs(10), Duration::from_secs(600));
        let preempted = failed(143, FailureCause::Preempted);
        // Attempt 1 started, the only one the budget allows, and was
        // preempted: it does not count.
        match decide(&p, preempted, true, 1, 1) {
            Decision::Retry { backoff, reason } => {
                assert_eq!(backoff, Duration::ZERO);
                assert!(reason.contains("preemption"), "{reason}");
                assert!(reason.contains("does not count"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        // Preempted again and again: bounded like attempts that never start.
        assert!(matches!(
            decide(&p, preempted, true, 1, 1 + NEVER_STARTED_ALLOWANCE),
            Decision::Final { .. }
        ));
    }

    #[test]
    fn lost_attempts_that_never_started_do_not_use_the_budget() {
        let p = Policy::of(None, 1, Duration::from_secs(10), Duration::from_secs(600));
        match decide(&p, Ending::Lost, false, 0, 1) {
            Decision::Retry { backoff, reason } => {
                assert_eq!(backoff, Duration::ZERO);
                assert!(reason.contains("does not count"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        assert!(matches!(
            decide(&p, Ending::Lost, true, 1, 1),
            Decision::Final { .. }
        ));
        assert!(matches!(
            decide(&p, Ending::Lost, false, 0, 1 + NEVER_STARTED_ALLOWANCE),
            Decision::Final { .. }
        ));
    }
}
