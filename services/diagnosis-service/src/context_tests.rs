use super::*;

fn replica(
    role: &str,
    name: &str,
    phase: &str,
    reason: &str,
    exit: Option<i32>,
) -> jpb::ReplicaStatus {
    jpb::ReplicaStatus {
        role: role.into(),
        name: name.into(),
        phase: phase.into(),
        reason: reason.into(),
        message: String::new(),
        exit_code: exit,
        restarts: 0,
    }
}

/// A failed PyTorchJob-shaped job: master, a healthy worker and an
/// OOM-killed one.
fn distributed_job(workers: i32, replicas: Vec<jpb::ReplicaStatus>) -> JobFacts {
    let job = jpb::Job {
        id: uuid::Uuid::now_v7().to_string(),
        owner: "alice".into(),
        spec: Some(jpb::JobSpec {
            name: "ddp".into(),
            replicas: Some(jpb::Replicas {
                masters: 1,
                workers,
            }),
            ..Default::default()
        }),
        state: jpb::JobState::Failed as i32,
        failure_cause: jpb::FailureCause::UserCode as i32,
        state_reason: "worker ddp-worker-1 failed".into(),
        error: Some(jpb::JobError {
            r#type: "OOMKilled".into(),
            message: "worker killed".into(),
            exit_code: 137,
            replicas,
            ..Default::default()
        }),
        attempts: vec![jpb::Attempt {
            number: 1,
            exit_code: Some(137),
            ..Default::default()
        }],
        ..Default::default()
    };
    JobFacts::from_proto(&job).unwrap()
}

fn three_replicas() -> Vec<jpb::ReplicaStatus> {
    vec![
        replica("master", "ddp-master-0", "Failed", "Error", Some(1)),
        replica("worker", "ddp-worker-0", "Running", "", None),
        replica("worker", "ddp-worker-1", "Failed", "OOMKilled", Some(137)),
    ]
}

fn log() -> Vec<LogLine> {
    [
        "rank0 step 1",
        "[trainmesh] k8s: event Failed pod=ddp-worker-1: OOMKilled",
        "[ddp-worker-1] rank2 loading shard",
        "[ddp-worker-1] Killed",
        "[2025-01-10 12:00:42] ERROR master: NCCL timeout",
        "[ddp-worker-0] healthy line",
        "[trainmesh] attempt ended",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| LogLine::new(i as i64 + 1, *t))
    .collect()
}

#[test]
fn a_distributed_job_analyses_the_master_and_abnormal_workers_only() {
    let job = distributed_job(2, three_replicas());
    let t = targets(&job);
    let got: Vec<(Kind, &str)> = t.iter().map(|t| (t.kind, t.replica_name())).collect();
    assert_eq!(
        got,
        [
            (Kind::Master, "ddp-master-0"),
            (Kind::Worker, "ddp-worker-1")
        ]
    );
}

#[test]
fn at_most_five_abnormal_workers_are_analysed() {
    let mut rs = vec![replica("master", "m", "Running", "", None)];
    rs.extend((0..8).map(|i| replica("worker", &format!("w{i}"), "Failed", "Error", Some(1))));
    let t = targets(&distributed_job(8, rs));
    assert_eq!(t.len(), 1 + MAX_WORKERS);
    assert_eq!(t[5].replica_name(), "w4");
}

#[test]
fn a_single_job_is_one_analysis_and_a_master_without_state_still_is() {
    let t = targets(&distributed_job(0, Vec::new()));
    assert_eq!(
        t,
        [Target {
            kind: Kind::Job,
            replica: None
        }]
    );
    let t = targets(&distributed_job(2, Vec::new()));
    assert_eq!(
        t,
        [Target {
            kind: Kind::Master,
            replica: None
        }]
    );
}

