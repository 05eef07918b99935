//! The HTTP application in process: `oats::api::build_app` over the local backend, driven by
//! poem's test client without a socket or a server process. Validation, problem responses and
//! routing are the application's; what needs a process (the HTTP server's limits, signals,
//! agents' environment, telemetry export) is tested through `oats serve` in the other modules.

use futures::StreamExt;
use oats::{
    api::{self, ApiState, RequestLimits},
    auth::Authenticator,
    backend::local::{LocalBackend, LocalSettings},
    config::Config,
    jobs::{JobService, policy::Policy},
    store::Store,
    telemetry::metrics::Metrics,
};
use poem::{
    EndpointExt, Response,
    http::StatusCode,
    test::{TestClient, TestResponse},
};
use serde_json::{Value, json};
use std::{sync::Arc, time::Duration};

/// The application as `oats serve` builds it with the local backend and no credentials, on a
/// state directory of its own; `env` are `OATS_*` variables, as for the server.
struct App {
    client: TestClient<poem::endpoint::BoxEndpoint<'static, Response>>,
    _state: tempfile::TempDir,
}

impl App {
    async fn start(env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut vars = vec![("OATS_STATE_DIR".to_owned(), dir.path().display().to_string())];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Config::load(None, vars).expect("a valid test configuration");
        let metrics = Arc::new(Metrics::new());
        let settings = LocalSettings {
            state_dir: config.state_dir.clone(),
            concurrency: config.local_concurrency,
            command: vec![env!("CARGO_BIN_EXE_oats").into(), "demo-agent".into()],
            env_allowlist: config.local_env_allowlist.clone(),
            max_log_bytes: config.local_max_log_bytes as u64,
            gateway: None,
            kept_after_finish: Duration::from_secs(config.ttl_seconds_after_finished.into()),
        };
        let store = Store::open_in(&config.state_dir).await.expect("the store opens");
        let backend = LocalBackend::start(settings, metrics.clone(), Arc::new(store)).await;
        let backend = Arc::new(backend.expect("the local backend starts"));
        let jobs = JobService::new(backend, config.job_limits(), Policy::builtin(), metrics.jobs.clone());
        let state = Arc::new(ApiState {
            jobs: Arc::new(jobs),
            auth: Authenticator::new(None, None, &config.tenant),
            metrics,
            shutdown: Default::default(),
            heartbeat: api::Heartbeat::every(api::HEARTBEAT),
        });
        let limits = RequestLimits {
            max_body_bytes: config.max_body_bytes,
            read_timeout: Duration::from_secs(config.request_read_timeout_seconds.into()),
        };
        Self { client: TestClient::new(api::build_app(state, limits).boxed()), _state: dir }
    }

    async fn post(&self, body: String, content_type: &str) -> TestResponse {
        self.client.post("/api/v1/jobs").content_type(content_type).body(body).send().await
    }

    async fn get(&self, path: &str) -> TestResponse {
        self.client.get(path).send().await
    }
}

/// The response is an RFC 9457 problem of this status and stable `type`, with a title and a
/// detail; its body.
async fn assert_problem(response: TestResponse, status: u16, problem_type: &str) -> Value {
    assert_eq!(response.0.status().as_u16(), status, "wrong status for {problem_type}");
    let content_type = response.0.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("application/problem+json"), "content type {content_type}");
    let body: Value = serde_json::from_str(&response.0.into_body().into_string().await.unwrap()).unwrap();
    assert_eq!(body["type"], format!("https://oats.dev/problems/{problem_type}"), "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    body
}

