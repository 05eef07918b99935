//! A scripted fake OpenAI-compatible upstream for the gateway and agent tests.
//!
//! [`FakeLlm::start`] serves `GET /v1/models` and `POST /v1/chat/completions` on a loopback port
//! the OS picked. Tests queue [`Reply`]s with [`FakeLlm::push`]; each chat completion request takes
//! the next one (or answers "ok" when the queue is empty), streamed as server-sent events when the
//! request asks for `"stream": true`. Every request is recorded ([`FakeLlm::requests`]) and the fake
//! keeps the sum of the token usage it actually delivered ([`FakeLlm::reported_usage`]), so a test
//! can compare what the gateway metered with what the upstream reported.

use bytes::Bytes;
use futures::{stream, task::AtomicWaker};
use poem::{
    Body, Request, Response, Server,
    http::{StatusCode, uri::Scheme},
    listener::{Acceptor, TcpAcceptor},
    web::{LocalAddr, RemoteAddr},
};
use serde_json::{Value, json};
use std::{
    collections::{HashMap, VecDeque},
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    task::JoinHandle,
};

/// Pause between two streamed chunks, so a client sees them arrive one by one.
const CHUNK_DELAY: Duration = Duration::from_millis(5);

/// A running fake upstream; it stops serving (listener closed, open connections cut) when dropped.
pub struct FakeLlm {
    /// Base URL of the OpenAI-style API, e.g. `http://127.0.0.1:PORT/v1`.
    pub base_url: String,
    state: Arc<State>,
    task: JoinHandle<()>,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The URL path, e.g. `/v1/chat/completions` (no query).
    pub path: String,
    /// Every header, names lowercased, in the order received (`authorization` included).
    pub headers: Vec<(String, String)>,
    /// The body as JSON: `Null` when empty, a JSON string holding the raw text when not JSON.
    pub body: Value,
}

impl Recorded {
    /// The first value of a header (name in lowercase), e.g. `header("authorization")`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Token usage as an OpenAI answer reports it (`total_tokens` is derived).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One scripted answer to a `POST /v1/chat/completions`.
#[derive(Clone, Debug)]
pub enum Reply {
    /// An assistant message with this content (`finish_reason: "stop"`).
    Text { content: String, usage: Usage },
    /// Tool calls as `(function name, arguments JSON text)`; the text is sent verbatim, so it
    /// may be malformed on purpose (`finish_reason: "tool_calls"`).
    ToolCalls { calls: Vec<(String, String)>, usage: Usage },
    /// An error answer: this status, `body` as JSON and a `Retry-After: <seconds>` header when set.
    Status { code: u16, retry_after: Option<u64>, body: Value },
    /// Streaming: the role chunk and the first part of `content`, then the connection is cut
    /// (no final chunk, no `[DONE]`). Non-streaming: the connection is closed without any answer.
    DieMidStream { content: String },
    /// Wait `delay` before answering (before the status line), then answer with `then`.
    Slow { delay: Duration, then: Box<Reply> },
}

impl Reply {
    /// A text answer with this usage.
    pub fn text(s: &str, prompt: u64, completion: u64) -> Reply {
        Reply::Text { content: s.to_owned(), usage: usage(prompt, completion) }
    }

    /// A single well-formed tool call (`args` serialised as the arguments text).
    pub fn tool(name: &str, args: Value, prompt: u64, completion: u64) -> Reply {
        Reply::ToolCalls { calls: vec![(name.to_owned(), args.to_string())], usage: usage(prompt, completion) }
    }
}

fn usage(prompt_tokens: u64, completion_tokens: u64) -> Usage {
    Usage { prompt_tokens, completion_tokens }
}

impl FakeLlm {
    /// Bind 127.0.0.1:0 and serve in a background task until the `FakeLlm` is dropped.
    pub async fn start() -> FakeLlm {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake LLM");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let acceptor =
            KillableAcceptor { inner: TcpAcceptor::from_tokio(listener).unwrap(), conns: state.conns.clone() };
        let endpoint = poem::endpoint::make({
            let state = state.clone();
            move |req| handle(state.clone(), req)
        });
        let task = tokio::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor).run(endpoint).await;
        });
        FakeLlm { base_url: format!("http://127.0.0.1:{port}/v1"), state, task }
    }

    /// Queue a reply; chat completion requests consume the queue in order.
    pub fn push(&self, reply: Reply) {
        self.state.queue.lock().unwrap().push_back(reply);
    }

    /// Every request received so far (any path), in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Sum of the usage of the answers the fake delivered completely (a stream counts once its
    /// `[DONE]` went out, whether or not the client asked for the usage chunk).
    pub fn reported_usage(&self) -> Usage {
        *self.state.usage.lock().unwrap()
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
        for conn in self.state.conns.lock().unwrap().values() {
            conn.kill();
        }
    }
}

#[derive(Default)]
struct State {
    queue: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Recorded>>,
    usage: Mutex<Usage>,
    completions: AtomicU64,
    tool_calls: AtomicU64,
    conns: Registry,
}

