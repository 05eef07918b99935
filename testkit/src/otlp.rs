//! OTLP trace sinks: real OTLP/gRPC and OTLP/HTTP receivers that keep every span (the tests read
//! them), and an OTLP/HTTP one that only counts them (the benchmark, where keeping them would cost
//! memory).

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value},
    trace::v1::Span,
};
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

/// An OTLP trace receiver: the collector's gRPC service, keeping every span it gets.
#[derive(Clone, Default)]
pub struct Receiver {
    pub spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.spans.lock().unwrap().extend(spans_by_service(request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// The spans of a request, each with the `service.name` of its resource.
fn spans_by_service(request: ExportTraceServiceRequest) -> impl Iterator<Item = (String, Span)> {
    request.resource_spans.into_iter().flat_map(|resource_spans| {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(string_of)
            .unwrap_or_default();
        resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans).map(move |span| (service.clone(), span))
    })
}

pub fn string_of(kv: &KeyValue) -> Option<String> {
    match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        _ => None,
    }
}

pub fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(string_of)
}

pub async fn start_receiver() -> (Receiver, u16) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream_of(listener))
            .await
            .unwrap();
    });
    (receiver, port)
}

/// Accepted connections of `listener` as the stream tonic serves from.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

/// One request an [`HttpReceiver`] got.
#[derive(Clone, Debug)]
pub struct HttpExport {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The spans of the decoded `ExportTraceServiceRequest`, with their service name.
    pub spans: Vec<(String, Span)>,
}

impl HttpExport {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// An OTLP/HTTP trace receiver: any path and method is recorded (the tests check them), the body
/// decoded as a protobuf `ExportTraceServiceRequest`; stopped when dropped.
pub struct HttpReceiver {
    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    pub exports: Arc<Mutex<Vec<HttpExport>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpReceiver {
    pub async fn start() -> std::io::Result<Self> {
        use poem::{Body, EndpointExt as _, Request, Response, handler, http::StatusCode, web::Data};
        use prost::Message as _;
        #[handler]
        async fn export(request: &Request, body: Body, exports: Data<&Arc<Mutex<Vec<HttpExport>>>>) -> Response {
            let bytes = body.into_bytes().await.unwrap_or_default();
            let Ok(decoded) = ExportTraceServiceRequest::decode(bytes) else {
                return Response::builder().status(StatusCode::BAD_REQUEST).finish();
            };
            let headers = request
                .headers()
                .iter()
                .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
                .collect();
            exports.lock().unwrap().push(HttpExport {
                method: request.method().to_string(),
                path: request.uri().path().to_owned(),
                headers,
                spans: spans_by_service(decoded).collect(),
            });
            let response = ExportTraceServiceResponse { partial_success: None }.encode_to_vec();
            Response::builder().content_type("application/x-protobuf").body(response)
        }
        let exports = Arc::new(Mutex::new(Vec::new()));
        let (endpoint, task) = serve_on_loopback(export.data(exports.clone())).await?;
        Ok(Self { endpoint, exports, task })
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf) that counts the spans it gets,
/// stopped when dropped.
pub struct HttpSink {
    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    pub spans: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpSink {
    pub async fn start() -> std::io::Result<Self> {
        use poem::{Body, EndpointExt as _, Response, Route, handler, post, web::Data};
        #[handler]
        async fn traces(body: Body, spans: Data<&Arc<AtomicU64>>) -> Response {
            let bytes = body.into_bytes().await.unwrap_or_default();
            spans.fetch_add(count_spans(&bytes), Ordering::Relaxed);
            Response::builder().content_type("application/x-protobuf").body(Vec::<u8>::new())
        }
        let spans = Arc::new(AtomicU64::new(0));
        let (endpoint, task) =
            serve_on_loopback(Route::new().at("/v1/traces", post(traces)).data(spans.clone())).await?;
        Ok(Self { endpoint, spans, task })
    }
}

impl Drop for HttpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `app` served by poem on a free loopback port: its `http://127.0.0.1:PORT` and the serving task.
async fn serve_on_loopback(
    app: impl poem::Endpoint + 'static,
) -> std::io::Result<(String, tokio::task::JoinHandle<()>)> {
    use poem::listener::Acceptor as _;
    let acceptor = poem::listener::TcpAcceptor::from_tokio(tokio::net::TcpListener::bind("127.0.0.1:0").await?)?;
    // The socket address itself: poem's `Addr` displays as `socket://…`.
    let address = acceptor.local_addr()[0].as_socket_addr().copied().expect("a TCP listener has a socket address");
    let task = tokio::spawn(async move {
        let _ = poem::Server::new_with_acceptor(acceptor).run(app).await;
    });
    Ok((format!("http://{address}"), task))
}

/// Length-delimited fields number `field` of a protobuf message.
fn proto_fields(mut buf: &[u8], field: u64) -> Vec<&[u8]> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first()?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut out = Vec::new();
    while let Some(key) = varint(&mut buf) {
        let skip = match key & 7 {
            0 => {
                varint(&mut buf);
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let Some(len) = varint(&mut buf) else { break };
                let len = len as usize;
                if len > buf.len() {
                    break;
                }
                if key >> 3 == field {
                    out.push(&buf[..len]);
                }
                len
            }
            _ => break,
        };
        if skip > buf.len() {
            break;
        }
        buf = &buf[skip..];
    }
    out
}

/// Spans in an `ExportTraceServiceRequest` (resource_spans = 1, scope_spans = 2, spans = 2).
fn count_spans(request: &[u8]) -> u64 {
    proto_fields(request, 1)
        .into_iter()
        .flat_map(|rs| proto_fields(rs, 2))
        .map(|ss| proto_fields(ss, 2).len() as u64)
        .sum()
}
