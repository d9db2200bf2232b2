//! Why a job waits: the limit causes and the capacity causes of
//! [`super::plan`], with the details users read.

use super::{Cause, Demand, LimitKind, QueuedJob, Snapshot, Usage, WaitReason};

/// The limit causes (global, org, user) that block `job` given the usage
/// so far, in that order.
pub(super) fn limit_causes(
    s: &Snapshot,
    job: &QueuedJob,
    user: Usage,
    org: Usage,
    global: Usage,
) -> Vec<Cause> {
    let mut out = Vec::new();
    let d = &job.demand;
    for kind in [LimitKind::RunningJobs, LimitKind::Gpus] {
        if let Some(limit) = s.limits.global.get(kind) {
            if kind.blocks(global, limit, d) {
                let current = kind.current(global);
                out.push(Cause {
                    reason: WaitReason::GlobalLimit {
                        kind,
                        limit,
                        current,
                    },
                    detail: format!(
                        "global limit {}={limit}; {}{}",
                        kind.name(),
                        kind.describe(current),
                        kind.needs(d)
                    ),
                });
            }
        }
    }
    let org_limits = (!job.org.is_empty())
        .then(|| s.limits.orgs.get(&job.org))
        .flatten();
    for kind in [LimitKind::RunningJobs, LimitKind::Gpus] {
        let Some(limit) = org_limits.and_then(|v| v.get(kind)) else {
            continue;
        };
        if kind.blocks(org, limit, d) {
            let current = kind.current(org);
            out.push(Cause {
                reason: WaitReason::OrgLimit {
                    kind,
                    limit,
                    current,
                },
                detail: format!(
                    "org `{}` limit {}={limit}; the org has {}{}",
                    job.org,
                    kind.name(),
                    kind.describe(current),
                    kind.needs(d)
                ),
            });
        }
    }
    if let Some(b) = s
        .limits
        .user_limit(&job.owner, &job.org, LimitKind::RunningJobs)
    {
        if LimitKind::RunningJobs.blocks(user, b.value, d) {
            out.push(Cause {
                reason: WaitReason::UserRunningLimit {
                    limit: b.value,
                    running: user.running,
                    scope: b.scope,
                },
                detail: format!(
                    "user limit max_running_jobs={} from {}; {} has {} running",
                    b.value,
                    b.scope.name(),
                    job.owner,
                    user.running
                ),
            });
        }
    }
    if let Some(b) = s.limits.user_limit(&job.owner, &job.org, LimitKind::Gpus) {
        if LimitKind::Gpus.blocks(user, b.value, d) {
            out.push(Cause {
                reason: WaitReason::UserGpuLimit {
                    limit: b.value,
                    in_use: user.gpus,
                    scope: b.scope,
                },
                detail: format!(
                    "user limit max_gpus={} from {}; {} has {} GPU(s) in use, the job needs {}",
                    b.value,
                    b.scope.name(),
                    job.owner,
                    user.gpus,
                    d.gpus
                ),
            });
        }
    }
    out
}

pub(super) fn capacity_detail(d: &Demand, fits_idle: bool, runners: usize, largest: u32) -> String {
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
        format!(
            "needs {need}; waiting for a runner to free them (largest free now: {largest} GPU(s))"
        )
    } else {
        format!("needs {need}; no registered runner has that much capacity (largest free now: {largest} GPU(s))")
    }
}

/// "avoiding runner `a` after a node fault there; runner `b` is cordoned
/// (…)", for the runners a job would fit on but may not use.
pub(super) fn excluded_detail(
    avoided: &[String],
    cordoned: &[(String, String)],
    others_fit: bool,
) -> String {
    let mut parts = Vec::new();
    match avoided {
        [] => {}
        [one] => parts.push(format!("avoiding runner `{one}` after a node fault there")),
        many => parts.push(format!(
            "avoiding runners {} after node faults there",
            many.iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
    for (name, why) in cordoned {
        parts.push(format!("runner `{name}` is cordoned ({why})"));
    }
    if !others_fit {
        parts.push("no other runner has room for it".into());
    }
    parts.join("; ")
}
