//! What a diagnosis is made from (a job, its error, its log) and of
//! (findings with evidence), independent of the wire format.

use trainmesh_common::error::FieldError;
use trainmesh_common::proto::diagnosis::v1 as dpb;
use trainmesh_common::proto::job::v1 as jpb;

use crate::text::{one_line, truncate};

trainmesh_common::typed_id!(
    /// A job of job-service.
    JobId
);
trainmesh_common::typed_id!(
    /// One stored diagnosis.
    DiagnosisId
);

/// The structured error of a failed job, as job-service reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobErrorFacts {
    pub kind: String,
    pub message: String,
    pub traceback: String,
    pub exit_code: i32,
    pub signal: i32,
    pub category: String,
    pub hint: String,
}

impl JobErrorFacts {
    /// `Type: first line of the message`, or whichever of the two is set.
    pub fn headline(&self) -> String {
        let msg = self.message.lines().next().unwrap_or("").trim();
        match (self.kind.trim(), msg) {
            ("", "") => String::new(),
            ("", m) => m.to_owned(),
            (t, "") => t.to_owned(),
            (t, m) => format!("{t}: {m}"),
        }
    }

    /// The text rules search: type, message and traceback.
    pub fn text(&self) -> String {
        format!("{}: {}\n{}", self.kind, self.message, self.traceback)
    }
}

/// Longest replica message quoted, in characters.
const MAX_REPLICA_MESSAGE_CHARS: usize = 200;

/// One replica (pod) of the last attempt, as its backend last saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaFacts {
    /// "master" or "worker".
    pub role: String,
    pub name: String,
    pub phase: String,
    /// Waiting reason or last terminated reason of the main container.
    pub reason: String,
    pub message: String,
    pub exit_code: Option<i32>,
    pub restarts: i32,
}

impl ReplicaFacts {
    fn from_proto(r: &jpb::ReplicaStatus) -> Self {
        Self {
            role: r.role.clone(),
            name: r.name.clone(),
            phase: r.phase.clone(),
            reason: r.reason.clone(),
            message: r.message.clone(),
            exit_code: r.exit_code,
            restarts: r.restarts,
        }
    }

    pub fn is_master(&self) -> bool {
        self.role == "master"
    }

    /// "my-job-worker-1: Failed, OOMKilled, exit 137, 0 restarts
    /// (message)", as evidence and prompts quote it.
    pub fn describe(&self) -> String {
        let phase = if self.phase.is_empty() {
            "Unknown"
        } else {
            &self.phase
        };
        let mut s = format!("{}: {phase}", self.name);
        if !self.reason.is_empty() {
            s.push_str(&format!(", {}", self.reason));
        }
        if let Some(code) = self.exit_code {
            s.push_str(&format!(", exit {code}"));
        }
        let plural = if self.restarts == 1 { "" } else { "s" };
        s.push_str(&format!(", {} restart{plural}", self.restarts));
        if !self.message.trim().is_empty() {
            s.push_str(&format!(
                " ({})",
                truncate(&one_line(&self.message), MAX_REPLICA_MESSAGE_CHARS)
            ));
        }
        s
    }

    /// Failed, or not running as it should (waiting with a reason,
    /// restarted, killed).
    pub fn abnormal(&self) -> bool {
        self.phase == "Failed"
            || self.phase == "Unknown"
            || self.restarts > 0
            || self.exit_code.is_some_and(|c| c != 0)
            || (!self.reason.is_empty() && self.reason != "Completed")
    }
}

/// What the rules know about a job.
#[derive(Clone, Debug)]
pub struct JobFacts {
    pub id: JobId,
    pub owner: String,
    pub name: String,
    pub state: jpb::JobState,
    pub failure_cause: jpb::FailureCause,
    pub state_reason: String,
    pub error: Option<JobErrorFacts>,
    /// Of the last attempt, else of the error.
    pub exit_code: Option<i32>,
    pub attempts: usize,
    pub gpus: i32,
    pub shm_mib: i64,
    pub workers: i32,
    pub correlation_id: String,
    /// Replicas of the last attempt, when its backend reported them.
    pub replicas: Vec<ReplicaFacts>,
    /// What the static checks compare the spec with.
    pub checks: CheckFacts,
}