impl State {
    fn add_usage(&self, u: Usage) {
        let mut total = self.usage.lock().unwrap();
        total.prompt_tokens += u.prompt_tokens;
        total.completion_tokens += u.completion_tokens;
    }
}

async fn handle(state: Arc<State>, mut req: Request) -> Response {
    let raw = req.take_body().into_bytes().await.unwrap_or_default();
    let body = if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&raw).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned()))
    };
    let path = req.uri().path().to_owned();
    state.requests.lock().unwrap().push(Recorded {
        path: path.clone(),
        headers: req
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect(),
        body: body.clone(),
    });
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/v1/models") => json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]}),
        ),
        ("POST", "/v1/chat/completions") if body.is_object() => {
            let conn =
                req.remote_addr().0.as_socket_addr().and_then(|peer| state.conns.lock().unwrap().get(peer).cloned());
            chat_completion(state, body, conn).await
        }
        ("POST", "/v1/chat/completions") => json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"message": "the body must be a JSON object", "type": "invalid_request_error", "param": null, "code": null}}),
        ),
        (method, _) => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {"message": format!("Unknown request URL: {method} {path}"), "type": "invalid_request_error", "param": null, "code": "unknown_url"}}),
        ),
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    Response::builder().status(status).content_type("application/json").body(body.to_string())
}

/// What a completed answer carries: text, or tool calls as (id, name, arguments).
enum Answer {
    Text(String),
    Tools(Vec<(String, String, String)>),
}

async fn chat_completion(state: Arc<State>, request: Value, conn: Option<Arc<Conn>>) -> Response {
    let n = state.completions.fetch_add(1, Ordering::SeqCst) + 1;
    let mut reply = state.queue.lock().unwrap().pop_front().unwrap_or_else(|| Reply::text("ok", 10, 5));
    while let Reply::Slow { delay, then } = reply {
        tokio::time::sleep(delay).await;
        reply = *then;
    }
    let stream = request["stream"].as_bool() == Some(true);
    let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
    let chunks = Chunks {
        id: format!("chatcmpl-{n}"),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        model: request["model"].as_str().unwrap_or("fake-model").to_owned(),
        include_usage,
    };
    let (answer, usage) = match reply {
        Reply::Slow { .. } => unreachable!("unwrapped above"),
        Reply::Status { code, retry_after, body } => {
            let mut response = json_response(StatusCode::from_u16(code).expect("a valid status code"), &body);
            if let Some(seconds) = retry_after {
                response.headers_mut().insert("retry-after", seconds.into());
            }
            return response;
        }
        Reply::DieMidStream { content } => {
            if !stream {
                // Hyper fails writing the status line and drops the connection: no answer at all.
                if let Some(conn) = &conn {
                    conn.kill();
                }
                return Response::builder().status(StatusCode::OK).finish();
            }
            let mut events = vec![chunks.chunk(json!({"role": "assistant"}), None)];
            let parts = pieces(&content, 3);
            let sent = parts.len().div_ceil(2);
            events.extend(parts.into_iter().take(sent).map(|p| chunks.chunk(json!({"content": p}), None)));
            return sse(events, End::Die(conn));
        }
        Reply::Text { content, usage } => (Answer::Text(content), usage),
        Reply::ToolCalls { calls, usage } => {
            let calls = calls
                .into_iter()
                .map(|(name, args)| {
                    (format!("call_{}", state.tool_calls.fetch_add(1, Ordering::SeqCst) + 1), name, args)
                })
                .collect();
            (Answer::Tools(calls), usage)
        }
    };
    // Like a real model, never more output than the request's `max_tokens` allows.
    let cap = ["max_completion_tokens", "max_tokens"].iter().find_map(|k| request[*k].as_u64());
    let usage =
        Usage { completion_tokens: cap.map_or(usage.completion_tokens, |c| usage.completion_tokens.min(c)), ..usage };
    let usage_json = json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    });
    let finish_reason = match answer {
        Answer::Text(_) => "stop",
        Answer::Tools(_) => "tool_calls",
    };
    if !stream {
        let message = match &answer {
            Answer::Text(content) => json!({"role": "assistant", "content": content}),
            Answer::Tools(calls) => json!({
                "role": "assistant",
                "content": null,
                "tool_calls": calls.iter().map(|(id, name, args)| json!({
                    "id": id, "type": "function", "function": {"name": name, "arguments": args},
                })).collect::<Vec<_>>(),
            }),
        };
        let body = json!({
            "id": chunks.id,
            "object": "chat.completion",
            "created": chunks.created,
            "model": chunks.model,
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
            "usage": usage_json,
        })
        .to_string();
        // Counted when the body is handed to the connection, not when the handler returns.
        let body = stream::once(async move {
            state.add_usage(usage);
            Ok::<_, io::Error>(Bytes::from(body))
        });
        return Response::builder().content_type("application/json").body(Body::from_bytes_stream(body));
    }
    let mut events = vec![chunks.chunk(json!({"role": "assistant"}), None)];
    match answer {
        Answer::Text(content) => {
            events.extend(pieces(&content, 3).into_iter().map(|p| chunks.chunk(json!({"content": p}), None)));
        }
        Answer::Tools(calls) => {
            for (index, (id, name, args)) in calls.into_iter().enumerate() {
                events.push(chunks.chunk(
                    json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                    None,
                ));
                events.extend(pieces(&args, 2).into_iter().map(|p| {
                    chunks.chunk(json!({"tool_calls": [{"index": index, "function": {"arguments": p}}]}), None)
                }));
            }
        }
    }
    events.push(chunks.finish(finish_reason));
    if include_usage {
        events.push(chunks.usage(usage_json));
    }
    events.push("[DONE]".to_owned());
    sse(events, End::Complete(state, usage))
}

