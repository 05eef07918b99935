//! Logs, traces and metrics: set up once at start, shut down once at exit.
//!
//! Traces are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific
//! variable) is set, with the protocol of `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` through
//! `opentelemetry-otlp`, or `http/protobuf`, the default, through [`otlp_http`], which writes spans
//! straight into the request body at a fraction of upstream's cost); endpoint, headers and timeout
//! come from the standard `OTEL_*` variables, service name and resource attributes too (read by
//! the OpenTelemetry SDK). Sampling follows
//! `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` with one refinement (see [`trace_request`]): the
//! ratio applies to reads; a caller's `traceparent` and every write (a submission starts the trace
//! the agent continues) are always traced. Export runs on the batch processor's own thread with a
//! bounded queue, so a slow or absent collector never blocks a request: spans are dropped instead.

pub mod kube_client;
mod logs;
pub mod metrics;
mod otlp_encode;
mod otlp_http;
mod process;
pub mod trace;

use crate::config::LogFormat;
use opentelemetry::{KeyValue, global, trace::TracerProvider as _};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SamplingResult, SdkTracerProvider, ShouldSample},
};
use std::io::IsTerminal;
use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    filter::{FilterExt, LevelFilter, Targets, filter_fn},
    fmt,
    prelude::*,
};

/// The git revision this binary was built from (`OATS_REVISION` at build time).
pub const REVISION: &str = match option_env!("OATS_REVISION") {
    Some(revision) => revision,
    None => "unknown",
};

/// Which requests start traces; set once by [`init`], and only when spans are exported.
static ROOTS: std::sync::OnceLock<Roots> = std::sync::OnceLock::new();

/// Whether a request gets a server span. Without an exporter, never: nothing would read it (JSON
/// log lines carry trace ids only when there is a trace). With one: when an authenticated caller
/// sent a `traceparent` (`caller_trace`; the sampler follows the caller's decision; an
/// unauthenticated caller's `traceparent` forces nothing), for every write (submissions start the
/// traces the agent continues), and for the sampler's share of reads. Deciding before the span
/// exists keeps an unsampled poll as cheap as with tracing off.
pub fn trace_request(caller_trace: bool, read_only: bool) -> bool {
    let Some(roots) = ROOTS.get() else { return false };
    caller_trace
        || if read_only {
            roots.reads >= 1.0 || (roots.reads > 0.0 && rand::random::<f64>() < roots.reads)
        } else {
            roots.writes
        }
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
    init_as(format, "oats")
}

/// [`init`] for a process that is not the server (the agent), named `service` in its spans
/// unless `OTEL_SERVICE_NAME` says otherwise.
pub fn init_as(format: LogFormat, service: &'static str) -> Telemetry {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt_layer = log_layer(json, filter);
    let (provider, problem) = match tracer_provider(service) {
        Ok(provider) => (provider, None),
        Err(problem) => (None, Some(problem)),
    };
    let otel_layer = provider.as_ref().map(|(provider, ..)| {
        // Our own spans, plus kube-client's per-request client spans (created at debug level).
        let spans =
            Targets::new().with_target("oats", tracing::Level::INFO).with_target("kube_client", tracing::Level::DEBUG);
        // No busy/idle timing, code location or thread attributes: they cost clock reads and
        // allocations on every span, and the semantic-convention attributes say what matters.
        // No context activation either: it attaches a span's OpenTelemetry context at every enter
        // (a clone and two thread-local stacks), for `opentelemetry::Context::current()`, which
        // nothing here reads; parents come from the tracing spans and ids from `span.context()`.
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("oats"))
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_threads(false)
            .with_filter(spans)
    });
    if let Some((provider, roots, _)) = &provider {
        global::set_tracer_provider(provider.clone());
        let _ = ROOTS.set(*roots);
    }
    tracing_subscriber::registry().with(fmt_layer).with(otel_layer).init();
    let provider = provider.map(|(provider, _, ignored)| {
        for setting in ignored {
            tracing::warn!("{setting}");
        }
        provider
    });
    match (&provider, problem) {
        (Some(_), _) => tracing::info!("exporting traces over OTLP"),
        (None, Some(problem)) => tracing::warn!(%problem, "traces are not exported"),
        (None, None) => tracing::info!("no OTLP endpoint configured; traces are off"),
    }
    Telemetry { provider }
}

