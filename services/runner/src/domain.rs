//! Validated types for what the runner works on. Assignments from the
//! scheduler are checked here, at the boundary, with errors that name the
//! offending field.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use trainmesh_common::error::FieldError;
use trainmesh_common::proto::runner::v1::{Assignment, AttemptRef};

trainmesh_common::typed_id!(
    /// A job, as named by job-service.
    JobId
);

/// One attempt of one job: the unit a runner executes, reports and fences on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptKey {
    pub job_id: JobId,
    pub attempt: i32,
}

impl fmt::Display for AttemptKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.job_id, self.attempt)
    }
}

impl AttemptKey {
    pub fn parse(job_id: &str, attempt: i32, field: &str) -> Result<Self, FieldError> {
        let job_id = JobId::parse_field(&format!("{field}.job_id"), job_id)?;
        if attempt < 1 {
            return Err(FieldError::new(
                format!("{field}.attempt"),
                "must be at least 1",
            ));
        }
        Ok(Self { job_id, attempt })
    }

    pub fn to_ref(self) -> AttemptRef {
        AttemptRef {
            job_id: self.job_id.to_string(),
            attempt: self.attempt,
        }
    }
}

impl TryFrom<&AttemptRef> for AttemptKey {
    type Error = FieldError;
    fn try_from(r: &AttemptRef) -> Result<Self, FieldError> {
        AttemptKey::parse(&r.job_id, r.attempt, "cancel")
    }
}

/// How a workload ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Termination {
    /// Exited normally with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl Termination {
    /// The shell convention: the exit code, or 128 + the signal number.
    pub fn exit_code(self) -> i32 {
        match self {
            Termination::Exited(c) => c,
            Termination::Signaled(s) => 128 + s,
        }
    }

    pub fn signal(self) -> Option<i32> {
        match self {
            Termination::Exited(_) => None,
            Termination::Signaled(s) => Some(s),
        }
    }

    pub fn success(self) -> bool {
        self == Termination::Exited(0)
    }
}

impl From<std::process::ExitStatus> for Termination {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => Termination::Exited(c),
            (None, Some(s)) => Termination::Signaled(s),
            // Neither: stopped/continued, which `wait` does not report.
            (None, None) => Termination::Exited(-1),
        }
    }
}

/// What a job may use, from `spec.resources`; zero means "not set".
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ResourceLimits {
    /// Cores (fractions allowed).
    pub cpu: f64,
    pub memory_mib: i64,
    pub shm_mib: i64,
}

impl ResourceLimits {
    /// From a validated spec's resources (bounded, so sizes in bytes fit
    /// an i64 for the engine).
    fn of(r: Option<&trainmesh_common::proto::job::v1::Resources>) -> Self {
        r.map(|r| Self {
            cpu: r.cpu,
            memory_mib: r.memory_mib,
            shm_mib: r.shm_mib,
        })
        .unwrap_or_default()
    }
}

/// An assignment, validated: what the runner needs to launch the attempt.
#[derive(Clone, Debug)]
pub struct Launch {
    pub key: AttemptKey,
    pub correlation_id: String,
    pub owner: String,
    /// argv; never empty.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    pub image: String,
    pub gpus_requested: i32,
    pub gpu_indexes: Vec<i32>,
    /// CPU, memory and shared memory the spec asks for; backends that can
    /// enforce limits (containers) do.
    pub resources: ResourceLimits,
    pub deadline: Option<Duration>,
    pub termination_grace: Option<Duration>,
    pub labels: BTreeMap<String, String>,
    /// Worker replicas besides the one master.
    pub workers: u32,
    /// Variable -> name of a secret the runner's side holds.
    pub secret_env: BTreeMap<String, String>,
    /// Variables of `env` whose values arrive sealed.
    pub secret_env_keys: Vec<String>,
}

impl TryFrom<Assignment> for Launch {
    type Error = FieldError;

