//! HTTP: the versioned REST API, its OpenAPI document and Swagger UI.
//!
//! Handlers speak only the domain's language ([`crate::jobs`]); nothing Kubernetes is visible here.

mod handlers;
mod json;
pub mod problem;
pub mod redact;
mod request_telemetry;
mod sse;
mod timestamp;
pub mod types;

use crate::{
    auth::Authenticator,
    jobs::JobService,
    telemetry::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE},
};
use futures::future::BoxFuture;
use handlers::{HealthApi, JobsApi};
use poem::{
    Body, Endpoint, IntoResponse, Request, Response, Route,
    endpoint::{BoxEndpoint, DynEndpoint},
    error::MethodNotAllowedError,
    http::{Method, header},
};
use poem_openapi::{__private::UrlQuery, OpenApi, OpenApiService};
use problem::{ProblemKind, problem_response};
use request_telemetry::RequestTelemetry;
pub use sse::Heartbeat;
use std::{collections::HashMap, sync::Arc, time::Duration};

/// What every handler can reach.
pub struct ApiState {
    pub jobs: Arc<JobService>,
    pub auth: Authenticator,
    /// The process's metrics: the HTTP server's are recorded here, all are served at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the server starts shutting down: readiness turns 503 and streams end.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The one timer of every watch stream's heartbeat comments.
    pub heartbeat: Heartbeat,
}

/// How often a watch stream sends a comment line, so proxies keep idle streams open.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// The OpenAPI service; the spec is a function of the code alone, not of configuration.
pub fn openapi() -> OpenApiService<(JobsApi, HealthApi), ()> {
    OpenApiService::new(api_operations(), "OATS", env!("CARGO_PKG_VERSION"))
        .description(
            "Run LLM agents as jobs. Submit a goal, follow the agent's status and logs, read its result. \
             Every error is an RFC 9457 `application/problem+json` document with a stable `type`.",
        )
        .license(poem_openapi::LicenseObject::new("Apache-2.0"))
}

/// The operations of the API, documented by [`openapi`] and routed by [`build_app`].
fn api_operations() -> (JobsApi, HealthApi) {
    (JobsApi, HealthApi)
}

/// Limits on how clients send requests.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_body_bytes: usize,
    /// Longest a client may take to send its body (slow clients hold a connection otherwise).
    pub read_timeout: Duration,
}

/// Request schemas that reject unknown fields (`deny_unknown_fields`), which poem-openapi does not
/// state in the document.
const CLOSED_SCHEMAS: [&str; 2] = ["CreateJobRequest", "RequestedBudget"];

/// The OpenAPI document as served and committed: poem-openapi's, adjusted so that client
/// generators read it without loss: request bodies say what the server enforces
/// (`additionalProperties: false` where unknown fields are refused, `nullable: true` on optional
/// fields, which the server treats as absent), references to enums and objects are plain `$ref`s,
/// and streamed text (logs, Server-Sent Events) is a string rather than poem-openapi's binary or
/// array conventions.
pub fn spec() -> serde_json::Value {
    let mut spec: serde_json::Value = serde_json::from_str(&openapi().spec()).expect("the generated spec is JSON");
    for item in spec["paths"].as_object_mut().into_iter().flat_map(|paths| paths.values_mut()) {
        for operation in item.as_object_mut().into_iter().flat_map(|ops| ops.values_mut()) {
            let responses = operation.get_mut("responses").and_then(|r| r.as_object_mut());
            for response in responses.into_iter().flat_map(|r| r.values_mut()) {
                let schema = response
                    .get_mut("content")
                    .and_then(|c| c.get_mut("text/event-stream"))
                    .and_then(|c| c.get_mut("schema"));
                if let Some(schema) = schema.filter(|s| s.get("format").is_some_and(|f| f == "event-stream")) {
                    let payload = schema["items"]["$ref"]
                        .as_str()
                        .unwrap_or_default()
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    *schema = serde_json::json!({
                        "type": "string",
                        "description": format!("Server-Sent Events; each event's `data` is a `{payload}` object as JSON."),
                    });
                }
                let text =
                    response.get_mut("content").and_then(|c| c.as_object_mut()).into_iter().flat_map(|c| c.iter_mut());
                for (media_type, content) in text {
                    if media_type.starts_with("text/plain") && content["schema"]["format"] == "binary" {
                        content["schema"] = serde_json::json!({"type": "string"});
                    }
                }
            }
        }
    }
    // A documented field of an enum or object type comes out as `allOf: [{$ref}, {description}]`,
    // which generators read as a new anonymous type; the referenced schema carries the text.
    for schema in spec["components"]["schemas"].as_object_mut().into_iter().flat_map(|s| s.values_mut()) {
        for property in
            schema.get_mut("properties").and_then(|p| p.as_object_mut()).into_iter().flat_map(|p| p.values_mut())
        {
            let reference =
                property["allOf"].as_array().and_then(|all| all.iter().find_map(|s| s.get("$ref").cloned()));
            if let Some(reference) = reference {
                *property = serde_json::json!({"$ref": reference});
            }
        }
    }
    for name in CLOSED_SCHEMAS {
        let schema = &mut spec["components"]["schemas"][name];
        schema["additionalProperties"] = serde_json::Value::Bool(false);
        let required: Vec<String> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default();
        if let Some(properties) = schema["properties"].as_object_mut() {
            for (_, property) in properties.iter_mut().filter(|(field, _)| !required.contains(field)) {
                property["nullable"] = serde_json::Value::Bool(true);
            }
        }
    }
    spec
}

