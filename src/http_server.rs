//! The HTTP server of every listener (the API, the metrics port, the LLM gateway): poem endpoints
//! served by hyper with limits that hold against slow and greedy clients, which poem's own server
//! does not offer:
//!
//! - **header read timeout**: a new connection's first request, and any later request once its
//!   first byte arrives, must bring its line and headers within the timeout, or the connection is
//!   closed (slowloris);
//! - **idle timeout**: a connection with no request in progress (kept alive, or connected and
//!   silent) is closed after it; requests in progress, streamed responses included, never are;
//! - **maximum header size**: a larger request head gets 431 (hyper's read buffer limit), and
//!   HTTP/2 header lists are bounded the same way;
//! - **HTTP/2 concurrent streams** per connection are capped;
//! - **open connections** are bounded: at the limit, new connections wait in the kernel's accept
//!   queue until one closes (the timeouts above make sure stalled ones do).
//!
//! Watch streams over HTTP/1.1 are served by `h1_watch` instead, within the same limits: hyper's
//! buffers would be most of what an idle one costs.
//!
//! Shutdown is poem's: when `shutdown` resolves the listener closes, connections finish their
//! requests in progress (idle ones close at once), and after `grace` the rest are dropped.

mod h1_watch;

use bytes::Bytes;
use futures::task::AtomicWaker;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use poem::{Endpoint, IntoEndpoint, Response};
use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;

/// Limits of one listener; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// Largest request head (request line and headers); hyper needs at least 8192.
    pub max_header_bytes: usize,
    pub max_concurrent_streams: u32,
    pub max_connections: usize,
}

impl HttpLimits {
    /// Smallest head limit hyper accepts.
    pub const MIN_HEADER_BYTES: usize = 8192;
}

/// Bind a listener, saying which address failed.
pub async fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {address}: {e}")))
}

/// Write the bound addresses of the listeners to `path`, one `NAME ADDRESS` line each, as a
/// whole file or none (written aside, then renamed): how a caller that asked for port 0 learns
/// which ports it got (`oats serve --addresses-file`).
pub fn write_addresses(path: &std::path::Path, bound: &[(&str, SocketAddr)]) -> io::Result<()> {
    let text: String = bound.iter().map(|(name, address)| format!("{name} {address}\n")).collect();
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)
}

/// Serve `app` on `listener` within `limits` until `shutdown` resolves; then stop accepting, let
/// requests in progress finish for up to `grace` (forever with `None`), and return.
pub async fn serve<E>(
    listener: TcpListener,
    app: E,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
    grace: Option<Duration>,
) -> io::Result<()>
where
    E: IntoEndpoint,
    E::Endpoint: Endpoint<Output = Response> + 'static,
{
    // Not a `BoxEndpoint`: its every call would be one more heap future next to the one each
    // request's service future is (below); with the endpoint's type known, it is one.
    let endpoint = Arc::new(app.into_endpoint());
    let local = listener.local_addr()?;
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = CancellationToken::new();
    let hard = CancellationToken::new();
    tracing::info!(address = %local, max_connections = limits.max_connections, "listening");
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset while queued: wait a moment.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = Connection {
            endpoint: endpoint.clone(),
            limits,
            local,
            remote,
            graceful: graceful.clone(),
            hard: hard.clone(),
        };
        tokio::spawn(async move {
            connection.serve(stream).await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.cancel();
    if let Some(grace) = grace {
        let hard = hard.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            hard.cancel();
        });
    }
    // Every connection holds a permit until it is done.
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = connections.acquire_many(all).await;
    Ok(())
}

/// One accepted connection.
struct Connection<E> {
    endpoint: Arc<E>,
    limits: HttpLimits,
    local: SocketAddr,
    remote: SocketAddr,
    graceful: CancellationToken,
    hard: CancellationToken,
}

