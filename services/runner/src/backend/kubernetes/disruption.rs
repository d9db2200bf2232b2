//! Whether the platform took a pod's resources back — preempted for a
//! pod of higher priority, evicted (node pressure, the Eviction API, a
//! NoExecute taint), or stopped for a node shutdown — rather than the job
//! failing by itself.
//!
//! The scheduler retries such an attempt at once and without using the
//! job's retry budget, so it must not be mistaken for the container's own
//! end: a preempted container is stopped with SIGTERM and exits 143, or
//! 137 when it outlives its grace period, which reads like a crash.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use super::status::{self, PodView};

/// How the platform took the resources back, as the error's type and the
/// log name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisruptionKind {
    Preempted,
    Evicted,
    NodeShutdown,
}

impl DisruptionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DisruptionKind::Preempted => "Preempted",
            DisruptionKind::Evicted => "Evicted",
            DisruptionKind::NodeShutdown => "NodeShutdown",
        }
    }

    /// What happened to the pod, for a sentence: "the master was …".
    pub fn past(self) -> &'static str {
        match self {
            DisruptionKind::Preempted => "preempted",
            DisruptionKind::Evicted => "evicted",
            DisruptionKind::NodeShutdown => "stopped by a node shutdown",
        }
    }
}

/// The platform's word that it disrupted a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disruption {
    pub kind: DisruptionKind,
    /// The DisruptionTarget condition's reason (PreemptionByScheduler,
    /// TerminationByKubelet, …), else the pod's `status.reason` (Evicted).
    pub reason: String,
    pub message: String,
    /// When Kubernetes decided it, when it said (the condition's
    /// lastTransitionTime).
    pub since: Option<String>,
}

impl Disruption {
    /// " (reason): message", each part only when it says something: the
    /// reason is left out when it only repeats the kind (`Evicted`). The
    /// error's message and the log line both end with it.
    pub fn detail(&self) -> String {
        let mut out = String::new();
        if !self.reason.is_empty() && self.reason != self.kind.as_str() {
            out.push_str(&format!(" ({})", self.reason));
        }
        if !self.message.is_empty() {
            out.push_str(&format!(": {}", self.message));
        }
        out
    }
}

/// The pod's `status.reason`s that mean its resources were taken back.
/// The kubelet's admission rejections (OutOfcpu, OutOfnvidia.com/gpu,
/// NodeAffinity, …) are left out on purpose: that pod never ran, and a
/// retry that does not count could loop on a node that keeps refusing it.
fn kind_of_pod_reason(reason: &str) -> Option<DisruptionKind> {
    match reason {
        "Evicted" => Some(DisruptionKind::Evicted),
        // The kubelet's critical-pod admission says Preempting.
        "Preempting" | "Preempted" => Some(DisruptionKind::Preempted),
        // Graceful node shutdown (Shutdown in its first releases), and
        // NodeShutdown for a pod a shutting-down node refused.
        "NodeShutdown" | "Shutdown" | "Terminated" => Some(DisruptionKind::NodeShutdown),
        _ => None,
    }
}

fn kind_of_condition_reason(reason: &str) -> DisruptionKind {
    match reason {
        "EvictionByEvictionAPI"
        | "DeletionByTaintManager"
        | "TerminationByKubelet"
        | "DeletionByPodGC" => DisruptionKind::Evicted,
        // PreemptionByScheduler (PreemptionByKubeScheduler before 1.27),
        // and reasons a later Kubernetes may add: the condition alone says
        // the platform, not the job, ended the pod.
        _ => DisruptionKind::Preempted,
    }
}

/// Whether the platform disrupted `pod`: a true DisruptionTarget condition
/// (Kubernetes 1.26 and later set one before they stop the pod), else a
/// `status.reason` that says so (older kubelets, node shutdown).
pub fn of_pod(pod: &Pod) -> Option<Disruption> {
    let status = pod.status.as_ref()?;
    let pod_reason = status.reason.as_deref().unwrap_or_default();
    // The kubelet ends its eviction message with a space.
    let pod_message = status.message.as_deref().unwrap_or_default().trim();
    let by_reason = kind_of_pod_reason(pod_reason);
    let condition = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True");
    let Some(c) = condition else {
        return Some(Disruption {
            kind: by_reason?,
            reason: pod_reason.to_owned(),
            message: pod_message.to_owned(),
            since: None,
        });
    };
    let reason = c.reason.as_deref().unwrap_or_default();
    let message = c.message.as_deref().unwrap_or_default().trim();
    Some(Disruption {
        // The pod's own reason (Evicted, Terminated) is the plainer word;
        // the condition's says who did it.
        kind: by_reason.unwrap_or_else(|| kind_of_condition_reason(reason)),
        reason: if reason.is_empty() {
            pod_reason
        } else {
            reason
        }
        .to_owned(),
        message: if message.is_empty() {
            pod_message
        } else {
            message
        }
        .to_owned(),
        since: c.last_transition_time.as_ref().map(|t| t.0.to_string()),
    })
}

/// The disrupted pods seen while the attempt ran, by name. A preempted or
/// evicted pod is deleted once its containers stop, so the poll that sees
/// its job fail may no longer list it; without this the job's failure
/// would be put on a pod that only lost its peer.
#[derive(Debug, Default)]
pub struct Seen(BTreeMap<String, PodView>);

impl Seen {
    /// Keeps the latest view of each disrupted pod among `pods`.
    pub fn note(&mut self, pods: &[PodView]) {
        for p in pods.iter().filter(|p| p.disrupted.is_some()) {
            self.0.insert(p.name.clone(), p.clone());
        }
    }

    /// `pods`, and the disrupted pods seen before that are gone now; master
    /// first.
    pub fn with_gone(&self, pods: &[PodView]) -> Vec<PodView> {
        let mut all = pods.to_vec();
        all.extend(
            self.0
                .values()
                .filter(|gone| !pods.iter().any(|p| p.name == gone.name))
                .cloned(),
        );
        status::sort_by_role(&mut all);
        all
    }
}