impl JobFacts {
    pub fn from_proto(job: &jpb::Job) -> Result<Self, FieldError> {
        let id = JobId::parse_field("job.id", &job.id)?;
        let error = job.error.as_ref().map(|e| JobErrorFacts {
            kind: e.r#type.clone(),
            message: e.message.clone(),
            traceback: e.traceback.clone(),
            exit_code: e.exit_code,
            signal: e.signal,
            category: e.category.clone(),
            hint: e.hint.clone(),
        });
        let last = job.attempts.iter().max_by_key(|a| a.number);
        let last_error = last.and_then(|a| a.error.as_ref()).or(job.error.as_ref());
        let exit_code = last.and_then(|a| a.exit_code).or_else(|| {
            error
                .as_ref()
                .and_then(|e| (e.exit_code != 0).then_some(e.exit_code))
        });
        let spec = job.spec.clone().unwrap_or_default();
        let resources = spec.resources.unwrap_or_default();
        Ok(Self {
            id,
            owner: job.owner.clone(),
            name: spec.name,
            state: jpb::JobState::try_from(job.state).unwrap_or(jpb::JobState::Unspecified),
            failure_cause: jpb::FailureCause::try_from(job.failure_cause)
                .unwrap_or(jpb::FailureCause::Unspecified),
            state_reason: job.state_reason.clone(),
            error,
            exit_code,
            attempts: job.attempts.len(),
            gpus: resources.gpus,
            shm_mib: resources.shm_mib,
            workers: spec.replicas.unwrap_or_default().workers,
            correlation_id: job.correlation_id.clone(),
            replicas: last_error
                .map(|e| e.replicas.iter().map(ReplicaFacts::from_proto).collect())
                .unwrap_or_default(),
            checks: CheckFacts {
                deadline: spec
                    .deadline
                    .as_ref()
                    .and_then(trainmesh_common::time::from_duration)
                    .filter(|d| !d.is_zero()),
                history: Vec::new(),
                gpu_type: resources.gpu_type.clone(),
                cpu: resources.cpu,
                memory_mib: resources.memory_mib,
                fleet: None,
            },
        })
    }

    /// Replicas the attempt asked for (a master and `workers` workers) and
    /// those its backend created; `None` when it reported none.
    pub fn replica_counts(&self) -> Option<(usize, usize)> {
        if self.replicas.is_empty() {
            return None;
        }
        let expected = 1 + usize::try_from(self.workers).unwrap_or(0);
        Some((expected, self.replicas.len()))
    }

    /// Not finished yet (anything before a terminal state).
    pub fn in_progress(&self) -> bool {
        !matches!(
            self.state,
            jpb::JobState::Succeeded | jpb::JobState::Failed | jpb::JobState::Cancelled
        )
    }

    pub fn state_name(&self) -> &'static str {
        match self.state {
            jpb::JobState::Unspecified => "UNSPECIFIED",
            jpb::JobState::Pending => "PENDING",
            jpb::JobState::Queued => "QUEUED",
            jpb::JobState::AwaitingApproval => "AWAITING_APPROVAL",
            jpb::JobState::Scheduled => "SCHEDULED",
            jpb::JobState::Running => "RUNNING",
            jpb::JobState::Succeeded => "SUCCEEDED",
            jpb::JobState::Failed => "FAILED",
            jpb::JobState::Cancelled => "CANCELLED",
        }
    }
}

pub use crate::checks::{CheckFacts, Offer};

/// One line of a job's log; `number` is 1-based within the attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub number: i64,
    pub text: String,
}

impl LogLine {
    pub fn new(number: i64, text: impl Into<String>) -> Self {
        Self {
            number,
            text: text.into(),
        }
    }
}

/// Where a finding's support comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Log,
    Error,
    Event,
    Metric,
    /// The job's spec (static resource checks).
    Spec,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Log => "log",
            Source::Error => "error",
            Source::Event => "event",
            Source::Metric => "metric",
            Source::Spec => "spec",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Evidence {
    pub source: Source,
    /// 1-based log line for [`Source::Log`], else 0.
    pub line_number: i64,
    pub text: String,
}

