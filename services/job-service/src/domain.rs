//! Job domain types: ids, the state machine, attempts, and the small value
//! types requests are turned into at the boundary.

use trainmesh_common::error::FieldError;
use trainmesh_common::proto::job::v1 as pb;

trainmesh_common::typed_id!(
    /// A job's id (UUIDv7, so ids sort by creation).
    JobId
);

pub use trainmesh_common::spec::PLATFORM_LABEL_PREFIX as RESERVED_LABEL_PREFIX;
/// Label put on a job created by RetryJob, naming the job it retries.
pub const RETRY_OF_LABEL: &str = "trainmesh.io/retry-of";

/// The lifecycle of a job; see [`JobState::can_become`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    Pending,
    Queued,
    AwaitingApproval,
    Scheduled,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Pending,
        JobState::Queued,
        JobState::AwaitingApproval,
        JobState::Scheduled,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The stored (TEXT column) name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Queued => "QUEUED",
            JobState::AwaitingApproval => "AWAITING_APPROVAL",
            JobState::Scheduled => "SCHEDULED",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// The transitions the scheduler may report (job-service itself only
    /// ever moves PENDING → CANCELLED). Requeue is QUEUED/SCHEDULED/RUNNING
    /// → QUEUED; any non-terminal state may end CANCELLED or FAILED.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        if self.is_terminal() {
            return false;
        }
        if matches!(to, Cancelled | Failed) {
            return true;
        }
        match (self, to) {
            // AWAITING_APPROVAL directly from PENDING: a scheduler that decides
            // approval at enqueue time need not pass through QUEUED first.
            (Pending, Queued | AwaitingApproval) => true,
            (Queued, Queued | AwaitingApproval | Scheduled) => true,
            (AwaitingApproval, Queued | Scheduled) => true,
            (Scheduled, Running | Queued) => true,
            (Running, Succeeded | Queued) => true,
            _ => false,
        }
    }

    /// Not yet given to a runner: DeleteJob may remove it.
    pub fn never_started(self) -> bool {
        matches!(
            self,
            JobState::Pending | JobState::Queued | JobState::AwaitingApproval
        )
    }

    pub fn to_proto(self) -> pb::JobState {
        match self {
            JobState::Pending => pb::JobState::Pending,
            JobState::Queued => pb::JobState::Queued,
            JobState::AwaitingApproval => pb::JobState::AwaitingApproval,
            JobState::Scheduled => pb::JobState::Scheduled,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
    }

    /// Converts a wire value; UNSPECIFIED and unknown numbers name `field`.
    pub fn from_proto(field: &str, value: i32) -> Result<Self, FieldError> {
        match pb::JobState::try_from(value) {
            Ok(pb::JobState::Pending) => Ok(JobState::Pending),
            Ok(pb::JobState::Queued) => Ok(JobState::Queued),
            Ok(pb::JobState::AwaitingApproval) => Ok(JobState::AwaitingApproval),
            Ok(pb::JobState::Scheduled) => Ok(JobState::Scheduled),
            Ok(pb::JobState::Running) => Ok(JobState::Running),
            Ok(pb::JobState::Succeeded) => Ok(JobState::Succeeded),
            Ok(pb::JobState::Failed) => Ok(JobState::Failed),
            Ok(pb::JobState::Cancelled) => Ok(JobState::Cancelled),
            Ok(pb::JobState::Unspecified) => Err(FieldError::new(field, "a job state is required")),
            Err(_) => Err(FieldError::new(
                field,
                format!("{value} is not a known job state"),
            )),
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of one attempt, stored as TEXT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptState {
    Scheduled,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Lost,
}

impl AttemptState {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptState::Scheduled => "SCHEDULED",
            AttemptState::Running => "RUNNING",
            AttemptState::Succeeded => "SUCCEEDED",
            AttemptState::Failed => "FAILED",
            AttemptState::Cancelled => "CANCELLED",
            AttemptState::Lost => "LOST",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            AttemptState::Scheduled,
            AttemptState::Running,
            AttemptState::Succeeded,
            AttemptState::Failed,
            AttemptState::Cancelled,
            AttemptState::Lost,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, AttemptState::Scheduled | AttemptState::Running)
    }

    pub fn to_proto(self) -> pb::AttemptState {
        match self {
            AttemptState::Scheduled => pb::AttemptState::Scheduled,
            AttemptState::Running => pb::AttemptState::Running,
            AttemptState::Succeeded => pb::AttemptState::Succeeded,
            AttemptState::Failed => pb::AttemptState::Failed,
            AttemptState::Cancelled => pb::AttemptState::Cancelled,
            AttemptState::Lost => pb::AttemptState::Lost,
        }
    }

    /// `None` for UNSPECIFIED (the job state then decides).
    pub fn from_proto(field: &str, value: i32) -> Result<Option<Self>, FieldError> {
        match pb::AttemptState::try_from(value) {
            Ok(pb::AttemptState::Unspecified) => Ok(None),
            Ok(pb::AttemptState::Scheduled) => Ok(Some(AttemptState::Scheduled)),
            Ok(pb::AttemptState::Running) => Ok(Some(AttemptState::Running)),
            Ok(pb::AttemptState::Succeeded) => Ok(Some(AttemptState::Succeeded)),
            Ok(pb::AttemptState::Failed) => Ok(Some(AttemptState::Failed)),
            Ok(pb::AttemptState::Cancelled) => Ok(Some(AttemptState::Cancelled)),
            Ok(pb::AttemptState::Lost) => Ok(Some(AttemptState::Lost)),
            Err(_) => Err(FieldError::new(
                field,
                format!("{value} is not a known attempt state"),
            )),
        }
    }

    /// What an attempt becomes when the job moves to `job` without the
    /// scheduler naming the attempt's state.
    pub fn implied_by(job: JobState, has_error: bool) -> Self {
        match job {
            JobState::Scheduled => AttemptState::Scheduled,
            JobState::Running => AttemptState::Running,
            JobState::Succeeded => AttemptState::Succeeded,
            JobState::Cancelled => AttemptState::Cancelled,
            // A requeue without a named state: the attempt did not finish.
            JobState::Queued | JobState::AwaitingApproval | JobState::Pending if !has_error => {
                AttemptState::Lost
            }
            _ => AttemptState::Failed,
        }
    }
}

/// A failure cause as stored (the proto enum's name; empty for none).
pub fn failure_cause_name(cause: i32) -> &'static str {
    match pb::FailureCause::try_from(cause) {
        Ok(pb::FailureCause::Unspecified) | Err(_) => "",
        Ok(c) => c.as_str_name(),
    }
}

