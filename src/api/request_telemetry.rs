//! Per-request telemetry: a server span named `{method} {route}` that continues an incoming W3C
//! `traceparent`, and the HTTP duration histogram (with the trace id as exemplar) and in-flight
//! gauge. Routes are templates (`/api/v1/jobs/{id}`), never raw paths: the raw path is not
//! recorded at all, since it may carry ids.

use crate::{
    jobs::metrics::SubmissionOutcome,
    telemetry::{
        self,
        metrics::{HttpLabels, MethodLabel, Metrics, TraceLabel},
    },
};
use opentelemetry::{
    global,
    trace::{TraceContextExt, TraceId},
};
use opentelemetry_http::HeaderExtractor;
use poem::{Request, Response, http::Method};
use prometheus_client::metrics::{exemplar::HistogramWithExemplars, gauge::Gauge};
use std::{
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll, ready},
    time::Instant,
};
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The route templates of the API (`/api/v1/jobs/{id}`), to name requests without raw paths.
pub struct Routes {
    /// Each template with its segments (`None` marks a `{parameter}`) and its methods.
    templates: Vec<(&'static str, Vec<Option<String>>, String)>,
    /// The places in `templates` of the templates of each length (in segments), in their order.
    by_length: [Vec<usize>; MAX_SEGMENTS + 1],
    /// `{method} {route}` of every route (by its place: the templates', then `/docs` and
    /// `unmatched`) and method (by its place in [`METHODS`]): span names, built once rather than
    /// per request, and found without hashing.
    span_names: Vec<[&'static str; METHODS.len()]>,
    /// The in-flight gauge of each method (by its place in [`METHODS`]), looked up in the metrics'
    /// family on a method's first request only: the family hashes the labels and locks per lookup.
    /// (One app serves one registry, so the gauges are those of the metrics `instrument` is given.)
    active: [OnceLock<Gauge>; METHODS.len()],
    /// The duration histogram of each route, method and status of [`CACHED_STATUSES`] (at
    /// [`Routes::duration_place`]), looked up in the family on its first request only, as the
    /// gauges are.
    durations: Box<[OnceLock<HistogramWithExemplars<TraceLabel>>]>,
}

impl Routes {
    /// Build the table from the OpenAPI document, once at start.
    pub fn from_spec(spec: &serde_json::Value) -> Self {
        let documented = spec["paths"].as_object().into_iter().flatten().map(|(path, item)| {
            let methods: Vec<String> =
                item.as_object().into_iter().flatten().map(|(method, _)| method.to_ascii_uppercase()).collect();
            (path.clone(), methods.join(", "))
        });
        let fixed = ["/metrics", "/openapi.json", "/docs"].map(|p| (p.to_owned(), "GET".to_owned()));
        let templates = documented
            .chain(fixed)
            .map(|(path, methods)| {
                let segments: Vec<Option<String>> = path
                    .trim_matches('/')
                    .split('/')
                    .map(|s| (!(s.starts_with('{') && s.ends_with('}'))).then(|| s.to_owned()))
                    .collect();
                (&*Box::leak(path.into_boxed_str()), segments, methods)
            })
            .collect::<Vec<_>>();
        assert!(
            templates.iter().all(|(_, segments, _)| (1..=MAX_SEGMENTS).contains(&segments.len())),
            "a route template has at most {MAX_SEGMENTS} segments"
        );
        let routes = templates.iter().map(|(template, _, _)| *template).chain(["/docs", "unmatched"]);
        let span_names = routes.map(|route| METHODS.map(|method| &*format!("{method} {route}").leak())).collect();
        let mut by_length: [Vec<usize>; MAX_SEGMENTS + 1] = Default::default();
        for (place, (_, segments, _)) in templates.iter().enumerate() {
            by_length[segments.len()].push(place);
        }
        let durations =
            (0..(templates.len() + 2) * METHODS.len() * CACHED_STATUSES.len()).map(|_| OnceLock::new()).collect();
        Self { templates, by_length, span_names, active: Default::default(), durations }
    }

    /// The server span's name for a request: `{method} {route}`.
    fn span_name(&self, method_index: usize, route: RoutePlace) -> &'static str {
        self.span_names[route.0][method_index]
    }

    /// The methods a route answers, for the `Allow` header of a 405.
    fn allowed(&self, route: &str) -> Option<&str> {
        self.templates.iter().find(|(template, _, _)| *template == route).map(|(_, _, methods)| methods.as_str())
    }

    /// The template `path` matches, `/docs` for Swagger UI's assets, else `unmatched`; with its
    /// place in the tables.
    fn route(&self, path: &str) -> (RoutePlace, &'static str) {
        // The path is split once, not once per template, by a byte loop: `split` searches each
        // of these short segments with `memchr`, which cost more than the matching (this runs on
        // every request).
        let trimmed = path.trim_matches('/');
        let mut segments = [""; MAX_SEGMENTS];
        let (mut count, mut start) = (0, 0);
        for end in trimmed.bytes().enumerate().filter(|(_, b)| *b == b'/').map(|(i, _)| i).chain([trimmed.len()]) {
            if count == MAX_SEGMENTS {
                count = 0;
                break;
            }
            segments[count] = &trimmed[start..end];
            count += 1;
            start = end + 1;
        }
        let segments = &segments[..count];
        let matched = self.by_length[segments.len()].iter().find(|&&place| {
            let (_, template, _) = &self.templates[place];
            template.iter().zip(segments).all(|(t, s)| !s.is_empty() && t.as_deref().is_none_or(|t| t == *s))
        });
        match matched {
            Some(&place) => (RoutePlace(place), self.templates[place].0),
            None if path.starts_with("/docs/") => (RoutePlace(self.templates.len()), "/docs"),
            None => (RoutePlace(self.templates.len() + 1), "unmatched"),
        }
    }

    /// The place in `durations` of a route, method and status; `None` for a status not cached.
    fn duration_place(&self, route: RoutePlace, method_index: usize, status: u16) -> Option<usize> {
        let status_place = CACHED_STATUSES.iter().position(|&s| s == status)?;
        Some((route.0 * METHODS.len() + method_index) * CACHED_STATUSES.len() + status_place)
    }
}

/// Where a route is in [`Routes`]' tables: a template's place, then `/docs`, then `unmatched`.
#[derive(Clone, Copy)]
struct RoutePlace(usize);

/// The statuses the API answers with, whose duration histograms are kept at hand; any other is
/// looked up in the family per request.
const CACHED_STATUSES: [u16; 16] = [200, 201, 202, 204, 304, 400, 401, 403, 404, 405, 409, 413, 415, 422, 429, 503];

/// Segments of the longest route template; a longer path matches none.
const MAX_SEGMENTS: usize = 8;

/// The method labels [`method_index`] points into.
const METHODS: [&str; 10] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT", "_OTHER"];

/// The place in [`METHODS`] of a method's semantic-convention value: known methods as they are,
/// anything else `_OTHER`.
fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::PATCH => 3,
        Method::DELETE => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        Method::TRACE => 7,
        Method::CONNECT => 8,
        _ => 9,
    }
}