/// [`spec`] as pretty JSON.
pub fn spec_json() -> String {
    serde_json::to_string_pretty(&spec()).expect("a JSON value serialises")
}

/// [`spec`] as YAML.
pub fn spec_yaml() -> String {
    serde_saphyr::to_string(&spec()).expect("a JSON value serialises as YAML")
}

/// The whole HTTP application, ready to serve or to drive from tests without a socket.
pub fn build_app(state: Arc<ApiState>, limits: RequestLimits) -> impl Endpoint<Output = Response> {
    let templates = request_telemetry::Routes::from_spec(&spec());
    let docs = openapi().swagger_ui();
    let document = spec_json();
    let spec = poem::endpoint::make_sync(move |_| {
        Response::builder().content_type("application/json; charset=utf-8").body(document.clone())
    });
    let metrics = state.metrics.clone();
    // The operations sit in the one route table, not behind `nest("/", api)`: the service's own
    // endpoint would add a boxed layer, a second routing and a rewritten URI to every request.
    // Its one other task, the parsed query string its `Query` parameters read, is the pipeline's.
    let mut operations = HashMap::new();
    api_operations().add_routes(&mut operations);
    let api = operations
        .into_iter()
        .fold(Route::new(), |route, (path, methods)| route.at(path, PathOperations(methods.into_iter().collect())));
    let routes = api
        .nest("/docs", docs)
        .at("/openapi.json", poem::get(spec))
        .at("/metrics", poem::get(metrics_endpoint(metrics)));
    Pipeline { routes, state, limits, templates }
}

/// The operations of one path, by method: the route table's endpoint for the path. It stands in
/// for poem's `RouteMethod`, which wraps every operation in one more boxed endpoint, a second
/// heap future per request; here the operation's own (boxed) future is the answer.
struct PathOperations(Vec<(Method, BoxEndpoint<'static>)>);

impl PathOperations {
    fn operation(&self, method: &Method) -> Option<&BoxEndpoint<'static>> {
        self.0.iter().find(|(m, _)| m == method).map(|(_, operation)| operation)
    }

    /// As `RouteMethod` answers: the method's operation; for HEAD without one, GET's without its
    /// body; else 405 (the pipeline adds `Allow`).
    fn answer(&self, mut request: Request) -> BoxFuture<'_, poem::Result<Response>> {
        if let Some(operation) = self.operation(request.method()) {
            return DynEndpoint::call(&**operation, request);
        }
        match self.operation(&Method::GET).filter(|_| request.method() == Method::HEAD) {
            Some(get) => Box::pin(async move {
                request.set_method(Method::GET);
                let mut response = DynEndpoint::call(&**get, request).await?;
                response.set_body(());
                Ok(response)
            }),
            None => Box::pin(std::future::ready(Err(MethodNotAllowedError.into()))),
        }
    }
}

impl Endpoint for PathOperations {
    type Output = Response;

    fn call(&self, request: Request) -> impl Future<Output = poem::Result<Response>> + Send {
        self.answer(request)
    }
}

/// What every request goes through around the routes, in one layer: its telemetry, the body
/// limit, the state handlers read, and errors as problem responses. (One layer, not a middleware
/// each: every layer's future holds the request and the inner future, and poem moves the whole
/// nest into the heap per request; that copying was the largest cost of a small GET.)
struct Pipeline {
    routes: Route,
    state: Arc<ApiState>,
    limits: RequestLimits,
    templates: request_telemetry::Routes,
}

