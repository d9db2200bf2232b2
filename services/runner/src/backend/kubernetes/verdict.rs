//! When an attempt on Kubernetes has ended, how, and why. Pure: the
//! workload feeds it the job's status, the pod views, the Warning events
//! and how long each pod problem has lasted.
//!
//! Kubernetes ends a Job by itself when its pods end; it does not end one
//! whose pod can never start (no node fits, the image cannot be pulled, a
//! secret is missing): those wait forever. The backend gives them a
//! timeout and then ends the attempt itself.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;

use super::disruption::Disruption;
use super::status::{ContainerNow, JobStatus, Phase, PodView, Role, Terminated};
use crate::domain::Termination;

/// Why an attempt failed, as far as Kubernetes can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The container was killed for exceeding its memory limit.
    OomKilled {
        pod: String,
        role: Role,
        container: String,
        exit_code: i32,
    },
    /// The job's own code exited non-zero.
    UserCode {
        pod: String,
        role: Role,
        container: String,
        exit_code: i32,
        reason: String,
    },
    ImagePull {
        pod: String,
        container: String,
        image: String,
        reason: String,
        message: String,
    },
    Unschedulable {
        pod: String,
        message: String,
        waited: Duration,
    },
    /// CreateContainerConfigError and friends: a secret, config map or
    /// volume the pod needs is missing.
    ContainerConfig {
        pod: String,
        container: String,
        reason: String,
        message: String,
    },
    /// The platform took a pod's resources back (preempted, evicted, node
    /// shutdown); whatever its container's exit, the job did not fail by
    /// itself.
    Preempted {
        pod: String,
        role: Role,
        disruption: Disruption,
    },
    /// The pod failed without its container ending (node lost, rejected).
    PodFailed {
        pod: String,
        reason: String,
        message: String,
    },
    /// activeDeadlineSeconds ran out.
    Deadline { message: String },
    /// Failed, and nothing left to say which pod or why.
    JobFailed { reason: String, message: String },
}

/// How the attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub termination: Termination,
    /// `None` for a success.
    pub cause: Option<Cause>,
    /// Kubernetes will not end the object by itself: the backend deletes it.
    pub delete: bool,
}

/// How long pod problems may last before they end the attempt.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub unschedulable: Duration,
    pub start: Duration,
}

/// A pod problem that ends the attempt when it lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stuck {
    /// Identifies the problem across polls, for its age.
    pub key: String,
    /// Ends the attempt at once, without waiting for the timeout.
    pub fatal_now: bool,
    pub unschedulable: bool,
    pub cause: Cause,
}