#[test]
fn metadata_counts_expected_and_created_replicas() {
    let job = distributed_job(2, three_replicas());
    let v = vars(&job, &log(), &[], &targets(&job)[0]);
    let m = |k| v.meta(k).to_owned();
    assert_eq!(m(MetaKey::JobName), "ddp");
    assert_eq!(m(MetaKey::JobStatus), "Failed: worker ddp-worker-1 failed");
    assert_eq!(
        m(MetaKey::LauncherStatus),
        "attempt 1, failure cause user-code, exit code 137"
    );
    assert_eq!(m(MetaKey::MasterExpected), "1");
    assert_eq!(m(MetaKey::MasterCreatedCount), "1");
    assert_eq!(m(MetaKey::WorkerExpected), "2");
    assert_eq!(m(MetaKey::WorkerCreatedCount), "2");
    assert_eq!(
        m(MetaKey::MasterDiagnosis),
        "ddp-master-0: Failed, Error, exit 1, 0 restarts"
    );
    assert_eq!(
        m(MetaKey::WorkerDiagnosis),
        "ddp-worker-0: Running, 0 restarts\nddp-worker-1: Failed, OOMKilled, exit 137, 0 restarts"
    );

    let single = distributed_job(0, Vec::new());
    let v = vars(&single, &[], &[], &targets(&single)[0]);
    assert_eq!(v.meta(MetaKey::MasterExpected), "0");
    assert_eq!(v.meta(MetaKey::WorkerExpected), "0");
    assert_eq!(
        v.meta(MetaKey::WorkerDiagnosis),
        "no replica state reported"
    );
}

#[test]
fn each_replica_gets_its_own_log_lines_and_every_one_the_events() {
    let job = distributed_job(2, three_replicas());
    let t = targets(&job);
    let master = vars(&job, &log(), &[], &t[0]);
    assert_eq!(
        master.log_info,
        "1: rank0 step 1\n5: [2025-01-10 12:00:42] ERROR master: NCCL timeout"
    );
    let worker = vars(&job, &log(), &[], &t[1]);
    assert_eq!(worker.log_info, "3: rank2 loading shard\n4: Killed");
    for v in [&master, &worker] {
        assert!(v
            .event_info
            .contains("2: [trainmesh] k8s: event Failed pod=ddp-worker-1: OOMKilled"));
        assert!(v.event_info.contains("7: [trainmesh] attempt ended"));
        assert!(v
            .event_info
            .starts_with("Job state: FAILED (worker ddp-worker-1 failed)"));
        assert!(v.event_info.contains("Attempts: 1"));
    }
    assert!(worker
        .error_info
        .starts_with("Replica analysed: worker ddp-worker-1: Failed, OOMKilled, exit 137"));
    assert!(master
        .error_info
        .contains("Job error: OOMKilled: worker killed"));
}

#[test]
fn a_single_job_log_keeps_bracketed_lines_that_name_no_replica() {
    let job = distributed_job(0, Vec::new());
    let v = vars(&job, &log(), &[], &targets(&job)[0]);
    assert!(v.log_info.contains("3: [ddp-worker-1] rank2 loading shard"));
    assert!(!v.log_info.contains("[trainmesh]"));
    assert!(v.error_info.starts_with("Job error:"));
}

#[test]
fn findings_are_part_of_the_error_information() {
    let job = distributed_job(2, three_replicas());
    let f = Finding {
        rule_id: "oom-killed".into(),
        layer: crate::domain::Layer::Control,
        severity: crate::domain::Severity::Error,
        category: "host-oom".into(),
        summary: "Killed by the out-of-memory killer".into(),
        hint: "Ask for more memory.".into(),
        evidence: vec![crate::domain::Evidence::log(&LogLine::new(
            4,
            "[ddp-worker-1] Killed",
        ))],
    };
    let v = vars(&job, &log(), &[f], &targets(&job)[1]);
    assert!(v.error_info.contains(
        "- oom-killed [host-oom]: Killed by the out-of-memory killer (log line 4: [ddp-worker-1] Killed). Hint: Ask for more memory."
    ), "{}", v.error_info);
}