pub fn failure_cause_from_name(name: &str) -> pb::FailureCause {
    pb::FailureCause::from_str_name(name).unwrap_or(pb::FailureCause::Unspecified)
}

/// Exit 1–127 is the user's code, 128–255 a signal,
/// no exit code at all means the platform lost the attempt.
pub fn failure_cause_for_exit(exit_code: Option<i32>) -> pb::FailureCause {
    match exit_code {
        Some(1..=127) => pb::FailureCause::UserCode,
        Some(128..=255) => pb::FailureCause::Signal,
        Some(_) => pb::FailureCause::UserCode,
        None => pb::FailureCause::Platform,
    }
}

/// The readable form of a structured error.
pub fn error_message(err: &pb::JobError) -> String {
    format!(
        "Error Type: {}\nError Message: {}\nFull Traceback:\n{}",
        err.r#type, err.message, err.traceback
    )
}

/// One `key=value` label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelector {
    pub key: String,
    pub value: String,
}

impl LabelSelector {
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldError> {
        let Some((k, v)) = s.split_once('=') else {
            return Err(FieldError::new(
                field,
                format!("`{s}` is not a `key=value` selector"),
            ));
        };
        let key = k.trim();
        if key.is_empty() {
            return Err(FieldError::new(
                field,
                "the selector's key must not be empty",
            ));
        }
        // A key no job can have is a mistake, not an empty result.
        trainmesh_common::spec::check_label_key(field, key)?;
        trainmesh_common::spec::check_label_value(field, v.trim())?;
        Ok(Self {
            key: key.to_owned(),
            value: v.trim().to_owned(),
        })
    }
}

/// Keyset position of ListJobs: the last (create_time, id) returned. Sent
/// hex-encoded so clients treat it as opaque.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageToken {
    pub create_time: i64,
    pub id: String,
}

impl PageToken {
    pub fn encode(&self) -> String {
        hex::encode(format!("v1:{}:{}", self.create_time, self.id))
    }

    pub fn decode(field: &str, token: &str) -> Result<Self, FieldError> {
        let bad = || FieldError::new(field, "is not a page token returned by ListJobs");
        let bytes = hex::decode(token).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let rest = text.strip_prefix("v1:").ok_or_else(bad)?;
        let (t, id) = rest.split_once(':').ok_or_else(bad)?;
        let create_time = t.parse().map_err(|_| bad())?;
        JobId::parse_field(field, id).map_err(|_| bad())?;
        Ok(Self {
            create_time,
            id: id.to_owned(),
        })
    }
}

