//! Logs, traces and metrics: set up once at start, shut down once at exit.
//!
//! Traces are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific
//! variable) is set, with the protocol of `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` or
//! `http/protobuf`, the default); headers, sampler, service name and resource attributes come from
//! the standard `OTEL_*` variables, read by the OpenTelemetry SDK itself. Export runs on the batch
//! processor's own thread with a bounded queue, so a slow or absent collector never blocks a
//! request: spans are dropped instead.

pub mod kube_client;
mod logs;
pub mod metrics;
mod process;
pub mod trace;

use crate::config::LogFormat;
use opentelemetry::{KeyValue, global, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use std::io::IsTerminal;
use tracing_subscriber::{EnvFilter, Layer, filter::Targets, fmt, prelude::*};

/// The git revision this binary was built from (`OATS_REVISION` at build time).
pub const REVISION: &str = match option_env!("OATS_REVISION") {
    Some(revision) => revision,
    None => "unknown",
};

/// Whether spans are exported (an OTLP endpoint is configured); set once by [`init`].
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans go anywhere. Without an exporter, a request's span would only cost time: nothing
/// reads it (JSON log lines carry trace ids only when there is a trace).
pub fn traces_exported() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Export the spans still queued (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "trace export did not shut down cleanly");
        }
    }
}

/// Install the global subscriber: logs filtered by `RUST_LOG` (default `info`), as JSON lines
/// (with `trace_id`/`span_id` inside a traced request) or text; plus OTLP traces when configured.
/// Must run inside the Tokio runtime (the gRPC exporter binds to it).
pub fn init(format: LogFormat) -> Telemetry {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt_layer = if json {
        fmt::layer()
            .event_format(logs::JsonWithTrace)
            .fmt_fields(logs::NoSpanFields)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).with_filter(filter).boxed()
    };
    let (provider, problem) = match tracer_provider() {
        Ok(provider) => (provider, None),
        Err(problem) => (None, Some(problem)),
    };
    let otel_layer = provider.as_ref().map(|provider| {
        // Our own spans, plus kube-client's per-request client spans (created at debug level).
        let spans =
            Targets::new().with_target("oats", tracing::Level::INFO).with_target("kube_client", tracing::Level::DEBUG);
        tracing_opentelemetry::layer().with_tracer(provider.tracer("oats")).with_filter(spans)
    });
    if let Some(provider) = &provider {
        global::set_tracer_provider(provider.clone());
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    tracing_subscriber::registry().with(logs::TraceIdLayer).with(fmt_layer).with(otel_layer).init();
    match (&provider, problem) {
        (Some(_), _) => tracing::info!("exporting traces over OTLP"),
        (None, Some(problem)) => tracing::warn!(%problem, "traces are not exported"),
        (None, None) => tracing::info!("no OTLP endpoint configured; traces are off"),
    }
    Telemetry { provider }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The tracer provider the `OTEL_*` variables ask for, `None` when tracing is off.
fn tracer_provider() -> Result<Option<SdkTracerProvider>, String> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none")
    {
        return Ok(None);
    }
    if env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() && env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none() {
        return Ok(None);
    }
    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into());
    use opentelemetry_otlp::{SpanExporter, WithExportConfig as _};
    let exporter = match protocol.as_str() {
        "grpc" => SpanExporter::builder().with_tonic().build(),
        "http/protobuf" => {
            SpanExporter::builder().with_http().with_protocol(opentelemetry_otlp::Protocol::HttpBinary).build()
        }
        other => {
            return Err(format!("OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported (use grpc or http/protobuf)"));
        }
    }
    .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
    let mut resource = Resource::builder().with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("oats");
    }
    Ok(Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build()))
}
