//! The OTLP/HTTP (protobuf) span exporter: configured by the standard `OTEL_EXPORTER_OTLP_*`
//! variables as `opentelemetry-otlp` 0.33 reads them, sending bodies written by
//! [`otlp_encode`](super::otlp_encode) with a blocking HTTP client on the batch processor's thread,
//! retried as upstream retries (up to 3 times, exponential backoff, `Retry-After`, within the
//! timeout).

use super::otlp_encode::{EncodedResource, export_request};
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    trace::{SpanData, SpanExporter},
};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

const TRACES_PATH: &str = "/v1/traces";
const DEFAULT_ENDPOINT: &str = "http://localhost:4318";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest body sent, as upstream (the OTLP/HTTP specification's recommendation).
const MAX_BODY: usize = 64 * 1024 * 1024;
/// The user agent upstream's exporter sends, kept so collectors see the same client.
const DEFAULT_USER_AGENT: &str = "OTel-OTLP-Exporter-Rust/0.33.1";

/// Why the exporter cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{variable}: invalid endpoint '{value}': {reason}")]
    Endpoint { variable: &'static str, value: String, reason: String },
    #[error("cannot build the OTLP/HTTP client: {0}")]
    Client(String),
}

/// Where and how spans are sent, from the `OTEL_EXPORTER_OTLP_*` variables.
pub struct HttpConfig {
    pub endpoint: reqwest::Url,
    /// Content type, user agent and the configured headers (which may carry secrets: never logged).
    pub headers: HeaderMap,
    pub timeout: Duration,
    /// Settings that were ignored, with why (for a warning once logging is up).
    pub ignored: Vec<String>,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("endpoint", &self.endpoint.as_str())
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpConfig {
    /// The configuration `var` (the process environment, or a test's map) describes. As upstream:
    /// the traces endpoint is used as is, the general one gets `/v1/traces`; signal-specific
    /// headers and timeout win over the general ones; header values are percent-decoded; an
    /// unparsable timeout falls back; compression (not built in, as upstream here) is ignored
    /// with a warning.
    pub fn resolve(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let set = |name: &str| var(name).filter(|value| !value.is_empty());
        let (variable, endpoint) = if let Some(endpoint) = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
        } else {
            let base = set("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
            let path = if base.ends_with('/') { &TRACES_PATH[1..] } else { TRACES_PATH };
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("{base}{path}"))
        };
        let invalid = |reason: String| ConfigError::Endpoint { variable, value: endpoint.clone(), reason };
        let url = reqwest::Url::parse(&endpoint).map_err(|e| invalid(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https".into()));
        }

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        headers.insert(USER_AGENT, HeaderValue::from_static(DEFAULT_USER_AGENT));
        if let Some(list) = var("OTEL_EXPORTER_OTLP_TRACES_HEADERS").or_else(|| var("OTEL_EXPORTER_OTLP_HEADERS")) {
            for (name, value) in parse_headers(&list) {
                if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                    headers.insert(name, value);
                }
            }
        }

        let millis = |name: &str| var(name).and_then(|value| value.parse::<u64>().ok());
        let timeout = millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|| millis("OTEL_EXPORTER_OTLP_TIMEOUT"))
            .map_or(DEFAULT_TIMEOUT, Duration::from_millis);

        let mut ignored = Vec::new();
        for name in ["OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"] {
            match set(name) {
                None => continue,
                Some(value) if value.eq_ignore_ascii_case("none") => break,
                Some(value) => ignored.push(format!(
                    "{name}={value} is ignored: compression is not supported, spans are sent uncompressed"
                )),
            }
        }
        Ok(Self { endpoint: url, headers, timeout, ignored })
    }
}

/// `key=value` pairs separated by commas, values percent-decoded (kept as written when they do not
/// decode), pairs with an empty key or value left out: upstream's reading of the headers variable.
fn parse_headers(list: &str) -> impl Iterator<Item = (&str, String)> {
    list.split_terminator(',').map(str::trim).filter_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        let key = key.trim();
        let value = percent_decode(value.trim()).unwrap_or_else(|| value.to_owned());
        (!key.is_empty() && !value.is_empty()).then_some((key, value))
    })
}

/// `%XX` escapes decoded; `None` when an escape is malformed or the result is not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(value.len());
    let mut rest = value.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// Sends batches of spans over OTLP/HTTP, one request per batch, on a kept-alive connection.
