//! The service's errors and their one mapping to `tonic::Status`.

use trainmesh_common::error::{db_error_code, to_status, ErrorCode, FieldError, ServiceError};

use crate::domain::JobId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// Also what a user gets for another user's job.
    #[error("job `{0}` not found")]
    JobNotFound(JobId),
    #[error("{0}")]
    NotFound(String),
    /// job-service could not be reached or did not answer sensibly.
    #[error("job-service unavailable: {0}")]
    JobService(String),
    /// scheduler-service could not be reached or did not answer sensibly.
    #[error("scheduler-service unavailable: {0}")]
    Scheduler(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("corrupt stored diagnosis: {0}")]
    Corrupt(String),
}

impl ServiceError for Error {
    fn code(&self) -> ErrorCode {
        match self {
            Error::Invalid(_) => ErrorCode::InvalidArgument,
            Error::JobNotFound(_) | Error::NotFound(_) => ErrorCode::NotFound,
            Error::JobService(_) | Error::Scheduler(_) => ErrorCode::Unavailable,
            Error::Db(e) => db_error_code(e),
            Error::Corrupt(_) => ErrorCode::Internal,
        }
    }

    fn field_errors(&self) -> Vec<FieldError> {
        match self {
            Error::Invalid(f) => vec![f.clone()],
            _ => Vec::new(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        to_status(&e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
