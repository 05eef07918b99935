//! Shared helpers: start the real `oats` binary on a free loopback port and talk to it over HTTP.
#![allow(dead_code)] // each test binary uses a part

pub mod fake_llm;
pub mod otlp;

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running `oats serve` process, killed on drop.
pub struct Server {
    child: Child,
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

    pub async fn start(env: Vec<(String, String)>, log_dir: &Path) -> Self {
        let port = free_port();
        let log = log_dir.join(format!("server-{port}.log"));
        std::fs::create_dir_all(log_dir).unwrap();
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_oats"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env_remove("KUBECONFIG")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start oats serve");
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            http: Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
        };
        server.wait_until_ready().await;
        server
    }

    async fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server did not become ready; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stop the server the way an orchestrator does (SIGTERM) and wait for it.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait (up to `within`) for the server to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Kill the server abruptly, as a crash would.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
