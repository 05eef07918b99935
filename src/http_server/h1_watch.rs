//! Watch streams over HTTP/1.1, served without hyper. hyper keeps an 8 KiB read buffer and an
//! 8 KiB write buffer for the life of every HTTP/1 connection (and cannot be given less), which
//! is most of what an idle watch stream costs over HTTP/1.1; a watch is one GET whose response
//! streams for hours, so it needs none of them once its head is read.
//!
//! A connection whose first bytes (as many as have arrived, up to 1 KiB) hold a whole request
//! line `GET /api/v1/jobs/<id>/watch[?…] HTTP/1.1` is served here; any other stays with hyper.
//! Its head is read into a buffer bounded by the listener's head limit (431 beyond it) within the
//! header read timeout (closed after it), the buffer is freed, the listener's endpoint answers,
//! and the response is written as it comes (chunked when streamed), with `connection: close`.
//! Like hyper, a peer that closes its side ends the response. At shutdown the response goes on
//! (the watch ends itself with its closing event) until the grace period ends.

use super::{Connection, HttpLimits, PoemBody};
use http::{Method, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use poem::Endpoint;
use std::io;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
    time::Instant,
};

/// The most headers a request may have (hyper's limit too; more gets 431).
const MAX_HEADERS: usize = 100;

/// How much of a connection's first bytes is looked at, and the head buffer's first size: a
/// watch's head is a few hundred bytes.
const PEEK_BYTES: usize = 1024;

/// A buffer holding the connection's first bytes (peeked, not yet read) when they start with a
/// watch's request line; `None` for any other request.
pub(super) async fn peek_watch(stream: &TcpStream) -> Option<Vec<u8>> {
    let mut buffer = vec![0; PEEK_BYTES];
    let peeked = stream.peek(&mut buffer).await.ok()?;
    is_watch_request_line(&buffer[..peeked]).then_some(buffer)
}

/// Whether `first` starts with a complete request line `GET /api/v1/jobs/<id>/watch[?query]
/// HTTP/1.1`. Which request it is only chooses the server: the endpoint routes it either way.
fn is_watch_request_line(first: &[u8]) -> bool {
    let Some(end) = first.windows(2).position(|pair| pair == b"\r\n") else { return false };
    let Some(target) = first[..end].strip_prefix(b"GET /api/v1/jobs/").and_then(|t| t.strip_suffix(b" HTTP/1.1"))
    else {
        return false;
    };
    let path = target.split(|&byte| byte == b'?').next().unwrap_or_default();
    path.strip_suffix(b"/watch").is_some_and(|id| !id.is_empty() && !id.contains(&b'/'))
}

/// Serve the connection's one request, whose head is in `stream` (and peeked into `buffer`), and
/// close it. The head must have arrived by `head_deadline`.
pub(super) async fn serve<E: Endpoint<Output = poem::Response> + 'static>(
    connection: &Connection<E>,
    mut stream: TcpStream,
    buffer: Vec<u8>,
    head_deadline: Instant,
) {
    let limit = connection.limits.max_header_bytes.max(HttpLimits::MIN_HEADER_BYTES);
    let head = tokio::select! {
        head = tokio::time::timeout_at(head_deadline, read_head(&mut stream, buffer, limit)) => match head {
            Ok(Ok(head)) => head,
            // Closed, broken, or too slow (slowloris).
            Ok(Err(_)) | Err(_) => return,
        },
        () = connection.graceful.cancelled() => return,
    };
    let (mut reader, writer) = stream.split();
    // Boxed: the request's future is done when the stream starts; inline, its size would stay in
    // the connection's task for the stream's life.
    let answer = Box::pin(answer(connection, head));
    let respond = async move { write_response(writer, answer.await).await };
    // Ended early by the peer closing its side or by the end of the shutdown's grace period.
    tokio::select! {
        _ = respond => {}
        () = closed_by_peer(&mut reader) => {}
        () = connection.hard.cancelled() => {}
    }
}

/// The endpoint's response to the request, or a bare one with the status that refuses it.
async fn answer<E: Endpoint<Output = poem::Response>>(
    connection: &Connection<E>,
    head: Result<http::request::Parts, StatusCode>,
) -> http::Response<PoemBody> {
    match head {
        Ok(parts) => {
            let parts = poem::RequestParts::from((
                parts,
                poem::web::LocalAddr(poem::Addr::SocketAddr(connection.local)),
                poem::web::RemoteAddr(poem::Addr::SocketAddr(connection.remote)),
                http::uri::Scheme::HTTP,
            ));
            let request = poem::Request::from_parts(parts, poem::Body::empty());
            connection.endpoint.get_response(request).await.into()
        }
        Err(status) => {
            let mut response = http::Response::new(PoemBody::default());
            *response.status_mut() = status;
            response
        }
    }
}

