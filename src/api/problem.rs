//! The one boundary where errors become HTTP: every failure leaves as RFC 9457
//! `application/problem+json` with a stable `type`.

use super::types::{FieldProblem, Problem};
use crate::{
    auth::AuthError,
    jobs::{JobError, policy::Rule},
};
use poem::{
    IntoResponse, Response,
    error::{MethodNotAllowedError, NotFoundError},
    http::StatusCode,
};
use poem_openapi::{
    ApiResponse,
    error::{ContentTypeError, ParseParamError, ParseRequestPayloadError},
    payload::Json,
};

/// Media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";
const TYPE_BASE: &str = "https://oats.dev/problems/";

/// The kinds of problem, each with its status, stable type and title.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    InvalidBody,
    InvalidParameter,
    InvalidPageToken,
    Unauthenticated,
    Forbidden,
    ValidationFailed,
    NotFound,
    MethodNotAllowed,
    IdempotencyKeyReused,
    JobFinished,
    RequestTimeout,
    PayloadTooLarge,
    UnsupportedMediaType,
    QuotaExhausted,
    BackendUnavailable,
    Internal,
}

impl ProblemKind {
    fn parts(self) -> (StatusCode, &'static str, &'static str) {
        use StatusCode as S;
        match self {
            Self::InvalidBody => {
                (S::BAD_REQUEST, "invalid-body", "The request body is not valid JSON of the expected shape")
            }
            Self::InvalidParameter => {
                (S::BAD_REQUEST, "invalid-parameter", "A path, query or header parameter is invalid")
            }
            Self::InvalidPageToken => (S::BAD_REQUEST, "invalid-page-token", "The page token is not valid"),
            Self::Unauthenticated => (S::UNAUTHORIZED, "unauthenticated", "Valid credentials are required"),
            Self::Forbidden => (S::FORBIDDEN, "forbidden", "The caller's role does not allow this"),
            Self::ValidationFailed => (S::UNPROCESSABLE_ENTITY, "validation-failed", "The request breaks a rule"),
            Self::NotFound => (S::NOT_FOUND, "not-found", "Not found"),
            Self::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, "method-not-allowed", "Method not allowed"),
            Self::IdempotencyKeyReused => {
                (S::CONFLICT, "idempotency-key-reused", "The idempotency key was used for a different request")
            }
            Self::JobFinished => (S::CONFLICT, "job-finished", "The job has already finished"),
            Self::RequestTimeout => (S::REQUEST_TIMEOUT, "request-timeout", "The request was not sent in time"),
            Self::PayloadTooLarge => (S::PAYLOAD_TOO_LARGE, "payload-too-large", "The request body is too large"),
            Self::UnsupportedMediaType => {
                (S::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "The request body must be application/json")
            }
            Self::QuotaExhausted => {
                (S::TOO_MANY_REQUESTS, "quota-exhausted", "The cluster's quota for jobs is exhausted; retry later")
            }
            Self::BackendUnavailable => {
                (S::SERVICE_UNAVAILABLE, "backend-unavailable", "The job backend is unavailable; retry later")
            }
            Self::Internal => (S::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        }
    }

    pub fn status(self) -> StatusCode {
        self.parts().0
    }

    pub fn type_uri(self) -> String {
        format!("{TYPE_BASE}{}", self.parts().1)
    }

    pub fn problem(self, detail: impl Into<String>) -> Problem {
        let (status, _, title) = self.parts();
        Problem {
            problem_type: self.type_uri(),
            title: title.into(),
            status: status.as_u16(),
            detail: detail.into(),
            instance: None,
            errors: None,
        }
    }
}