pub struct HttpExporter {
    /// `None` once shut down.
    client: Mutex<Option<reqwest::blocking::Client>>,
    endpoint: reqwest::Url,
    headers: HeaderMap,
    timeout: Duration,
    resource: EncodedResource,
}

impl std::fmt::Debug for HttpExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpExporter").field("endpoint", &self.endpoint.as_str()).finish_non_exhaustive()
    }
}

impl HttpExporter {
    /// Builds the client on a thread of its own: a blocking client must not be built (nor dropped)
    /// inside a Tokio runtime, and this runs inside one.
    pub fn new(config: HttpConfig) -> Result<Self, ConfigError> {
        let timeout = config.timeout;
        let client = std::thread::spawn(move || reqwest::blocking::Client::builder().timeout(timeout).build())
            .join()
            .map_err(|_| ConfigError::Client("the thread building it panicked".into()))?
            .map_err(|e| ConfigError::Client(e.to_string()))?;
        Ok(Self {
            client: Mutex::new(Some(client)),
            endpoint: config.endpoint,
            headers: config.headers,
            timeout,
            resource: EncodedResource::default(),
        })
    }

    fn client(&self) -> Result<reqwest::blocking::Client, OTelSdkError> {
        self.client
            .lock()
            .map_err(|_| OTelSdkError::InternalFailure("the exporter's lock is poisoned".into()))?
            .clone()
            .ok_or(OTelSdkError::AlreadyShutdown)
    }

    /// One POST; the error says whether and when to try again.
    fn send_once(&self, client: &reqwest::blocking::Client, body: &bytes::Bytes) -> Result<bytes::Bytes, Failure> {
        let response =
            client.post(self.endpoint.clone()).headers(self.headers.clone()).body(body.clone()).send().map_err(
                |error| {
                    // No details: they could name the endpoint's credentials; never the headers.
                    let what = if error.is_timeout() {
                        "timed out"
                    } else if error.is_connect() {
                        "cannot connect"
                    } else {
                        "network error"
                    };
                    Failure { message: format!("OTLP/HTTP export failed: {what}"), retry: Retry::Backoff }
                },
            )?;
        let status = response.status();
        if status.is_success() {
            return Ok(response.bytes().unwrap_or_default());
        }
        let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(retry_after);
        let retry = match (status.as_u16(), retry_after) {
            (429 | 503, Some(delay)) => Retry::After(delay),
            (429 | 502 | 503 | 504, _) => Retry::Backoff,
            _ => Retry::Never,
        };
        Err(Failure { message: format!("OTLP/HTTP export failed with status code: {}", status.as_u16()), retry })
    }
}

/// A failed attempt and whether to try again.
struct Failure {
    message: String,
    retry: Retry,
}

#[derive(Clone, Copy)]
enum Retry {
    Never,
    Backoff,
    /// The server asked to wait this long (`Retry-After`).
    After(Duration),
}

/// Upstream's recommended policy: 3 retries, from 100 ms doubling to 1.6 s, up to 100 ms jitter;
/// a server's delay is honoured up to 30 s.
const MAX_RETRIES: usize = 3;
const INITIAL_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_millis(1600);
const MAX_JITTER_MS: u64 = 100;
const MAX_THROTTLE: Duration = Duration::from_secs(30);

/// A `Retry-After` value: seconds or an HTTP date, at most 10 minutes (as upstream).
fn retry_after(value: &str) -> Option<Duration> {
    let seconds = match value.trim().parse::<u64>() {
        Ok(seconds) => seconds,
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .as_secs(),
    };
    Some(Duration::from_secs(seconds.min(600)))
}

