//! The state of an attempt's Job/PyTorchJob, read from the objects the API
//! returns. Pure functions over those documents, so every mapping is
//! tested on recorded (fixture) JSON.

use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, Pod};
use serde_json::Value;

use super::body::{JOB_CONTAINER, PYTORCH_CONTAINER};
use super::disruption::{self, Disruption};

/// Where a Job or PyTorchJob stands, from its conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Phase {
    /// Exists, no condition yet.
    Created,
    Running,
    Suspended,
    Succeeded,
    Restarting,
    Failed,
}

impl Phase {
    /// When several conditions are true at once (an operator that sets
    /// Failed without clearing Running), the most final one wins: Failed >
    /// Restarting > Succeeded > Suspended > Running > Created.
    fn rank(self) -> u8 {
        match self {
            Phase::Failed => 6,
            Phase::Restarting => 5,
            Phase::Succeeded => 4,
            Phase::Suspended => 3,
            Phase::Running => 2,
            Phase::Created => 1,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Created => "Created",
            Phase::Running => "Running",
            Phase::Suspended => "Suspended",
            Phase::Succeeded => "Succeeded",
            Phase::Restarting => "Restarting",
            Phase::Failed => "Failed",
        }
    }
}

/// The job's phase and the condition that set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobStatus {
    pub phase: Phase,
    pub reason: String,
    pub message: String,
    pub since: Option<String>,
}

fn phase_of_condition(type_: &str) -> Option<Phase> {
    match type_ {
        "Failed" => Some(Phase::Failed),
        "Restarting" => Some(Phase::Restarting),
        // batch/v1 Jobs say Complete, PyTorchJobs Succeeded.
        "Succeeded" | "Complete" => Some(Phase::Succeeded),
        "Suspended" => Some(Phase::Suspended),
        "Running" => Some(Phase::Running),
        "Created" => Some(Phase::Created),
        // FailureTarget/SuccessCriteriaMet: the Job controller is still
        // terminating pods; the final condition follows.
        _ => None,
    }
}

fn str_at<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// The phase of a Job or PyTorchJob document (`status.conditions`). A
/// batch/v1 Job has no Running condition: active pods mean Running.
pub fn job_status(obj: &Value) -> JobStatus {
    let status = obj.get("status");
    let conditions = status
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let best = conditions
        .iter()
        .filter(|c| str_at(c, "status") == "True")
        .filter_map(|c| Some((phase_of_condition(str_at(c, "type"))?, c)))
        .max_by_key(|(p, _)| p.rank());
    match best {
        Some((phase, c)) => JobStatus {
            phase,
            reason: str_at(c, "reason").to_owned(),
            message: str_at(c, "message").to_owned(),
            since: c
                .get("lastTransitionTime")
                .and_then(Value::as_str)
                .map(str::to_owned),
        },
        None => {
            let active = status
                .and_then(|s| s.get("active"))
                .and_then(Value::as_i64)
                .unwrap_or(0);
            JobStatus {
                phase: if active > 0 {
                    Phase::Running
                } else {
                    Phase::Created
                },
                reason: String::new(),
                message: String::new(),
                since: None,
            }
        }
    }
}

/// A pod's place in the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Master,
    Worker(u32),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Master => f.write_str("master"),
            Role::Worker(i) => write!(f, "worker {i}"),
        }
    }
}

/// How a container run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Terminated {
    pub reason: String,
    pub message: String,
    pub exit_code: i32,
    pub finished_at: Option<String>,
}

/// What a container is doing now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerNow {
    Waiting { reason: String, message: String },
    Running,
    Terminated(Terminated),
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    pub now: ContainerNow,
    pub restart_count: i32,
    /// The previous run's end, when the container was restarted.
    pub last: Option<Terminated>,
}

/// What the backend reads from one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub role: Role,
    /// Pending, Running, Succeeded, Failed, Unknown.
    pub phase: String,
    /// `status.reason`/`status.message` (e.g. Evicted).
    pub reason: String,
    pub message: String,
    /// The scheduler's message while PodScheduled is False/Unschedulable.
    pub unschedulable: Option<String>,
    /// The platform took the pod's resources back (preempted, evicted).
    pub disrupted: Option<Disruption>,
    pub containers: Vec<ContainerView>,
}