/// Error answers of the job operations.
#[derive(ApiResponse, Debug)]
pub enum ProblemResponse {
    /// Malformed body, parameter or page token.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Problem>),
    /// Missing or invalid credentials.
    #[oai(status = 401, content_type = "application/problem+json")]
    Unauthorized(Json<Problem>, #[oai(header = "WWW-Authenticate")] String),
    /// The caller's role may not do this, or a policy rule forbids it for the tenant
    /// (`type` names the rule, e.g. `…/policy/allowed-models`).
    #[oai(status = 403, content_type = "application/problem+json")]
    Forbidden(Json<Problem>),
    /// No such job (or it belongs to another tenant).
    #[oai(status = 404, content_type = "application/problem+json")]
    NotFound(Json<Problem>),
    /// The idempotency key was reused with another body, or the job already finished.
    #[oai(status = 409, content_type = "application/problem+json")]
    Conflict(Json<Problem>),
    /// The body is larger than the configured limit.
    #[oai(status = 413, content_type = "application/problem+json")]
    PayloadTooLarge(Json<Problem>),
    /// The body is not `application/json`.
    #[oai(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(Json<Problem>),
    /// The request is well-formed but breaks a rule: a field (each is listed in `errors`) or a
    /// policy limit (`type` names the rule, e.g. `…/policy/max-turns`), or the Kubernetes API
    /// server refuses the Job (`…/policy/kubernetes-admission`, with its message).
    #[oai(status = 422, content_type = "application/problem+json")]
    Unprocessable(Json<Problem>),
    /// A rate or concurrency limit of the tenant's policy, or the cluster's quota for jobs
    /// (`quota-exhausted`); retry after the given seconds.
    #[oai(status = 429, content_type = "application/problem+json")]
    TooManyRequests(Json<Problem>, #[oai(header = "Retry-After")] u64),
    /// An unexpected failure; nothing about it is the caller's fault.
    #[oai(status = 500, content_type = "application/problem+json")]
    Internal(Json<Problem>),
    /// The backend (e.g. the Kubernetes API) is unreachable or not ready; retry after the given
    /// number of seconds. Nothing was created.
    #[oai(status = 503, content_type = "application/problem+json")]
    Unavailable(Json<Problem>, #[oai(header = "Retry-After")] u64),
}

impl ProblemResponse {
    pub fn from_problem(problem: Problem, retry_after: u64) -> Self {
        let body = Json(problem);
        match body.0.status {
            400 => Self::BadRequest(body),
            401 => Self::Unauthorized(body, r#"Bearer realm="oats""#.into()),
            403 => Self::Forbidden(body),
            429 => Self::TooManyRequests(body, retry_after.max(1)),
            404 => Self::NotFound(body),
            409 => Self::Conflict(body),
            413 => Self::PayloadTooLarge(body),
            415 => Self::UnsupportedMediaType(body),
            422 => Self::Unprocessable(body),
            503 => Self::Unavailable(body, retry_after),
            _ => Self::Internal(body),
        }
    }
}

impl From<JobError> for ProblemResponse {
    fn from(error: JobError) -> Self {
        let mut retry_after = 0;
        let problem = match error {
            JobError::Invalid(errors) => {
                let detail = JobError::Invalid(errors.clone()).to_string();
                let mut problem = ProblemKind::ValidationFailed.problem(detail);
                problem.errors =
                    Some(errors.into_iter().map(|e| FieldProblem { field: e.field, message: e.message }).collect());
                problem
            }
            JobError::NotFound(_) => ProblemKind::NotFound.problem(error.to_string()),
            JobError::Forbidden(_) => ProblemKind::Forbidden.problem(error.to_string()),
            JobError::PolicyDenied { rule, ref detail, retry_after: after } => {
                retry_after = after.map_or(0, |a| a.as_secs().max(1));
                policy_problem(rule, detail)
            }
            JobError::IdempotencyConflict(_) => ProblemKind::IdempotencyKeyReused.problem(error.to_string()),
            JobError::AlreadyFinished { .. } => ProblemKind::JobFinished.problem(error.to_string()),
            JobError::InvalidPageToken(_) => ProblemKind::InvalidPageToken.problem(error.to_string()),
            JobError::QuotaExhausted { ref detail, retry_after: after } => {
                retry_after = after.as_secs().max(1);
                ProblemKind::QuotaExhausted.problem(detail.clone())
            }
            JobError::Unavailable { ref detail, retry_after: after } => {
                retry_after = after.as_secs().max(1);
                ProblemKind::BackendUnavailable.problem(detail.clone())
            }
            JobError::Internal(message) => {
                tracing::error!(error = %message, "internal error");
                ProblemKind::Internal.problem("an unexpected error occurred; it has been logged")
            }
        };
        Self::from_problem(problem, retry_after)
    }
}

/// A denial by a policy rule: its own `type`, the rule's status.
fn policy_problem(rule: Rule, detail: &str) -> Problem {
    Problem {
        problem_type: format!("{TYPE_BASE}policy/{}", rule.name()),
        title: format!("Denied by the policy rule {}", rule.name()),
        status: rule.status(),
        detail: detail.to_owned(),
        instance: None,
        errors: None,
    }
}

impl From<AuthError> for ProblemResponse {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Unavailable => Self::from_problem(ProblemKind::BackendUnavailable.problem(error.to_string()), 5),
            AuthError::UnusableTenant(_) => Self::from_problem(ProblemKind::Forbidden.problem(error.to_string()), 0),
            AuthError::Missing | AuthError::Invalid => {
                Self::from_problem(ProblemKind::Unauthenticated.problem(error.to_string()), 0)
            }
        }
    }
}

/// Turn any error poem or poem-openapi raised before (or instead of) a handler into a problem.
pub fn from_poem_error(error: poem::Error) -> Response {
    if error.is_from_response() {
        return error.into_response(); // already a problem from an operation
    }
    let kind = if error.is::<ParseRequestPayloadError>() {
        ProblemKind::InvalidBody
    } else if error.is::<ParseParamError>() {
        ProblemKind::InvalidParameter
    } else if error.is::<ContentTypeError>() {
        ProblemKind::UnsupportedMediaType
    } else if error.is::<NotFoundError>() {
        ProblemKind::NotFound
    } else if error.is::<MethodNotAllowedError>() {
        ProblemKind::MethodNotAllowed
    } else {
        match error.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ProblemKind::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ProblemKind::UnsupportedMediaType,
            StatusCode::NOT_FOUND => ProblemKind::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => ProblemKind::MethodNotAllowed,
            status if status.is_client_error() => ProblemKind::InvalidParameter,
            _ => ProblemKind::Internal,
        }
    };
    let detail = match kind {
        ProblemKind::NotFound => "no such resource; the API lives under /api/v1 (see /docs)".to_owned(),
        ProblemKind::Internal => {
            tracing::error!(%error, "unhandled error");
            "an unexpected error occurred; it has been logged".to_owned()
        }
        _ => error.to_string(),
    };
    problem_response(kind.problem(detail))
}

/// A problem as a bare response (for middleware outside the OpenAPI operations).
pub fn problem_response(problem: Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::json!({
        "type": problem.problem_type,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    });
    Response::builder().status(status).content_type(PROBLEM_JSON).body(body.to_string()).into_response()
}