impl SpanExporter for HttpExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let client = self.client()?;
        let body = export_request(&self.resource, &batch);
        drop(batch);
        if body.len() > MAX_BODY {
            return Err(OTelSdkError::InternalFailure(format!(
                "the OTLP/HTTP request body is {} bytes, over the limit of {MAX_BODY}; the spans are dropped",
                body.len()
            )));
        }
        let body = bytes::Bytes::from(body);
        let start = Instant::now();
        let mut delay = INITIAL_DELAY;
        let mut delay_cap = MAX_DELAY;
        let mut attempt = 0;
        loop {
            let failure = match self.send_once(&client, &body) {
                Ok(response) => {
                    warn_partial_success(&response);
                    return Ok(());
                }
                Err(failure) => failure,
            };
            let give_up = || Err(OTelSdkError::InternalFailure(failure.message.clone()));
            if attempt >= MAX_RETRIES || start.elapsed() >= self.timeout {
                return give_up();
            }
            match failure.retry {
                Retry::Never => return give_up(),
                Retry::Backoff => {}
                Retry::After(server_delay) => {
                    let server_delay = server_delay.min(MAX_THROTTLE);
                    if server_delay > delay_cap {
                        delay_cap = MAX_THROTTLE;
                    }
                    delay = delay.max(server_delay);
                }
            }
            attempt += 1;
            let sleep = (delay + Duration::from_millis(rand::random_range(0..=MAX_JITTER_MS))).min(delay_cap);
            if sleep >= self.timeout.saturating_sub(start.elapsed()) {
                return give_up();
            }
            tracing::debug!(attempt, delay_ms = sleep.as_millis() as u64, error = %failure.message, "retrying the OTLP export");
            std::thread::sleep(sleep);
            delay = (delay * 2).min(delay_cap);
        }
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        let mut client =
            self.client.lock().map_err(|_| OTelSdkError::InternalFailure("the exporter's lock is poisoned".into()))?;
        client.take().map(drop).ok_or(OTelSdkError::AlreadyShutdown)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = EncodedResource::new(resource);
    }
}

