//! The scheduler's one error type, mapped once to `tonic::Status`.

use trainmesh_common::error::{db_error_code, to_status, ErrorCode, FieldError, ServiceError};

use crate::domain::{JobId, RunnerId};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Field(#[from] FieldError),

    #[error("job `{0}` is not in the scheduler's queue")]
    JobNotFound(JobId),

    #[error("job `{0}` has no approval")]
    ApprovalNotFound(JobId),

    #[error("runner `{0}` is not registered or its lease expired; register again")]
    RunnerNotFound(RunnerId),

    #[error("no runner named `{0}` ever registered")]
    RunnerNameNotFound(String),

    /// Another installation's live runner holds the name.
    #[error(
        "runner name `{name}` is held by another live runner (another machine or work \
         directory) until its lease ends at {until}; two runners cannot share a name"
    )]
    NameTaken { name: String, until: String },

    /// A runner's credential used for another runner's registration.
    #[error("runner `{caller}` may not act for runner `{runner_id}`, registered as `{name}`")]
    OtherRunner {
        caller: String,
        runner_id: RunnerId,
        name: String,
    },

    /// A report from a runner that does not hold the attempt (fencing).
    #[error("runner `{runner_id}` does not hold attempt {attempt} of job `{job_id}`: {why}")]
    NotHolder {
        runner_id: RunnerId,
        job_id: JobId,
        attempt: i64,
        why: String,
    },

    #[error("{0}")]
    FailedPrecondition(String),

    #[error("you may only see your own queue entries, not those of `{0}`")]
    OtherUsersQueue(String),

    /// A concurrent change won a race (PostgreSQL); the operation is retried.
    #[error("{0}; retry")]
    Conflict(String),

    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),

    /// Stored data the code cannot read back (a bug or a bad migration).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl ServiceError for Error {
    fn code(&self) -> ErrorCode {
        match self {
            Error::Field(_) => ErrorCode::InvalidArgument,
            Error::JobNotFound(_)
            | Error::ApprovalNotFound(_)
            | Error::RunnerNotFound(_)
            | Error::RunnerNameNotFound(_) => ErrorCode::NotFound,
            Error::NotHolder { .. } | Error::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Error::OtherUsersQueue(_) | Error::OtherRunner { .. } => ErrorCode::PermissionDenied,
            Error::NameTaken { .. } => ErrorCode::AlreadyExists,
            Error::Conflict(_) => ErrorCode::Unavailable,
            Error::Db(e) => db_error_code(e),
            Error::Corrupt(_) => ErrorCode::Internal,
        }
    }

    fn field_errors(&self) -> Vec<FieldError> {
        match self {
            Error::Field(f) => vec![f.clone()],
            _ => Vec::new(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        to_status(&e)
    }
}
