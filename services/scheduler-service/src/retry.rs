//! The retry policy as a pure decision: after an attempt ends without
//! success, is the job queued again (after what backoff, changed how) or
//! final? The decision follows what went wrong, as the runner diagnosed it
//! ([`Diagnosis`]), before the exit code:
//!
//! - an out-of-memory kill (host OOM killer, a container's limit, the
//!   process backend's limit) is never retried unchanged: the next attempt
//!   gets `memory_factor` × the memory (default 1.5, rounded up), at most
//!   `max_memory_mib` (default 4 × the first request), at once; or the job
//!   fails (`on_oom_killed: FAIL`, no memory requested, or at the cap);
//! - a CUDA out-of-memory error is final, even with `retry_user_errors`:
//!   the same work on the same GPUs runs out again;
//! - a node fault (the node could not run GPU work) is retried at once on
//!   another runner, without using the budget, for up to
//!   [`NODE_FAULT_ALLOWANCE`] runners (`on_node_fault: FAIL` ends the job);
//! - an image pull is retried with backoff when the runner says it may
//!   pass (`JobError.retryable`), else final;
//! - otherwise the exit code: 1–127 (the job's own code) is final unless
//!   the policy sets `retry_user_errors`; 128–255 (signals), a lost
//!   runner, platform failures and a cluster without room for the pods
//!   (no capacity) are retried; setup and deadline failures are final.
//!
//! `max_attempts` counts attempts that started (reached RUNNING); an
//! attempt lost or failed by the platform before it started, and an attempt
//! the platform preempted, do not use the budget, but at most
//! [`NEVER_STARTED_ALLOWANCE`] such attempts are added on top so a job that
//! can never run to its end still ends. A failed attempt waits
//! `initial_backoff` doubled per started attempt (10 s, 20 s, 40 s … capped
//! at `max_backoff`, 10 min) before it may be dispatched again; a lost
//! runner, a preemption, a node fault or more memory says nothing
//! transient about the job, so those are retried at once.
//!
//! The scheduler itself does not preempt (yet); preemption reaches it from
//! a backend (Kubernetes) or from a runner that was stopped and handed its
//! attempts back ([`crate::leases`]), as an attempt that ended with cause
//! PREEMPTED.

use std::time::Duration;

use trainmesh_common::proto::job::v1::{
    FailureCause, JobError, NodeFaultAction, OomKilledAction, RetryPolicy,
};
use trainmesh_common::spec::limits::{DEFAULT_MEMORY_FACTOR, MAX_MEMORY_MIB};
use trainmesh_common::time::from_duration;

/// Extra dispatches allowed for attempts that never started.
pub const NEVER_STARTED_ALLOWANCE: i64 = 5;

/// Runners a job is moved off after node faults without using its budget;
/// a fault on one more ends the job (the job itself may be what fails).
pub const NODE_FAULT_ALLOWANCE: usize = 3;

/// Memory ceiling by default: this many times the first request.
pub const DEFAULT_MEMORY_CEILING: i64 = 4;

/// The runner categories the decision reads (the runner's `job_error`).
pub const CATEGORY_OOM_KILLED: &str = "oom-killed";
pub const CATEGORY_CUDA_OOM: &str = "cuda-oom";
pub const CATEGORY_IMAGE_PULL: &str = "image-pull";

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub max_attempts: i64,
    pub retry_user_errors: bool,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Retry an out-of-memory kill with more memory (else fail).
    pub more_memory: bool,
    /// Validated at the boundary: 1.1 to 4.0.
    pub memory_factor: f64,
    /// MiB per replica; 0: [`DEFAULT_MEMORY_CEILING`] × the first request
    /// (the caller writes it into the spec at the first raise).
    pub max_memory_mib: i64,
    /// Retry a node fault on another runner (else fail).
    pub other_runner: bool,
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
        let factor = p.map_or(0.0, |p| p.memory_factor);
        Policy {
            max_attempts: max_attempts.max(1),
            retry_user_errors: p.is_some_and(|p| p.retry_user_errors),
            initial_backoff,
            max_backoff,
            more_memory: p.is_none_or(|p| p.on_oom_killed() != OomKilledAction::Fail),
            memory_factor: if factor.is_finite() && factor > 1.0 {
                factor
            } else {
                DEFAULT_MEMORY_FACTOR
            },
            max_memory_mib: p.map_or(0, |p| p.max_memory_mib.max(0)),
            other_runner: p.is_none_or(|p| p.on_node_fault() != NodeFaultAction::Fail),
        }
    }

    /// Backoff before the retry that follows `started` started attempts.
    pub fn backoff(&self, started: i64) -> Duration {
        let doublings = u32::try_from(started.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }

    /// The most memory retries may ask for, given the current request.
    pub fn memory_ceiling(&self, memory_mib: i64) -> i64 {
        let ceiling = if self.max_memory_mib > 0 {
            self.max_memory_mib
        } else {
            memory_mib.saturating_mul(DEFAULT_MEMORY_CEILING)
        };
        ceiling.min(MAX_MEMORY_MIB)
    }

    /// `memory_mib` × the factor, rounded up to a MiB (the factor taken to
    /// three decimals, so 1.1 × 100 is 110, not 111), saturating.
    pub fn raised(&self, memory_mib: i64) -> i64 {
        let milli = (self.memory_factor * 1000.0).round() as i64;
        memory_mib
            .saturating_mul(milli)
            .saturating_add(999)
            .saturating_div(1000)
    }
}