/// Logs what a collector said it rejected (`ExportTraceServiceResponse.partial_success`), as
/// upstream does.
fn warn_partial_success(response: &[u8]) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    use prost::Message as _;
    if let Ok(ExportTraceServiceResponse { partial_success: Some(partial) }) =
        ExportTraceServiceResponse::decode(response)
        && (partial.rejected_spans > 0 || !partial.error_message.is_empty())
    {
        tracing::warn!(
            rejected_spans = partial.rejected_spans,
            error_message = partial.error_message,
            "the OTLP collector rejected spans"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(vars: &[(&str, &str)]) -> Result<HttpConfig, ConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HttpConfig::resolve(|name| vars.get(name).cloned())
    }

    fn endpoint(vars: &[(&str, &str)]) -> String {
        resolve(vars).unwrap().endpoint.to_string()
    }

    #[test]
    fn the_endpoint_is_the_traces_one_as_is_or_the_general_one_with_the_traces_path() {
        assert_eq!(
            endpoint(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")]),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            endpoint(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            endpoint(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector/otlp")]),
            "https://collector/otlp/v1/traces"
        );
        assert_eq!(
            endpoint(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:9999/custom"),
            ]),
            "http://traces:9999/custom"
        );
        assert_eq!(
            endpoint(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
            ]),
            "http://general:4318/v1/traces"
        );
        assert_eq!(endpoint(&[]), "http://localhost:4318/v1/traces");
        for bad in ["not a url", "ftp://collector"] {
            let error = resolve(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", bad)]).unwrap_err().to_string();
            assert!(error.starts_with("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: invalid endpoint"), "{error}");
        }
    }

    #[test]
    fn headers_are_percent_decoded_and_the_traces_variable_wins() {
        let config = resolve(&[(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-collector-key=otlp-secret-123, Authorization=Basic%20dXNlcjpwYXNz",
        )])
        .unwrap();
        assert_eq!(config.headers["x-collector-key"], "otlp-secret-123");
        assert_eq!(config.headers["authorization"], "Basic dXNlcjpwYXNz");
        assert_eq!(config.headers["content-type"], "application/x-protobuf");
        assert_eq!(config.headers["user-agent"], DEFAULT_USER_AGENT);

        let config = resolve(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "general=1"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "traces=2,empty=,=novalue,bad key=x,raw=%zz"),
        ])
        .unwrap();
        assert!(!config.headers.contains_key("general"), "the traces variable replaces the general one");
        assert_eq!(config.headers["traces"], "2");
        assert_eq!(config.headers["raw"], "%zz", "a value that does not decode is kept as written");
        assert!(!config.headers.contains_key("empty"));
        assert_eq!(config.headers.len(), 4, "{:?}", config.headers.keys().collect::<Vec<_>>());
        assert_eq!(percent_decode("a%2Cb%3D%C3%A9"), Some("a,b=é".into()));
        assert_eq!(percent_decode("%4"), None);
    }

    #[test]
    fn the_timeout_is_in_milliseconds_with_the_traces_variable_first() {
        assert_eq!(resolve(&[]).unwrap().timeout, Duration::from_secs(10));
        assert_eq!(resolve(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")]).unwrap().timeout, Duration::from_millis(2500));
        let both = [("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"), ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "700")];
        assert_eq!(resolve(&both).unwrap().timeout, Duration::from_millis(700));
        let unparsable = [("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"), ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "7s")];
        assert_eq!(resolve(&unparsable).unwrap().timeout, Duration::from_millis(2500));
    }

    #[test]
    fn compression_is_ignored_with_a_warning() {
        assert!(resolve(&[]).unwrap().ignored.is_empty());
        assert!(resolve(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "none")]).unwrap().ignored.is_empty());
        let ignored = resolve(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")]).unwrap().ignored;
        assert_eq!(
            ignored,
            [
                "OTEL_EXPORTER_OTLP_COMPRESSION=gzip is ignored: compression is not supported, spans are sent uncompressed"
            ]
        );
        let ignored =
            resolve(&[("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "NONE"), ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")])
                .unwrap()
                .ignored;
        assert!(ignored.is_empty(), "{ignored:?}");
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        assert_eq!(retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(retry_after("100000"), Some(Duration::from_secs(600)));
        assert_eq!(retry_after("Fri, 31 Dec 1999 23:59:59 GMT"), Some(Duration::ZERO));
        assert_eq!(retry_after("soon"), None);
    }

    /// A collector on a loopback socket answering with `statuses` in turn (then 200), recording
    /// each request's head; one thread, connections kept alive as the client likes.
    fn collector(statuses: &[u16]) -> (String, std::sync::Arc<Mutex<Vec<String>>>) {
        use std::io::{BufRead as _, BufReader, Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let heads = std::sync::Arc::new(Mutex::new(Vec::new()));
        let (recorded, statuses) = (heads.clone(), statuses.to_vec());
        let mut statuses = statuses.into_iter();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = BufReader::new(stream.unwrap());
                loop {
                    let mut head = String::new();
                    while !head.ends_with("\r\n\r\n") {
                        if stream.read_line(&mut head).unwrap_or(0) == 0 {
                            break;
                        }
                    }
                    if !head.ends_with("\r\n\r\n") {
                        break;
                    }
                    let length = head
                        .lines()
                        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_owned))
                        .map_or(0, |value| value.trim().parse::<usize>().unwrap());
                    stream.read_exact(&mut vec![0; length]).unwrap();
                    recorded.lock().unwrap().push(head);
                    let status = statuses.next().unwrap_or(200);
                    let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    stream.get_mut().write_all(answer.as_bytes()).unwrap();
                }
            }
        });
        (endpoint, heads)
    }

    fn export_to(endpoint: &str, statuses_seen: usize, heads: &Mutex<Vec<String>>) -> OTelSdkResult {
        let config = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-key=otlp-secret-123"),
        ])
        .unwrap();
        let exporter = HttpExporter::new(config).unwrap();
        let result = futures::executor::block_on(exporter.export(Vec::new()));
        assert_eq!(heads.lock().unwrap().len(), statuses_seen, "{:?}", heads.lock().unwrap());
        result
    }

    #[test]
    fn a_refusal_is_an_error_with_its_status_and_no_header_and_is_not_retried() {
        let (endpoint, heads) = collector(&[401]);
        let error = export_to(&endpoint, 1, &heads).unwrap_err().to_string();
        assert!(error.contains("status code: 401"), "{error}");
        assert!(!error.contains("otlp-secret-123"), "{error}");
        let head = heads.lock().unwrap()[0].to_ascii_lowercase();
        assert!(head.starts_with("post /v1/traces http/1.1\r\n"), "{head}");
        assert!(head.contains("content-type: application/x-protobuf\r\n"), "{head}");
        assert!(head.contains("x-collector-key: otlp-secret-123\r\n"), "{head}");
    }

    #[test]
    fn an_unavailable_collector_is_tried_again() {
        let (endpoint, heads) = collector(&[503, 502]);
        assert!(export_to(&endpoint, 3, &heads).is_ok());
    }

    #[test]
    fn debug_output_never_shows_header_values() {
        let config = resolve(&[("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-key=otlp-secret-123")]).unwrap();
        assert!(!format!("{config:?}").contains("otlp-secret-123"));
    }
}
