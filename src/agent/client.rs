//! The agent's side of the gateway: OpenAI chat completions over HTTP, with the job's credential
//! and trace context on every call.

use serde_json::{Value, json};
use std::time::Duration;

/// Why a model call gave no answer, in the terms the loop acts on.
#[derive(Debug)]
pub enum ChatError {
    /// The gateway refused: the budget cannot pay.
    BudgetExhausted(String),
    /// The gateway refused: `max_turns` calls were made.
    CallCap(String),
    Other(String),
}

impl std::fmt::Display for ChatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BudgetExhausted(why) | Self::CallCap(why) | Self::Other(why) => f.write_str(why),
        }
    }
}

/// One answer: the assistant message and the tokens the call used.
pub struct Answer {
    pub message: Value,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The job's credential: given once (local backend), or a file the kubelet rotates in place
/// (Kubernetes: a projected service-account token), read for each call.
#[derive(Clone)]
pub enum Credential {
    Fixed(String),
    File(std::path::PathBuf),
}

impl Credential {
    fn current(&self) -> String {
        match self {
            Self::Fixed(key) => key.clone(),
            Self::File(path) => std::fs::read_to_string(path).map(|t| t.trim().to_owned()).unwrap_or_default(),
        }
    }
}

pub struct ModelClient {
    http: reqwest::Client,
    base_url: String,
    credential: Credential,
    traceparent: Option<String>,
}

/// Retries of calls the gateway says may be retried (a provider briefly unavailable).
const RETRIES: u32 = 3;

impl ModelClient {
    pub fn new(base_url: &str, credential: Credential, traceparent: Option<String>) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(600)).build().expect("an HTTP client builds");
        Self { http, base_url: base_url.trim_end_matches('/').to_owned(), credential, traceparent }
    }

    fn request(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let builder = builder.bearer_auth(self.credential.current());
        // The current span's context when the agent exports spans, else the job's own.
        let traceparent =
            crate::telemetry::trace::context_header(&tracing::Span::current()).or(self.traceparent.clone());
        match traceparent {
            Some(traceparent) => builder.header("traceparent", traceparent),
            None => builder,
        }
    }

    /// The first model the job may use.
    pub async fn first_model(&self) -> Result<String, ChatError> {
        let response = self
            .request(self.http.get(format!("{}/models", self.base_url)))
            .send()
            .await
            .map_err(|e| ChatError::Other(format!("cannot reach the gateway: {e}")))?;
        let body: Value = response.json().await.map_err(|e| ChatError::Other(e.to_string()))?;
        body.pointer("/data/0/id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ChatError::Other("the gateway lists no model for this job".into()))
    }

    pub async fn chat(&self, model: &str, messages: &[Value], tools: Value) -> Result<Answer, ChatError> {
        let body = json!({"model": model, "messages": messages, "tools": tools});
        let mut attempt = 0;
        loop {
            let sent =
                self.request(self.http.post(format!("{}/chat/completions", self.base_url))).json(&body).send().await;
            let response = match sent {
                Ok(response) => response,
                Err(error) if attempt < RETRIES => {
                    attempt += 1;
                    eprintln!("agent: model call failed ({error}); retrying");
                    tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                    continue;
                }
                Err(error) => return Err(ChatError::Other(format!("cannot reach the gateway: {error}"))),
            };
            let status = response.status();
            let retryable = response.headers().get("x-should-retry").and_then(|v| v.to_str().ok()) == Some("true");
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if status.is_success() {
                let message =
                    body.pointer("/choices/0/message").cloned().unwrap_or_else(|| json!({"role": "assistant"}));
                let count = |key: &str| body.pointer(&format!("/usage/{key}")).and_then(Value::as_u64).unwrap_or(0);
                return Ok(Answer {
                    message,
                    input_tokens: count("prompt_tokens"),
                    output_tokens: count("completion_tokens"),
                });
            }
            let code = body.pointer("/error/code").and_then(Value::as_str).unwrap_or_default();
            let message = body.pointer("/error/message").and_then(Value::as_str).unwrap_or("no detail").to_owned();
            match code {
                "insufficient_quota" => return Err(ChatError::BudgetExhausted(message)),
                "max_calls_reached" => return Err(ChatError::CallCap(message)),
                _ if retryable && attempt < RETRIES => {
                    attempt += 1;
                    eprintln!("agent: model call answered {status} ({message}); retrying");
                    tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                }
                _ => return Err(ChatError::Other(format!("{status}: {message}"))),
            }
        }
    }
}