/// WatchJobs resume position: the global event id, as an opaque string.
pub fn encode_cursor(id: i64) -> String {
    id.to_string()
}

pub fn decode_cursor(field: &str, cursor: &str) -> Result<i64, FieldError> {
    cursor
        .parse::<i64>()
        .ok()
        .filter(|c| *c >= 0)
        .ok_or_else(|| FieldError::new(field, "is not a cursor returned by WatchJobs"))
}

/// StreamJobLogs resume position: after line `number` of `attempt`
/// (attempt 0: before the first line of whichever attempt the stream
/// starts on). Written `attempt:number`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogCursor {
    pub attempt: i64,
    pub number: i64,
}

impl LogCursor {
    pub fn encode(self) -> String {
        format!("{}:{}", self.attempt, self.number)
    }

    pub fn decode(field: &str, cursor: &str) -> Result<Self, FieldError> {
        let bad = || FieldError::new(field, "is not a cursor returned by StreamJobLogs");
        let (a, n) = cursor.split_once(':').ok_or_else(bad)?;
        let attempt = a.parse::<i32>().ok().filter(|a| *a >= 0).ok_or_else(bad)?;
        let number = n.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(bad)?;
        Ok(Self {
            attempt: i64::from(attempt),
            number,
        })
    }
}

/// A validated StreamJobLogs request (the job id is resolved against the
/// caller by the service).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogQuery {
    pub job_id: String,
    /// 0: the latest attempt (and, when following, the ones after it).
    pub attempt: i64,
    /// Start with the last `tail` lines; 0: the whole log.
    pub tail: i64,
    pub follow: bool,
    /// Resume after this position instead of starting afresh.
    pub resume: Option<LogCursor>,
}

impl TryFrom<pb::StreamJobLogsRequest> for LogQuery {
    type Error = FieldError;
    fn try_from(r: pb::StreamJobLogsRequest) -> Result<Self, FieldError> {
        if r.attempt < 0 {
            return Err(FieldError::new(
                "attempt",
                "must not be negative (0 means the latest)",
            ));
        }
        if r.tail_lines < 0 {
            return Err(FieldError::new(
                "tail_lines",
                "must not be negative (0 means the whole log)",
            ));
        }
        let attempt = i64::from(r.attempt);
        let resume = if r.cursor.is_empty() {
            None
        } else {
            Some(LogCursor::decode("cursor", &r.cursor)?)
        };
        if let Some(c) = resume {
            if attempt != 0 && c.attempt != 0 && c.attempt != attempt {
                return Err(FieldError::new(
                    "cursor",
                    format!(
                        "names a line of attempt {} but attempt {attempt} was asked for",
                        c.attempt
                    ),
                ));
            }
        }
        Ok(Self {
            job_id: r.job_id,
            attempt,
            tail: i64::from(r.tail_lines),
            follow: r.follow,
            resume,
        })
    }
}

/// A validated UpdateJobStatus request.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusUpdate {
    pub job_id: JobId,
    /// 0 when the scheduler did not name one (the current attempt is meant).
    pub attempt: i64,
    pub state: JobState,
    pub attempt_state: Option<AttemptState>,
    pub runner_id: String,
    pub runner_name: String,
    pub exit_code: Option<i32>,
    pub error: Option<pb::JobError>,
    pub failure_cause: Option<pb::FailureCause>,
    pub reason: String,
    /// When it happened on the scheduler's side (micros), if sent.
    pub time: Option<i64>,
    pub sequence: i64,
}

impl TryFrom<pb::UpdateJobStatusRequest> for StatusUpdate {
    type Error = FieldError;