/// Read the request head into `buffer`, grown up to `limit` bytes: the request, or the status
/// that refuses it. The buffer is dropped when the head has been read.
async fn read_head(
    stream: &mut TcpStream,
    mut buffer: Vec<u8>,
    limit: usize,
) -> io::Result<Result<http::request::Parts, StatusCode>> {
    let mut filled = 0;
    loop {
        let read = stream.read(&mut buffer[filled..]).await?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // A head ends with a line end: parsed only when one arrives, not once per byte of a slow one.
        let line_ended = buffer[filled..filled + read].contains(&b'\n');
        filled += read;
        if let Some(parsed) = line_ended.then(|| parse(&buffer[..filled])).flatten() {
            return Ok(parsed);
        }
        if filled == limit {
            return Ok(Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        }
        if filled == buffer.len() {
            buffer.resize((2 * filled).min(limit), 0);
        }
    }
}

/// The request whose head `bytes` start with, or the status that refuses it; `None` while the
/// head is incomplete. A watch has no body: a request that declares one gets 400 (its body is
/// never read, and the connection ends with the response).
fn parse(bytes: &[u8]) -> Option<Result<http::request::Parts, StatusCode>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    match head.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return None,
        Err(httparse::Error::TooManyHeaders) => return Some(Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)),
        Err(_) => return Some(Err(StatusCode::BAD_REQUEST)),
    }
    let mut request = http::Request::builder()
        .method(head.method.unwrap_or_default())
        .uri(head.path.unwrap_or_default())
        .version(Version::HTTP_11);
    for field in head.headers.iter() {
        request = request.header(field.name, field.value);
    }
    let Ok(request) = request.body(()) else { return Some(Err(StatusCode::BAD_REQUEST)) };
    let (parts, ()) = request.into_parts();
    let declares_body = parts.headers.contains_key(header::TRANSFER_ENCODING)
        || parts.headers.get(header::CONTENT_LENGTH).is_some_and(|length| length != "0");
    Some(if parts.method != Method::GET || declares_body { Err(StatusCode::BAD_REQUEST) } else { Ok(parts) })
}

/// Write `response`: its head with `connection: close`, then its body frame by frame as each
/// comes (with `content-length` when its size is known, else chunked); then end the connection.
async fn write_response(mut writer: WriteHalf<'_>, response: http::Response<PoemBody>) -> io::Result<()> {
    let (parts, mut body) = response.into_parts();
    let length = body.size_hint().exact();
    // The head is freed once written.
    writer.write_all(&response_head(parts, length)).await?;
    while let Some(frame) = body.frame().await {
        // Trailers are not sent (poem's responses have none).
        let Ok(data) = frame?.into_data() else { continue };
        if data.is_empty() {
            continue; // an empty chunk would end the body
        }
        if length.is_some() {
            writer.write_all(&data).await?;
        } else {
            let mut chunk = Vec::with_capacity(data.len() + 20);
            chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            chunk.extend_from_slice(&data);
            chunk.extend_from_slice(b"\r\n");
            writer.write_all(&chunk).await?;
        }
    }
    if length.is_none() {
        writer.write_all(b"0\r\n\r\n").await?;
    }
    writer.shutdown().await
}

/// The status line and headers, with the framing, `connection` and `date` headers of our own.
fn response_head(parts: http::response::Parts, length: Option<u64>) -> Vec<u8> {
    let reason = parts.status.canonical_reason().unwrap_or_default();
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", parts.status.as_str()).into_bytes();
    let ours = [header::CONTENT_LENGTH, header::TRANSFER_ENCODING, header::CONNECTION, header::DATE];
    for (name, value) in parts.headers.iter().filter(|(name, _)| !ours.contains(name)) {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let framing = match length {
        Some(length) => format!("content-length: {length}"),
        None => "transfer-encoding: chunked".to_owned(),
    };
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    head.extend_from_slice(format!("{framing}\r\nconnection: close\r\ndate: {date}\r\n\r\n").as_bytes());
    head
}

/// Resolves when the peer closes its side (or the connection breaks); bytes it sends after the
/// request are discarded.
async fn closed_by_peer(reader: &mut ReadHalf<'_>) {
    let mut discarded = [0; 64];
    while reader.read(&mut discarded).await.is_ok_and(|read| read > 0) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_watch_request_line_is_served_here() {
        let watch = |line: &str| is_watch_request_line(line.as_bytes());
        assert!(watch("GET /api/v1/jobs/job-a1/watch HTTP/1.1\r\n"));
        assert!(watch("GET /api/v1/jobs/job-a1/watch?x=1 HTTP/1.1\r\nhost: x\r\n\r\n"));
        assert!(!watch("GET /api/v1/jobs/job-a1/watch HTTP/1.1"), "the line is incomplete");
        assert!(!watch("GET /api/v1/jobs/job-a1/watch HTTP/1.0\r\n"));
        assert!(!watch("GET /api/v1/jobs/job-a1 HTTP/1.1\r\n"));
        assert!(!watch("GET /api/v1/jobs//watch HTTP/1.1\r\n"));
        assert!(!watch("GET /api/v1/jobs/a/b/watch HTTP/1.1\r\n"));
        assert!(!watch("POST /api/v1/jobs/job-a1/watch HTTP/1.1\r\n"));
    }

    #[test]
    fn a_watch_head_declaring_a_body_is_refused() {
        let parsed = |head: &str| parse(head.as_bytes()).map(|parsed| parsed.map(|parts| parts.uri.to_string()));
        let head = "GET /api/v1/jobs/job-a1/watch?x=1 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 7\r\n";
        assert_eq!(parsed(head), None);
        assert_eq!(parsed(&format!("{head}\r\n")), Some(Ok("/api/v1/jobs/job-a1/watch?x=1".to_owned())));
        assert_eq!(
            parsed(&format!("{head}content-length: 0\r\n\r\n")),
            Some(Ok("/api/v1/jobs/job-a1/watch?x=1".to_owned()))
        );
        assert_eq!(parsed(&format!("{head}content-length: 3\r\n\r\nabc")), Some(Err(StatusCode::BAD_REQUEST)));
        assert_eq!(parsed(&format!("{head}transfer-encoding: chunked\r\n\r\n")), Some(Err(StatusCode::BAD_REQUEST)));
        assert_eq!(parsed(&format!("{head}bad header\r\n\r\n")), Some(Err(StatusCode::BAD_REQUEST)));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: y\r\n")).collect();
        assert_eq!(parsed(&format!("{head}{many}\r\n")), Some(Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)));
    }
}