    fn try_from(a: Assignment) -> Result<Self, FieldError> {
        let key = AttemptKey::parse(&a.job_id, a.attempt, "assignment")?;
        let spec = a
            .spec
            .ok_or_else(|| FieldError::new("assignment.spec", "is required"))?;
        // The checks job-service and the scheduler made, so what they
        // accepted runs; durations are bounded there, so no timer overflows.
        let valid = trainmesh_common::spec::validate(spec)
            .map_err(|e| FieldError::new(format!("assignment.{}", e.field), e.description))?;
        let (deadline, termination_grace) = (valid.timing.deadline, valid.timing.termination_grace);
        let workers = valid.shape.workers;
        let spec = valid.into_inner();
        let mut gpu_indexes = a.gpu_indexes;
        if gpu_indexes.iter().any(|i| *i < 0) {
            return Err(FieldError::new(
                "assignment.gpu_indexes",
                "must not be negative",
            ));
        }
        gpu_indexes.sort_unstable();
        gpu_indexes.dedup();
        let gpus_requested = spec.resources.as_ref().map_or(0, |r| r.gpus);
        let resources = ResourceLimits::of(spec.resources.as_ref());
        Ok(Launch {
            key,
            correlation_id: trainmesh_common::correlation::accept(Some(&a.correlation_id)),
            owner: a.owner,
            command: spec.command,
            env: spec.env.into_iter().collect(),
            working_dir: (!spec.working_dir.is_empty()).then(|| PathBuf::from(spec.working_dir)),
            image: spec.image,
            gpus_requested,
            gpu_indexes,
            resources,
            deadline,
            termination_grace,
            labels: spec.labels.into_iter().collect(),
            workers,
            secret_env: spec.secret_env.into_iter().collect(),
            secret_env_keys: spec.secret_env_keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainmesh_common::proto::job::v1::JobSpec;

    fn assignment() -> Assignment {
        Assignment {
            job_id: JobId::new().to_string(),
            attempt: 1,
            spec: Some(JobSpec {
                image: "python:3.12".into(),
                command: vec!["python".into(), "train.py".into()],
                ..JobSpec::default()
            }),
            correlation_id: "cid-1".into(),
            gpu_indexes: vec![3, 1],
            ..Assignment::default()
        }
    }

    #[test]
    fn valid_assignment_becomes_launch() {
        let l = Launch::try_from(assignment()).unwrap();
        assert_eq!(l.command, ["python", "train.py"]);
        assert_eq!(l.gpu_indexes, [1, 3]);
        assert_eq!(l.correlation_id, "cid-1");
        assert_eq!(l.deadline, None);
    }

    #[test]
    fn empty_command_is_refused_naming_the_field() {
        let mut a = assignment();
        a.spec.as_mut().unwrap().command.clear();
        let err = Launch::try_from(a).unwrap_err();
        assert_eq!(err.field, "assignment.spec.command");
    }

    #[test]
    fn bad_job_id_and_attempt_are_refused() {
        let mut a = assignment();
        a.job_id = "nope".into();
        assert_eq!(Launch::try_from(a).unwrap_err().field, "assignment.job_id");
        let mut a = assignment();
        a.attempt = 0;
        assert_eq!(Launch::try_from(a).unwrap_err().field, "assignment.attempt");
    }

    #[test]
    fn negative_deadline_is_refused_and_zero_means_none() {
        let mut a = assignment();
        a.spec.as_mut().unwrap().deadline = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        assert_eq!(
            Launch::try_from(a).unwrap_err().field,
            "assignment.spec.deadline"
        );
        let mut a = assignment();
        a.spec.as_mut().unwrap().termination_grace = Some(prost_types::Duration::default());
        assert_eq!(Launch::try_from(a).unwrap().termination_grace, None);
        // What would overflow a timer on cancel is refused up front.
        let mut a = assignment();
        a.spec.as_mut().unwrap().termination_grace = Some(prost_types::Duration {
            seconds: i64::MAX,
            nanos: 0,
        });
        assert_eq!(
            Launch::try_from(a).unwrap_err().field,
            "assignment.spec.termination_grace"
        );
    }

    #[test]
    fn resources_are_carried_and_negative_ones_refused() {
        use trainmesh_common::proto::job::v1::Resources;
        let mut a = assignment();
        a.spec.as_mut().unwrap().resources = Some(Resources {
            cpu: 1.5,
            memory_mib: 512,
            shm_mib: 64,
            ..Resources::default()
        });
        let l = Launch::try_from(a.clone()).unwrap();
        assert_eq!(
            l.resources,
            ResourceLimits {
                cpu: 1.5,
                memory_mib: 512,
                shm_mib: 64
            }
        );
        a.spec
            .as_mut()
            .unwrap()
            .resources
            .as_mut()
            .unwrap()
            .memory_mib = -1;
        assert_eq!(
            Launch::try_from(a.clone()).unwrap_err().field,
            "assignment.spec.resources.memory_mib"
        );
        a.spec.as_mut().unwrap().resources.as_mut().unwrap().cpu = f64::NAN;
        assert_eq!(
            Launch::try_from(a).unwrap_err().field,
            "assignment.spec.resources.cpu"
        );
    }

    #[test]
    fn replicas_and_resources_are_checked() {
        use trainmesh_common::proto::job::v1::{Replicas, Resources};
        let mut a = assignment();
        let spec = a.spec.as_mut().unwrap();
        spec.replicas = Some(Replicas {
            masters: 1,
            workers: 3,
        });
        spec.resources = Some(Resources {
            gpus: 8,
            cpu: 16.0,
            memory_mib: 65536,
            shm_mib: 8192,
            ..Resources::default()
        });
        let l = Launch::try_from(a).unwrap();
        assert_eq!(
            (
                l.workers,
                l.gpus_requested,
                l.resources.memory_mib,
                l.resources.shm_mib
            ),
            (3, 8, 65536, 8192)
        );
        let mut a = assignment();
        a.spec.as_mut().unwrap().replicas = Some(Replicas {
            masters: 0,
            workers: -1,
        });
        assert_eq!(
            Launch::try_from(a).unwrap_err().field,
            "assignment.spec.replicas.workers"
        );
        let mut a = assignment();
        a.spec.as_mut().unwrap().replicas = Some(Replicas {
            masters: 2,
            workers: 0,
        });
        assert_eq!(
            Launch::try_from(a).unwrap_err().field,
            "assignment.spec.replicas.masters"
        );
    }

    #[test]
    fn termination_exit_codes_follow_the_shell_convention() {
        assert_eq!(Termination::Exited(3).exit_code(), 3);
        assert_eq!(Termination::Signaled(9).exit_code(), 137);
        assert_eq!(Termination::Signaled(9).signal(), Some(9));
        assert!(Termination::Exited(0).success());
    }
}
