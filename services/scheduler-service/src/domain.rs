//! Validated domain types. Protos are converted at the boundary with
//! `TryFrom`, and every error names the offending field.

use std::collections::{BTreeMap, HashSet};

use trainmesh_common::error::FieldError;
use trainmesh_common::proto::job::v1::{AttemptState, FailureCause, JobError, JobState};
use trainmesh_common::proto::runner::v1 as runner_pb;
use trainmesh_common::proto::scheduler::v1 as sched_pb;
use trainmesh_common::spec::ValidSpec;
use trainmesh_common::time::from_timestamp;
use trainmesh_common::typed_id;

typed_id!(
    /// A job, as named by job-service.
    JobId
);
typed_id!(
    /// One registration of a runner; a runner that lost its lease gets a new one.
    RunnerId
);

/// The scheduler's view of a job's state (the queue side of `JobState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryState {
    Queued,
    AwaitingApproval,
    Scheduled,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl EntryState {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryState::Queued => "QUEUED",
            EntryState::AwaitingApproval => "AWAITING_APPROVAL",
            EntryState::Scheduled => "SCHEDULED",
            EntryState::Running => "RUNNING",
            EntryState::Succeeded => "SUCCEEDED",
            EntryState::Failed => "FAILED",
            EntryState::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "QUEUED" => EntryState::Queued,
            "AWAITING_APPROVAL" => EntryState::AwaitingApproval,
            "SCHEDULED" => EntryState::Scheduled,
            "RUNNING" => EntryState::Running,
            "SUCCEEDED" => EntryState::Succeeded,
            "FAILED" => EntryState::Failed,
            "CANCELLED" => EntryState::Cancelled,
            _ => return None,
        })
    }

    pub fn proto(self) -> JobState {
        match self {
            EntryState::Queued => JobState::Queued,
            EntryState::AwaitingApproval => JobState::AwaitingApproval,
            EntryState::Scheduled => JobState::Scheduled,
            EntryState::Running => JobState::Running,
            EntryState::Succeeded => JobState::Succeeded,
            EntryState::Failed => JobState::Failed,
            EntryState::Cancelled => JobState::Cancelled,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EntryState::Succeeded | EntryState::Failed | EntryState::Cancelled
        )
    }
}

/// State of one attempt (`AttemptState` without the prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttemptStatus {
    Scheduled,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Lost,
}

impl AttemptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptStatus::Scheduled => "SCHEDULED",
            AttemptStatus::Running => "RUNNING",
            AttemptStatus::Succeeded => "SUCCEEDED",
            AttemptStatus::Failed => "FAILED",
            AttemptStatus::Cancelled => "CANCELLED",
            AttemptStatus::Lost => "LOST",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "SCHEDULED" => AttemptStatus::Scheduled,
            "RUNNING" => AttemptStatus::Running,
            "SUCCEEDED" => AttemptStatus::Succeeded,
            "FAILED" => AttemptStatus::Failed,
            "CANCELLED" => AttemptStatus::Cancelled,
            "LOST" => AttemptStatus::Lost,
            _ => return None,
        })
    }

    pub fn proto(self) -> AttemptState {
        match self {
            AttemptStatus::Scheduled => AttemptState::Scheduled,
            AttemptStatus::Running => AttemptState::Running,
            AttemptStatus::Succeeded => AttemptState::Succeeded,
            AttemptStatus::Failed => AttemptState::Failed,
            AttemptStatus::Cancelled => AttemptState::Cancelled,
            AttemptStatus::Lost => AttemptState::Lost,
        }
    }

    /// Holds its runner's resources.
    pub fn is_active(self) -> bool {
        matches!(self, AttemptStatus::Scheduled | AttemptStatus::Running)
    }

    /// Order in an attempt's life; a report that does not move forward is a
    /// duplicate or a stale retry.
    pub fn rank(self) -> u8 {
        match self {
            AttemptStatus::Scheduled => 0,
            AttemptStatus::Running => 1,
            _ => 2,
        }
    }

    /// The job state an attempt in this state puts the job in.
    pub fn job_state(self) -> EntryState {
        match self {
            AttemptStatus::Scheduled => EntryState::Scheduled,
            AttemptStatus::Running => EntryState::Running,
            AttemptStatus::Succeeded => EntryState::Succeeded,
            AttemptStatus::Failed => EntryState::Failed,
            AttemptStatus::Cancelled => EntryState::Cancelled,
            AttemptStatus::Lost => EntryState::Queued,
        }
    }
}

