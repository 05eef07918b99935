//! Per-request telemetry: a server span named `{method} {route}` that continues an incoming W3C
//! `traceparent`, and the HTTP duration histogram (with the trace id as exemplar) and in-flight
//! gauge. Routes are templates (`/api/v1/jobs/{id}`), never raw paths.

use crate::telemetry::metrics::{HttpLabels, MethodLabel, Metrics, TraceLabel};
use opentelemetry::{global, trace::TraceContextExt};
use opentelemetry_http::HeaderExtractor;
use poem::{Endpoint, IntoResponse, Request, Response, http::Method};
use poem_openapi::OperationId;
use std::{collections::HashMap, sync::Arc, time::Instant};
use tracing::{Instrument, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Operation ids and fixed paths mapped to their route templates.
pub struct Routes {
    by_operation: HashMap<String, &'static str>,
    fixed: HashMap<&'static str, &'static str>,
}

impl Routes {
    /// Build the table from the OpenAPI document, once at start.
    pub fn from_spec(spec: &str) -> Self {
        let spec: serde_json::Value = serde_json::from_str(spec).expect("the generated spec is JSON");
        let mut by_operation = HashMap::new();
        for (path, item) in spec["paths"].as_object().into_iter().flatten() {
            let template: &'static str = Box::leak(path.clone().into_boxed_str());
            for operation in item.as_object().into_iter().flatten().map(|(_, op)| op) {
                if let Some(id) = operation["operationId"].as_str() {
                    by_operation.insert(id.to_owned(), template);
                }
            }
        }
        let fixed = ["/metrics", "/openapi.json", "/docs"].into_iter().map(|p| (p, p)).collect();
        Self { by_operation, fixed }
    }

    fn route(&self, response: &Response, path: &str) -> &'static str {
        if let Some(id) = response.data::<OperationId>() {
            if let Some(template) = self.by_operation.get(id.0) {
                return template;
            }
        }
        let path = path.trim_end_matches('/');
        if path.starts_with("/docs") {
            return "/docs";
        }
        self.fixed.get(path).copied().unwrap_or("unmatched")
    }
}

/// The semantic-convention value of a method: known methods as they are, anything else `_OTHER`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// Run one request inside its server span and record its metrics.
pub async fn observe<E: Endpoint>(
    endpoint: Arc<E>,
    request: Request,
    metrics: Arc<Metrics>,
    routes: Arc<Routes>,
) -> poem::Result<Response> {
    let method = method_label(request.method());
    let path = request.uri().path().to_owned();
    let parent = global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
    let span = tracing::info_span!(
        "HTTP request",
        otel.name = method,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method,
        http.route = Empty,
        http.response.status_code = Empty,
        url.path = %path,
        url.scheme = "http",
        trace_id = Empty,
        span_id = Empty,
    );
    let _ = span.set_parent(parent);
    let context = span.context();
    let span_context = context.span().span_context().clone();
    let trace_id = span_context.is_valid().then(|| span_context.trace_id().to_string());
    if let Some(trace_id) = &trace_id {
        span.record("trace_id", trace_id.as_str());
        span.record("span_id", span_context.span_id().to_string().as_str());
    }

    let active = metrics.http_active.get_or_create(&MethodLabel { http_request_method: method }).clone();
    active.inc();
    let started = Instant::now();
    let response = endpoint.call(request).instrument(span.clone()).await.map(IntoResponse::into_response);
    active.dec();
    let response = response.unwrap_or_else(super::problem::from_poem_error);

    let status = response.status().as_u16();
    let route = routes.route(&response, &path);
    span.record("otel.name", format!("{method} {route}"));
    span.record("http.route", route);
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    let labels = HttpLabels { http_request_method: method, http_route: route, http_response_status_code: status };
    let exemplar = trace_id.filter(|_| span_context.is_sampled()).map(|trace_id| TraceLabel { trace_id });
    metrics.http_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64(), exemplar, None);
    Ok(response)
}