/// One request's telemetry from its arrival to its response: [`start`](Self::start) opens its
/// span and counts it in flight, [`finish`](Self::finish) records the response. (A pair rather
/// than a wrapper around the handling: a wrapping future would hold one more copy of the request.)
pub struct RequestTelemetry<'a> {
    metrics: &'a Metrics,
    routes: &'a Routes,
    method_index: usize,
    route_place: RoutePlace,
    route: &'static str,
    span: Span,
    started: Instant,
}

impl<'a> RequestTelemetry<'a> {
    /// `caller_trace`: the request carries a `traceparent` and its caller authenticated, so the
    /// span continues the caller's trace and is sampled; an anonymous caller's `traceparent` is
    /// ignored (it could otherwise force every request it sends into the trace pipeline, or pick
    /// our trace ids).
    pub fn start(request: &Request, metrics: &'a Metrics, routes: &'a Routes, caller_trace: bool) -> Self {
        let method_index = method_index(request.method());
        let method = METHODS[method_index];
        let (route_place, route) = routes.route(request.uri().path());
        let read_only = matches!(method, "GET" | "HEAD" | "OPTIONS");
        let span = if telemetry::trace_request(caller_trace, read_only) {
            server_span(request, routes.span_name(method_index, route_place), method, route, caller_trace)
        } else {
            Span::none()
        };
        let telemetry = Self { metrics, routes, method_index, route_place, route, span, started: Instant::now() };
        telemetry.active().inc();
        telemetry
    }

