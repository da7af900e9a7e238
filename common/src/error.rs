//! The domain errors every service returns, and the one table that maps them to gRPC status
//! codes. Messages are lowercase and name the offending field or value.

/// An error a shardgate service returns to its caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` names the request field at fault.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The named object does not exist.
    #[error("{what} '{id}' not found")]
    NotFound { what: &'static str, id: String },
    /// The request is well formed but no longer applies, e.g. a report from an expired attempt.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request was too large.
    #[error("{0}")]
    ResourceExhausted(String),
    /// No credential, or one the coordinator does not know.
    #[error("{0}")]
    Unauthenticated(String),
    /// A known credential whose role or identity may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The coordinator is shutting down or its scheduler stopped.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a storage failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub fn not_found(what: &'static str, id: impl ToString) -> Self {
        Self::NotFound {
            what,
            id: id.to_string(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            Error::NotFound { .. } => tonic::Status::not_found(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::ResourceExhausted(_) => tonic::Status::resource_exhausted(msg),
            Error::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            Error::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            Error::Unavailable(_) => tonic::Status::unavailable(msg),
            Error::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_status_codes() {
        let s: tonic::Status = Error::invalid("tests", "the run has no tests").into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "invalid tests: the run has no tests");
        let s: tonic::Status = Error::not_found("run", "abc").into();
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(s.message(), "run 'abc' not found");
    }
}
