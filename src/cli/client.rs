//! HTTP calls of the CLI, with errors that read as one clear line.

use super::{
    Connection,
    output::{CleanStream, Spinner, clean},
    sse::{SseEvent, SseParser},
};
use futures::StreamExt;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;
use std::{fmt, io::Write, path::PathBuf, time::Duration};

/// Why a command failed.
#[derive(Debug)]
pub enum ClientError {
    /// The server could not be reached.
    Connection { url: String, cause: String },
    /// The server answered with an RFC 9457 problem.
    Problem { status: u16, kind: String, title: String, detail: String },
    /// Anything else the server said that is not a job.
    Http(String),
    /// A local problem (a file, stdin).
    Local(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connection { url, cause } => write!(f, "cannot reach {url}: {}", clean(cause)),
            Self::Problem { status, kind, title, detail } => {
                let short = kind.rsplit("/problems/").next().unwrap_or(kind);
                write!(f, "{}: {} (HTTP {status}, {})", clean(title), clean(detail), clean(short))
            }
            Self::Http(message) | Self::Local(message) => f.write_str(&clean(message)),
        }
    }
}

/// The CLI's settings file: `url` and `token`.
#[derive(Debug, Default, serde::Deserialize)]
struct CliConfig {
    url: Option<String>,
    token: Option<String>,
}

/// `$XDG_CONFIG_HOME/oats/cli.yaml`, else `~/.config/oats/cli.yaml`.
fn config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("oats").join("cli.yaml"))
}

pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl ApiClient {
    /// Flags and environment first, then the config file, then `http://localhost:8000`.
    pub fn new(connection: &Connection) -> anyhow::Result<Self> {
        let file: CliConfig = match config_path().filter(|p| p.exists()) {
            Some(path) => serde_saphyr::from_str(&std::fs::read_to_string(&path)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            None => CliConfig::default(),
        };
        let base = connection.url.clone().or(file.url).unwrap_or_else(|| "http://localhost:8000".into());
        let token = connection.token.clone().or(file.token).filter(|t| !t.is_empty());
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build()?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned(), token })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(&self, request: RequestBuilder) -> Result<Response, ClientError> {
        let response = request.send().await.map_err(|e| {
            // The innermost cause says what happened ("Connection refused", a DNS failure, …).
            let mut cause: &dyn std::error::Error = &e;
            while let Some(source) = cause.source() {
                cause = source;
            }
            ClientError::Connection { url: self.base.clone(), cause: cause.to_string() }
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        match body["type"].as_str() {
            Some(kind) => Err(ClientError::Problem {
                status,
                kind: kind.to_owned(),
                title: body["title"].as_str().unwrap_or("error").to_owned(),
                detail: body["detail"].as_str().unwrap_or_default().to_owned(),
            }),
            None => Err(ClientError::Http(format!("the server answered HTTP {status}"))),
        }
    }

    async fn json(&self, request: RequestBuilder) -> Result<Value, ClientError> {
        let response = self.send(request).await?;
        response.json().await.map_err(|e| ClientError::Http(format!("the answer is not JSON: {e}")))
    }

    pub async fn submit(&self, body: &Value, idempotency_key: Option<&str>) -> Result<Value, ClientError> {
        let mut request = self.request(Method::POST, "/api/v1/jobs").json(body);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        self.json(request).await
    }

    pub async fn get(&self, id: &str) -> Result<Value, ClientError> {
        self.json(self.request(Method::GET, &format!("/api/v1/jobs/{id}"))).await
    }

    pub async fn cancel(&self, id: &str) -> Result<Value, ClientError> {
        self.json(self.request(Method::POST, &format!("/api/v1/jobs/{id}/cancel"))).await
    }

    pub async fn list(
        &self,
        status: Option<&str>,
        label: Option<&str>,
        limit: u32,
        page_token: Option<&str>,
    ) -> Result<Value, ClientError> {
        let mut query = vec![("limit", limit.to_string())];
        for (key, value) in [("status", status), ("label", label), ("page_token", page_token)] {
            if let Some(value) = value {
                query.push((key, value.to_owned()));
            }
        }
        self.json(self.request(Method::GET, "/api/v1/jobs").query(&query)).await
    }

    /// Copy a job's output to `out` as it arrives.
    pub async fn stream_logs(
        &self,
        id: &str,
        follow: bool,
        tail: Option<u32>,
        out: &mut impl Write,
    ) -> Result<(), ClientError> {
        let mut query = vec![("follow", follow.to_string())];
        if let Some(tail) = tail {
            query.push(("tail_lines", tail.to_string()));
        }
        let response = self.send(self.request(Method::GET, &format!("/api/v1/jobs/{id}/logs")).query(&query)).await?;
        let mut chunks = response.bytes_stream();
        // The agent's output may hold anything: escape sequences are stripped before printing.
        let mut text = CleanStream::default();
        let mut write = |text: String| {
            out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| ClientError::Local(e.to_string()))
        };
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| ClientError::Connection { url: self.base.clone(), cause: e.to_string() })?;
            write(text.push(&chunk))?;
        }
        write(text.finish())
    }

    /// Watch a job over Server-Sent Events, calling `on_change` for each state, until it
    /// finishes; reconnects with `Last-Event-ID` if the stream ends early (e.g. a server restart).
    pub async fn watch(&self, id: &str, mut on_change: impl FnMut(&Value)) -> Result<Value, ClientError> {
        let mut last_id: Option<String> = None;
        let mut attempts = 0;
        loop {
            let mut request = self.request(Method::GET, &format!("/api/v1/jobs/{id}/watch"));
            if let Some(last) = &last_id {
                request = request.header("Last-Event-ID", last);
            }
            let response = self.send(request).await?;
            let mut parser = SseParser::default();
            let mut chunks = response.bytes_stream();
            while let Some(chunk) = chunks.next().await {
                let Ok(chunk) = chunk else { break };
                for SseEvent { event, id: event_id, data } in parser.push(&chunk) {
                    let change: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                    if event == "shutdown" {
                        continue;
                    }
                    last_id = event_id;
                    let job = &change["job"];
                    on_change(job);
                    if matches!(job["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                        return Ok(job.clone());
                    }
                }
            }
            attempts += 1;
            if attempts > 10 {
                return Err(ClientError::Connection {
                    url: self.base.clone(),
                    cause: "the watch stream kept ending".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Wait until a job leaves `pending`, animating `spinner` meanwhile; returns the job then.
    pub async fn watch_until_started(&self, id: &str, spinner: &mut Spinner) -> Result<Value, ClientError> {
        let response = self.send(self.request(Method::GET, &format!("/api/v1/jobs/{id}/watch"))).await?;
        let mut parser = SseParser::default();
        let mut chunks = response.bytes_stream();
        let mut tick = tokio::time::interval(Duration::from_millis(120));
        let mut latest = Value::Null;
        loop {
            tokio::select! {
                chunk = chunks.next() => {
                    let Some(Ok(chunk)) = chunk else { return self.get(id).await };
                    for event in parser.push(&chunk) {
                        let change: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                        latest = change["job"].clone();
                        if latest["status"] != "pending" {
                            return Ok(latest);
                        }
                    }
                }
                _ = tick.tick() => spinner.tick(&latest),
            }
        }
    }
}
