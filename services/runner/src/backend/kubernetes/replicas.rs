//! The attempt's pods as data for the diagnosis: expected against created
//! replicas, each pod's phase, its main container's waiting or terminated
//! reason, exit code and restarts. The log already tells these as
//! `[trainmesh] k8s:` lines; the diagnosis's control layer and an LLM's
//! prompt read them as fields.

use trainmesh_common::proto::job::v1::ReplicaStatus;

use super::status::{ContainerNow, PodView, Role};

/// Pods reported per attempt; a bigger job reports its master and the
/// first ones, abnormal pods first.
const MAX_REPLICAS: usize = 256;

fn replica(pod: &PodView) -> ReplicaStatus {
    let main = pod.main();
    let (reason, message, exit_code) = match main.map(|c| &c.now) {
        Some(ContainerNow::Waiting { reason, message }) => (
            reason.clone(),
            message.clone(),
            main.and_then(|c| c.last.as_ref()).map(|t| t.exit_code),
        ),
        Some(ContainerNow::Terminated(t)) => {
            (t.reason.clone(), t.message.clone(), Some(t.exit_code))
        }
        // Running again after a crash: the last run's end is the story.
        _ => match main.and_then(|c| c.last.as_ref()) {
            Some(t) => (t.reason.clone(), t.message.clone(), Some(t.exit_code)),
            None => (String::new(), String::new(), None),
        },
    };
    // A pod that failed without its container ending (evicted, node lost)
    // says why on the pod.
    let (reason, message) = if reason.is_empty() {
        (pod.reason.clone(), pod.message.clone())
    } else {
        (reason, message)
    };
    let reason = match (&pod.unschedulable, reason.is_empty()) {
        (Some(_), true) => "Unschedulable".to_owned(),
        _ => reason,
    };
    let message = match (&pod.unschedulable, message.is_empty()) {
        (Some(m), true) => m.clone(),
        _ => message,
    };
    ReplicaStatus {
        role: match pod.role {
            Role::Master => "master".into(),
            Role::Worker(_) => "worker".into(),
        },
        name: pod.name.clone(),
        phase: pod.phase.clone(),
        reason,
        message,
        exit_code,
        restarts: main.map(|c| c.restart_count).unwrap_or(0),
    }
}

/// `pods` as replica statuses, in role order.
pub fn replica_statuses(pods: &[PodView]) -> Vec<ReplicaStatus> {
    let mut out: Vec<ReplicaStatus> = pods.iter().map(replica).collect();
    if out.len() > MAX_REPLICAS {
        // Keep the master and the abnormal ones.
        out.sort_by_key(|r| {
            let abnormal = r.phase != "Running" && r.phase != "Succeeded" || r.restarts > 0;
            (r.role != "master", !abnormal)
        });
        out.truncate(MAX_REPLICAS);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kubernetes::status::{ContainerView, Terminated};

    fn pod(name: &str, role: Role, phase: &str, now: ContainerNow, restarts: i32) -> PodView {
        PodView {
            name: name.into(),
            role,
            phase: phase.into(),
            reason: String::new(),
            message: String::new(),
            unschedulable: None,
            disrupted: None,
            containers: vec![ContainerView {
                name: "pytorch".into(),
                image: "img".into(),
                now,
                restart_count: restarts,
                last: None,
            }],
        }
    }

    #[test]
    fn master_and_workers_carry_their_phase_reason_exit_and_restarts() {
        let killed = ContainerNow::Terminated(Terminated {
            reason: "OOMKilled".into(),
            message: String::new(),
            exit_code: 137,
            finished_at: None,
        });
        let mut pending = pod(
            "j-worker-1",
            Role::Worker(1),
            "Pending",
            ContainerNow::Unknown,
            0,
        );
        pending.containers.clear();
        pending.unschedulable =
            Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into());
        let pods = [
            pod(
                "j-master-0",
                Role::Master,
                "Running",
                ContainerNow::Running,
                0,
            ),
            pod("j-worker-0", Role::Worker(0), "Failed", killed, 0),
            pending,
            pod(
                "j-worker-2",
                Role::Worker(2),
                "Running",
                ContainerNow::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: "back-off 40s restarting failed container".into(),
                },
                3,
            ),
        ];
        let r = replica_statuses(&pods);
        assert_eq!(r.len(), 4);
        assert_eq!(
            (r[0].role.as_str(), r[0].phase.as_str()),
            ("master", "Running")
        );
        assert_eq!(r[0].exit_code, None);
        assert_eq!(
            (r[1].role.as_str(), r[1].reason.as_str(), r[1].exit_code),
            ("worker", "OOMKilled", Some(137))
        );
        assert_eq!(r[2].reason, "Unschedulable");
        assert!(r[2].message.contains("Insufficient nvidia.com/gpu"));
        assert_eq!(
            (r[3].reason.as_str(), r[3].restarts),
            ("CrashLoopBackOff", 3)
        );
    }

    #[test]
    fn a_big_job_reports_its_master_and_abnormal_pods_first() {
        let mut pods: Vec<PodView> = (0..400)
            .map(|i| {
                pod(
                    &format!("w-{i}"),
                    Role::Worker(i),
                    "Running",
                    ContainerNow::Running,
                    0,
                )
            })
            .collect();
        pods[399].phase = "Failed".into();
        pods.push(pod("m", Role::Master, "Running", ContainerNow::Running, 0));
        let r = replica_statuses(&pods);
        assert_eq!(r.len(), MAX_REPLICAS);
        assert_eq!(r[0].name, "m");
        assert_eq!(r[1].name, "w-399");
    }
}
