//! The one mapping from service errors to `tonic::Status`.
//!
//! Each service has its own error enum and implements [`ServiceError`] for
//! it; `impl From<TheirError> for Status` is then one line calling
//! [`to_status`]. Internal details are logged, never sent to callers.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The small set of outcomes a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Unauthenticated,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    Internal,
}

impl ErrorCode {
    pub fn grpc(self) -> Code {
        match self {
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            ErrorCode::FailedPrecondition => Code::FailedPrecondition,
            ErrorCode::Unauthenticated => Code::Unauthenticated,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::ResourceExhausted => Code::ResourceExhausted,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::Unimplemented => Code::Unimplemented,
            ErrorCode::Internal => Code::Internal,
        }
    }
}

/// Implemented by every service's error enum.
pub trait ServiceError: std::error::Error {
    fn code(&self) -> ErrorCode;

    /// Field violations to attach as `google.rpc.BadRequest` details.
    fn field_errors(&self) -> Vec<FieldError> {
        Vec::new()
    }
}

/// A bad field in a request: the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {description}")]
pub struct FieldError {
    pub field: String,
    pub description: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl ServiceError for FieldError {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
    fn field_errors(&self) -> Vec<FieldError> {
        vec![self.clone()]
    }
}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Self {
        to_status(&e)
    }
}

/// Converts a service error to a `Status`. Internal errors are logged with
/// their detail and answered with a generic message.
pub fn to_status<E: ServiceError + ?Sized>(err: &E) -> Status {
    let code = err.code();
    match code {
        ErrorCode::Internal => {
            tracing::error!(error = %err, "internal error");
            Status::internal("internal error; see the service log for the correlation id")
        }
        ErrorCode::Unavailable => {
            tracing::warn!(error = %err, "dependency unavailable");
            Status::unavailable(err.to_string())
        }
        _ => {
            let fields = err.field_errors();
            if fields.is_empty() {
                Status::new(code.grpc(), err.to_string())
            } else {
                let mut details = ErrorDetails::new();
                for f in &fields {
                    details.add_bad_request_violation(f.field.clone(), f.description.clone());
                }
                Status::with_error_details(code.grpc(), err.to_string(), details)
            }
        }
    }
}

/// Classifies a sqlx error: storage failures (a full disk, I/O errors, a
/// read-only or locked database, lost connections) and contention that a
/// retry resolves (deadlocks, serialization failures) are `Unavailable`,
/// so the caller retries; everything else is `Internal`.
pub fn db_error_code(err: &sqlx::Error) -> ErrorCode {
    let contention = match err {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("40001" | "40P01")),
        _ => false,
    };
    if contention || crate::storage::is_storage_failure(err) {
        ErrorCode::Unavailable
    } else {
        ErrorCode::Internal
    }
}

/// True for a unique-constraint violation (SQLite 2067/1555, PostgreSQL 23505).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some("2067") | Some("1555") | Some("23505")
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_error_becomes_invalid_argument_with_details() {
        let status = to_status(&FieldError::new("spec.image", "is required"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("spec.image"));
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request details");
        assert_eq!(bad.field_violations[0].field, "spec.image");
    }
}
