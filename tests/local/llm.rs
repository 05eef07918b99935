//! The LLM gateway and the agent, end to end on the local backend: a real `oats serve`, its
//! gateway, the scripted fake upstream (tests/common/fake_llm.rs), the built-in `oats agent`, and
//! the official `openai` Python SDK as a client.

use crate::common;

use common::{
    Server,
    fake_llm::{FakeLlm, Reply},
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The provider key the gateway holds; it must reach the upstream and nothing else.
const PROVIDER_KEY: &str = "sk-test-provider-key-7f3a9c2e5b";

struct Gateway {
    fake: FakeLlm,
    server: Server,
    /// The gateway's base URL (`http://127.0.0.1:PORT/v1`).
    url: String,
    dir: tempfile::TempDir,
}

/// A providers file pointing at `fake`, in `dir`, with the provider's timeout in seconds.
fn providers_file_with_timeout(dir: &Path, fake: &FakeLlm, timeout_seconds: u32) -> PathBuf {
    std::fs::write(dir.join("provider.key"), format!("{PROVIDER_KEY}\n")).unwrap();
    let path = dir.join("providers.yaml");
    std::fs::write(
        &path,
        format!(
            "providers:\n  - name: fake\n    base_url: {}\n    api_key_file: provider.key\n    timeout_seconds: {timeout_seconds}\n    max_retries: 2\n    retry_window_seconds: 10\n    models:\n      - name: test-model\n        upstream: fake-model\n        aliases: [small-model]\n        input_per_million_usd: 1\n        output_per_million_usd: 2\n",
            fake.base_url
        ),
    )
    .unwrap();
    path
}

impl Gateway {
    /// `oats serve` on the local backend with the gateway on, plus `extra` settings.
    async fn start(extra: &[(&str, &str)]) -> Self {
        Self::start_with_timeout(extra, 3).await
    }

    /// [`Gateway::start`] with the provider's timeout in seconds.
    async fn start_with_timeout(extra: &[(&str, &str)], timeout_seconds: u32) -> Self {
        let fake = FakeLlm::start().await;
        let dir = tempfile::tempdir().unwrap();
        let providers = providers_file_with_timeout(dir.path(), &fake, timeout_seconds);
        let mut env = vec![("OATS_LLM_PROVIDERS_FILE", providers.to_str().unwrap().to_owned())];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let server = Server::start_local(&dir.path().join("state"), &env).await;
        let url = server.gateway_url();
        Self { fake, server, url, dir }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn workspace(&self, id: &str) -> PathBuf {
        self.state_dir().join("jobs").join(id).join("workspace")
    }

    async fn submit(&self, body: Value) -> Value {
        let response = self.server.submit(body).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    /// Wait for a final status.
    async fn finished(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let job = self.server.job(id).await;
            if ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap()) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} never finished: {job}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn logs(&self, id: &str) -> String {
        let url = self.server.url(&format!("/api/v1/jobs/{id}/logs"));
        self.server.http.get(url).send().await.unwrap().text().await.unwrap()
    }

    fn chat_requests(&self) -> Vec<common::fake_llm::Recorded> {
        self.fake.requests().into_iter().filter(|r| r.path.ends_with("/chat/completions")).collect()
    }

    async fn metrics(&self) -> String {
        self.server.http.get(self.server.url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    /// Nothing the server wrote or serves contains the provider key.
    async fn assert_key_never_leaked(&self) {
        assert!(!self.server.log_text().contains(PROVIDER_KEY), "the provider key is in the server log");
        assert!(!self.metrics().await.contains(PROVIDER_KEY), "the provider key is in the metrics");
        let jobs = self.server.http.get(self.server.url("/api/v1/jobs")).send().await.unwrap().text().await.unwrap();
        assert!(!jobs.contains(PROVIDER_KEY));
        let dry_run = self.server.http.post(self.server.url("/api/v1/jobs?dry_run=true"));
        let dry_run = dry_run.json(&json!({"goal": "g", "max_turns": 1})).send().await.unwrap().text().await.unwrap();
        assert!(dry_run.contains("OPENAI_BASE_URL") && !dry_run.contains(PROVIDER_KEY), "{dry_run}");
        assert!(!dry_run.contains("oats-job."), "no job credential in the dry run: {dry_run}");
    }
}

/// The value of one sample in a Prometheus text page (`name{labels} value`), 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn the_agent_works_a_goal_with_tools_through_the_gateway() {
    let gateway = Gateway::start(&[]).await;
    gateway.fake.push(Reply::tool(
        "write_file",
        json!({"path": "plan.md", "content": "1. picnic\n2. rain plan\n"}),
        100,
        20,
    ));
    gateway.fake.push(Reply::tool("read_file", json!({"path": "plan.md"}), 150, 10));
    gateway.fake.push(Reply::text("The plan is in plan.md: picnic, with a rain plan.", 200, 30));
    let job = gateway.submit(json!({"goal": "Plan a picnic in plan.md", "max_turns": 5, "model": "small-model"})).await;
    let id = job["id"].as_str().unwrap();
    let job = gateway.finished(id).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", gateway.logs(id).await);
    assert_eq!(job["result"], "The plan is in plan.md: picnic, with a rain plan.");
    assert_eq!(std::fs::read_to_string(gateway.workspace(id).join("plan.md")).unwrap(), "1. picnic\n2. rain plan\n");
    let usage = &job["usage"];
    assert_eq!(usage["model_calls"], 3, "{job}");
    assert_eq!((usage["input_tokens"].as_u64(), usage["output_tokens"].as_u64()), (Some(450), Some(60)));
    // $1 per million input tokens and $2 per million output tokens.
    assert!((usage["cost_usd"].as_f64().unwrap() - (450.0 + 120.0) / 1e6).abs() < 1e-12, "{usage}");
    let reported = gateway.fake.reported_usage();
    assert_eq!((reported.prompt_tokens, reported.completion_tokens), (450, 60));

    let logs = gateway.logs(id).await;
    for line in
        ["turn=1 tools=write_file input_tokens=100 output_tokens=20", "turn=2 tools=read_file", "turn=3 tools=-"]
    {
        assert!(logs.contains(line), "no {line:?} in the logs:\n{logs}");
    }
    // The upstream saw the provider's key and the provider's model name, never the job's credential.
    let requests = gateway.chat_requests();
    assert_eq!(requests.len(), 3);
    for request in &requests {
        assert_eq!(request.header("authorization"), Some(format!("Bearer {PROVIDER_KEY}").as_str()));
        assert_eq!(request.body["model"], "fake-model");
        assert!(request.body["max_tokens"].as_u64().is_some_and(|m| m >= 1), "{}", request.body);
    }
    // The second call carried the result of the first tool call back to the model.
    let tool_message = requests[1].body["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(tool_message["role"], "tool");
    assert!(tool_message["content"].as_str().unwrap().starts_with("wrote 23 bytes to plan.md"), "{tool_message}");

    // Spend for chargeback, by tenant, model and day.
    let (status, report) = gateway.server.get_json("/api/v1/usage").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let items = report["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{report}");
    assert_eq!((items[0]["tenant"].as_str(), items[0]["model"].as_str()), (Some("default"), Some("test-model")));
    assert_eq!((items[0]["model_calls"].as_u64(), items[0]["input_tokens"].as_u64()), (Some(3), Some(450)));
    assert_eq!(report["total_cost_usd"], usage["cost_usd"]);
    let (status, _) = gateway.server.get_json("/api/v1/usage?from=2026-02-30").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "not a date");
    let (status, problem) = gateway.server.get_json("/api/v1/usage?from=2026-12-02&to=2026-12-01").await;
    assert_eq!(
        (status, problem["type"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("https://oats.dev/problems/validation-failed"))
    );
    let (status, _) = gateway.server.get_json("/api/v1/usage?from=2024-01-01&to=2026-01-01").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "over 366 days");

    let metrics = gateway.metrics().await;
    let labels = r#"gen_ai_operation_name="chat",gen_ai_provider_name="fake",gen_ai_request_model="test-model""#;
    assert_eq!(
        sample(&metrics, &format!("gen_ai_client_token_usage_count{{{labels},gen_ai_token_type=\"input\"}}")),
        3.0
    );
    assert_eq!(
        sample(&metrics, &format!("gen_ai_client_token_usage_sum{{{labels},gen_ai_token_type=\"output\"}}")),
        60.0
    );
    assert_eq!(sample(&metrics, r#"oats_llm_requests_total{provider="fake",model="test-model",outcome="ok"}"#), 3.0);
    gateway.assert_key_never_leaked().await;
}

#[tokio::test]
async fn a_model_that_keeps_calling_tools_stops_at_the_call_cap() {
    let gateway = Gateway::start(&[]).await;
    for i in 0..5 {
        gateway.fake.push(Reply::tool("list_files", json!({}), 10 + i, 5));
    }
    let job = gateway.submit(json!({"goal": "Look around forever", "max_turns": 2})).await;
    let job = gateway.finished(job["id"].as_str().unwrap()).await;
    assert_eq!((job["status"].as_str(), job["reason"].as_str()), (Some("failed"), Some("MaxTurnsReached")), "{job}");
    let result = job["result"].as_str().unwrap();
    assert!(result.contains("cap of 2 model calls") && result.contains("list_files"), "{result}");
    assert_eq!(job["usage"]["model_calls"], 2);
    assert_eq!(gateway.chat_requests().len(), 2);
}

#[tokio::test]
async fn a_budget_that_runs_out_mid_run_stops_the_job_with_budget_exhausted() {
    let gateway = Gateway::start(&[]).await;
    // The first call uses 9,000 of the 10,000 tokens; the next call's input alone is bounded by
    // more than the 1,000 left, so it cannot be paid for.
    gateway.fake.push(Reply::tool("write_file", json!({"path": "a.txt", "content": "partial"}), 5000, 4000));
    let job =
        gateway.submit(json!({"goal": "Write a long essay", "max_turns": 10, "budget": {"max_tokens": 10_000}})).await;
    let job = gateway.finished(job["id"].as_str().unwrap()).await;
    assert_eq!((job["status"].as_str(), job["reason"].as_str()), (Some("failed"), Some("BudgetExhausted")), "{job}");
    assert!(job["result"].as_str().unwrap().contains("a.txt"), "the partial result names what was done: {job}");
    let usage = &job["usage"];
    assert_eq!((usage["model_calls"].as_u64(), usage["refused"].as_str()), (Some(1), Some("job_tokens")), "{job}");
    assert_eq!(usage["budget_left"]["tokens"], 1000);
    assert_eq!(job["budget"]["max_tokens"], 10_000);
    assert_eq!(gateway.chat_requests().len(), 1, "the refused call never reached the upstream");
    let metrics = gateway.metrics().await;
    assert_eq!(sample(&metrics, r#"oats_llm_budget_refusals_total{reason="job_tokens"}"#), 1.0);
}

#[tokio::test]
async fn tools_refuse_paths_out_of_the_workspace_and_bad_arguments_and_the_job_goes_on() {
    let gateway = Gateway::start(&[]).await;
    gateway.fake.push(Reply::tool("read_file", json!({"path": "../../etc/passwd"}), 10, 5));
    gateway.fake.push(Reply::ToolCalls {
        calls: vec![("write_file".into(), "{\"path\": \"x\", ".into())],
        usage: Default::default(),
    });
    gateway.fake.push(Reply::tool("final_answer", json!({"answer": "done despite errors"}), 10, 5));
    let job = gateway.submit(json!({"goal": "Read the password file", "max_turns": 5})).await;
    let job = gateway.finished(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"], "done despite errors");
    let requests = gateway.chat_requests();
    let tool_reply = |i: usize| {
        requests[i].body["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap().to_owned()
    };
    assert!(tool_reply(1).starts_with("error:") && tool_reply(1).contains("`..` is not allowed"), "{}", tool_reply(1));
    assert!(!tool_reply(1).contains("root:"));
    assert!(tool_reply(2).starts_with("error: the arguments of write_file must be a JSON object"), "{}", tool_reply(2));
}

#[tokio::test]
async fn cancel_mid_turn_leaves_a_partial_result() {
    let gateway = Gateway::start(&[]).await;
    gateway.fake.push(Reply::tool("write_file", json!({"path": "draft.md", "content": "draft"}), 10, 5));
    gateway.fake.push(Reply::Slow { delay: Duration::from_secs(20), then: Box::new(Reply::text("too late", 1, 1)) });
    let job = gateway.submit(json!({"goal": "Draft, then think for a long time", "max_turns": 5})).await;
    let id = job["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while gateway.chat_requests().len() < 2 {
        assert!(Instant::now() < deadline, "the agent never made its second call");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancel =
        gateway.server.http.post(gateway.server.url(&format!("/api/v1/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(10);
    let job = loop {
        let job = gateway.server.job(id).await;
        if job["result"].is_string() {
            break job;
        }
        assert!(Instant::now() < deadline, "no partial result after cancel: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["status"], "cancelled");
    let result = job["result"].as_str().unwrap();
    assert!(result.contains("SIGTERM") && result.contains("draft.md"), "{result}");
}

/// The credential of a running job, written by an agent that only waits.
async fn credential_of(gateway: &Gateway, id: &str) -> String {
    let path = gateway.workspace(id).join("key");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(key) = std::fs::read_to_string(&path)
            && !key.trim().is_empty()
        {
            return key.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "the agent never wrote its credential");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent that hands its credential to the test and waits to be cancelled.
const WAITING_AGENT: &str = "sh,-c,echo \"$OPENAI_API_KEY\" > key; exec sleep 60";

async fn chat(gateway: &Gateway, key: &str, body: Value) -> reqwest::Response {
    gateway
        .server
        .http
        .post(format!("{}/chat/completions", gateway.url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn streams_are_relayed_and_charged_and_the_usage_chunk_is_only_for_clients_that_ask() {
    let gateway = Gateway::start(&[("OATS_LOCAL_AGENT_COMMAND", WAITING_AGENT)]).await;
    let job = gateway.submit(json!({"goal": "wait", "max_turns": 10})).await;
    let id = job["id"].as_str().unwrap();
    let key = credential_of(&gateway, id).await;
    let messages = json!([{"role": "user", "content": "hi"}]);

    gateway.fake.push(Reply::text("streamed answer", 12, 7));
    let response = chat(&gateway, &key, json!({"model": "test-model", "messages": messages, "stream": true})).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let body = response.text().await.unwrap();
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert!(!body.contains("\"usage\":{"), "the client did not ask for usage: {body}");
    let upstream = gateway.chat_requests().pop().unwrap();
    assert_eq!(upstream.body["stream_options"]["include_usage"], true, "usage is always asked upstream");

    gateway.fake.push(Reply::text("with usage", 20, 3));
    let asked =
        json!({"model": "test-model", "messages": messages, "stream": true, "stream_options": {"include_usage": true}});
    let body = chat(&gateway, &key, asked).await.text().await.unwrap();
    assert!(body.contains("\"prompt_tokens\":20"), "{body}");

    gateway.fake.push(Reply::text("plain", 5, 2));
    let answer: Value =
        chat(&gateway, &key, json!({"model": "test-model", "messages": messages})).await.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "plain");

    let usage = gateway.server.job(id).await["usage"].clone();
    assert_eq!(
        (usage["model_calls"].as_u64(), usage["input_tokens"].as_u64(), usage["output_tokens"].as_u64()),
        (Some(3), Some(37), Some(12)),
        "{usage}"
    );
    let metrics = gateway.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"gen_ai_client_operation_time_to_first_chunk_seconds_count{gen_ai_operation_name="chat",gen_ai_provider_name="fake",gen_ai_request_model="test-model"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn upstream_faults_are_retried_within_bounds_and_answered_in_openai_format() {
    let gateway = Gateway::start(&[("OATS_LOCAL_AGENT_COMMAND", WAITING_AGENT)]).await;
    let job = gateway.submit(json!({"goal": "wait", "max_turns": 20})).await;
    let id = job["id"].as_str().unwrap();
    let key = credential_of(&gateway, id).await;
    let ask = json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}]});

    // A 429 with Retry-After is waited out, then the answer comes.
    gateway.fake.push(Reply::Status {
        code: 429,
        retry_after: Some(1),
        body: json!({"error": {"message": "slow down"}}),
    });
    gateway.fake.push(Reply::text("after the 429", 3, 3));
    let started = Instant::now();
    let response = chat(&gateway, &key, ask.clone()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(900), "Retry-After was not honoured");

    // 500s are retried twice (max_retries), then answered as a sanitised 502.
    for _ in 0..3 {
        gateway.fake.push(Reply::Status {
            code: 500,
            retry_after: None,
            body: json!({"error": {"message": format!("boom with key {PROVIDER_KEY}")}}),
        });
    }
    let before = gateway.chat_requests().len();
    let response = chat(&gateway, &key, ask.clone()).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "api_error", "{error}");
    assert!(!error.to_string().contains(PROVIDER_KEY), "{error}");
    assert_eq!(gateway.chat_requests().len() - before, 3);

    // A stream that dies is charged its reservation; the client gets an error event, no [DONE].
    gateway.fake.push(Reply::DieMidStream { content: "half an answer".into() });
    let response = chat(
        &gateway,
        &key,
        json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "stream": true}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    assert!(text.contains(r#""code":"upstream_interrupted""#) && !text.contains("[DONE]"), "{text}");

    // A slow upstream times out (timeout_seconds: 3) and is not charged.
    for _ in 0..3 {
        gateway.fake.push(Reply::Slow { delay: Duration::from_secs(5), then: Box::new(Reply::text("late", 1, 1)) });
    }
    let response = chat(&gateway, &key, ask.clone()).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);

    let usage = gateway.server.job(id).await["usage"].clone();
    assert_eq!(usage["input_tokens"], 3 + body_bytes_of_stream_call(&gateway), "{usage}");
    let metrics = gateway.metrics().await;
    assert!(sample(&metrics, r#"oats_llm_upstream_retries_total{provider="fake"}"#) >= 5.0, "{metrics}");
    gateway.assert_key_never_leaked().await;
}

/// The input bound charged for the broken stream: the length of the body the client sent
/// (reqwest writes the JSON compactly, as `to_string` does).
fn body_bytes_of_stream_call(_gateway: &Gateway) -> u64 {
    json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "stream": true}).to_string().len()
        as u64
}

#[tokio::test]
async fn credentials_die_with_the_job_and_others_are_refused() {
    let gateway = Gateway::start(&[("OATS_LOCAL_AGENT_COMMAND", WAITING_AGENT)]).await;
    let job = gateway.submit(json!({"goal": "wait", "max_turns": 10})).await;
    let id = job["id"].as_str().unwrap();
    let key = credential_of(&gateway, id).await;
    let ask = json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}]});
    let models: Value = gateway
        .server
        .http
        .get(format!("{}/models", gateway.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "test-model");
    assert_eq!(chat(&gateway, &key, ask.clone()).await.status(), StatusCode::OK);
    for bad in ["", "sk-anything", &key.replace(id, "job-aaaaaaaaaaaaaaaaaaaa")] {
        let response = chat(&gateway, bad, ask.clone()).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{bad}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_api_key");
    }
    gateway.server.http.post(gateway.server.url(&format!("/api/v1/jobs/{id}/cancel"))).send().await.unwrap();
    gateway.server.wait_for(id, "cancelled", Duration::from_secs(10)).await;
    let response = chat(&gateway, &key, ask).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "a cancelled job's credential is dead");
    assert!(!gateway.server.log_text().contains(&key), "the job's credential is in the log");
}

#[tokio::test]
async fn concurrent_calls_never_spend_past_the_budget() {
    let gateway = Gateway::start(&[("OATS_LOCAL_AGENT_COMMAND", WAITING_AGENT)]).await;
    // Each call is bounded by ~100 bytes of input and asks for 100 output tokens: about 200
    // tokens reserved each, so a budget of 2,000 fits about 10 of the 50.
    let job = gateway.submit(json!({"goal": "wait", "max_turns": 100, "budget": {"max_tokens": 2000}})).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let key = credential_of(&gateway, &id).await;
    for _ in 0..50 {
        gateway.fake.push(Reply::text("x", 60, 90));
    }
    let calls = (0..50).map(|_| {
        let body = json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100});
        let (http, url, key) = (gateway.server.http.clone(), format!("{}/chat/completions", gateway.url), key.clone());
        tokio::spawn(async move { http.post(url).bearer_auth(key).json(&body).send().await.unwrap() })
    });
    let mut succeeded = 0;
    for call in futures::future::join_all(calls).await {
        let response = call.unwrap();
        match response.status() {
            StatusCode::OK => succeeded += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                let error: Value = response.json().await.unwrap();
                assert!(
                    ["insufficient_quota", "too_many_calls_in_flight"]
                        .contains(&error["error"]["code"].as_str().unwrap()),
                    "{error}"
                );
            }
            other => panic!("unexpected {other}"),
        }
    }
    let usage = gateway.server.job(&id).await["usage"].clone();
    let charged = usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap();
    assert!(charged <= 2000, "charged {charged} tokens against a budget of 2000");
    assert!(succeeded >= 1);
    assert_eq!(usage["model_calls"], succeeded);
    let reported = gateway.fake.reported_usage();
    assert_eq!(charged, reported.prompt_tokens + reported.completion_tokens, "usage equals what the upstream reported");
}

/// The interpreter with the `openai` package (scripts/install-test-tools.sh makes it).
fn python_with_openai() -> String {
    let python = std::env::var("OATS_TEST_PYTHON").expect(
        "OATS_TEST_PYTHON is not set: run scripts/install-test-tools.sh (scripts/test.sh does) for the openai SDK",
    );
    let probe = std::process::Command::new(&python).args(["-c", "import openai"]).status();
    assert!(probe.is_ok_and(|s| s.success()), "{python} cannot import openai");
    python
}

#[tokio::test]
async fn the_official_openai_sdk_streams_calls_and_meets_insufficient_quota() {
    let python = python_with_openai();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/llm/openai_sdk_client.py");
    let command = format!("{python},{}", script.display());
    let gateway = Gateway::start(&[("OATS_LOCAL_AGENT_COMMAND", &command)]).await;
    gateway.fake.push(Reply::text("non-streamed", 10, 5));
    gateway.fake.push(Reply::text("streamed", 10, 5));
    for _ in 0..20 {
        gateway.fake.push(Reply::text("spend", 60, 400));
    }
    let job = gateway.submit(json!({"goal": "sdk", "max_turns": 50, "budget": {"max_tokens": 2000}})).await;
    let id = job["id"].as_str().unwrap();
    let job = gateway.finished(id).await;
    let logs = gateway.logs(id).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{logs}");
    assert!(logs.contains("non-streamed: non-streamed") && logs.contains("streamed: streamed"), "{logs}");
    assert!(logs.contains("refused: insufficient_quota"), "{logs}");
    let usage = &job["usage"];
    assert!(usage["model_calls"].as_u64().unwrap() >= 3, "{job}");
    assert_eq!(usage["refused"], "job_tokens");
}

#[tokio::test]
async fn the_python_example_agent_meets_the_same_contract() {
    let python = python_with_openai();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/agents/python-openai/agent.py");
    let command = format!("{python},{}", script.display());
    let gateway = Gateway::start(&[("OATS_LOCAL_AGENT_COMMAND", &command)]).await;
    gateway.fake.push(Reply::tool("write_file", json!({"path": "plan.md", "content": "1. picnic\n"}), 100, 20));
    gateway.fake.push(Reply::tool("read_file", json!({"path": "plan.md"}), 150, 10));
    gateway.fake.push(Reply::text("The plan is in plan.md.", 200, 30));
    let job = gateway.submit(json!({"goal": "Plan a picnic in plan.md", "max_turns": 5, "model": "test-model"})).await;
    let id = job["id"].as_str().unwrap();
    let job = gateway.finished(id).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", gateway.logs(id).await);
    assert_eq!(job["result"], "The plan is in plan.md.");
    assert_eq!(std::fs::read_to_string(gateway.workspace(id).join("plan.md")).unwrap(), "1. picnic\n");
    assert_eq!(job["usage"]["model_calls"], 3);
}

/// The spans of `trace_id` the receiver got, by name, once `expected` names have all arrived.
async fn spans_of(
    receiver: &common::otlp::Receiver,
    trace_id: &str,
    expected: &[&str],
) -> Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans: Vec<_> =
            receiver.spans.lock().unwrap().iter().filter(|(_, s)| hex(&s.trace_id) == trace_id).cloned().collect();
        // Each name as many times as it is expected.
        let arrived = |name: &str| spans.iter().filter(|(_, s)| s.name == name).count();
        if expected.iter().all(|name| arrived(name) >= expected.iter().filter(|n| *n == name).count()) {
            return spans;
        }
        let names: Vec<_> = spans.iter().map(|(_, s)| s.name.clone()).collect();
        assert!(Instant::now() < deadline, "missing spans of {expected:?}; got {names:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn one_trace_runs_from_the_caller_through_the_job_into_every_model_call() {
    let (receiver, port) = common::otlp::start_receiver().await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let gateway = Gateway::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        // Agents export too: the endpoint is passed to them.
        (
            "OATS_LOCAL_ENV_ALLOWLIST",
            "PATH,OTEL_EXPORTER_OTLP_ENDPOINT,OTEL_EXPORTER_OTLP_PROTOCOL,OTEL_BSP_SCHEDULE_DELAY",
        ),
    ])
    .await;
    gateway.fake.push(Reply::tool("write_file", json!({"path": "a.txt", "content": "x"}), 40, 8));
    gateway.fake.push(Reply::text("done", 50, 4));
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    let response = gateway
        .server
        .http
        .post(gateway.server.url("/api/v1/jobs"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"goal": "Trace me", "max_turns": 3, "model": "test-model"}))
        .send()
        .await
        .unwrap();
    let job: Value = response.json().await.unwrap();
    let job = gateway.finished(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    let expected = ["invoke_agent oats", "execute_tool write_file", "chat test-model", "chat test-model"];
    let spans = spans_of(&receiver, trace_id, &expected).await;
    let chats: Vec<_> = spans.iter().filter(|(_, s)| s.name == "chat test-model").collect();
    assert_eq!(chats.len(), 2, "one span per model call");
    let agent = spans.iter().find(|(_, s)| s.name == "invoke_agent oats").unwrap();
    assert_eq!(agent.0, "oats-agent", "the agent's spans carry its own service name");
    for (service, chat) in &chats {
        assert_eq!(service, "oats");
        assert_eq!(chat.kind, 3, "CLIENT");
        assert_eq!(chat.parent_span_id, agent.1.span_id, "a child of the agent's span");
        let attribute = |key: &str| common::otlp::attribute(chat, key);
        assert_eq!(attribute("gen_ai.operation.name").as_deref(), Some("chat"));
        assert_eq!(attribute("gen_ai.provider.name").as_deref(), Some("fake"));
        assert_eq!(attribute("gen_ai.request.model").as_deref(), Some("test-model"));
        assert_eq!(attribute("gen_ai.response.model").as_deref(), Some("fake-model"));
        assert!(attribute("gen_ai.usage.input_tokens").is_some_and(|t| t == "40" || t == "50"));
        assert_eq!(attribute("gen_ai.input.messages"), None, "no content unless the tenant's policy opts in");
    }
    // Secrets appear nowhere in what was exported.
    let exported = format!("{:?}", receiver.spans.lock().unwrap());
    assert!(!exported.contains(PROVIDER_KEY) && !exported.contains("oats-job."), "a credential was exported");
}

/// The launcher that agents of other images run under on Kubernetes: installed by copying the
/// binary, it sets OPENAI_API_KEY from the token file and execs the agent.
#[test]
fn the_launcher_hands_the_token_file_to_an_agent_that_reads_openai_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = dir.path().join("oats");
    let installed = std::process::Command::new(env!("CARGO_BIN_EXE_oats"))
        .args(["install-launcher", launcher.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(installed.success());
    let token = dir.path().join("token");
    std::fs::write(&token, "eyJ.projected.token\n").unwrap();
    let output = std::process::Command::new(&launcher)
        .args(["launch", "--", "sh", "-c", "echo \"key=$OPENAI_API_KEY\"; exit 7"])
        .env_remove("OPENAI_API_KEY")
        .env("OATS_LLM_TOKEN_FILE", &token)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "key=eyJ.projected.token\n");
    assert_eq!(output.status.code(), Some(7), "the agent's own exit code");
    let missing = std::process::Command::new(&launcher)
        .args(["launch", "--", "true"])
        .env_remove("OPENAI_API_KEY")
        .env("OATS_LLM_TOKEN_FILE", dir.path().join("absent"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read the job's credential"));
}

#[tokio::test]
async fn a_long_answer_is_cut_for_the_result_and_kept_whole_in_result_md() {
    let gateway = Gateway::start(&[]).await;
    let answer = format!("{}\nThe end.", "All work and no play. ".repeat(250));
    assert!(answer.len() > 5000);
    gateway.fake.push(Reply::tool("final_answer", json!({"answer": answer}), 10, 5));
    let job = gateway.submit(json!({"goal": "Write a lot", "max_turns": 3})).await;
    let id = job["id"].as_str().unwrap();
    let job = gateway.finished(id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let result = job["result"].as_str().unwrap();
    assert!(result.len() <= 4096, "{} bytes", result.len());
    assert!(
        result.starts_with("All work and no play.")
            && result.ends_with("[The full answer is in result.md in the workspace.]")
    );
    assert_eq!(std::fs::read_to_string(gateway.workspace(id).join("result.md")).unwrap(), answer);
}

#[tokio::test]
async fn the_agent_stops_with_a_partial_result_as_its_deadline_nears() {
    // A 12 s job keeps back a fifth: after a 10 s model call the agent is past its own deadline
    // and stops, before the server's timeout kills it.
    let gateway = Gateway::start_with_timeout(&[], 30).await;
    gateway.fake.push(Reply::tool("write_file", json!({"path": "notes.md", "content": "n"}), 10, 5));
    gateway.fake.push(Reply::Slow {
        delay: Duration::from_millis(9_800),
        then: Box::new(Reply::tool("list_files", json!({}), 10, 5)),
    });
    let job = gateway.submit(json!({"goal": "Take your time", "max_turns": 10, "timeout_seconds": 12})).await;
    let job = gateway.finished(job["id"].as_str().unwrap()).await;
    assert_eq!((job["status"].as_str(), job["reason"].as_str()), (Some("failed"), Some("DeadlineExceeded")), "{job}");
    assert!(job["message"].as_str().unwrap().contains("stopped as its deadline neared"), "{job}");
    let result = job["result"].as_str().unwrap();
    assert!(result.contains("deadline is near") && result.contains("notes.md"), "{result}");
}

/// A TCP relay to a server, that the test can cut (an outage of the database, say).
struct Relay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn to(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { port, task }
    }

    /// Cut every connection and refuse new ones.
    fn cut(&self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn without_its_ledger_the_gateway_forwards_nothing_and_the_api_keeps_serving() {
    let url = common::stores::postgres_url();
    let (head, rest) = url.rsplit_once('@').unwrap();
    let (host_port, database) = rest.split_once('/').unwrap();
    let relay = Relay::to(host_port.parse().unwrap()).await;
    let through_relay = format!("{head}@127.0.0.1:{}/{database}", relay.port);
    let gateway =
        Gateway::start(&[("OATS_LOCAL_AGENT_COMMAND", WAITING_AGENT), ("OATS_DATABASE_URL", &through_relay)]).await;
    let job = gateway.submit(json!({"goal": "wait", "max_turns": 10})).await;
    let id = job["id"].as_str().unwrap();
    let key = credential_of(&gateway, id).await;
    let ask = json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(chat(&gateway, &key, ask.clone()).await.status(), StatusCode::OK);

    relay.cut();
    let response = chat(&gateway, &key, ask).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "service_unavailable", "{error}");
    assert!(!error.to_string().contains(head), "no database URL in the answer");
    assert_eq!(gateway.chat_requests().len(), 1, "nothing was forwarded without the ledger");
    // The API still answers (usage is shown when it can be).
    let job = gateway.server.job(id).await;
    assert_eq!(job["status"], "running");
    let metrics = gateway.metrics().await;
    assert_eq!(sample(&metrics, r#"oats_llm_budget_refusals_total{reason="ledger_unavailable"}"#), 1.0);
    assert!(
        !gateway.server.log_text().contains(head.rsplit_once(':').unwrap().1),
        "the database password is in the log"
    );
}

#[tokio::test]
async fn the_tenant_policy_is_enforced_on_every_call_and_the_providers_file_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "defaults:\n  allowed_models: [test-model]\n  daily_spend_limit_usd: 0.0003\n").unwrap();
    let gateway =
        Gateway::start(&[("OATS_LOCAL_AGENT_COMMAND", WAITING_AGENT), ("OATS_POLICY_FILE", policy.to_str().unwrap())])
            .await;
    let job = gateway.submit(json!({"goal": "wait", "max_turns": 50})).await;
    let id = job["id"].as_str().unwrap();
    let key = credential_of(&gateway, id).await;

    // A model the tenant may not use: refused before any upstream call, whatever the job said.
    let providers = gateway.dir.path().join("providers.yaml");
    let yaml = std::fs::read_to_string(&providers).unwrap();
    std::fs::write(
        &providers,
        format!(
            "{yaml}      - name: other-model\n        input_per_million_usd: 1\n        output_per_million_usd: 1\n"
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = gateway.server.http.get(format!("{}/models", gateway.url)).bearer_auth(&key).send().await.unwrap();
        let models: Value = answer.json().await.unwrap();
        // The tenant may use test-model only, so the reloaded file is seen through a direct call.
        let other = chat(&gateway, &key, json!({"model": "other-model", "messages": []})).await.status();
        if other == StatusCode::FORBIDDEN {
            assert_eq!(models["data"].as_array().unwrap().len(), 1, "{models}");
            break;
        }
        assert_eq!(other, StatusCode::NOT_FOUND, "before the reload the model does not exist");
        assert!(Instant::now() < deadline, "the providers file was not reloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gateway.chat_requests().len(), 0);

    // The day's limit ($0.0003) holds: calls of 60 + 90 tokens at $1/$2 per million cost $0.00024
    // each once settled, but each reserves its worst case first.
    let mut refused = None;
    for _ in 0..5 {
        gateway.fake.push(Reply::text("x", 60, 90));
        let response = chat(
            &gateway,
            &key,
            json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 90}),
        )
        .await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(response.json::<Value>().await.unwrap());
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
    }
    let refused = refused.expect("the daily limit refused a call");
    assert_eq!(refused["error"]["type"], "insufficient_quota", "{refused}");
    assert_eq!(gateway.server.job(id).await["usage"]["refused"], "tenant_daily_spend");
    let (_, report) = gateway.server.get_json("/api/v1/usage").await;
    assert!(report["total_cost_usd"].as_f64().unwrap() <= 0.0003, "{report}");
}

#[tokio::test]
async fn usage_moves_live_in_the_watch_stream_and_fields_pass_through_untouched() {
    use futures::StreamExt;
    let gateway = Gateway::start(&[("OATS_LOCAL_AGENT_COMMAND", WAITING_AGENT)]).await;
    let job = gateway.submit(json!({"goal": "wait", "max_turns": 10})).await;
    let id = job["id"].as_str().unwrap();
    let key = credential_of(&gateway, id).await;
    gateway.server.wait_for(id, "running", Duration::from_secs(10)).await;
    let watch = gateway.server.http.get(gateway.server.url(&format!("/api/v1/jobs/{id}/watch"))).send().await.unwrap();
    let mut events = watch.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\n\n") {
        seen.push_str(&String::from_utf8_lossy(&events.next().await.unwrap().unwrap()));
    }
    assert!(!seen.contains("\"usage\""), "no usage before the first call: {seen}");

    let ask = json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"}, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "temperature": 0.25, "seed": 7});
    gateway.fake.push(Reply::text("{}", 21, 3));
    assert_eq!(chat(&gateway, &key, ask.clone()).await.status(), StatusCode::OK);
    let forwarded = gateway.chat_requests().pop().unwrap().body;
    for field in ["response_format", "tools", "temperature", "seed", "messages"] {
        assert_eq!(forwarded[field], ask[field], "{field} was changed on the way");
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains("\"model_calls\":1") {
        assert!(Instant::now() < deadline, "no event with the usage: {seen}");
        let chunk = tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("\"input_tokens\":21"), "{seen}");
}
