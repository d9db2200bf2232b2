//! The one error type of job-service and its mapping to gRPC codes.

use trainmesh_common::error::{db_error_code, to_status, ErrorCode, FieldError, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// Also what a user gets for another user's job.
    #[error("job `{0}` not found")]
    JobNotFound(String),
    #[error("token `{0}` not found")]
    TokenNotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unimplemented(String),
    /// A limit refuses the request (the message names it).
    #[error("{0}")]
    ResourceExhausted(String),
    /// Transient: the caller should retry.
    #[error("{0}")]
    Retry(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl ServiceError for Error {
    fn code(&self) -> ErrorCode {
        match self {
            Error::Invalid(_) => ErrorCode::InvalidArgument,
            Error::JobNotFound(_) | Error::TokenNotFound(_) => ErrorCode::NotFound,
            Error::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Error::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Error::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Error::Unimplemented(_) => ErrorCode::Unimplemented,
            Error::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
            Error::Retry(_) => ErrorCode::Unavailable,
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

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::Corrupt(e.to_string())
    }
}
