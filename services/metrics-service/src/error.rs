//! The service's errors and their one mapping to `tonic::Status`.

use trainmesh_common::error::{db_error_code, to_status, ErrorCode, FieldError, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored row that this version cannot read (e.g. an unknown value kind).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl ServiceError for Error {
    fn code(&self) -> ErrorCode {
        match self {
            Error::Invalid(_) => ErrorCode::InvalidArgument,
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