impl Evidence {
    pub fn log(line: &LogLine) -> Self {
        Self {
            source: Source::Log,
            line_number: line.number,
            text: line.text.clone(),
        }
    }

    pub fn error(text: impl Into<String>) -> Self {
        Self {
            source: Source::Error,
            line_number: 0,
            text: text.into(),
        }
    }

    /// A fact from the attempt's structured state (pods, replicas).
    pub fn event(text: impl Into<String>) -> Self {
        Self {
            source: Source::Event,
            line_number: 0,
            text: text.into(),
        }
    }

    pub fn spec(text: impl Into<String>) -> Self {
        Self {
            source: Source::Spec,
            line_number: 0,
            text: text.into(),
        }
    }

    pub fn to_proto(&self) -> dpb::Evidence {
        dpb::Evidence {
            source: self.source.as_str().to_owned(),
            line_number: self.line_number,
            text: self.text.clone(),
        }
    }
}

/// The three layers of analysis, as in Aegis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// Static checks of the spec.
    Resource,
    /// Job, attempt and container states, exit codes.
    Control,
    /// Logs, events, metric anomalies.
    Execution,
}

impl Layer {
    pub fn to_proto(self) -> dpb::Layer {
        match self {
            Layer::Resource => dpb::Layer::Resource,
            Layer::Control => dpb::Layer::Control,
            Layer::Execution => dpb::Layer::Execution,
        }
    }
}

/// A problem or a risk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Explains a failure.
    #[default]
    Error,
    /// A risk that does not by itself make a job unhealthy.
    Warning,
}

/// What one rule found.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub rule_id: String,
    pub layer: Layer,
    pub severity: Severity,
    pub category: String,
    pub summary: String,
    pub hint: String,
    pub evidence: Vec<Evidence>,
}

impl Finding {
    pub fn to_proto(&self) -> dpb::RuleFinding {
        dpb::RuleFinding {
            rule_id: self.rule_id.clone(),
            layer: self.layer.to_proto() as i32,
            category: self.category.clone(),
            summary: self.summary.clone(),
            hint: self.hint.clone(),
            evidence: self.evidence.iter().map(Evidence::to_proto).collect(),
        }
    }
}

/// Page size of ListDiagnoses when the request does not say.
pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 500;

/// A validated ListDiagnoses request.
#[derive(Clone, Debug)]
pub struct ListQuery {
    pub job_id: Option<JobId>,
    pub page_size: usize,
    /// List entries older than this position.
    pub before_seq: Option<i64>,
}

impl TryFrom<dpb::ListDiagnosesRequest> for ListQuery {
    type Error = FieldError;
    fn try_from(req: dpb::ListDiagnosesRequest) -> Result<Self, Self::Error> {
        let job_id = if req.job_id.is_empty() {
            None
        } else {
            Some(JobId::parse_field("job_id", &req.job_id)?)
        };
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => return Err(FieldError::new("page_size", "must not be negative")),
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let before_seq = if req.page_token.is_empty() {
            None
        } else {
            match req.page_token.parse::<i64>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    return Err(FieldError::new(
                        "page_token",
                        "is not a token from a previous response",
                    ))
                }
            }
        };
        Ok(Self {
            job_id,
            page_size,
            before_seq,
        })
    }
}

/// What GetDiagnosis asks for.
#[derive(Clone, Copy, Debug)]
pub enum GetQuery {
    ById(DiagnosisId),
    LatestOfJob(JobId),
}

impl TryFrom<dpb::GetDiagnosisRequest> for GetQuery {
    type Error = FieldError;
    fn try_from(req: dpb::GetDiagnosisRequest) -> Result<Self, Self::Error> {
        if !req.diagnosis_id.is_empty() {
            return Ok(GetQuery::ById(DiagnosisId::parse_field(
                "diagnosis_id",
                &req.diagnosis_id,
            )?));
        }
        if !req.job_id.is_empty() {
            return Ok(GetQuery::LatestOfJob(JobId::parse_field(
                "job_id",
                &req.job_id,
            )?));
        }
        Err(FieldError::new(
            "diagnosis_id",
            "set diagnosis_id, or job_id for the job's latest diagnosis",
        ))
    }
}