impl Endpoint for Pipeline {
    type Output = Response;

    /// One async fn, no nested futures around the routes' (each level would hold one more copy of
    /// the request, and the whole is moved into the heap per request).
    async fn call(&self, mut request: Request) -> poem::Result<Response> {
        // A caller's trace is followed only once the caller has authenticated (checked here only
        // for requests that carry one; the handler authenticates again as usual).
        let caller_trace = request.headers().contains_key(TRACEPARENT)
            && Box::pin(self.state.auth.authenticate(bearer_token(&request))).await.is_ok();
        let telemetry = RequestTelemetry::start(&request, &self.state.metrics, &self.templates, caller_trace);
        request.extensions_mut().insert(self.state.clone());
        // The parsed query string poem-openapi's `Query` parameters read (a hidden type of
        // poem-openapi, which its own service endpoint would insert).
        let query = UrlQuery(request.params().unwrap_or_default());
        request.extensions_mut().insert(query);
        if matches!(*request.method(), Method::POST | Method::PUT | Method::PATCH) {
            request = match telemetry.in_span(Box::pin(read_body(request, self.limits))).await {
                Ok(request) => request,
                Err(refusal) => return Ok(telemetry.finish(refusal)),
            };
        }
        // Not boxed: the server boxes this whole future once per request; boxing the routes'
        // future too would be a second large allocation.
        let response = match telemetry.in_span(self.routes.call(request)).await {
            Ok(output) => output.into_response(),
            Err(error) => problem::from_poem_error(error),
        };
        Ok(telemetry.finish(response))
    }
}

/// W3C Trace Context's header, looked up in every request (a name made once: looking one up by
/// `&str` parses it each time).
const TRACEPARENT: header::HeaderName = header::HeaderName::from_static("traceparent");

/// The token of an `Authorization: Bearer <token>` header.
fn bearer_token(request: &Request) -> Option<&str> {
    let value = request.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// Only `/metrics`, for a separate metrics port.
pub fn metrics_app(metrics: Arc<Metrics>) -> impl Endpoint<Output = Response> {
    Route::new().at("/metrics", poem::get(metrics_endpoint(metrics)))
}

/// Prometheus scrape: OpenMetrics (with exemplars) when asked for, else the 0.0.4 text format.
fn metrics_endpoint(metrics: Arc<Metrics>) -> impl Endpoint<Output = Response> {
    poem::endpoint::make_sync(move |request: Request| {
        let accept = request.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let openmetrics = accept.contains("application/openmetrics-text");
        let content_type = if openmetrics { OPENMETRICS_CONTENT_TYPE } else { PROMETHEUS_CONTENT_TYPE };
        Response::builder().content_type(content_type).body(metrics.encode(openmetrics))
    })
}

/// Bytes of an oversize body read and discarded before answering 413, so a client still sending
/// can read the answer instead of seeing the connection reset.
const DRAIN_LIMIT: usize = 1 << 20;

/// Read a request's body up to `max` bytes, or refuse it: 413 when larger (whether or not the
/// client sent a Content-Length), 408 when it does not arrive in time.
async fn read_body(mut request: Request, limits: RequestLimits) -> Result<Request, Response> {
    let max = limits.max_body_bytes;
    let too_large =
        || problem_response(ProblemKind::PayloadTooLarge.problem(format!("the body is larger than {max} bytes")));
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > DRAIN_LIMIT) {
        return Err(too_large());
    }
    let mut chunks = std::pin::pin!(request.take_body().into_bytes_stream());
    let (mut body, mut seen) = (Vec::new(), 0usize);
    let deadline = tokio::time::Instant::now() + limits.read_timeout;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut chunks)).await {
            Err(_) => {
                let seconds = limits.read_timeout.as_secs();
                let detail = format!("the body did not arrive within {seconds}s");
                return Err(problem_response(ProblemKind::RequestTimeout.problem(detail)));
            }
            Ok(None) => break,
            Ok(Some(Ok(chunk))) => chunk,
            Ok(Some(Err(error))) => {
                let problem = ProblemKind::InvalidBody.problem(format!("cannot read the body: {error}"));
                return Err(problem_response(problem));
            }
        };
        seen += chunk.len();
        if seen <= max {
            body.extend_from_slice(&chunk);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > max {
        return Err(too_large());
    }
    request.set_body(Body::from(body));
    Ok(request)
}