const IMAGE_PULL_REASONS: [&str; 3] = ["ImagePullBackOff", "ErrImagePull", "InvalidImageName"];
const CONFIG_REASONS: [&str; 3] = [
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The newest Warning event about `pod` whose message passes `filter`.
fn event_message(events: &[&Event], pod: &str, filter: impl Fn(&str) -> bool) -> Option<String> {
    events
        .iter()
        .rev()
        .filter(|e| e.involved_object.name.as_deref() == Some(pod))
        .filter_map(|e| e.message.as_deref())
        .find(|m| filter(m))
        .map(str::to_owned)
}

/// The pod problems in `pods` that would end the attempt if they last.
pub fn stuck(pods: &[PodView], events: &[&Event]) -> Vec<Stuck> {
    let mut out = Vec::new();
    for pod in pods {
        if let Some(message) = &pod.unschedulable {
            out.push(Stuck {
                key: format!("{}/unschedulable", pod.name),
                fatal_now: false,
                unschedulable: true,
                cause: Cause::Unschedulable {
                    pod: pod.name.clone(),
                    message: message.clone(),
                    waited: Duration::ZERO,
                },
            });
        }
        for c in &pod.containers {
            let ContainerNow::Waiting { reason, message } = &c.now else {
                continue;
            };
            if IMAGE_PULL_REASONS.contains(&reason.as_str()) {
                // The kubelet's Failed event says why the pull failed (not
                // found, unauthorized); the back-off message only that it
                // is waiting.
                let detail = event_message(events, &pod.name, |m| {
                    m.contains(&c.image) && m.to_ascii_lowercase().contains("failed")
                })
                .unwrap_or_else(|| message.clone());
                out.push(Stuck {
                    // Both pull reasons are one problem: the kubelet
                    // alternates between them while it backs off.
                    key: format!("{}/{}/image-pull", pod.name, c.name),
                    fatal_now: reason == "InvalidImageName",
                    unschedulable: false,
                    cause: Cause::ImagePull {
                        pod: pod.name.clone(),
                        container: c.name.clone(),
                        image: c.image.clone(),
                        reason: reason.clone(),
                        message: detail,
                    },
                });
            } else if CONFIG_REASONS.contains(&reason.as_str()) {
                out.push(Stuck {
                    key: format!("{}/{}/config", pod.name, c.name),
                    fatal_now: false,
                    unschedulable: false,
                    cause: Cause::ContainerConfig {
                        pod: pod.name.clone(),
                        container: c.name.clone(),
                        reason: reason.clone(),
                        message: message.clone(),
                    },
                });
            } else if reason == "CrashLoopBackOff" {
                // restartPolicy Never should make this impossible; if a
                // mutating webhook changed it, the attempt has failed
                // already and a restart would run it twice.
                let last = c.last.as_ref();
                let exit_code = last.map(|t| t.exit_code).unwrap_or(-1);
                let cause = if last.is_some_and(|t| t.reason == "OOMKilled") {
                    Cause::OomKilled {
                        pod: pod.name.clone(),
                        role: pod.role,
                        container: c.name.clone(),
                        exit_code,
                    }
                } else {
                    Cause::UserCode {
                        pod: pod.name.clone(),
                        role: pod.role,
                        container: c.name.clone(),
                        exit_code,
                        reason: reason.clone(),
                    }
                };
                out.push(Stuck {
                    key: format!("{}/{}/crashloop", pod.name, c.name),
                    fatal_now: true,
                    unschedulable: false,
                    cause,
                });
            }
        }
    }
    out
}

fn instant(time: Option<&str>) -> Option<Timestamp> {
    time?.parse().ok()
}

/// Earlier first; a known time before an unknown one.
fn earlier(a: Option<Timestamp>, b: Option<Timestamp>) -> Ordering {
    match (a, b) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// The pod whose failure explains the job's: the earliest non-zero end
/// (a worker killed first takes the master down with it), master first on
/// a tie or when times are missing.
fn first_failure<'a>(
    pods: impl IntoIterator<Item = &'a PodView>,
) -> Option<(&'a PodView, &'a Terminated)> {
    pods.into_iter()
        .filter_map(|p| Some((p, p.terminated().filter(|t| t.exit_code != 0)?)))
        .min_by(|(a, ta), (b, tb)| {
            let at = |t: &Terminated| instant(t.finished_at.as_deref());
            earlier(at(ta), at(tb)).then(a.role.cmp(&b.role))
        })
}

/// The preemption that ended the attempt: the earliest disrupted pod,
/// whatever its container's exit (SIGTERM, or SIGKILL after the grace
/// period) — unless a pod the platform left alone had failed by itself
/// before the disruption, so that the job's own failure came first.
fn preemption(pods: &[PodView]) -> Option<Cause> {
    let (pod, d) = pods
        .iter()
        .filter_map(|p| Some((p, p.disrupted.as_ref()?)))
        .min_by(|(a, da), (b, db)| {
            earlier(instant(da.since.as_deref()), instant(db.since.as_deref()))
                .then(a.role.cmp(&b.role))
        })?;
    let own = first_failure(pods.iter().filter(|p| p.disrupted.is_none()));
    if let Some((_, t)) = own {
        let failed_at = instant(t.finished_at.as_deref());
        let disrupted_at = instant(d.since.as_deref());
        if failed_at.is_some() && disrupted_at.is_some() && failed_at < disrupted_at {
            return None;
        }
    }
    Some(Cause::Preempted {
        pod: pod.name.clone(),
        role: pod.role,
        disruption: d.clone(),
    })
}

fn failed(status: &JobStatus, pods: &[PodView]) -> Verdict {
    let from_pod = first_failure(pods);
    let termination = Termination::Exited(from_pod.map(|(_, t)| t.exit_code).unwrap_or(-1));
    let verdict = |cause| Verdict {
        termination,
        cause: Some(cause),
        delete: false,
    };
    // activeDeadlineSeconds is the job's own limit: the pods it stopped
    // were not taken by the platform.
    if status.reason.contains("DeadlineExceeded") {
        return verdict(Cause::Deadline {
            message: status.message.clone(),
        });
    }
    if let Some(cause) = preemption(pods) {
        return verdict(cause);
    }
    if let Some((pod, t)) = from_pod {
        let container = pod.main().map(|c| c.name.clone()).unwrap_or_default();
        return verdict(if t.reason == "OOMKilled" {
            Cause::OomKilled {
                pod: pod.name.clone(),
                role: pod.role,
                container,
                exit_code: t.exit_code,
            }
        } else {
            Cause::UserCode {
                pod: pod.name.clone(),
                role: pod.role,
                container,
                exit_code: t.exit_code,
                reason: t.reason.clone(),
            }
        });
    }
    if let Some(pod) = pods.iter().find(|p| p.phase == "Failed") {
        return verdict(Cause::PodFailed {
            pod: pod.name.clone(),
            reason: pod.reason.clone(),
            message: pod.message.clone(),
        });
    }
    verdict(Cause::JobFailed {
        reason: status.reason.clone(),
        message: status.message.clone(),
    })
}

/// Whether the attempt has ended, and how. `ages` holds how long each
/// [`Stuck`] problem (by key) has been seen.
pub fn decide(
    status: &JobStatus,
    pods: &[PodView],
    events: &[&Event],
    ages: &HashMap<String, Duration>,
    timeouts: Timeouts,
) -> Option<Verdict> {
    match status.phase {
        Phase::Succeeded => {
            return Some(Verdict {
                termination: Termination::Exited(0),
                cause: None,
                delete: false,
            })
        }
        Phase::Failed => return Some(failed(status, pods)),
        _ => {}
    }
    for s in stuck(pods, events) {
        let age = ages.get(&s.key).copied().unwrap_or_default();
        let limit = if s.unschedulable {
            timeouts.unschedulable
        } else {
            timeouts.start
        };
        if s.fatal_now || age >= limit {
            let cause = match s.cause {
                Cause::Unschedulable { pod, message, .. } => Cause::Unschedulable {
                    pod,
                    message,
                    waited: age,
                },
                other => other,
            };
            let code = match &cause {
                Cause::OomKilled { exit_code, .. } | Cause::UserCode { exit_code, .. } => {
                    *exit_code
                }
                _ => -1,
            };
            return Some(Verdict {
                termination: Termination::Exited(code),
                cause: Some(cause),
                delete: true,
            });
        }
    }
    None
}