/// Builds the `chat.completion.chunk` objects of one streamed answer.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Chunks {
    fn object(&self, choices: Value, usage: Option<Value>) -> String {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        // Like OpenAI: with include_usage every chunk has `usage`, null but on the last one.
        if self.include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        chunk.to_string()
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> String {
        self.object(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]), None)
    }

    fn finish(&self, finish_reason: &str) -> String {
        self.chunk(json!({}), Some(finish_reason))
    }

    fn usage(&self, usage: Value) -> String {
        self.object(json!([]), Some(usage))
    }
}

/// Split `s` into at most `n` non-empty parts on character boundaries (none when `s` is empty).
fn pieces(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return Vec::new();
    }
    chars.chunks(chars.len().div_ceil(n)).map(|c| c.iter().collect()).collect()
}

/// How a streamed answer ends once its events are out.
enum End {
    /// Delivered: count the usage.
    Complete(Arc<State>, Usage),
    /// Cut the connection (no terminating chunk reaches the client).
    Die(Option<Arc<Conn>>),
}

/// A `text/event-stream` answer: one `data:` event per item, `CHUNK_DELAY` apart. Hyper flushes
/// whenever the body is pending, so each event reaches the client as it is produced.
fn sse(events: Vec<String>, end: End) -> Response {
    let body = stream::unfold((events.into_iter(), Some(end), true), |(mut events, mut end, first)| async move {
        if let Some(event) = events.next() {
            if !first {
                tokio::time::sleep(CHUNK_DELAY).await;
            }
            return Some((Ok(Bytes::from(format!("data: {event}\n\n"))), (events, end, false)));
        }
        match end.take()? {
            End::Complete(state, usage) => {
                state.add_usage(usage);
                None
            }
            End::Die(conn) => {
                // Let hyper flush what was sent, then cut the connection under it.
                tokio::time::sleep(CHUNK_DELAY).await;
                if let Some(conn) = conn {
                    conn.kill();
                }
                Some((
                    Err(io::Error::new(io::ErrorKind::ConnectionAborted, "fake LLM died mid-stream")),
                    (events, None, false),
                ))
            }
        }
    });
    Response::builder()
        .content_type("text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_bytes_stream(body))
}

// --- Connections the fake can cut: a TCP acceptor whose streams fail once killed. ---

type Registry = Arc<Mutex<HashMap<SocketAddr, Arc<Conn>>>>;

/// The kill switch of one accepted connection, found by the peer address.
#[derive(Default)]
struct Conn {
    killed: AtomicBool,
    read: AtomicWaker,
    write: AtomicWaker,
}

impl Conn {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.read.wake();
        self.write.wake();
    }

    fn check(&self, waker: &AtomicWaker, cx: &Context<'_>) -> io::Result<()> {
        waker.register(cx.waker());
        if self.killed.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "connection cut by the fake LLM"));
        }
        Ok(())
    }
}

struct KillableAcceptor {
    inner: TcpAcceptor,
    conns: Registry,
}

impl Acceptor for KillableAcceptor {
    type Io = KillableIo;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(KillableIo, LocalAddr, RemoteAddr, Scheme)> {
        let (stream, local, remote, scheme) = self.inner.accept().await?;
        let peer = *remote.0.as_socket_addr().expect("a TCP peer");
        let conn = Arc::new(Conn::default());
        self.conns.lock().unwrap().insert(peer, conn.clone());
        let io = KillableIo { inner: stream, conn, peer, conns: self.conns.clone() };
        Ok((io, local, remote, scheme))
    }
}

struct KillableIo {
    inner: TcpStream,
    conn: Arc<Conn>,
    peer: SocketAddr,
    conns: Registry,
}

impl Drop for KillableIo {
    fn drop(&mut self) {
        let mut conns = self.conns.lock().unwrap();
        if conns.get(&self.peer).is_some_and(|c| Arc::ptr_eq(c, &self.conn)) {
            conns.remove(&self.peer);
        }
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.conn.check(&this.conn.read, cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.conn.check(&this.conn.write, cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.conn.check(&this.conn.write, cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.conn.check(&this.conn.write, cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