/// The layer that writes log lines to stderr: JSON lines or text, filtered by `filter`.
///
/// Its level hint is `filter`'s, so the global maximum level stays what `RUST_LOG` asks for:
/// the `trace_span!`s that h2 opens for every frame it sends then cost one comparison instead
/// of a span in the registry.
fn log_layer(json: bool, filter: EnvFilter) -> Box<dyn Layer<Registry> + Send + Sync> {
    if json {
        // JSON lines read the current span themselves: the layer need not follow spans at all.
        // The event-only filter bounds no level, so it says so (without a hint it would leave the
        // combined filter's hint unknown, which means every level).
        let events = filter_fn(|metadata| metadata.is_event()).with_max_level_hint(LevelFilter::TRACE);
        fmt::layer()
            .event_format(logs::JsonWithTrace)
            .fmt_fields(logs::NoSpanFields)
            .with_writer(std::io::stderr)
            .with_filter(filter.and(events))
            .boxed()
    } else {
        fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).with_filter(filter).boxed()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The tracer provider the `OTEL_*` variables ask for, which requests start traces and the settings
/// ignored (to warn about once logs are up); `None` when tracing is off.
fn tracer_provider(service: &'static str) -> Result<Option<(SdkTracerProvider, Roots, Vec<String>)>, String> {
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
    let roots = roots(env("OTEL_TRACES_SAMPLER").as_deref(), env("OTEL_TRACES_SAMPLER_ARG").as_deref())?;
    let builder = SdkTracerProvider::builder();
    let (builder, ignored) = match protocol.as_str() {
        "grpc" => {
            let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build().map_err(cannot_build)?;
            (builder.with_batch_exporter(exporter), Vec::new())
        }
        "http/protobuf" => {
            let mut config = otlp_http::HttpConfig::resolve(|name| std::env::var(name).ok()).map_err(cannot_build)?;
            let ignored = std::mem::take(&mut config.ignored);
            let exporter = otlp_http::HttpExporter::new(config).map_err(cannot_build)?;
            (builder.with_batch_exporter(exporter), ignored)
        }
        other => {
            return Err(format!("OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported (use grpc or http/protobuf)"));
        }
    };
    let mut resource = Resource::builder().with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let sampler = Sampler::ParentBased(Box::new(RootSampler { roots }));
    let provider = builder.with_sampler(sampler).with_resource(resource.build()).build();
    Ok(Some((provider, roots, ignored)))
}

fn cannot_build(error: impl std::fmt::Display) -> String {
    format!("cannot build the OTLP exporter: {error}")
}

/// Which requests without a caller's trace start one.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Roots {
    /// Writes (submissions, cancels): all of them, unless the sampler is `always_off`.
    writes: bool,
    /// The share of reads (and of background work).
    reads: f64,
}

/// The new traces `OTEL_TRACES_SAMPLER` (and `_ARG`) ask for: everything for `always_on` and
/// `parentbased_always_on` (the default), nothing for the `always_off` ones, every write and the
/// argument's share (default 1) of reads for `traceidratio` and `parentbased_traceidratio`.
/// Spans with a parent always follow the parent (the `parentbased_` behaviour, whichever form is
/// named).
fn roots(sampler: Option<&str>, arg: Option<&str>) -> Result<Roots, String> {
    let all = |reads| Roots { writes: true, reads };
    match sampler.unwrap_or("parentbased_always_on") {
        "always_on" | "parentbased_always_on" => Ok(all(1.0)),
        "always_off" | "parentbased_always_off" => Ok(Roots { writes: false, reads: 0.0 }),
        "traceidratio" | "parentbased_traceidratio" => match arg {
            None => Ok(all(1.0)),
            Some(arg) => arg
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .map(all)
                .ok_or_else(|| format!("OTEL_TRACES_SAMPLER_ARG={arg} is not a ratio between 0 and 1")),
        },
        other => Err(format!(
            "OTEL_TRACES_SAMPLER={other} is not supported (use always_on, always_off, traceidratio or their \
             parentbased_ forms)"
        )),
    }
}

