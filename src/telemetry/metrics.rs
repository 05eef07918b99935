//! The process's metric registry. Each subsystem's metrics are a struct with
//! `register(&mut Registry)`: the HTTP server's, the Kubernetes client's (recorded by `kube_client`),
//! the Kubernetes watches' and the local backend's here, the jobs' in `jobs::metrics`, the
//! gateway's in `llm::metrics` (docs/metrics.md is the contract).
//!
//! Label values are bounded by construction: `&'static str` from fixed sets (methods, route
//! templates, statuses, reasons, verbs, resources) and status codes.

use crate::jobs::metrics::JobMetrics;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::Counter,
        exemplar::HistogramWithExemplars,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::{Registry, Unit},
};
use std::sync::Arc;

/// Media type of the OpenMetrics text format (the only one that carries exemplars).
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Media type of the classic Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenTelemetry's recommended buckets for `http.server.request.duration` (the Kubernetes
/// client's latency uses them too).
const HTTP_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub http_request_method: &'static str,
    pub http_route: &'static str,
    pub http_response_status_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub http_request_method: &'static str,
}

/// The trace an observation belongs to, attached as an exemplar.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabel {
    pub trace_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    revision: &'static str,
}

type HttpDuration = Family<HttpLabels, HistogramWithExemplars<TraceLabel>, fn() -> HistogramWithExemplars<TraceLabel>>;

/// The HTTP server's metrics (OpenTelemetry's names), recorded per request by the API.
pub struct HttpMetrics {
    pub duration: HttpDuration,
    pub active: Family<MethodLabel, Gauge>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            duration: Family::new_with_constructor(|| HistogramWithExemplars::new(HTTP_BUCKETS.into_iter())),
            active: Family::default(),
        }
    }
}

impl HttpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "http_server_request_duration",
            "Duration of HTTP server requests",
            Unit::Seconds,
            self.duration.clone(),
        );
        registry.register("http_server_active_requests", "HTTP requests in flight", self.active.clone());
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeLabels {
    pub verb: &'static str,
    pub resource: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeOperationLabels {
    pub verb: &'static str,
    pub resource: &'static str,
}

/// The Kubernetes API calls: counted by verb, resource and status code, timed (watches aside).
pub struct KubeClientMetrics {
    pub requests: Family<KubeLabels, Counter>,
    pub duration: Family<KubeOperationLabels, Histogram, fn() -> Histogram>,
}

impl Default for KubeClientMetrics {
    fn default() -> Self {
        Self { requests: Family::default(), duration: Family::new_with_constructor(|| Histogram::new(HTTP_BUCKETS)) }
    }
}

impl KubeClientMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let oats = registry.sub_registry_with_prefix("oats");
        oats.register("kube_requests", "Kubernetes API calls by verb, resource and status code", self.requests.clone());
        oats.register_with_unit(
            "kube_request_duration",
            "Latency of Kubernetes API calls (watches excluded)",
            Unit::Seconds,
            self.duration.clone(),
        );
    }
}

/// The Kubernetes backend's watches: failures, re-lists and whether each cache is synced.
#[derive(Default)]
pub struct WatchMetrics {
    pub errors: Family<ResourceLabel, Counter>,
    pub restarts: Family<ResourceLabel, Counter>,
    pub cache_synced: Family<ResourceLabel, Gauge>,
}

impl WatchMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let oats = registry.sub_registry_with_prefix("oats");
        oats.register("kube_watch_errors", "Failures of the Kubernetes watches", self.errors.clone());
        oats.register(
            "kube_watch_restarts",
            "Full re-lists of the Kubernetes watches, the first sync included",
            self.restarts.clone(),
        );
        oats.register("kube_cache_synced", "1 when the watch cache is synced and healthy", self.cache_synced.clone());
    }
}

/// The local backend's agent processes.
#[derive(Default)]
pub struct LocalMetrics {
    pub running: Gauge,
}

impl LocalMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let oats = registry.sub_registry_with_prefix("oats");
        oats.register("local_running_processes", "Agent processes run by the local backend", self.running.clone());
    }
}

/// The process's registry and every subsystem's metrics registered in it: one per process,
/// shared by the API, the backends and the Kubernetes client.
pub struct Metrics {
    registry: Registry,
    pub http: HttpMetrics,
    pub jobs: Arc<JobMetrics>,
    pub kube_client: KubeClientMetrics,
    pub watches: WatchMetrics,
    pub local: LocalMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http = HttpMetrics::default();
        http.register(&mut registry);
        registry.register_collector(Box::new(super::process::ProcessCollector));
        let jobs = Arc::new(JobMetrics::default());
        jobs.register(&mut registry);
        let kube_client = KubeClientMetrics::default();
        kube_client.register(&mut registry);
        let watches = WatchMetrics::default();
        watches.register(&mut registry);
        let local = LocalMetrics::default();
        local.register(&mut registry);
        registry.sub_registry_with_prefix("oats").register_collector(Box::new(BuildInfo));
        Self { registry, http, jobs, kube_client, watches, local }
    }

    /// The registry, for subsystems that register their own metrics (`register(&mut Registry)`).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// OpenMetrics text (with exemplars), or the Prometheus 0.0.4 text format.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        let encoded = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        encoded.expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family =
            encoder.encode_descriptor("build_info", "Build of the running binary", None, MetricType::Gauge)?;
        let labels = BuildLabels { version: env!("CARGO_PKG_VERSION"), revision: super::REVISION };
        ConstGauge::new(1).encode(family.encode_family(&labels)?)
    }
}