/// What a job needs from one runner, summed over its replicas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    pub gpus: u32,
    /// Case-insensitive substring of the GPU model; empty means any.
    pub gpu_type: String,
    pub cpu_milli: i64,
    pub memory_mib: i64,
}

pub fn cpu_to_milli(field: &str, cpu: f64) -> Result<i64, FieldError> {
    if !cpu.is_finite() || cpu < 0.0 {
        return Err(FieldError::new(
            field,
            "must be a finite, non-negative number",
        ));
    }
    if cpu > 1_000_000.0 {
        return Err(FieldError::new(field, "must be at most 1000000"));
    }
    Ok((cpu * 1000.0).round() as i64)
}

impl Demand {
    /// Every replica runs on the same runner in this release, so the
    /// demand is per replica times the replica count.
    pub fn of(spec: &ValidSpec) -> Self {
        let shape = &spec.shape;
        let n = shape.replicas();
        Demand {
            gpus: shape.gpus,
            gpu_type: shape.gpu_type.clone(),
            cpu_milli: shape.cpu_milli.saturating_mul(n),
            memory_mib: shape.memory_mib.saturating_mul(n),
        }
    }
}

/// A validated `EnqueueJob` request.
#[derive(Clone, Debug)]
pub struct NewEntry {
    pub job_id: JobId,
    pub owner: String,
    pub org: String,
    pub priority: i32,
    pub demand: Demand,
    pub spec: Vec<u8>,
    /// `None`: the configured default.
    pub max_attempts: Option<u32>,
    pub correlation_id: String,
    pub submit_time: Option<i64>,
    /// What approval rules look at.
    pub image: String,
    pub labels: std::collections::HashMap<String, String>,
    pub deadline: Option<std::time::Duration>,
}

impl TryFrom<sched_pb::EnqueueJobRequest> for NewEntry {
    type Error = FieldError;

    fn try_from(req: sched_pb::EnqueueJobRequest) -> Result<Self, FieldError> {
        let job_id = JobId::parse_field("job_id", &req.job_id)?;
        if req.owner.trim().is_empty() {
            return Err(FieldError::new("owner", "is required"));
        }
        let spec = req
            .spec
            .ok_or_else(|| FieldError::new("spec", "is required"))?;
        // The same checks job-service made: what it accepted is queued.
        let valid = trainmesh_common::spec::validate(spec)?;
        let demand = Demand::of(&valid);
        let max_attempts = valid.timing.max_attempts;
        let deadline = valid.timing.deadline;
        let spec = valid.into_inner();
        Ok(NewEntry {
            image: spec.image.clone(),
            labels: spec.labels.clone().into_iter().collect(),
            deadline,
            job_id,
            owner: req.owner.trim().to_owned(),
            org: req.org.trim().to_owned(),
            priority: spec.priority,
            demand,
            spec: prost::Message::encode_to_vec(&spec),
            max_attempts,
            correlation_id: req.correlation_id,
            submit_time: req.submit_time.as_ref().map(from_timestamp),
        })
    }
}

/// One GPU of a runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub index: i32,
    pub model: String,
}

/// A runner's capacity, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunnerCapacity {
    pub gpus: Vec<GpuInfo>,
    pub cpu_milli: i64,
    pub memory_mib: i64,
}

impl RunnerCapacity {
    pub fn from_proto(cap: &runner_pb::Capacity) -> Result<Self, FieldError> {
        let mut seen = HashSet::new();
        let mut gpus = Vec::with_capacity(cap.gpus.len());
        for (i, g) in cap.gpus.iter().enumerate() {
            if g.index < 0 {
                return Err(FieldError::new(
                    format!("capacity.gpus[{i}].index"),
                    "must not be negative",
                ));
            }
            if !seen.insert(g.index) {
                return Err(FieldError::new(
                    format!("capacity.gpus[{i}].index"),
                    format!("index {} appears twice", g.index),
                ));
            }
            gpus.push(GpuInfo {
                index: g.index,
                model: g.model.clone(),
            });
        }
        if cap.memory_mib < 0 {
            return Err(FieldError::new(
                "capacity.memory_mib",
                "must not be negative",
            ));
        }
        Ok(RunnerCapacity {
            gpus,
            cpu_milli: cpu_to_milli("capacity.cpu", cap.cpu)?,
            memory_mib: cap.memory_mib,
        })
    }
}

