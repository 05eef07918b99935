//! Every metric OATS exports, in one struct (docs/metrics.md is the contract).
//!
//! Label values are bounded by construction: `&'static str` from fixed sets (methods, route
//! templates, statuses, reasons, verbs, resources) and status codes.

use crate::jobs::{JobPhase, JobRecord};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::Counter,
        exemplar::HistogramWithExemplars,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use std::sync::{Arc, OnceLock};

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
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabels {
    pub status: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
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
pub struct RuleLabel {
    pub rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    revision: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// How a submission ended, for `oats_job_submissions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmissionOutcome {
    Accepted,
    Existing,
    Invalid,
    Rejected,
    Error,
}

impl SubmissionOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Existing => "existing",
            Self::Invalid => "invalid",
            Self::Rejected => "rejected",
            Self::Error => "error",
        }
    }
}

/// Current jobs by phase, computed from a backend's cache at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    pub by_phase: [u64; 5],
    /// Unfinished jobs older than a minute that have no pod (the Job controller cannot make one).
    pub without_pod: u64,
}

impl JobCounts {
    pub fn add(&mut self, phase: JobPhase) {
        let index = JobPhase::ALL.iter().position(|p| *p == phase).expect("every phase is listed");
        self.by_phase[index] += 1;
    }
}

/// Something that can count its jobs on demand (a backend).
pub type JobCountSource = Box<dyn Fn() -> JobCounts + Send + Sync>;

/// All metric families, registered once.
pub struct Metrics {
    registry: Registry,
    pub http_duration:
        Family<HttpLabels, HistogramWithExemplars<TraceLabel>, fn() -> HistogramWithExemplars<TraceLabel>>,
    pub http_active: Family<MethodLabel, Gauge>,
    pub submissions: Family<OutcomeLabel, Counter>,
    pub finished: Family<FinishedLabels, Counter>,
    pub job_duration: HistogramFamily<StatusLabel>,
    pub queue_wait: Histogram,
    pub result_bytes: Histogram,
    pub log_streams: Gauge,
    pub watch_streams: Gauge,
    pub policy_denials: Family<RuleLabel, Counter>,
    pub kube_requests: Family<KubeLabels, Counter>,
    pub kube_duration: HistogramFamily<KubeOperationLabels>,
    pub watch_errors: Family<ResourceLabel, Counter>,
    pub watch_restarts: Family<ResourceLabel, Counter>,
    pub cache_synced: Family<ResourceLabel, Gauge>,
    pub kube_quota_refusals: Counter,
    pub local_running: Gauge,
    job_counts: Arc<OnceLock<JobCountSource>>,
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
        let oats = registry.sub_registry_with_prefix("oats");
        let submissions = Family::<OutcomeLabel, Counter>::default();
        oats.register("job_submissions", "Job submissions by outcome", submissions.clone());
        let finished = Family::<FinishedLabels, Counter>::default();
        oats.register(
            "jobs_finished",
            "Jobs that reached a final status, counted once across replicas",
            finished.clone(),
        );
        let job_duration: HistogramFamily<StatusLabel> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 2.0, 15)));
        oats.register_with_unit(
            "job_duration",
            "Run time of finished jobs, started to finished",
            Unit::Seconds,
            job_duration.clone(),
        );
        let queue_wait = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        oats.register_with_unit(
            "job_queue_wait",
            "Time from submission to the agent running",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let result_bytes = Histogram::new(exponential_buckets(64.0, 2.0, 7));
        oats.register_with_unit("job_result", "Size of results of succeeded jobs", Unit::Bytes, result_bytes.clone());
        let log_streams = Gauge::default();
        oats.register("log_streams", "Clients following job logs", log_streams.clone());
        let watch_streams = Gauge::default();
        oats.register("watch_streams", "Clients watching jobs (Server-Sent Events)", watch_streams.clone());
        let policy_denials = Family::<RuleLabel, Counter>::default();
        oats.register("policy_denials", "Submissions denied by a policy rule", policy_denials.clone());
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
        let kube_quota_refusals = Counter::default();
        oats.register(
            "kube_quota_refusals",
            "Job creations a namespace ResourceQuota refused (answered 429 quota-exhausted)",
            kube_quota_refusals.clone(),
        );
        let local_running = Gauge::default();
        oats.register("local_running_processes", "Agent processes run by the local backend", local_running.clone());
        let job_counts: Arc<OnceLock<JobCountSource>> = Arc::default();
        oats.register_collector(Box::new(JobCountCollector(job_counts.clone())));
        oats.register_collector(Box::new(BuildInfo));

        Self {
            registry,
            http_duration,
            http_active,
            submissions,
            finished,
            job_duration,
            queue_wait,
            result_bytes,
            log_streams,
            watch_streams,
            policy_denials,
            kube_requests,
            kube_duration,
            watch_errors,
            watch_restarts,
            cache_synced,
            kube_quota_refusals,
            local_running,
            job_counts,
        }
    }

    /// Let scrapes count jobs through `source` (the backend, once it exists).
    /// The registry, for subsystems that register their own metrics (`register(&mut Registry)`).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn count_jobs_with(&self, source: JobCountSource) {
        let _ = self.job_counts.set(source);
    }

    pub fn submission(&self, outcome: SubmissionOutcome) {
        self.submissions.get_or_create(&OutcomeLabel { outcome: outcome.as_str() }).inc();
    }

    /// Record a job that reached its final status. Callers make sure this happens once per job.
    pub fn job_finished(&self, job: &JobRecord) {
        let status = job.status.phase.as_str();
        let reason = job.status.reason.map_or("none", |r| r.as_str());
        self.finished.get_or_create(&FinishedLabels { status, reason }).inc();
        if let (Some(started), Some(finished)) = (job.started_at, job.finished_at) {
            let seconds = (finished - started).as_seconds_f64().max(0.0);
            self.job_duration.get_or_create(&StatusLabel { status }).observe(seconds);
        }
        if let Some(started) = job.started_at {
            self.queue_wait.observe((started - job.created_at).as_seconds_f64().max(0.0));
        }
        if let Some(result) = &job.result {
            self.result_bytes.observe(result.len() as f64);
        }
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

struct JobCountCollector(Arc<OnceLock<JobCountSource>>);

impl std::fmt::Debug for JobCountCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobCountCollector")
    }
}

impl Collector for JobCountCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.0.get().map(|count| count()).unwrap_or_default();
        let mut family = encoder.encode_descriptor("jobs", "Current jobs by status", None, MetricType::Gauge)?;
        for (phase, value) in JobPhase::ALL.iter().zip(counts.by_phase) {
            let labels = StatusLabel { status: phase.as_str() };
            ConstGauge::new(value as i64).encode(family.encode_family(&labels)?)?;
        }
        let without_pod = encoder.encode_descriptor(
            "jobs_without_pod",
            "Unfinished jobs older than a minute without a pod (pod creation is failing)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(counts.without_pod as i64).encode(without_pod)
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