impl PodView {
    /// The training container (`pytorch`/`main`), else the first.
    pub fn main(&self) -> Option<&ContainerView> {
        self.containers
            .iter()
            .find(|c| c.name == PYTORCH_CONTAINER || c.name == JOB_CONTAINER)
            .or_else(|| self.containers.first())
    }

    /// The main container's end, when it ended.
    pub fn terminated(&self) -> Option<&Terminated> {
        match &self.main()?.now {
            ContainerNow::Terminated(t) => Some(t),
            _ => None,
        }
    }

    /// Whether its log can be read: the main container started.
    pub fn started(&self) -> bool {
        self.main().is_some_and(|c| {
            matches!(c.now, ContainerNow::Running | ContainerNow::Terminated(_)) || c.last.is_some()
        })
    }

    /// Failed, or a non-zero end, or restarted: a worker whose log the
    /// diagnosis wants.
    pub fn abnormal(&self) -> bool {
        self.phase == "Failed"
            || self.terminated().is_some_and(|t| t.exit_code != 0)
            || self.main().is_some_and(|c| c.restart_count > 0)
    }
}

fn terminated(state: Option<&ContainerState>) -> Option<Terminated> {
    let t = state?.terminated.as_ref()?;
    Some(Terminated {
        reason: t.reason.clone().unwrap_or_default(),
        message: t.message.clone().unwrap_or_default(),
        exit_code: t.exit_code,
        finished_at: t.finished_at.as_ref().map(|t| t.0.to_string()),
    })
}

fn container_view(cs: &ContainerStatus, spec_image: Option<&str>) -> ContainerView {
    let state = cs.state.as_ref();
    let now = if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
        ContainerNow::Waiting {
            reason: w.reason.clone().unwrap_or_default(),
            message: w.message.clone().unwrap_or_default(),
        }
    } else if state.and_then(|s| s.running.as_ref()).is_some() {
        ContainerNow::Running
    } else if let Some(t) = terminated(state) {
        ContainerNow::Terminated(t)
    } else {
        ContainerNow::Unknown
    };
    ContainerView {
        name: cs.name.clone(),
        // The status names the image as pulled (digest) once it is; the
        // spec's is what the user wrote.
        image: spec_image.unwrap_or(cs.image.as_str()).to_owned(),
        now,
        restart_count: cs.restart_count,
        last: terminated(cs.last_state.as_ref()),
    }
}

/// The pod's role from the training operator's labels; pods without them
/// (a batch/v1 Job's) are the master.
fn role(pod: &Pod) -> Role {
    let labels = pod.metadata.labels.as_ref();
    let get = |keys: [&str; 2]| {
        keys.iter()
            .find_map(|k| labels.and_then(|l| l.get(*k)))
            .map(|v| v.to_ascii_lowercase())
    };
    let kind = get(["training.kubeflow.org/replica-type", "replica-type"]);
    let index = get(["training.kubeflow.org/replica-index", "replica-index"])
        .and_then(|i| i.parse().ok())
        .unwrap_or(0);
    match kind.as_deref() {
        Some("worker") => Role::Worker(index),
        _ => Role::Master,
    }
}

pub fn pod_view(pod: &Pod) -> PodView {
    let status = pod.status.as_ref();
    let spec_image = |name: &str| {
        pod.spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == name))
            .and_then(|c| c.image.as_deref())
    };
    let unschedulable = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter().find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        })
        .map(|c| c.message.clone().unwrap_or_default());
    let containers = status
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| {
            cs.iter()
                .map(|c| container_view(c, spec_image(&c.name)))
                .collect()
        })
        .unwrap_or_default();
    PodView {
        name: pod.metadata.name.clone().unwrap_or_default(),
        role: role(pod),
        phase: status
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Unknown".into()),
        reason: status.and_then(|s| s.reason.clone()).unwrap_or_default(),
        message: status.and_then(|s| s.message.clone()).unwrap_or_default(),
        unschedulable,
        disrupted: disruption::of_pod(pod),
        containers,
    }
}

/// The views of `pods`, master first, then workers by index.
pub fn pod_views(pods: &[Pod]) -> Vec<PodView> {
    let mut views: Vec<PodView> = pods.iter().map(pod_view).collect();
    sort_by_role(&mut views);
    views
}

/// Master first, then workers by index.
pub fn sort_by_role(views: &mut [PodView]) {
    views.sort_by(|a, b| (a.role, &a.name).cmp(&(b.role, &b.name)));
}
