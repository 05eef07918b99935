use std::time::Duration;

/// One rule a request broke, named by the JSON field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Why a job operation did not succeed. The API maps each variant to one problem type.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request breaks one or more rules; nothing was created.
    #[error("the request is invalid: {}", summarize(.0))]
    Invalid(Vec<FieldError>),
    /// No job with this id is visible to the caller.
    #[error("job {0} not found")]
    NotFound(String),
    /// The idempotency key was used before with a different request body.
    #[error("idempotency key was already used for job {0} with a different request")]
    IdempotencyConflict(String),
    /// The caller's role does not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// A policy rule denies the submission.
    #[error("denied by policy rule {}: {detail}", rule.name())]
    PolicyDenied { rule: crate::jobs::policy::Rule, detail: String, retry_after: Option<Duration> },
    /// The job finished before it could be cancelled.
    #[error("job {id} already finished as {phase}")]
    AlreadyFinished { id: String, phase: &'static str },
    /// The page token is not one this server issued for this query.
    #[error("invalid page token: {0}")]
    InvalidPageToken(String),
    /// The namespace's ResourceQuota has no room for the job; retry later.
    #[error("{detail}")]
    QuotaExhausted { detail: String, retry_after: Duration },
    /// The backend cannot serve right now (e.g. the Kubernetes API is unreachable); retry later.
    #[error("{detail}")]
    Unavailable { detail: String, retry_after: Duration },
    /// Something failed that the caller cannot fix.
    #[error("internal error: {0}")]
    Internal(String),
}

fn summarize(errors: &[FieldError]) -> String {
    errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ")
}
