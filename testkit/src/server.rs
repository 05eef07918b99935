//! `oats serve` as the tests start it: the real binary, on ports of its own choosing.

use crate::Process;
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// The `oats` binary of this build. Cargo tells an integration test where it is at compile time
/// only (`env!("CARGO_BIN_EXE_oats")`), so it is looked up at run time: `$CARGO_BIN_EXE_oats`
/// when set, else `target/<profile>/oats` beside the test's own `target/<profile>/deps/`.
pub fn oats_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_oats") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("a test binary lives in target/<profile>/deps");
    profile_dir.join("oats")
}

/// A running `oats serve` process, killed on drop.
pub struct Server {
    process: Process,
    pub base: String,
    pub log: PathBuf,
    pub http: Client,
}

impl Server {
    /// Start `oats serve` with the local backend in `state_dir`, plus extra `OATS_*` settings.
    pub async fn start_local(state_dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        let mut env: Vec<(String, String)> = vec![
            ("OATS_BACKEND".into(), "local".into()),
            ("OATS_STATE_DIR".into(), state_dir.display().to_string()),
            ("OATS_LOG_FORMAT".into(), "json".into()),
            ("OATS_DEMO_TURN_DELAY_MS".into(), "50".into()),
            ("OATS_LOCAL_ENV_ALLOWLIST".into(), "PATH,OATS_DEMO_TURN_DELAY_MS".into()),
        ];
        env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self::start(env, state_dir).await
    }

    /// Start `oats serve` with `env`, its log in `log_dir`. Every listener binds port 0 unless
    /// `env` says otherwise (the API always does): the server reports the ports it got.
    pub async fn start(env: Vec<(String, String)>, log_dir: &Path) -> Self {
        static STARTED: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(log_dir).unwrap();
        let log = log_dir.join(format!("server-{}.log", STARTED.fetch_add(1, Ordering::Relaxed)));
        let mut command = Command::new(oats_binary());
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_remove("KUBECONFIG")
            .env("OATS_LLM_LISTEN", "127.0.0.1:0")
            .envs(env);
        let http = Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        let process = match Process::start(command, &log, &http, Duration::from_secs(30)).await {
            Ok(process) => process,
            Err(error) => panic!("oats serve did not start: {error}"),
        };
        Self { base: format!("http://{}", process.api()), log, http, process }
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Where the listener `name` (`api`, `metrics`, `llm`) is bound, if the server has it.
    pub fn address(&self, name: &str) -> Option<SocketAddr> {
        self.process.address(name)
    }

    /// The LLM gateway's base URL (`http://127.0.0.1:PORT/v1`); the server must have it on.
    pub fn gateway_url(&self) -> String {
        format!("http://{}/v1", self.address("llm").expect("the LLM gateway is on"))
    }

    /// Stop the server the way an orchestrator does (SIGTERM) and wait for it.
    pub fn stop(mut self) {
        self.process.terminate();
        self.process.wait();
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Wait (up to `within`) for the server to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.process.wait_exit(within)
    }

    /// Kill the server abruptly, as a crash would.
    pub fn crash(mut self) {
        self.process.kill();
    }

    pub async fn submit(&self, body: Value) -> Response {
        self.http.post(self.url("/api/v1/jobs")).json(&body).send().await.unwrap()
    }

    /// Submit and return the created job.
    pub async fn create(&self, goal: &str, max_turns: u32) -> Value {
        let response = self.submit(json!({"goal": goal, "max_turns": max_turns})).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn job(&self, id: &str) -> Value {
        let (status, job) = self.get_json(&format!("/api/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        job
    }

    /// Poll until the job reaches `status` (or fail with the last state seen).
    pub async fn wait_for(&self, id: &str, status: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let job = self.job(id).await;
            if job["status"] == status {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} never reached {status}: {job}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Assert an RFC 9457 problem answer with the given status and type suffix.
pub async fn assert_problem(response: Response, status: u16, problem_type: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "wrong status for {problem_type}");
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("application/problem+json"), "content type {content_type}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], format!("https://oats.dev/problems/{problem_type}"), "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    body
}