/// A validated `RegisterRunner` request.
#[derive(Clone, Debug)]
pub struct Registration {
    pub name: String,
    pub backend: String,
    /// The capacity as sent (kept for display), and validated.
    pub capacity_proto: Vec<u8>,
    pub capacity: RunnerCapacity,
    pub labels: BTreeMap<String, String>,
    /// The runner's installation key; empty from runners that send none.
    pub instance: String,
}

impl TryFrom<runner_pb::RegisterRunnerRequest> for Registration {
    type Error = FieldError;

    fn try_from(req: runner_pb::RegisterRunnerRequest) -> Result<Self, FieldError> {
        if req.name.trim().is_empty() {
            return Err(FieldError::new("name", "is required"));
        }
        let cap = req.capacity.unwrap_or_default();
        let capacity = RunnerCapacity::from_proto(&cap)?;
        Ok(Registration {
            name: req.name.trim().to_owned(),
            backend: req.backend.trim().to_owned(),
            capacity_proto: prost::Message::encode_to_vec(&cap),
            capacity,
            labels: req.labels.into_iter().collect(),
            instance: req.instance.trim().to_owned(),
        })
    }
}

/// A validated `ReportAttemptStatus` request.
#[derive(Clone, Debug)]
pub struct AttemptReport {
    pub runner_id: RunnerId,
    pub job_id: JobId,
    pub attempt: i64,
    pub state: AttemptStatus,
    pub exit_code: Option<i32>,
    pub error: Option<JobError>,
}

impl TryFrom<runner_pb::ReportAttemptStatusRequest> for AttemptReport {
    type Error = FieldError;

    fn try_from(req: runner_pb::ReportAttemptStatusRequest) -> Result<Self, FieldError> {
        let runner_id = RunnerId::parse_field("runner_id", &req.runner_id)?;
        let job_id = JobId::parse_field("job_id", &req.job_id)?;
        if req.attempt < 1 {
            return Err(FieldError::new("attempt", "must be 1 or more"));
        }
        let state = match AttemptState::try_from(req.state) {
            Ok(AttemptState::Running) => AttemptStatus::Running,
            Ok(AttemptState::Succeeded) => AttemptStatus::Succeeded,
            Ok(AttemptState::Failed) => AttemptStatus::Failed,
            Ok(AttemptState::Cancelled) => AttemptStatus::Cancelled,
            _ => {
                return Err(FieldError::new(
                    "state",
                    "must be RUNNING, SUCCEEDED, FAILED or CANCELLED",
                ))
            }
        };
        Ok(AttemptReport {
            runner_id,
            job_id,
            attempt: i64::from(req.attempt),
            state,
            exit_code: req.exit_code,
            error: req.error,
        })
    }
}