/// How a span without a parent is sampled. Server spans exist only for requests that
/// [`trace_request`] chose, so they are kept; other roots (background work) get the reads' ratio.
#[derive(Clone, Debug)]
struct RootSampler {
    roots: Roots,
}

impl ShouldSample for RootSampler {
    fn should_sample(
        &self,
        parent: Option<&opentelemetry::Context>,
        trace_id: opentelemetry::trace::TraceId,
        name: &str,
        kind: &opentelemetry::trace::SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        let sampler = match kind {
            opentelemetry::trace::SpanKind::Server if self.roots.writes || self.roots.reads > 0.0 => Sampler::AlwaysOn,
            _ => Sampler::TraceIdRatioBased(self.roots.reads),
        };
        sampler.should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanKind, TraceId};
    use opentelemetry_sdk::trace::SamplingDecision;

    #[test]
    fn the_standard_sampler_variables_give_the_share_of_new_traces() {
        let all = |reads| Ok(Roots { writes: true, reads });
        assert_eq!(roots(None, None), all(1.0));
        assert_eq!(roots(Some("always_on"), None), all(1.0));
        assert_eq!(roots(Some("parentbased_always_off"), None), Ok(Roots { writes: false, reads: 0.0 }));
        assert_eq!(roots(Some("parentbased_traceidratio"), Some("0.1")), all(0.1));
        assert_eq!(roots(Some("traceidratio"), Some("0")), all(0.0));
        assert_eq!(roots(Some("traceidratio"), None), all(1.0));
        for (sampler, arg) in [("traceidratio", Some("1.5")), ("traceidratio", Some("x")), ("jaeger_remote", None)] {
            assert!(roots(Some(sampler), arg).is_err(), "{sampler} {arg:?}");
        }
    }

    #[test]
    fn log_lines_leave_the_global_level_at_the_filters_so_dependencies_trace_spans_cost_nothing() {
        for json in [true, false] {
            let layer = log_layer(json, EnvFilter::new("info"));
            assert_eq!(layer.max_level_hint(), Some(LevelFilter::INFO), "json: {json}");
            let no_exporter: Option<tracing_subscriber::layer::Identity> = None;
            let subscriber = tracing_subscriber::registry().with(layer).with(no_exporter);
            tracing::subscriber::with_default(subscriber, || {
                assert_eq!(LevelFilter::current(), LevelFilter::INFO, "json: {json}");
                assert!(tracing::trace_span!(target: "h2", "reserve_capacity").is_disabled(), "json: {json}");
            });
        }
    }

    #[test]
    fn chosen_requests_keep_their_span_and_background_roots_get_the_ratio() {
        let decide = |writes: bool, reads: f64, kind: SpanKind| {
            let trace_id = TraceId::from_hex("ffffffffffffffffffffffffffffffff").unwrap();
            RootSampler { roots: Roots { writes, reads } }.should_sample(None, trace_id, "x", &kind, &[], &[]).decision
        };
        assert_eq!(decide(true, 0.0, SpanKind::Server), SamplingDecision::RecordAndSample);
        assert_eq!(decide(false, 0.0, SpanKind::Server), SamplingDecision::Drop);
        assert_eq!(decide(true, 0.1, SpanKind::Client), SamplingDecision::Drop);
        assert_eq!(decide(true, 1.0, SpanKind::Client), SamplingDecision::RecordAndSample);
    }
}