impl<E: Endpoint<Output = Response> + 'static> Connection<E> {
    async fn serve(self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let accepted = Instant::now();
        let head_deadline = accepted + self.limits.header_read_timeout;
        let protocol = tokio::select! {
            first = tokio::time::timeout_at(head_deadline, protocol(&stream)) => match first {
                Ok(Some(protocol)) => protocol,
                // Closed, or silent past the header read timeout, before a first byte.
                Ok(None) | Err(_) => return,
            },
            () = self.graceful.cancelled() => return,
        };
        // The first bytes have arrived: peeking at them again does not wait.
        if protocol == Protocol::Http1
            && let Some(buffer) = h1_watch::peek_watch(&stream).await
        {
            h1_watch::serve(&self, stream, buffer, head_deadline).await;
            return;
        }
        // Boxed: hyper's connection state would make every connection's task its size, watch
        // streams served by `h1_watch` included.
        Box::pin(self.serve_with_hyper(stream, protocol, accepted)).await;
    }

    async fn serve_with_hyper(self, stream: TcpStream, protocol: Protocol, accepted: Instant) {
        let activity = Arc::new(Activity::new(accepted, self.limits));
        let io = Guarded::new(stream, activity.clone());
        let (endpoint, local, remote) = (self.endpoint.clone(), self.local, self.remote);
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let endpoint = endpoint.clone();
            let in_flight = InFlight::start(activity.clone());
            // Boxed: hyper keeps a slot of the service future's size for the connection's life,
            // and a streamed response (a watch) outlives its future by hours.
            Box::pin(async move {
                let request = poem::Request::from((
                    request,
                    poem::web::LocalAddr(poem::Addr::SocketAddr(local)),
                    poem::web::RemoteAddr(poem::Addr::SocketAddr(remote)),
                    http::uri::Scheme::HTTP,
                ));
                // `E::call`, not `get_response` nor `endpoint.call` (that is `Arc<E>`'s): each
                // wraps E's future in one more holding a copy of the request and of E's future.
                let response = E::call(&endpoint, request).await.unwrap_or_else(poem::Error::into_response);
                let response: http::Response<PoemBody> = response.into();
                // The request counts as in progress until its body has been sent (or dropped).
                Ok::<_, Infallible>(response.map(|body| Tracked { body, _in_flight: in_flight }))
            })
        });
        let io = TokioIo::new(io);
        let max_buf_size = self.limits.max_header_bytes.max(HttpLimits::MIN_HEADER_BYTES);
        // Serve until the connection ends, or until the server shuts down: then ask it to finish
        // its requests in progress, and drop it when the grace period ends. (A macro: rustc cannot
        // prove the future of a generic async fn doing this `Send`.) The first wait polls the
        // connection first and only the graceful token after it, on every wake-up of a busy
        // connection: the hard token is cancelled only after the graceful one, so the second wait
        // sees it.
        macro_rules! serve_until_shutdown {
            ($connection:ident) => {
                tokio::select! {
                    biased;
                    _ = $connection.as_mut() => return,
                    () = self.graceful.cancelled() => {}
                }
                $connection.as_mut().graceful_shutdown();
                tokio::select! {
                    _ = $connection => {}
                    () = self.hard.cancelled() => {}
                }
            };
        }
        // HTTP/1 responses are written from one buffer (head and body copied into it), not as a
        // vectored write of their parts: for the small bodies most answers have, the copy costs
        // less than queueing the parts (GET job: 26.7k -> 26.1k instructions).
        if protocol == Protocol::Http1 {
            let connection = hyper::server::conn::http1::Builder::new()
                .max_buf_size(max_buf_size)
                .writev(false)
                .serve_connection(io, service);
            tokio::pin!(connection);
            serve_until_shutdown!(connection);
            return;
        }
        let mut builder = auto::Builder::new(TokioExecutor::new());
        if protocol == Protocol::Http2 {
            builder = builder.http2_only();
        }
        builder.http1().max_buf_size(max_buf_size).writev(false);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(self.limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(20);
        // Boxed: HTTP/2's state is twice the size of HTTP/1's, and every connection's task would
        // be that size.
        let mut connection = Box::pin(builder.serve_connection(io, service));
        serve_until_shutdown!(connection);
    }
}

/// The HTTP/2 connection preface (prior knowledge, as `h2c` clients send it).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which protocol a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// Only the start of the HTTP/2 preface has arrived: hyper-util's detection reads the rest.
    Unknown,
}

/// The protocol of `stream`, from its first bytes without consuming them; `None` when it closes
/// first. hyper's own detection reads the first bytes into a buffer of 24 and hands them to the
/// HTTP/1 parser first, so the parser's first read falls short of the request and it doubles its
/// 8 KiB read buffer to 16 KiB, kept for the connection's life (thousands of watch streams).
async fn protocol(stream: &TcpStream) -> Option<Protocol> {
    let mut first = [0u8; H2_PREFACE.len()];
    let read = stream.peek(&mut first).await.ok().filter(|read| *read > 0)?;
    Some(if first[..read] != H2_PREFACE[..read] {
        Protocol::Http1
    } else if read == H2_PREFACE.len() {
        Protocol::Http2
    } else {
        Protocol::Unknown
    })
}

/// poem's response body type.
type PoemBody = http_body_util::combinators::BoxBody<Bytes, io::Error>;

/// What a connection is doing, for its timeouts.
///
/// The reader's timer may fire early (the deadline is then computed again), never late. So it
/// moves only to an earlier instant, not to every request's later idle deadline: a busy
/// connection's requests reset no timer and wake no task, as they did when the timer followed
/// each deadline exactly.
struct Activity {
    state: Mutex<ActivityState>,
    /// The connection's reader, woken when the last request in progress ends and its timer would
    /// fire after the new idle deadline (or is not set).
    reader: AtomicWaker,
    limits: HttpLimits,
}