    /// Run `future` in the request's span, as `future.instrument(span)` would (entered to poll,
    /// and to drop the future), without the clone of the span and without entering it once more
    /// to drop a future that has finished (each enter of a traced span costs about a thousand
    /// instructions). A future of its own rather than an `async fn`: that would hold `future`
    /// twice (as its argument and pinned), and the whole request's future is copied per request.
    pub fn in_span<F: Future>(&self, future: F) -> InSpan<'_, F> {
        InSpan { span: &self.span, future: Some(future) }
    }

    /// The in-flight gauge of the request's method, looked up in the metrics' family on the
    /// method's first request only.
    fn active(&self) -> &'a Gauge {
        let method = METHODS[self.method_index];
        self.routes.active[self.method_index].get_or_init(|| {
            self.metrics.http.active.get_or_create(&MethodLabel { http_request_method: method }).clone()
        })
    }

    /// Record the response (status on the span, the duration histogram) and add `Allow` to a 405.
    pub fn finish(self, mut response: Response) -> Response {
        let (method, route, span) = (METHODS[self.method_index], self.route, &self.span);
        if response.status() == poem::http::StatusCode::METHOD_NOT_ALLOWED
            && let Some(allowed) = self.routes.allowed(route).and_then(|m| poem::http::HeaderValue::from_str(m).ok())
        {
            response.headers_mut().insert(poem::http::header::ALLOW, allowed);
        }

        let status = response.status().as_u16();
        // The code's text, as the attribute has always been exported: recorded as a number it
        // would be formatted per request by the exporter layer's `Debug` fallback.
        span.record("http.response.status_code", response.status().as_str());
        if status >= 500 {
            span.record("otel.status_code", "ERROR");
        }
        // Submissions refused before reaching the job service (unparsable body or header) are
        // invalid submissions too.
        if method == "POST" && route == "/api/v1/jobs" && matches!(status, 400 | 413 | 415) {
            self.metrics.jobs.submission(SubmissionOutcome::Invalid);
        }
        // The trace id is read last: reading it starts the OpenTelemetry span (unless the handling
        // did, by logging or by a child span), and the attributes recorded before go into its
        // builder rather than through the started span's lock.
        let context = span.context();
        let span_context = context.span();
        let span_context = span_context.span_context();
        let exemplar =
            span_context.is_sampled().then(|| TraceLabel { trace_id: hex_trace_id(span_context.trace_id()) });
        self.observe_duration(status, exemplar);
        response
    }

    /// Record the request's duration under its route, method and `status`.
    fn observe_duration(&self, status: u16, exemplar: Option<TraceLabel>) {
        let seconds = self.started.elapsed().as_secs_f64();
        let family = &self.metrics.http.duration;
        let labels = || HttpLabels {
            http_request_method: METHODS[self.method_index],
            http_route: self.route,
            http_response_status_code: status,
        };
        match self.routes.duration_place(self.route_place, self.method_index, status) {
            Some(place) => self.routes.durations[place]
                .get_or_init(|| family.get_or_create(&labels()).clone())
                .observe(seconds, exemplar, None),
            None => family.get_or_create(&labels()).observe(seconds, exemplar, None),
        }
    }
}

pin_project_lite::pin_project! {
    /// A future run in a request's span ([`RequestTelemetry::in_span`]): a request dropped before
    /// its answer drops the future inside the span too.
    pub struct InSpan<'a, F> {
        span: &'a Span,
        #[pin]
        future: Option<F>,
    }

    impl<F> PinnedDrop for InSpan<'_, F> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if this.future.is_some() {
                let _entered = this.span.enter();
                this.future.set(None);
            }
        }
    }
}

