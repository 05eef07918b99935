//! The process's metric registry and the metrics of the HTTP server and the Kubernetes client;
//! subsystems add theirs with `register(&mut Registry)` (docs/metrics.md is the contract).
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

/// OpenTelemetry's recommended buckets for `http.server.request.duration`.
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    revision: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// All metric families, registered once.
pub struct Metrics {
    registry: Registry,
    pub http_duration:
        Family<HttpLabels, HistogramWithExemplars<TraceLabel>, fn() -> HistogramWithExemplars<TraceLabel>>,
    pub http_active: Family<MethodLabel, Gauge>,
    /// The job metrics, registered here too.
    pub jobs: Arc<JobMetrics>,
    pub kube_requests: Family<KubeLabels, Counter>,
    pub kube_duration: HistogramFamily<KubeOperationLabels>,
    pub watch_errors: Family<ResourceLabel, Counter>,
    pub watch_restarts: Family<ResourceLabel, Counter>,
    pub cache_synced: Family<ResourceLabel, Gauge>,
    pub local_running: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http_duration = Family::<_, _, fn() -> HistogramWithExemplars<TraceLabel>>::new_with_constructor(|| {
            HistogramWithExemplars::new(HTTP_BUCKETS.into_iter())
        });
        registry.register_with_unit(
            "http_server_request_duration",
            "Duration of HTTP server requests",
            Unit::Seconds,
            http_duration.clone(),
        );
        let http_active = Family::<MethodLabel, Gauge>::default();
        registry.register("http_server_active_requests", "HTTP requests in flight", http_active.clone());

        registry.register_collector(Box::new(super::process::ProcessCollector));
        let jobs = Arc::new(JobMetrics::default());
        jobs.register(&mut registry);
        let oats = registry.sub_registry_with_prefix("oats");
        let kube_requests = Family::<KubeLabels, Counter>::default();
        oats.register("kube_requests", "Kubernetes API calls by verb, resource and status code", kube_requests.clone());
        let kube_duration: HistogramFamily<KubeOperationLabels> =
            Family::new_with_constructor(|| Histogram::new(HTTP_BUCKETS));
        oats.register_with_unit(
            "kube_request_duration",
            "Latency of Kubernetes API calls (watches excluded)",
            Unit::Seconds,
            kube_duration.clone(),
        );
        let watch_errors = Family::<ResourceLabel, Counter>::default();
        oats.register("kube_watch_errors", "Failures of the Kubernetes watches", watch_errors.clone());
        let watch_restarts = Family::<ResourceLabel, Counter>::default();
        oats.register(
            "kube_watch_restarts",
            "Full re-lists of the Kubernetes watches, the first sync included",
            watch_restarts.clone(),
        );
        let cache_synced = Family::<ResourceLabel, Gauge>::default();
        oats.register("kube_cache_synced", "1 when the watch cache is synced and healthy", cache_synced.clone());
        let local_running = Gauge::default();
        oats.register("local_running_processes", "Agent processes run by the local backend", local_running.clone());
        oats.register_collector(Box::new(BuildInfo));

        Self {
            registry,
            http_duration,
            http_active,
            jobs,
            kube_requests,
            kube_duration,
            watch_errors,
            watch_restarts,
            cache_synced,
            local_running,
        }
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