    fn try_from(r: pb::UpdateJobStatusRequest) -> Result<Self, FieldError> {
        let job_id = JobId::parse_field("job_id", &r.job_id)?;
        if r.attempt < 0 {
            return Err(FieldError::new("attempt", "must not be negative"));
        }
        if r.scheduler_sequence < 1 {
            return Err(FieldError::new(
                "scheduler_sequence",
                "must be at least 1 (monotonic per job)",
            ));
        }
        if r.runner_id.len() > 256 {
            return Err(FieldError::new("runner_id", "is longer than 256 bytes"));
        }
        trainmesh_common::text::display_text("runner_name", &r.runner_name, 256)?;
        let runner_name = r.runner_name;
        let failure_cause = match pb::FailureCause::try_from(r.failure_cause) {
            Ok(pb::FailureCause::Unspecified) => None,
            Ok(c) => Some(c),
            Err(_) => {
                return Err(FieldError::new(
                    "failure_cause",
                    format!("{} is not a known failure cause", r.failure_cause),
                ))
            }
        };
        Ok(Self {
            job_id,
            attempt: i64::from(r.attempt),
            state: JobState::from_proto("state", r.state)?,
            attempt_state: AttemptState::from_proto("attempt_state", r.attempt_state)?,
            runner_id: r.runner_id,
            runner_name,
            exit_code: r.exit_code,
            error: r.error.map(sanitize_error),
            failure_cause,
            reason: crate::validate::validate_reason("reason", &r.reason)?,
            time: r.time.as_ref().map(trainmesh_common::time::from_timestamp),
            sequence: r.scheduler_sequence,
        })
    }
}

/// PostgreSQL TEXT cannot hold NUL; errors come from arbitrary programs.
fn sanitize_error(mut e: pb::JobError) -> pb::JobError {
    for s in [
        &mut e.r#type,
        &mut e.message,
        &mut e.traceback,
        &mut e.category,
        &mut e.hint,
    ] {
        if s.contains('\0') {
            *s = s.replace('\0', "\u{fffd}");
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine_follows_the_design() {
        use JobState::*;
        assert!(Pending.can_become(Queued));
        assert!(Queued.can_become(Scheduled));
        assert!(Queued.can_become(AwaitingApproval));
        assert!(AwaitingApproval.can_become(Scheduled));
        assert!(Scheduled.can_become(Running));
        assert!(Running.can_become(Succeeded));
        for s in [Queued, Scheduled, Running] {
            assert!(s.can_become(Queued), "{s} requeue");
        }
        for s in [Pending, Queued, AwaitingApproval, Scheduled, Running] {
            assert!(s.can_become(Cancelled));
            assert!(s.can_become(Failed));
        }
        assert!(!Pending.can_become(Running));
        assert!(!Pending.can_become(Succeeded));
        assert!(!Queued.can_become(Succeeded));
        assert!(!Scheduled.can_become(Succeeded));
        assert!(!Running.can_become(Scheduled));
        for t in [Succeeded, Failed, Cancelled] {
            for to in JobState::ALL {
                assert!(!t.can_become(to), "{t} is terminal");
            }
        }
    }

    #[test]
    fn states_round_trip_through_text_and_proto() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
            assert_eq!(JobState::from_proto("s", s.to_proto() as i32).unwrap(), s);
        }
        assert!(JobState::from_proto("states[0]", 0).is_err());
        assert_eq!(
            JobState::from_proto("states[0]", 99).unwrap_err().field,
            "states[0]"
        );
    }

    #[test]
    fn error_message_has_the_documented_shape() {
        let e = pb::JobError {
            r#type: "RuntimeError".into(),
            message: "boom".into(),
            traceback: "Traceback (most recent call last):\n  x".into(),
            ..Default::default()
        };
        assert_eq!(
            error_message(&e),
            "Error Type: RuntimeError\nError Message: boom\nFull Traceback:\nTraceback (most recent call last):\n  x"
        );
    }

    #[test]
    fn exit_codes_map_to_causes() {
        assert_eq!(failure_cause_for_exit(Some(1)), pb::FailureCause::UserCode);
        assert_eq!(failure_cause_for_exit(Some(137)), pb::FailureCause::Signal);
        assert_eq!(failure_cause_for_exit(None), pb::FailureCause::Platform);
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let t = PageToken {
            create_time: 42,
            id: JobId::new().to_string(),
        };
        assert_eq!(PageToken::decode("page_token", &t.encode()).unwrap(), t);
        for bad in ["zz", "", &hex::encode("v1:x:y"), &hex::encode("v2:1:a")] {
            assert_eq!(
                PageToken::decode("page_token", bad).unwrap_err().field,
                "page_token"
            );
        }
    }

    #[test]
    fn selectors_need_key_and_equals() {
        assert_eq!(
            LabelSelector::parse("l", "team=nlp").unwrap(),
            LabelSelector {
                key: "team".into(),
                value: "nlp".into()
            }
        );
        assert!(LabelSelector::parse("l", "team").is_err());
        assert!(LabelSelector::parse("l", "=x").is_err());
    }
}