struct ActivityState {
    /// Requests whose response has not been sent completely.
    in_flight: usize,
    /// When the connection last became idle.
    idle_since: Instant,
    /// When the first byte arrived since then: a request head is on its way.
    head_started: Option<Instant>,
    /// When the reader's timer fires, if it is set.
    armed: Option<Instant>,
}

impl ActivityState {
    /// When the connection is closed unless something happens first: none while a request is in
    /// progress.
    fn deadline(&self, limits: &HttpLimits) -> Option<Instant> {
        match (self.in_flight, self.head_started) {
            (0, Some(started)) => Some(started + limits.header_read_timeout),
            (0, None) => Some(self.idle_since + limits.idle_timeout),
            _ => None,
        }
    }
}

impl Activity {
    /// A connection accepted at `accepted` owes its first request head within the header read
    /// timeout from then.
    fn new(accepted: Instant, limits: HttpLimits) -> Self {
        let state = ActivityState { in_flight: 0, idle_since: accepted, head_started: Some(accepted), armed: None };
        Self { state: Mutex::new(state), reader: AtomicWaker::new(), limits }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bytes_arrived(&self) {
        let mut state = self.lock();
        if state.in_flight == 0 && state.head_started.is_none() {
            state.head_started = Some(Instant::now());
        }
    }

    /// Where the reader's timer must move, if it must: to the deadline when it is not set or would
    /// fire after it; while requests are in progress (no deadline), only when it is not set, to an
    /// idle timeout from now (a check that comes again while they last).
    fn timer_move(&self) -> Option<Instant> {
        let mut state = self.lock();
        let at = match (state.armed, state.deadline(&self.limits)) {
            (Some(armed), Some(deadline)) if armed <= deadline => return None,
            (Some(_), None) => return None,
            (_, Some(deadline)) => deadline,
            (None, None) => Instant::now() + self.limits.idle_timeout,
        };
        state.armed = Some(at);
        Some(at)
    }

    /// The reader's timer fired: whether the deadline has passed (else it was early, and is set
    /// again).
    fn timer_fired(&self) -> bool {
        let mut state = self.lock();
        state.armed = None;
        state.deadline(&self.limits).is_some_and(|deadline| deadline <= Instant::now())
    }
}

/// A request in progress; ends when dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        let mut state = activity.lock();
        state.in_flight += 1;
        state.head_started = None;
        drop(state);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            let now = Instant::now();
            state.idle_since = now;
            state.head_started = None;
            let fires_in_time = state.armed.is_some_and(|armed| armed <= now + self.0.limits.idle_timeout);
            drop(state);
            if !fires_in_time {
                self.0.reader.wake();
            }
        }
    }
}

/// A response body that keeps its request in progress until it is sent or dropped.
struct Tracked {
    body: PoemBody,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket, which reads as closed once the connection's deadline passes.
struct Guarded {
    stream: TcpStream,
    activity: Arc<Activity>,
    timer: Pin<Box<Sleep>>,
    expired: bool,
}

impl Guarded {
    fn new(stream: TcpStream, activity: Arc<Activity>) -> Self {
        let timer = Box::pin(tokio::time::sleep(activity.limits.idle_timeout));
        Self { stream, activity, timer, expired: false }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Ok(())); // end of stream
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity.bytes_arrived();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => {}
        }
        // Registered before the timer is read, so a request ending in between wakes us if it must.
        this.activity.reader.register(cx.waker());
        loop {
            if let Some(at) = this.activity.timer_move() {
                this.timer.as_mut().reset(at);
            }
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if this.activity.timer_fired() {
                // Too slow or idle too long: the connection reads as closed, and hyper closes it.
                this.expired = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// What the server side of a connection detects once the client sent `first` (and closed,
    /// when it sent nothing), and whether the bytes were left for hyper to read.
    async fn detected(first: &[u8]) -> (Option<Protocol>, bool) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        if first.is_empty() {
            drop(client);
        } else {
            client.write_all(first).await.unwrap();
        }
        let detected = protocol(&server).await;
        let mut left = vec![0; first.len()];
        let left_for_hyper = first.is_empty() || server.peek(&mut left).await.unwrap() == first.len() && left == first;
        (detected, left_for_hyper)
    }

    #[tokio::test]
    async fn the_protocol_is_read_from_the_first_bytes_without_consuming_them() {
        assert_eq!(detected(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await, (Some(Protocol::Http1), true));
        assert_eq!(detected(b"PRI /x HTTP/1.1\r\n\r\n").await, (Some(Protocol::Http1), true));
        assert_eq!(detected(H2_PREFACE).await, (Some(Protocol::Http2), true));
        assert_eq!(detected(&H2_PREFACE[..10]).await, (Some(Protocol::Unknown), true));
        assert_eq!(detected(b"").await, (None, true));
    }
}
