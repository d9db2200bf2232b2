//! The service's errors and their one mapping to `tonic::Status`.

use tonic_types::{ErrorDetails, StatusExt};
use trainmesh_common::error::{db_error_code, to_status, ErrorCode, FieldError, ServiceError};

use crate::caps::CapExceeded;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// A batch would take a job past a per-job cap.
    #[error(transparent)]
    Cap(#[from] CapExceeded),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// No such job, or not one the caller may see.
    #[error("job `{0}` was not found")]
    JobNotFound(crate::domain::JobId),
    /// job-service could not say whose job it is.
    #[error("cannot check the job's owner with job-service: {0}")]
    JobService(String),
    /// The caller may see the job but not make this change.
    #[error("{0}")]
    PermissionDenied(String),
    /// Not known yet (job-service has not heard of the attempt): retry.
    #[error("{0}")]
    NotYet(String),
    /// A stored row that this version cannot read (e.g. an unknown value kind).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl ServiceError for Error {
    fn code(&self) -> ErrorCode {
        match self {
            Error::Invalid(_) => ErrorCode::InvalidArgument,
            Error::Cap(_) => ErrorCode::ResourceExhausted,
            Error::Db(e) => db_error_code(e),
            Error::JobNotFound(_) => ErrorCode::NotFound,
            Error::JobService(_) | Error::NotYet(_) => ErrorCode::Unavailable,
            Error::PermissionDenied(_) => ErrorCode::PermissionDenied,
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
        match &e {
            // RESOURCE_EXHAUSTED alone also means "shed, retry later"; the
            // QuotaFailure detail tells a client that retrying the same
            // batch cannot succeed.
            Error::Cap(cap) => tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                e.to_string(),
                ErrorDetails::with_quota_failure_violation(
                    format!("job:{}", cap.job),
                    format!(
                        "at most {} {} per job (metrics-service {})",
                        cap.limit,
                        cap.cap.noun(),
                        cap.cap.flag()
                    ),
                ),
            ),
            _ => to_status(&e),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