/// Why an attempt failed, for retry policies and SLOs: the exit code
/// decides when there is one, else the runner's error category.
pub fn failure_cause(exit_code: Option<i32>, error: Option<&JobError>) -> FailureCause {
    // The node could not run GPU work: the platform's failure, whatever
    // the job's code exited with when it found out.
    if error.is_some_and(|e| e.node_fault) {
        return FailureCause::Platform;
    }
    // A category that names the platform's own reason (the process never
    // ran, the deadline or the runner killed it) outranks the exit code,
    // which only echoes how it was stopped.
    match error.map(|e| e.category.as_str()).unwrap_or_default() {
        "setup" => return FailureCause::Setup,
        "image-pull" => return FailureCause::ImagePull,
        "deadline" => return FailureCause::Deadline,
        // Kubernetes could not place the pods (the runner's backend gave up
        // waiting); the exit code, if any, says nothing.
        "unschedulable" => return FailureCause::NoCapacity,
        // The platform took the resources back (a pod preempted or
        // evicted, a runner stopped and handed its attempt back); the exit
        // code is only how the workload was stopped.
        "preempted" | crate::leases::CATEGORY_RUNNER_SHUTDOWN => return FailureCause::Preempted,
        "platform" | "runner-lost" => return FailureCause::Platform,
        _ => {}
    }
    let code = exit_code.or_else(|| error.map(|e| e.exit_code).filter(|c| *c != 0));
    match code {
        Some(1..=127) => return FailureCause::UserCode,
        // Negative codes are how some runtimes report "killed by signal N".
        Some(c) if (128..=255).contains(&c) || c < 0 => return FailureCause::Signal,
        _ => {}
    }
    if error.is_some_and(|e| e.signal != 0) {
        return FailureCause::Signal;
    }
    match error.map(|e| e.category.as_str()).unwrap_or_default() {
        "user-code" => FailureCause::UserCode,
        "oom-killed" => FailureCause::Signal,
        _ => FailureCause::Unspecified,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainmesh_common::proto::job::v1::{JobSpec, Replicas, Resources};

    fn err(category: &str) -> JobError {
        JobError {
            category: category.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_preempted_pod_is_preempted_whatever_the_exit_code() {
        assert_eq!(
            failure_cause(Some(143), Some(&err("preempted"))),
            FailureCause::Preempted
        );
    }

    #[test]
    fn an_unschedulable_pod_is_no_capacity_whatever_the_exit_code() {
        assert_eq!(
            failure_cause(Some(-1), Some(&err("unschedulable"))),
            FailureCause::NoCapacity
        );
    }

    #[test]
    fn a_node_fault_is_the_platforms_whatever_the_exit_code() {
        let fault = JobError {
            category: "gpu-unavailable".into(),
            node_fault: true,
            ..Default::default()
        };
        assert_eq!(failure_cause(Some(1), Some(&fault)), FailureCause::Platform);
    }

    #[test]
    fn failure_cause_follows_exit_code_then_category() {
        assert_eq!(failure_cause(Some(1), None), FailureCause::UserCode);
        assert_eq!(failure_cause(Some(127), None), FailureCause::UserCode);
        assert_eq!(failure_cause(Some(128), None), FailureCause::Signal);
        assert_eq!(
            failure_cause(Some(137), Some(&err("oom-killed"))),
            FailureCause::Signal
        );
        assert_eq!(failure_cause(Some(255), None), FailureCause::Signal);
        assert_eq!(
            failure_cause(None, Some(&err("setup"))),
            FailureCause::Setup
        );
        assert_eq!(
            failure_cause(Some(0), Some(&err("image-pull"))),
            FailureCause::ImagePull
        );
        assert_eq!(failure_cause(None, None), FailureCause::Unspecified);
        // The runner reports a process that never started as exit -1 and a
        // deadline kill as 143: the category decides.
        assert_eq!(
            failure_cause(Some(-1), Some(&err("setup"))),
            FailureCause::Setup
        );
        assert_eq!(
            failure_cause(Some(143), Some(&err("deadline"))),
            FailureCause::Deadline
        );
    }

    #[test]
    fn demand_multiplies_by_replicas() {
        let spec = JobSpec {
            image: "i".into(),
            command: vec!["true".into()],
            resources: Some(Resources {
                gpus: 2,
                cpu: 1.5,
                memory_mib: 100,
                ..Default::default()
            }),
            replicas: Some(Replicas {
                masters: 1,
                workers: 2,
            }),
            ..Default::default()
        };
        let d = Demand::of(&trainmesh_common::spec::validate(spec).unwrap());
        assert_eq!((d.gpus, d.cpu_milli, d.memory_mib), (6, 4500, 300));
    }

    #[test]
    fn capacity_refuses_duplicate_gpu_indexes() {
        let cap = runner_pb::Capacity {
            gpus: vec![
                runner_pb::Gpu {
                    index: 0,
                    ..Default::default()
                },
                runner_pb::Gpu {
                    index: 0,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            RunnerCapacity::from_proto(&cap).unwrap_err().field,
            "capacity.gpus[1].index"
        );
    }
}
