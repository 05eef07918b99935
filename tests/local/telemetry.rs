//! Telemetry end to end: spans received by real OTLP/gRPC and OTLP/HTTP receivers, an exact scrape
//! of `/metrics`, and logs that never carry secrets.

use crate::common;

use common::{
    Server,
    otlp::{HttpReceiver, attribute, start_receiver, string_of},
};
use openmetrics_parser::{PrometheusType, PrometheusValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// The trace of a request sent last, to know when every earlier span has been exported.
const MARKER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

/// The spans received once one of trace `trace` is among them.
async fn wait_for_trace(
    spans: &std::sync::Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>,
    trace: &str,
) -> Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let received = spans.lock().unwrap().clone();
        let hex = |id: &[u8]| id.iter().map(|b| format!("{b:02x}")).collect::<String>();
        if received.iter().any(|(_, s)| hex(&s.trace_id) == trace) {
            return received;
        }
        assert!(Instant::now() < deadline, "the span of trace {trace} never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A local-backend server exporting spans over OTLP/gRPC to `port` every 100 ms, with `extra`
/// variables.
async fn traced_server(dir: &std::path::Path, port: u16, extra: &[(&str, &str)]) -> Server {
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    env.extend_from_slice(extra);
    Server::start_local(dir, &env).await
}

#[tokio::test]
async fn a_submission_is_one_trace_from_the_caller_into_the_agent() {
    let (receiver, port) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let server = traced_server(
        dir.path(),
        port,
        &[("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-key=otlp-secret-123"), ("OTEL_SERVICE_NAME", "oats-under-test")],
    )
    .await;

    let response = server
        .http
        .post(server.url("/api/v1/jobs"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .header("authorization", "Bearer caller-token-456")
        .json(&json!({"goal": "Trace me", "max_turns": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["trace_id"], TRACE_ID, "the job links to the caller's trace");
    let id = job["id"].as_str().unwrap();
    server.wait_for(id, "succeeded", Duration::from_secs(20)).await;

    // The agent continued the same trace.
    let logs = server.http.get(server.url(&format!("/api/v1/jobs/{id}/logs"))).send().await.unwrap();
    let logs = logs.text().await.unwrap();
    assert!(logs.contains(&format!("TRACEPARENT=00-{TRACE_ID}-")), "{logs}");

    // The receiver gets the server span, its child, and the job's lifecycle.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
        if ["POST /api/v1/jobs", "create job", "job pending", "job running"].iter().all(|n| names.contains(n)) {
            break spans;
        }
        assert!(Instant::now() < deadline, "spans never arrived; got {names:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let find = |name: &str| spans.iter().find(|(_, s)| s.name == name).unwrap();
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();

    let (service, server_span) = find("POST /api/v1/jobs");
    assert_eq!(service, "oats-under-test");
    assert_eq!(hex(&server_span.trace_id), TRACE_ID);
    assert_eq!(hex(&server_span.parent_span_id), CALLER_SPAN, "continues the caller's span");
    assert_eq!(server_span.kind, SpanKind::Server as i32);
    assert_eq!(attribute(server_span, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attribute(server_span, "http.route").as_deref(), Some("/api/v1/jobs"));
    assert_eq!(attribute(server_span, "http.response.status_code").as_deref(), Some("201"));

    let (_, create) = find("create job");
    assert_eq!(hex(&create.trace_id), TRACE_ID);
    assert_eq!(create.parent_span_id, server_span.span_id, "job creation is a child of the request");
    assert_eq!(attribute(create, "oats.job.id").as_deref(), Some(id));
    for name in ["job pending", "job running"] {
        let (_, lifecycle) = find(name);
        assert_eq!(hex(&lifecycle.trace_id), TRACE_ID, "{name}");
        assert_eq!(lifecycle.parent_span_id, create.span_id, "{name} hangs under the job's creation");
        assert_eq!(attribute(lifecycle, "oats.job.status").as_deref(), Some("succeeded"));
    }
    let (_, pending) = find("job pending");
    let (_, running) = find("job running");
    assert!(pending.end_time_unix_nano <= running.start_time_unix_nano + 1_000_000, "pending ends as running starts");

    // Exemplars carry the trace id (OpenMetrics only).
    let scrape = server
        .http
        .get(server.url("/metrics"))
        .header("accept", "application/openmetrics-text")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(scrape.contains(&format!("trace_id=\"{TRACE_ID}\"")), "no exemplar with the trace id");

    // Logs are JSON lines carrying the trace id, and never the secrets.
    let log = server.log_text();
    let submitted = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "job submitted")
        .expect("a log line for the submission");
    assert_eq!(submitted["trace_id"], TRACE_ID);
    assert!(submitted["span_id"].as_str().is_some_and(|s| s.len() == 16));
    for secret in ["otlp-secret-123", "caller-token-456"] {
        assert!(!log.contains(secret), "{secret} leaked into the logs");
    }
    for (_, span) in &spans {
        for kv in &span.attributes {
            let value = string_of(kv).unwrap_or_default();
            assert!(!value.contains("caller-token-456") && !value.contains("otlp-secret-123"), "secret in span");
        }
    }
}

/// The default protocol, OTLP/HTTP with protobuf (our own exporter): a traced request's server span
/// reaches the collector's `/v1/traces` with the configured header, whose secret stays out of the
/// logs.
#[tokio::test]
async fn spans_are_exported_over_otlp_http_with_the_configured_headers() {
    let receiver = HttpReceiver::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-key=otlp-secret-123"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_SERVICE_NAME", "oats-over-http"),
    ];
    let server = Server::start_local(dir.path(), &env).await;
    let response = server
        .http
        .get(server.url("/api/v1/jobs"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (export, service, span) = loop {
        let exports = receiver.exports.lock().unwrap().clone();
        let found = exports.iter().find_map(|export| {
            let (service, span) = export.spans.iter().find(|(_, s)| hex(&s.trace_id) == TRACE_ID)?;
            Some((export.clone(), service.clone(), span.clone()))
        });
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "the span never arrived; {} requests", exports.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((export.method.as_str(), export.path.as_str()), ("POST", "/v1/traces"));
    assert_eq!(export.header("content-type"), Some("application/x-protobuf"));
    assert_eq!(export.header("x-collector-key"), Some("otlp-secret-123"));
    assert_eq!(service, "oats-over-http");
    assert_eq!(span.name, "GET /api/v1/jobs");
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(hex(&span.parent_span_id), CALLER_SPAN, "continues the caller's span");
    assert_eq!(attribute(&span, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(attribute(&span, "http.route").as_deref(), Some("/api/v1/jobs"));
    assert_eq!(attribute(&span, "http.response.status_code").as_deref(), Some("200"));

    let log = server.log_text();
    assert!(log.contains("exporting traces over OTLP"), "{log}");
    assert!(!log.contains("otlp-secret-123"), "the collector's key leaked into the logs");
}

/// With a ratio of 0 for new traces, untraced reads get no span; submissions and callers' traces
/// still do.
#[tokio::test]
async fn sampling_spares_untraced_reads_but_never_submissions() {
    let (receiver, port) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let sampler = [("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0")];
    let server = traced_server(dir.path(), port, &sampler).await;
    let job = server.create("sampled", 1).await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(job["trace_id"].as_str().map(str::len), Some(32), "a submission starts a trace");
    for _ in 0..20 {
        server.job(id).await;
    }
    let traced = server
        .http
        .get(server.url(&format!("/api/v1/jobs/{id}")))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(traced.status(), StatusCode::OK);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let gets: Vec<_> = spans.iter().filter(|(_, s)| s.name == "GET /api/v1/jobs/{id}").collect();
        let posts = spans.iter().filter(|(_, s)| s.name == "POST /api/v1/jobs").count();
        if posts == 1 && !gets.is_empty() {
            let hex: String = gets[0].1.trace_id.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, TRACE_ID, "the only traced read is the one with a caller's trace");
            break;
        }
        assert!(Instant::now() < deadline, "spans never arrived: {} GET, {posts} POST", gets.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A last traced request (a list, by a trace of its own): the batch exporter sends spans in
    // the order they ended, so once its span is in, every earlier one is. Still one traced read.
    let marker = server
        .http
        .get(server.url("/api/v1/jobs"))
        .header("traceparent", format!("00-{MARKER_TRACE}-{CALLER_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(marker.status(), StatusCode::OK);
    let spans = wait_for_trace(&receiver.spans, MARKER_TRACE).await;
    assert_eq!(spans.iter().filter(|(_, s)| s.name == "GET /api/v1/jobs/{id}").count(), 1);
}

/// A `traceparent` forces a span (and continues the caller's trace) only for a caller who
/// authenticated: anonymous or wrongly authenticated callers cannot push requests into the trace
/// pipeline or choose our trace ids.
#[tokio::test]
async fn only_authenticated_callers_traces_are_followed() {
    let (receiver, port) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    let hash = oats::auth::hash_token("good-token");
    std::fs::write(&tokens, format!("tokens:\n  - {{name: ci, sha256: {hash}, tenant: acme, role: submitter}}\n"))
        .unwrap();
    let tokens = tokens.display().to_string();
    let env = [
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ("OATS_AUTH_TOKENS_FILE", tokens.as_str()),
    ];
    let server = traced_server(dir.path(), port, &env).await;
    let untrusted = "11111111111111111111111111111111";
    let traceparent = |trace: &str| format!("00-{trace}-{CALLER_SPAN}-01");
    let get = |path: &str, trace: &str, token: Option<&str>| {
        let mut request = server.http.get(server.url(path)).header("traceparent", traceparent(trace));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    for _ in 0..5 {
        assert_eq!(get("/api/v1/jobs", untrusted, None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(get("/api/v1/jobs", untrusted, Some("bad-token")).await.unwrap().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(get("/healthz", untrusted, None).await.unwrap().status(), StatusCode::OK);
    }
    // A write is always traced, but an unauthenticated caller's trace is not continued.
    let refused = server
        .http
        .post(server.url("/api/v1/jobs"))
        .header("traceparent", traceparent(untrusted))
        .json(&json!({"goal": "anonymous", "max_turns": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(get("/api/v1/jobs", TRACE_ID, Some("good-token")).await.unwrap().status(), StatusCode::OK);

    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let trusted = spans.iter().any(|(_, s)| s.name == "GET /api/v1/jobs" && hex(&s.trace_id) == TRACE_ID);
        let post = spans.iter().any(|(_, s)| s.name == "POST /api/v1/jobs");
        if trusted && post {
            break;
        }
        assert!(Instant::now() < deadline, "the spans never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A last traced request (a job that does not exist, by a trace of its own): once its span
    // is in, every earlier one is (spans are exported in the order they ended).
    let marker = get("/api/v1/jobs/job-aaaaaaaaaaaaaaaaaaaa", MARKER_TRACE, Some("good-token")).await.unwrap();
    assert_eq!(marker.status(), StatusCode::NOT_FOUND);
    let spans = wait_for_trace(&receiver.spans, MARKER_TRACE).await;
    let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    assert!(spans.iter().all(|(_, s)| hex(&s.trace_id) != untrusted), "an anonymous caller's trace was followed");
    assert_eq!(names.iter().filter(|n| **n == "GET /api/v1/jobs").count(), 1, "{names:?}");
    assert!(!names.contains(&"GET /healthz"), "{names:?}");
}

/// Median time of `count` submissions to `server`.
async fn median_submission(server: &Server, count: usize, goal: &str) -> Duration {
    let mut times = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        let response = server.submit(json!({"goal": format!("{goal} {i}"), "max_turns": 1})).await;
        times.push(started.elapsed());
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    times.sort();
    times[count / 2]
}

/// A collector that accepts connections and never answers (a listener nobody accepts on: the
/// kernel completes the handshakes), the worst case for an exporter that would wait for it.
/// Submissions, each a sampled trace, take no longer than without any collector, within 25 ms
/// of median, generous for a loaded machine (a blocked export would add its whole timeout,
/// seconds).
#[tokio::test]
async fn a_dead_collector_never_blocks_requests() {
    let dir = tempfile::tempdir().unwrap();
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = black_hole.local_addr().unwrap().port();
    let traced = traced_server(&dir.path().join("traced"), port, &[]).await;
    let plain = Server::start_local(&dir.path().join("plain"), &[]).await;
    // Warm both up, then measure them alternately so they share the machine's load.
    median_submission(&traced, 5, "warm-up").await;
    median_submission(&plain, 5, "warm-up").await;
    let (mut with_dead, mut without) = (Vec::new(), Vec::new());
    for round in 0..5 {
        with_dead.push(median_submission(&traced, 15, &format!("dead collector {round}")).await);
        without.push(median_submission(&plain, 15, &format!("no collector {round}")).await);
    }
    with_dead.sort();
    without.sort();
    let (with_dead, without) = (with_dead[2], without[2]);
    assert!(
        with_dead <= without + Duration::from_millis(25),
        "a dead collector slows submissions: median {with_dead:?} vs {without:?} without one"
    );
    let (status, list) = traced.get_json("/api/v1/jobs?limit=500").await;
    assert_eq!((status, list["items"].as_array().unwrap().len()), (StatusCode::OK, 80));
}

type Exposition = openmetrics_parser::MetricsExposition<PrometheusType, PrometheusValue>;

fn family<'a>(
    scrape: &'a Exposition,
    name: &str,
) -> Option<&'a openmetrics_parser::MetricFamily<PrometheusType, PrometheusValue>> {
    scrape.families.get(name).or_else(|| scrape.families.get(name.trim_end_matches("_total")))
}

/// The value of the one sample of `name` with these labels (a histogram's count).
fn sample_value(scrape: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    let family = family(scrape, name).unwrap_or_else(|| panic!("no metric {name}"));
    let sample = family
        .iter_samples()
        .find(|s| {
            let set = s.get_labelset().unwrap();
            labels.iter().all(|(k, v)| set.get_label_value(k) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"));
    match &sample.value {
        PrometheusValue::Counter(c) => c.value.as_f64(),
        PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
        PrometheusValue::Histogram(h) => h.count.unwrap_or_default() as f64,
        PrometheusValue::Summary(_) => panic!("{name} is a summary"),
    }
}

async fn scrape(server: &Server) -> (String, Exposition) {
    let text = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let parsed = openmetrics_parser::prometheus::parse_prometheus(&text).expect("the scrape parses");
    (text, parsed)
}

#[tokio::test]
async fn a_scrape_has_every_metric_with_exact_counts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_local(dir.path(), &[]).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(server.create(&format!("count me {i}"), 1).await["id"].as_str().unwrap().to_owned());
    }
    let invalid = server.submit(json!({"goal": "   ", "max_turns": 1})).await;
    assert_eq!(invalid.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let unparsable =
        server.http.post(server.url("/api/v1/jobs")).header("content-type", "application/json").body("{").send();
    assert_eq!(unparsable.await.unwrap().status(), StatusCode::BAD_REQUEST);
    for id in &ids {
        server.wait_for(id, "succeeded", Duration::from_secs(20)).await;
    }
    let get_route =
        [("http_request_method", "GET"), ("http_route", "/api/v1/jobs/{id}"), ("http_response_status_code", "200")];
    // wait_for polled GET /api/v1/jobs/{id} an unknown number of times: count a known batch by delta.
    let (_, before) = scrape(&server).await;
    for id in &ids {
        let (status, _) = server.get_json(&format!("/api/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (text, scrape) = scrape(&server).await;
    let gets = sample_value(&scrape, "http_server_request_duration_seconds", &get_route)
        - sample_value(&before, "http_server_request_duration_seconds", &get_route);
    assert_eq!(gets, 3.0, "GETs are counted under the route template");

    for (metric, kind) in [
        ("http_server_request_duration_seconds", PrometheusType::Histogram),
        ("http_server_active_requests", PrometheusType::Gauge),
        ("oats_job_submissions_total", PrometheusType::Counter),
        ("oats_jobs_finished_total", PrometheusType::Counter),
        ("oats_job_duration_seconds", PrometheusType::Histogram),
        ("oats_job_queue_wait_seconds", PrometheusType::Histogram),
        ("oats_jobs", PrometheusType::Gauge),
        ("oats_jobs_without_pod", PrometheusType::Gauge),
        ("oats_job_result_bytes", PrometheusType::Histogram),
        ("oats_log_streams", PrometheusType::Gauge),
        ("oats_local_running_processes", PrometheusType::Gauge),
        ("oats_build_info", PrometheusType::Gauge),
        ("process_resident_memory_bytes", PrometheusType::Gauge),
        ("process_cpu_seconds_total", PrometheusType::Counter),
        ("process_open_fds", PrometheusType::Gauge),
        ("process_start_time_seconds", PrometheusType::Gauge),
    ] {
        let declared = family(&scrape, metric).map(|f| f.family_type.clone());
        assert_eq!(declared, Some(kind), "{metric} is not exported as that type");
    }

    assert_eq!(sample_value(&scrape, "oats_job_submissions_total", &[("outcome", "accepted")]), 3.0);
    assert_eq!(sample_value(&scrape, "oats_job_submissions_total", &[("outcome", "invalid")]), 2.0);
    assert_eq!(sample_value(&scrape, "oats_jobs_finished_total", &[("status", "succeeded"), ("reason", "none")]), 3.0);
    assert_eq!(sample_value(&scrape, "oats_jobs", &[("status", "succeeded")]), 3.0);
    assert_eq!(sample_value(&scrape, "oats_jobs", &[("status", "running")]), 0.0);
    assert_eq!(sample_value(&scrape, "oats_job_duration_seconds", &[("status", "succeeded")]), 3.0);
    assert_eq!(sample_value(&scrape, "oats_job_queue_wait_seconds", &[]), 3.0);
    assert_eq!(sample_value(&scrape, "oats_job_result_bytes", &[]), 3.0);
    let post = |code: &'static str| {
        sample_value(
            &scrape,
            "http_server_request_duration_seconds",
            &[("http_request_method", "POST"), ("http_route", "/api/v1/jobs"), ("http_response_status_code", code)],
        )
    };
    assert_eq!((post("201"), post("422"), post("400")), (3.0, 1.0, 1.0));
    assert!(!text.contains("job-"), "no job id in any label");
    assert_eq!(sample_value(&scrape, "oats_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
}