impl<F: Future> Future for InSpan<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let output = ready!(this.future.as_mut().as_pin_mut().expect("polled after it finished").poll(cx));
        this.future.set(None);
        Poll::Ready(output)
    }
}

/// A trace id as its 32 lowercase hex digits (its `Display`, without the formatting machinery,
/// which cost more than the rest of the exemplar).
fn hex_trace_id(trace_id: TraceId) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0; 32];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(trace_id.to_bytes()) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
    std::str::from_utf8(&hex).expect("hex digits are ASCII").to_owned()
}

/// A request leaves the in-flight gauge when it is finished or dropped: a client that goes away
/// mid-request drops its future, and the gauge must not count it for ever.
impl Drop for RequestTelemetry<'_> {
    fn drop(&mut self) {
        self.active().dec();
    }
}

/// The server span `name` (`{method} {route}`), continuing the caller's `traceparent` when it is
/// trusted. It is a root (no span is current when a request arrives): an OpenTelemetry root needs
/// no parent set, which costs a lookup of the span.
fn server_span(
    request: &Request,
    name: &'static str,
    method: &'static str,
    route: &'static str,
    caller_trace: bool,
) -> Span {
    let span = tracing::info_span!(
        parent: None,
        "HTTP request",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method,
        http.route = route,
        http.response.status_code = Empty,
        url.scheme = "http",
    );
    if caller_trace {
        let _ = span.set_parent(global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers()))));
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_dropped_before_its_answer_leaves_the_in_flight_gauge() {
        let (metrics, routes) = (Metrics::new(), Routes::from_spec(&crate::api::spec()));
        let request = Request::builder().uri_str("/api/v1/jobs/job-aaaaaaaaaaaaaaaaaaaa").finish();
        let in_flight = || metrics.http.active.get_or_create(&MethodLabel { http_request_method: "GET" }).get();
        let answered = RequestTelemetry::start(&request, &metrics, &routes, false);
        let dropped = RequestTelemetry::start(&request, &metrics, &routes, false);
        assert_eq!(in_flight(), 2);
        answered.finish(Response::default());
        drop(dropped);
        assert_eq!(in_flight(), 0);
    }

    #[test]
    fn durations_are_recorded_under_their_route_method_and_status_whether_kept_at_hand_or_not() {
        let (metrics, routes) = (Metrics::new(), Routes::from_spec(&crate::api::spec()));
        let answer = |method: Method, path: &str, status: u16| {
            let request = Request::builder().method(method).uri_str(path).finish();
            let response = Response::builder().status(poem::http::StatusCode::from_u16(status).unwrap()).finish();
            RequestTelemetry::start(&request, &metrics, &routes, false).finish(response);
        };
        // 418 is not among the statuses kept at hand.
        for (method, path, status) in [
            (Method::GET, "/api/v1/jobs/job-a", 200),
            (Method::GET, "/api/v1/jobs/job-b", 200),
            (Method::GET, "/api/v1/jobs/job-c", 404),
            (Method::DELETE, "/api/v1/jobs/job-a", 200),
            (Method::GET, "/api/v1/jobs", 200),
            (Method::GET, "/api/v1/jobs/job-d", 418),
            (Method::GET, "/api/v1/jobs/job-e", 418),
            (Method::GET, "/nowhere", 404),
        ] {
            answer(method, path, status);
        }
        let text = metrics.encode(false);
        let count = |method: &str, route: &str, status: u16| {
            let series = format!(
                "http_server_request_duration_seconds_count{{http_request_method=\"{method}\",http_route=\"{route}\",http_response_status_code=\"{status}\"}} "
            );
            text.lines().find_map(|line| line.strip_prefix(&series)).map(str::to_owned)
        };
        assert_eq!(count("GET", "/api/v1/jobs/{id}", 200).as_deref(), Some("2"), "{text}");
        assert_eq!(count("GET", "/api/v1/jobs/{id}", 404).as_deref(), Some("1"));
        assert_eq!(count("DELETE", "/api/v1/jobs/{id}", 200).as_deref(), Some("1"));
        assert_eq!(count("GET", "/api/v1/jobs", 200).as_deref(), Some("1"));
        assert_eq!(count("GET", "/api/v1/jobs/{id}", 418).as_deref(), Some("2"));
        assert_eq!(count("GET", "unmatched", 404).as_deref(), Some("1"));
    }

    #[test]
    fn trace_ids_are_written_as_their_display_is() {
        for hex in
            ["0af7651916cd43dd8448eb211c80319c", "00000000000000000000000000000001", "ffffffffffffffffffffffffffffffff"]
        {
            let trace_id = TraceId::from_hex(hex).unwrap();
            assert_eq!(hex_trace_id(trace_id), trace_id.to_string());
        }
    }

    /// Where the future runs: the current span's name when polled and when dropped.
    struct Probe<'a>(&'a std::sync::Mutex<Vec<(&'static str, Option<&'static str>)>>, bool);

    impl Future for Probe<'_> {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
            self.0.lock().unwrap().push(("poll", Span::current().metadata().map(|m| m.name())));
            if self.1 {
                return Poll::Ready(());
            }
            self.1 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    impl Drop for Probe<'_> {
        fn drop(&mut self) {
            self.0.lock().unwrap().push(("drop", Span::current().metadata().map(|m| m.name())));
        }
    }

    #[tokio::test]
    async fn handling_runs_and_is_dropped_in_the_requests_span_whether_it_finishes_or_not() {
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
        let (metrics, routes) = (Metrics::new(), Routes::from_spec(&crate::api::spec()));
        let request = Request::builder().uri_str("/api/v1/jobs/job-aaaaaaaaaaaaaaaaaaaa").finish();
        let seen = std::sync::Mutex::new(Vec::new());
        let mut telemetry = RequestTelemetry::start(&request, &metrics, &routes, false);
        telemetry.span = tracing::info_span!("request");

        telemetry.in_span(Probe(&seen, false)).await;
        let inside = Some("request");
        assert_eq!(*seen.lock().unwrap(), [("poll", inside), ("poll", inside), ("drop", inside)]);

        seen.lock().unwrap().clear();
        let mut cancelled = Box::pin(telemetry.in_span(Probe(&seen, false)));
        assert!(futures::poll!(cancelled.as_mut()).is_pending());
        drop(cancelled);
        assert_eq!(*seen.lock().unwrap(), [("poll", inside), ("drop", inside)]);
    }

    #[test]
    fn server_spans_are_named_by_method_and_route() {
        let routes = Routes::from_spec(&crate::api::spec());
        for (method, path, name) in [
            (Method::GET, "/api/v1/jobs/job-abcdefghijklmnopqrst", "GET /api/v1/jobs/{id}"),
            (Method::POST, "/api/v1/jobs", "POST /api/v1/jobs"),
            (Method::from_bytes(b"PURGE").unwrap(), "/api/v1/jobs", "_OTHER /api/v1/jobs"),
            (Method::GET, "/docs/swagger-ui.css", "GET /docs"),
            (Method::DELETE, "/etc/passwd", "DELETE unmatched"),
        ] {
            assert_eq!(routes.span_name(method_index(&method), routes.route(path).0), name, "{method} {path}");
        }
    }

    #[test]
    fn paths_map_to_templates() {
        let routes = Routes::from_spec(&crate::api::spec());
        for (path, route) in [
            ("/api/v1/jobs", "/api/v1/jobs"),
            ("/api/v1/jobs/", "/api/v1/jobs"),
            ("/api/v1/jobs/job-abcdefghijklmnopqrst", "/api/v1/jobs/{id}"),
            ("/api/v1/jobs/anything/logs", "/api/v1/jobs/{id}/logs"),
            ("/api/v1/jobs/x/cancel", "/api/v1/jobs/{id}/cancel"),
            ("/healthz", "/healthz"),
            ("/metrics", "/metrics"),
            ("/docs", "/docs"),
            ("/docs/swagger-ui.css", "/docs"),
            ("/api/v1/jobs//logs", "unmatched"),
            ("/etc/passwd", "unmatched"),
            ("/api/v1/jobs/x/y/z", "unmatched"),
        ] {
            assert_eq!(routes.route(path).1, route, "{path}");
        }
    }
}
