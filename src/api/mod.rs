//! HTTP: the versioned REST API, its OpenAPI document and Swagger UI.
//!
//! Handlers speak only the domain's language ([`crate::jobs`]); nothing Kubernetes is visible here.

mod handlers;
pub mod problem;
pub mod types;

use crate::jobs::JobService;
use handlers::{HealthApi, JobsApi};
use poem::{Body, Endpoint, EndpointExt, IntoResponse, Request, Response, Route, http::Method, middleware::AddData};
use poem_openapi::OpenApiService;
use problem::{ProblemKind, problem_response};
use std::sync::Arc;

/// What every handler can reach.
pub struct ApiState {
    pub jobs: Arc<JobService>,
    /// Owner of the jobs submitted through this server (until authentication assigns tenants).
    pub tenant: String,
}

/// The OpenAPI service; the spec is a function of the code alone, not of configuration.
pub fn openapi() -> OpenApiService<(JobsApi, HealthApi), ()> {
    OpenApiService::new((JobsApi, HealthApi), "OATS", env!("CARGO_PKG_VERSION"))
        .description(
            "Run LLM agents as jobs. Submit a goal, follow the agent's status and logs, read its result. \
             Every error is an RFC 9457 `application/problem+json` document with a stable `type`.",
        )
        .license(poem_openapi::LicenseObject::new("Apache-2.0"))
}

/// The whole HTTP application, ready to serve or to drive from tests without a socket.
pub fn build_app(state: Arc<ApiState>, max_body_bytes: usize) -> impl Endpoint<Output = Response> {
    let api = openapi();
    let docs = api.swagger_ui();
    let spec = api.spec_endpoint();
    Route::new()
        .nest("/", api)
        .nest("/docs", docs)
        .at("/openapi.json", spec)
        .catch_all_error(|error| async move { problem::from_poem_error(error) })
        .with(AddData::new(state))
        .around(move |endpoint, request| limit_body(endpoint, request, max_body_bytes))
}

/// Read request bodies up to `max` bytes and refuse larger ones with 413, whether or not the
/// client sent a Content-Length.
async fn limit_body<E: Endpoint>(endpoint: Arc<E>, mut request: Request, max: usize) -> poem::Result<Response> {
    let too_large =
        || problem_response(ProblemKind::PayloadTooLarge.problem(format!("the body is larger than {max} bytes")));
    if matches!(*request.method(), Method::POST | Method::PUT | Method::PATCH) {
        let declared = request
            .headers()
            .get(poem::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|len| len > max) {
            return Ok(too_large());
        }
        let body = request.take_body();
        match body.into_bytes_limit(max).await {
            Ok(bytes) => request.set_body(Body::from(bytes)),
            Err(poem::error::ReadBodyError::PayloadTooLarge) => return Ok(too_large()),
            Err(error) => {
                return Ok(problem_response(
                    ProblemKind::InvalidBody.problem(format!("cannot read the body: {error}")),
                ));
            }
        }
    }
    Ok(endpoint.call(request).await.map(IntoResponse::into_response).unwrap_or_else(problem::from_poem_error))
}