/// What the runner found wrong, from its structured error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Diagnosis {
    /// The out-of-memory killer (or a memory limit) stopped it.
    OomKilled,
    /// The GPU ran out of memory.
    CudaOom,
    /// The node could not run GPU work.
    NodeFault,
    /// The image could not be pulled; `transient` when it may pass.
    ImagePull {
        transient: bool,
    },
    Other,
}

impl Diagnosis {
    pub fn of(error: Option<&JobError>) -> Self {
        let Some(e) = error else {
            return Diagnosis::Other;
        };
        if e.node_fault {
            return Diagnosis::NodeFault;
        }
        match e.category.as_str() {
            CATEGORY_OOM_KILLED => Diagnosis::OomKilled,
            CATEGORY_CUDA_OOM => Diagnosis::CudaOom,
            CATEGORY_IMAGE_PULL => Diagnosis::ImagePull {
                transient: e.retryable,
            },
            _ => Diagnosis::Other,
        }
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

/// The attempt that ended, and what the decision needs about the job.
#[derive(Clone, Debug)]
pub struct Ended<'a> {
    pub ending: Ending,
    pub diagnosis: Diagnosis,
    /// The number of the attempt that ended.
    pub attempt: i64,
    /// Whether it started.
    pub this_started: bool,
    /// Started attempts, including this one if it started.
    pub started: i64,
    /// The runner's name it ran on.
    pub runner: &'a str,
    /// Memory per replica it ran with (MiB; 0: none requested).
    pub memory_mib: i64,
    /// Runners the job avoids already, after earlier node faults.
    pub avoided: &'a [String],
}

/// How the next attempt differs from the last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Same,
    /// This much memory per replica (MiB).
    Memory {
        mib: i64,
    },
    /// Not on this runner (by name); the attempt does not use the budget.
    AvoidRunner {
        name: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Retry {
        /// Zero: dispatch again at once.
        backoff: Duration,
        /// The status update's reason, e.g. "retrying after exit 137
        /// (attempt 1 of 3) in 10s".
        reason: String,
        change: Change,
    },
    Final {
        /// Why no retry; empty when the cause itself says it.
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

fn final_(why: impl Into<String>) -> Decision {
    Decision::Final { why: why.into() }
}

/// The decision after the attempt `a` ended.
pub fn decide(policy: &Policy, a: &Ended<'_>) -> Decision {
    let cause = match a.ending {
        Ending::Failed { cause, .. } => Some(cause),
        Ending::Lost => None,
    };
    // A lost runner or a preemption outranks what the attempt printed.
    let platform = matches!(cause, None | Some(FailureCause::Preempted));
    match a.diagnosis {
        _ if platform => {}
        Diagnosis::OomKilled => return more_memory(policy, a),
        Diagnosis::CudaOom => {
            return final_(format!(
                "attempt {} ran out of GPU memory (CUDA out of memory), which is not retried: \
                 the same work on the same GPUs runs out again; lower the batch size or use \
                 GPUs with more memory",
                a.attempt
            ))
        }
        Diagnosis::NodeFault => return other_runner(policy, a),
        Diagnosis::ImagePull { transient: false } => {
            return final_(
                "the image cannot be pulled (it does not exist, or access to it is denied), \
                 which is not retried: fix spec.image",
            )
        }
        Diagnosis::ImagePull { transient: true } => {
            return counted_retry(policy, a, "a failed image pull", false, Change::Same)
        }
        Diagnosis::Other => {}
    }
    if let Some(cause) = cause {
        if !retryable(cause, policy) {
            let why = match (cause, a.ending) {
                (
                    FailureCause::UserCode,
                    Ending::Failed {
                        exit_code: Some(c), ..
                    },
                ) => format!(
                    "the job's own code failed (exit {c}), which is not retried unless \
                     retry_policy.retry_user_errors is set"
                ),
                _ => String::new(),
            };
            return final_(why);
        }
    }
    let preempted = cause == Some(FailureCause::Preempted);
    let what = match a.ending {
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
    let at_once = preempted || a.ending == Ending::Lost;
    counted_retry(policy, a, &what, at_once, Change::Same)
}

/// A retry within the budget: final when it is spent.
fn counted_retry(
    policy: &Policy,
    a: &Ended<'_>,
    what: &str,
    at_once: bool,
    change: Change,
) -> Decision {
    let preempted = matches!(
        a.ending,
        Ending::Failed {
            cause: FailureCause::Preempted,
            ..
        }
    );
    // A preempted attempt ran, but the platform ended it: it counts as one
    // that never started (the caller gives its place in the stored count
    // back), so the allowance below bounds repeated preemptions.
    let (this_started, started) = if preempted {
        (false, a.started - i64::from(a.this_started))
    } else {
        (a.this_started, a.started)
    };
    if let Some(why) = spent(policy, this_started, started, a.attempt) {
        return final_(why);
    }
    let counted = if this_started {
        format!("attempt {started} of {}", policy.max_attempts)
    } else if preempted {
        "a preempted attempt does not count".to_owned()
    } else {
        "the attempt never started and does not count".to_owned()
    };
    let (backoff, after) = if at_once {
        (Duration::ZERO, String::new())
    } else {
        let b = policy.backoff(started.max(1));
        (b, format!(" in {}", human(b)))
    };
    Decision::Retry {
        backoff,
        reason: format!("retrying after {what} ({counted}){after}"),
        change,
    }
}

/// Why the budget allows no retry, if it does not.
fn spent(policy: &Policy, this_started: bool, started: i64, attempt: i64) -> Option<String> {
    if this_started && started >= policy.max_attempts {
        return Some(format!(
            "no attempts left ({started} of {} started)",
            policy.max_attempts
        ));
    }
    if !this_started && attempt >= policy.max_attempts + NEVER_STARTED_ALLOWANCE {
        return Some(format!(
            "{attempt} attempts dispatched, none of the last ones started"
        ));
    }
    None
}

fn more_memory(policy: &Policy, a: &Ended<'_>) -> Decision {
    let n = a.attempt;
    let killed = format!("the out-of-memory killer stopped attempt {n}");
    if !policy.more_memory {
        return final_(format!(
            "{killed}; retry_policy.on_oom_killed is FAIL, so it is not retried"
        ));
    }
    if a.memory_mib <= 0 {
        return final_(format!(
            "{killed}, and the job asks for no memory (spec.resources.memory_mib is 0), so it \
             cannot be given more: set spec.resources.memory_mib to what it needs"
        ));
    }
    let ceiling = policy.memory_ceiling(a.memory_mib);
    if a.memory_mib >= ceiling {
        return final_(format!(
            "{killed} at {} MiB, the most this job may ask for (retry_policy.max_memory_mib, \
             by default 4 × the first request): raise retry_policy.max_memory_mib or \
             spec.resources.memory_mib",
            a.memory_mib
        ));
    }
    if let Some(why) = spent(policy, a.this_started, a.started, n) {
        return final_(format!("{killed} at {} MiB; {why}", a.memory_mib));
    }
    let raised = policy.raised(a.memory_mib);
    let mib = raised.min(ceiling);
    let capped = if raised > ceiling {
        ", capped by retry_policy.max_memory_mib"
    } else {
        ""
    };
    let counted = if a.this_started {
        format!(" (attempt {} of {})", a.started, policy.max_attempts)
    } else {
        String::new()
    };
    Decision::Retry {
        backoff: Duration::ZERO,
        reason: format!(
            "retrying with memory {mib} MiB ({} × {} MiB{capped}) after {killed}{counted}",
            policy.memory_factor, a.memory_mib
        ),
        change: Change::Memory { mib },
    }
}

fn other_runner(policy: &Policy, a: &Ended<'_>) -> Decision {
    let (n, runner) = (a.attempt, a.runner);
    let fault = format!("a node fault on runner `{runner}` stopped attempt {n}");
    if !policy.other_runner {
        return final_(format!(
            "{fault}; retry_policy.on_node_fault is FAIL, so it is not retried"
        ));
    }
    let mut runners: Vec<&str> = a.avoided.iter().map(String::as_str).collect();
    if !runners.contains(&runner) {
        runners.push(runner);
    }
    if runners.len() > NODE_FAULT_ALLOWANCE {
        let names: Vec<String> = runners.iter().map(|r| format!("`{r}`")).collect();
        return final_(format!(
            "{fault}; node faults have now stopped the job on {} runners ({}), so the job \
             itself may be what fails there: check its error",
            runners.len(),
            names.join(", ")
        ));
    }
    Decision::Retry {
        backoff: Duration::ZERO,
        reason: format!(
            "retrying on another runner after {fault} (a node fault does not count against \
             the job's attempts)"
        ),
        change: Change::AvoidRunner {
            name: runner.to_owned(),
        },
    }
}

#[cfg(test)]
#[path = "retry_tests.rs"]
mod tests;
