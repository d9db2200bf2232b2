//! The control layer: rules over the attempt's replicas as its backend
//! reported them, not over log lines.

use super::*;
use crate::domain::{JobId, ReplicaFacts, Source};

fn replica(role: &str, name: &str, phase: &str, reason: &str, exit: Option<i32>) -> ReplicaFacts {
    ReplicaFacts {
        role: role.into(),
        name: name.into(),
        phase: phase.into(),
        reason: reason.into(),
        exit_code: exit,
        ..ReplicaFacts::default()
    }
}

fn pytorchjob(replicas: Vec<ReplicaFacts>) -> JobFacts {
    JobFacts {
        id: JobId::new(),
        owner: "alice".into(),
        name: "ddp".into(),
        state: jpb::JobState::Failed,
        failure_cause: jpb::FailureCause::UserCode,
        state_reason: String::new(),
        error: None,
        exit_code: Some(1),
        attempts: 1,
        gpus: 1,
        shm_mib: 8192,
        workers: 2,
        correlation_id: String::new(),
        replicas,
        checks: Default::default(),
    }
}

#[test]
fn a_worker_killed_for_memory_outranks_the_masters_nccl_error() {
    let job = pytorchjob(vec![
        replica("master", "ddp-master-0", "Failed", "Error", Some(1)),
        replica("worker", "ddp-worker-0", "Running", "", None),
        replica("worker", "ddp-worker-1", "Failed", "OOMKilled", Some(137)),
    ]);
    let log = [LogLine::new(
        40,
        "RuntimeError: NCCL communicator was aborted on rank 0",
    )];
    let f = RuleSet::builtin().evaluate(&job, &log);
    assert_eq!(f[0].rule_id, "oom-killed");
    assert!(f[0].evidence.iter().any(|e| e.source == Source::Event
        && e.text == "ddp-worker-1: Failed, OOMKilled, exit 137, 0 restarts"));
    assert!(f.iter().any(|f| f.rule_id == "nccl"));
}

#[test]
fn pods_waiting_on_their_image_or_crashing_are_named_from_their_state() {
    for (reason, rule) in [
        ("ImagePullBackOff", "image-pull"),
        ("CrashLoopBackOff", "crash-loop"),
        ("Unschedulable", "scheduling"),
        ("CreateContainerConfigError", "setup"),
    ] {
        let job = pytorchjob(vec![
            replica("master", "m", "Running", "", None),
            replica("worker", "w0", "Pending", reason, None),
            replica("worker", "w1", "Running", "", None),
        ]);
        let f = RuleSet::builtin().evaluate(&job, &[]);
        assert_eq!(f[0].rule_id, rule, "{reason}");
    }
}

#[test]
fn fewer_replicas_than_asked_for_is_found() {
    let job = pytorchjob(vec![replica("master", "m", "Pending", "", None)]);
    let f = RuleSet::builtin().evaluate(&job, &[]);
    assert_eq!(f[0].rule_id, "replicas-missing");
    assert_eq!(f[0].evidence[0].text, "1 of 3 replicas were created");
    // Without replicas reported (process and docker backends) nothing is
    // missing.
    let f = RuleSet::builtin().evaluate(&pytorchjob(Vec::new()), &[]);
    assert!(f.iter().all(|f| f.rule_id != "replicas-missing"));
}

#[test]
fn a_deadline_shorter_than_earlier_runs_is_a_warning_with_them_as_evidence() {
    let h = |secs: u64| std::time::Duration::from_secs(secs);
    let mut job = pytorchjob(Vec::new());
    job.state = jpb::JobState::Running;
    job.checks.deadline = Some(h(2 * 3600));
    job.checks.history = vec![h(9600), h(6000), h(11_100)];
    let f = RuleSet::builtin().evaluate(&job, &[]);
    let w = f.iter().find(|f| f.rule_id == "deadline-history").unwrap();
    assert_eq!(w.severity, Severity::Warning);
    assert_eq!(
        w.evidence[0].text,
        "spec.deadline = 2h; 2 of the last 3 successful runs of this job took longer (2h40m, 3h5m)"
    );
    // Runs that fit the deadline raise nothing.
    job.checks.history = vec![h(6000)];
    let f = RuleSet::builtin().evaluate(&job, &[]);
    assert!(f.iter().all(|f| f.rule_id != "deadline-history"));
}

#[test]
fn a_job_no_runner_can_take_is_found_against_the_fleet() {
    use crate::domain::Offer;
    let offer = |runner: &str, gpus: &[&str], memory_mib: i64| Offer {
        runner: runner.into(),
        gpus: gpus.iter().map(|g| (*g).to_owned()).collect(),
        cpu: 64.0,
        memory_mib,
    };
    let mut job = pytorchjob(Vec::new());
    job.state = jpb::JobState::Queued;
    job.gpus = 8;
    job.checks.gpu_type = "H100".into();
    job.checks.fleet = Some(vec![
        offer("a100-node", &["NVIDIA A100-SXM4-80GB"; 8], 1 << 20),
        offer("h100-node", &["NVIDIA H100 80GB HBM3"; 4], 1 << 20),
    ]);
    let f = RuleSet::builtin().evaluate(&job, &[]);
    assert_eq!(f[0].rule_id, "beyond-fleet");
    let text = &f[0].evidence[0].text;
    assert!(
        text.starts_with("each replica asks for 8 GPUs of type `H100`; no runner offers that: a100-node: 8 GPUs (NVIDIA A100-SXM4-80GB)"),
        "{text}"
    );
    assert!(
        text.contains("h100-node: 4 GPUs (NVIDIA H100 80GB HBM3)"),
        "{text}"
    );

    // One runner that fits is enough; an unknown fleet says nothing.
    job.gpus = 4;
    assert!(RuleSet::builtin()
        .evaluate(&job, &[])
        .iter()
        .all(|f| f.rule_id != "beyond-fleet"));
    job.gpus = 8;
    job.checks.fleet = None;
    assert!(RuleSet::builtin()
        .evaluate(&job, &[])
        .iter()
        .all(|f| f.rule_id != "beyond-fleet"));
}