async fn json_of(response: TestResponse) -> (StatusCode, Value) {
    let status = response.0.status();
    let text = response.0.into_body().into_string().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

fn ok(goal: Value, max_turns: Value) -> String {
    json!({"goal": goal, "max_turns": max_turns}).to_string()
}

#[tokio::test]
async fn malformed_bodies_are_400_invalid_body_and_other_media_types_415() {
    let app = App::start(&[]).await;
    let json = "application/json";
    assert_problem(app.post("{\"goal\": ".into(), json).await, 400, "invalid-body").await;
    assert_problem(app.post("[1,2]".into(), json).await, 400, "invalid-body").await;
    assert_problem(app.post(ok(json!(1), json!(2)), json).await, 400, "invalid-body").await;
    assert_problem(app.post(ok(json!("g"), json!("2")), json).await, 400, "invalid-body").await;
    assert_problem(app.post(ok(json!("g"), json!(-1)), json).await, 400, "invalid-body").await;
    let unknown = json!({"goal": "g", "max_turns": 1, "priority": "high"}).to_string();
    let body = assert_problem(app.post(unknown, json).await, 400, "invalid-body").await;
    assert!(body["detail"].as_str().unwrap().contains("priority"), "{body}");
    assert_problem(app.post(json!({"goal": "g"}).to_string(), json).await, 400, "invalid-body").await;
    assert_problem(app.post(ok(json!("g"), json!(1)), "text/plain").await, 415, "unsupported-media-type").await;
}

#[tokio::test]
async fn each_input_limit_is_enforced_at_its_bound() {
    let app = App::start(&[]).await;
    let json = "application/json";
    assert_problem(app.post(ok(json!(""), json!(1)), json).await, 400, "invalid-body").await;
    assert_problem(app.post(ok(json!("   "), json!(1)), json).await, 422, "validation-failed").await;
    let goal_16384 = "a".repeat(16384);
    app.post(ok(json!(goal_16384), json!(1)), json).await.assert_status(StatusCode::CREATED);
    let wide = "é".repeat(8193); // 16386 bytes in 8193 characters
    let body = assert_problem(app.post(ok(json!(wide), json!(1)), json).await, 422, "validation-failed").await;
    assert_eq!(body["errors"][0]["field"], "goal");
    assert_problem(app.post(ok(json!("g"), json!(0)), json).await, 400, "invalid-body").await;
    assert_problem(app.post(ok(json!("g"), json!(101)), json).await, 400, "invalid-body").await;
    let labels: serde_json::Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let many = json!({"goal": "g", "max_turns": 1, "labels": labels}).to_string();
    assert_problem(app.post(many, json).await, 400, "invalid-body").await;
    let bad_label = json!({"goal": "g", "max_turns": 1, "labels": {"bad key": "v"}}).to_string();
    let body = assert_problem(app.post(bad_label, json).await, 422, "validation-failed").await;
    assert_eq!(body["errors"][0]["field"], "labels.bad key");
    let long_timeout = json!({"goal": "g", "max_turns": 1, "timeout_seconds": 7200}).to_string();
    assert_problem(app.post(long_timeout, json).await, 422, "validation-failed").await;
}

#[tokio::test]
async fn hostile_bodies_are_4xx_problems() {
    let app = App::start(&[]).await;
    let post_raw = |body: Vec<u8>| app.client.post("/api/v1/jobs").content_type("application/json").body(body).send();
    let deep = format!("{{\"goal\": {}1{}, \"max_turns\": 1}}", "[".repeat(10_000), "]".repeat(10_000));
    assert_problem(post_raw(deep.into_bytes()).await, 400, "invalid-body").await;
    let mut invalid_utf8 = br#"{"goal": "bad "#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xfd]);
    invalid_utf8.extend_from_slice(br#"", "max_turns": 1}"#);
    assert_problem(post_raw(invalid_utf8).await, 400, "invalid-body").await;
    let nul = json!({"goal": "a\u{0}b", "max_turns": 1}).to_string().into_bytes();
    assert_problem(post_raw(nul).await, 422, "validation-failed").await;
    let huge = br#"{"goal": "g", "max_turns": 1e400}"#.to_vec();
    assert_problem(post_raw(huge).await, 400, "invalid-body").await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_with_or_without_a_content_length() {
    let app = App::start(&[("OATS_MAX_BODY_BYTES", "32768")]).await;
    let huge = ok(json!("a".repeat(40_000)), json!(1));
    assert_problem(app.post(huge.clone(), "application/json").await, 413, "payload-too-large").await;
    let chunks = futures::stream::iter(huge.into_bytes().chunks(1000).map(|c| c.to_vec()).collect::<Vec<_>>())
        .map(Ok::<_, std::io::Error>);
    let streamed = app
        .client
        .post("/api/v1/jobs")
        .content_type("application/json")
        .body(poem::Body::from_bytes_stream(chunks))
        .send()
        .await;
    assert_problem(streamed, 413, "payload-too-large").await;
}

#[tokio::test]
async fn idempotency_keys_are_checked() {
    let app = App::start(&[]).await;
    let submit = |key: String| {
        app.client.post("/api/v1/jobs").header("Idempotency-Key", key).body_json(&json!({"goal": "g", "max_turns": 1}))
    };
    assert_problem(submit("k".repeat(256)).send().await, 400, "invalid-parameter").await;
    assert_problem(submit("has space".into()).send().await, 422, "validation-failed").await;
}

#[tokio::test]
async fn ids_queries_selectors_and_page_tokens_are_checked() {
    let app = App::start(&[]).await;
    for path in ["/api/v1/jobs/job-aaaaaaaaaaaaaaaaaaaa", "/api/v1/jobs/not-an-id", "/api/v1/jobs/..%2F..%2Fetc"] {
        assert_problem(app.get(path).await, 404, "not-found").await;
    }
    for query in ["limit=0", "limit=501", "limit=ten", "status=done"] {
        assert_problem(app.get(&format!("/api/v1/jobs?{query}")).await, 400, "invalid-parameter").await;
    }
    assert_problem(app.get("/api/v1/jobs?label=bad%20key%3Dv").await, 422, "validation-failed").await;
    assert_problem(app.get("/api/v1/jobs?page_token=bogus").await, 400, "invalid-page-token").await;
}

/// Routes match exactly: one version (`/api/v1`), no trailing slash (except Swagger UI's
/// `/docs/`), case-sensitive; anything else is a 404 problem that points at `/api/v1`, and a known
/// route with a method it does not take is a 405 problem.
#[tokio::test]
async fn routes_match_exactly_and_misses_are_404_or_405_problems() {
    let app = App::start(&[]).await;
    let job = "/api/v1/jobs/job-aaaaaaaaaaaaaaaaaaaa";
    for path in [
        "/api/v2/jobs",
        "/api/v0/jobs",
        "/API/v1/jobs",
        "/api",
        "/api/v1",
        "/api/v1/",
        "/api/v1/jobs/",
        "/api/v1//jobs",
        &format!("{job}/"),
        &format!("{job}/nope"),
        "/",
        "/healthz/",
        "/readyz/",
        "/openapi.json/",
        "/metrics/",
    ] {
        let body = assert_problem(app.get(path).await, 404, "not-found").await;
        assert!(body["detail"].as_str().unwrap().contains("/api/v1"), "{path}: {body}");
    }
    assert_problem(app.client.post("/api/v1/jobs/").send().await, 404, "not-found").await;
    assert_problem(app.client.delete("/api/v1/jobs").send().await, 405, "method-not-allowed").await;
    assert_problem(app.client.put("/api/v1/jobs").send().await, 405, "method-not-allowed").await;
    assert_problem(app.client.options("/api/v1/jobs").send().await, 405, "method-not-allowed").await;
    assert_problem(app.client.patch(job).send().await, 405, "method-not-allowed").await;
    assert_problem(app.get(&format!("{job}/cancel")).await, 405, "method-not-allowed").await;
    assert_problem(app.client.post("/healthz").send().await, 405, "method-not-allowed").await;
    assert_problem(app.client.delete("/openapi.json").send().await, 405, "method-not-allowed").await;
    assert_problem(app.client.post("/metrics").send().await, 405, "method-not-allowed").await;
    // The routes that exist answer for a job that does not: 404 naming the job.
    for response in [app.get(&format!("{job}/logs")).await, app.client.post(format!("{job}/cancel")).send().await] {
        let body = assert_problem(response, 404, "not-found").await;
        assert!(body["detail"].as_str().unwrap().contains("job-aaaaaaaaaaaaaaaaaaaa"), "{body}");
    }
    app.get("/docs/").await.assert_status_is_ok();
}

/// Where a route has no HEAD operation, HEAD answers as GET without the body; a 405 names the
/// methods the route takes in `Allow`.
#[tokio::test]
async fn head_is_get_without_a_body_and_405_says_what_is_allowed() {
    let app = App::start(&[]).await;
    for path in ["/api/v1/jobs", "/healthz"] {
        let get = app.get(path).await;
        let head = app.client.head(path).send().await;
        assert_eq!(head.0.status(), get.0.status(), "{path}");
        assert_eq!(head.0.headers()["content-type"], get.0.headers()["content-type"], "{path}");
        assert!(!get.0.into_body().into_bytes().await.unwrap().is_empty(), "{path}");
        assert!(head.0.into_body().into_bytes().await.unwrap().is_empty(), "{path}");
    }
    let cancel = "/api/v1/jobs/job-aaaaaaaaaaaaaaaaaaaa/cancel";
    for (response, allowed) in [
        (app.client.delete("/api/v1/jobs").send().await, vec!["GET", "POST"]),
        (app.get(cancel).await, vec!["POST"]),
        (app.client.head(cancel).send().await, vec!["POST"]),
    ] {
        assert_eq!(response.0.status(), StatusCode::METHOD_NOT_ALLOWED);
        let allow = response.0.headers()["allow"].to_str().unwrap();
        let mut methods: Vec<&str> = allow.split(", ").collect();
        methods.sort_unstable();
        assert_eq!(methods, allowed, "{allow}");
    }
}

#[tokio::test]
async fn docs_spec_and_probes_are_served() {
    let app = App::start(&[]).await;
    let (status, spec) = json_of(app.get("/openapi.json").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(spec["paths"]["/api/v1/jobs"]["post"]["operationId"], "createJob");
    let docs = app.get("/docs").await;
    docs.assert_status_is_ok();
    assert!(docs.0.into_body().into_string().await.unwrap().contains("swagger"));
    let (status, ready) = json_of(app.get("/readyz").await).await;
    assert_eq!((status, ready["backend"].as_str()), (StatusCode::OK, Some("local")));
}
