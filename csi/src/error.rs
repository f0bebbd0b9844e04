//! One error type for the whole driver, mapped to gRPC status codes in one place.
//!
//! The CSI spec assigns a code to each failure class (and the sidecars act on the code:
//! retry, give up, mark the PVC failed), so every path returns a typed variant rather
//! than a string, and only [`From<CsiError> for Status`] decides the code.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A required field is missing or a value is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume (or the cluster holding it) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken by a volume with incompatible properties, or a target is
    /// already published in an incompatible way.
    #[error("{0}")]
    AlreadyExists(String),
    /// The requested capacity cannot be provided.
    #[error("{0}")]
    OutOfRange(String),
    /// The call is valid but the system is not in a state that allows it (e.g. publish
    /// before stage).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same volume is in flight; the CO retries later.
    #[error("an operation on {0} is already in progress")]
    Aborted(String),
    /// A Mortar cluster or the mount helper cannot be reached right now.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CsiError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn missing(field: &str) -> Self {
        CsiError::InvalidArgument(format!("{field} is required"))
    }

    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Unimplemented(_) => Code::Unimplemented,
            // Out of space on the volume is a capacity problem the CO can surface as such.
            CsiError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                Code::ResourceExhausted
            }
            CsiError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOTCONN) => {
                Code::Unavailable
            }
            // A brick refused the call for the certificate's role (a mount's where an
            // admin's is needed): a configuration error, not one to retry.
            CsiError::Io { source, .. }
                if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) =>
            {
                Code::PermissionDenied
            }
            CsiError::Io { .. } | CsiError::Internal(_) => Code::Internal,
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

impl From<crate::ops::OpsError> for CsiError {
    fn from(e: crate::ops::OpsError) -> Self {
        use crate::ops::OpsError as O;
        match e {
            O::NotFound(what) => CsiError::NotFound(format!("{what} does not exist")),
            O::AlreadyExists(what) => CsiError::AlreadyExists(format!("{what} already exists")),
            O::Unavailable(why) => CsiError::Unavailable(why),
            O::Io { context, source } => CsiError::Io { context, source },
        }
    }
}

/// A capability Mortar cannot serve is a bad request, unless the RPC's own error table
/// says otherwise (NodeStage/NodePublish: see `node.rs`).
impl From<crate::caps::CapError> for CsiError {
    fn from(e: crate::caps::CapError) -> Self {
        CsiError::InvalidArgument(e.to_string())
    }
}

pub type Result<T, E = CsiError> = std::result::Result<T, E>;
