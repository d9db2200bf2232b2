//! The runner's error enum. The runner serves no RPCs, but it follows the
//! same mapping as the services so its errors read the same in logs (and a
//! future control endpoint gets the conversion to `Status` for free).

use trainmesh_common::error::{to_status, ErrorCode, FieldError, ServiceError};
use trainmesh_common::proto::job::v1::JobError;

use crate::backend::docker;
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

    #[error("secret `{name}` for ${variable} is not available on this runner: {reason}")]
    Secret {
        variable: String,
        name: String,
        reason: String,
    },

    #[error("gpu index {index} is not in this runner's inventory")]
    UnknownGpu { index: i32 },

    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },

    /// The Docker Engine could not be reached, or failed a request.
    #[error("docker engine: {what}: {source}")]
    Docker {
        what: String,
        source: bollard::errors::Error,
    },

    /// The job's image is not on the node and could not be pulled (or the
    /// pull policy forbids pulling it).
    #[error("cannot pull image `{image}`: {reason}")]
    ImagePull {
        image: String,
        reason: String,
        /// A registry or network hiccup that a later attempt may not meet.
        transient: bool,
    },

    /// GPUs were asked of an engine that cannot hand them to containers.
    #[error(
        "the Docker engine has no NVIDIA runtime, so it cannot give the container GPUs ({detail})"
    )]
    NoNvidiaRuntime { detail: String },

    /// The engine created the container but refused to start it.
    #[error("cannot start container `{container}` (image `{image}`): {message}")]
    ContainerStart {
        container: String,
        image: String,
        message: String,
    },

    /// The attempt's deterministic container name is held by a container
    /// that is not this attempt's.
    #[error("container name `{name}` is taken by a container that is not this attempt's")]
    ContainerNameTaken { name: String },
    /// The Kubernetes API refused or failed a request (`status` is the
    /// HTTP code when it answered).
    #[error("{what}: {message}")]
    Kubernetes {
        what: String,
        status: Option<u16>,
        message: String,
    },
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub fn docker(what: impl Into<String>, source: bollard::errors::Error) -> Self {
        Error::Docker {
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
            Error::Secret { .. } => {
                job_error::setup_error("SecretUnavailable", self.to_string(), false)
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
            Error::Docker { .. } => {
                job_error::platform_error("DockerEngineError", self.to_string())
            }
            Error::ImagePull {
                image, transient, ..
            } => docker::errors::image_pull_error(image, self.to_string(), *transient),
            Error::NoNvidiaRuntime { .. } => {
                docker::errors::nvidia_runtime_missing(self.to_string())
            }
            Error::ContainerStart { image, message, .. } => {
                docker::errors::container_start_error(image, message, self.to_string())
            }
            Error::ContainerNameTaken { .. } => {
                job_error::platform_error("ContainerNameTaken", self.to_string())
            }
            // The API server found the object invalid: the job's spec (an
            // env name, a label) is at fault, and a retry changes nothing.
            Error::Kubernetes {
                status: Some(400 | 422),
                ..
            } => job_error::setup_error("KubernetesInvalidObject", self.to_string(), false),
            // Unreachable API, RBAC, quota, a missing CRD: the platform's.
            Error::Kubernetes { .. } => {
                job_error::platform_error("KubernetesApiError", self.to_string())
            }
        }
    }
}

impl ServiceError for Error {
    fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidAssignment(_) => ErrorCode::InvalidArgument,
            Error::Exec { .. }
            | Error::WorkingDir { .. }
            | Error::Secret { .. }
            | Error::UnknownGpu { .. }
            | Error::ImagePull { .. }
            | Error::NoNvidiaRuntime { .. }
            | Error::ContainerStart { .. }
            | Error::ContainerNameTaken { .. } => ErrorCode::FailedPrecondition,
            Error::Docker { .. } => ErrorCode::Unavailable,
            Error::Io { .. } => ErrorCode::Internal,
            Error::Kubernetes {
                status: Some(400 | 422),
                ..
            } => ErrorCode::InvalidArgument,
            Error::Kubernetes { .. } => ErrorCode::Unavailable,
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
    fn kubernetes_errors_split_into_setup_and_platform() {
        let invalid = Error::Kubernetes {
            what: "cannot create Job `tm-x-1`".into(),
            status: Some(422),
            message: "spec.template.spec.containers[0].env[0].name: Invalid value".into(),
        };
        let je = invalid.to_job_error();
        assert_eq!((je.category.as_str(), je.retryable), ("setup", false));
        let forbidden = Error::Kubernetes {
            what: "cannot create Job `tm-x-1`".into(),
            status: Some(403),
            message: "exceeded quota".into(),
        };
        let je = forbidden.to_job_error();
        assert_eq!((je.category.as_str(), je.retryable), ("platform", true));
        assert!(je.message.contains("exceeded quota"));
    }

    #[test]
    fn invalid_assignment_is_invalid_argument() {
        let e = Error::from(FieldError::new("assignment.spec.command", "is required"));
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
    }
}
