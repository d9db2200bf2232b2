//! The runner's error enum. The runner serves no RPCs, but it follows the
//! same mapping as the services so its errors read the same in logs (and a
//! future control endpoint gets the conversion to `Status` for free).

use trainmesh_common::error::{to_status, ErrorCode, FieldError, ServiceError};
use trainmesh_common::proto::job::v1::JobError;

use crate::job_error;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidAssignment(#[from] FieldError),

    /// The command could not be started (not found, not executable, …).
    #[error("cannot execute `{program}`: {source}")]
    Exec {
        program: String,
        source: std::io::Error,
    },

    #[error("working directory `{path}` is not usable: {reason}")]
    WorkingDir { path: String, reason: String },

    #[error("gpu index {index} is not in this runner's inventory")]
    UnknownGpu { index: i32 },

    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },

    #[error("backend `{0}` arrives with a later release")]
    BackendUnavailable(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The structured error to report when an attempt could not be
    /// launched because of this.
    pub fn to_job_error(&self) -> JobError {
        match self {
            Error::Exec { program, source } => job_error::exec_error(program, source),
            Error::InvalidAssignment(_) => {
                job_error::setup_error("InvalidAssignment", self.to_string(), false)
            }
            Error::WorkingDir { .. } => {
                job_error::setup_error("InvalidWorkingDir", self.to_string(), false)
            }
            // The scheduler and this runner disagree about the node: a
            // platform problem another runner may not have.
            Error::UnknownGpu { .. } => {
                job_error::platform_error("GpuUnavailable", self.to_string())
            }
            Error::Io { .. } => job_error::platform_error("RunnerIoError", self.to_string()),
            Error::BackendUnavailable(_) => {
                job_error::platform_error("BackendUnavailable", self.to_string())
            }
        }
    }
}

impl ServiceError for Error {
    fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidAssignment(_) => ErrorCode::InvalidArgument,
            Error::Exec { .. } | Error::WorkingDir { .. } | Error::UnknownGpu { .. } => {
                ErrorCode::FailedPrecondition
            }
            Error::Io { .. } => ErrorCode::Internal,
            Error::BackendUnavailable(_) => ErrorCode::Unimplemented,
        }
    }

    fn field_errors(&self) -> Vec<FieldError> {
        match self {
            Error::InvalidAssignment(f) => vec![f.clone()],
            _ => Vec::new(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        to_status(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_error_becomes_a_setup_job_error() {
        let e = Error::Exec {
            program: "nope".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let je = e.to_job_error();
        assert_eq!(je.category, "setup");
        assert_eq!(je.r#type, "ExecError");
        assert!(je.message.contains("`nope`"));
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::FailedPrecondition
        );
    }

    #[test]
    fn invalid_assignment_is_invalid_argument() {
        let e = Error::from(FieldError::new("assignment.spec.command", "is required"));
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
    }
}
