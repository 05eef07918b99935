//! The job metrics (docs/metrics.md): submissions, finished jobs, streams, policy denials and the
//! current jobs by status. The service and the backends record them; `register` adds them to the
//! process's registry.

use super::{JobCounts, JobPhase, JobRecord};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use std::sync::{Arc, OnceLock};

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
pub struct RuleLabel {
    pub rule: &'static str,
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

/// Something that can count its jobs on demand (a backend).
pub type JobCountSource = Box<dyn Fn() -> JobCounts + Send + Sync>;

/// The job metric families; `register` once, then record through any clone of the handles.
pub struct JobMetrics {
    pub submissions: Family<OutcomeLabel, Counter>,
    pub finished: Family<FinishedLabels, Counter>,
    pub job_duration: HistogramFamily<StatusLabel>,
    pub queue_wait: Histogram,
    pub result_bytes: Histogram,
    pub log_streams: Gauge,
    pub watch_streams: Gauge,
    pub policy_denials: Family<RuleLabel, Counter>,
    pub kube_quota_refusals: Counter,
    job_counts: Arc<OnceLock<JobCountSource>>,
}

impl Default for JobMetrics {
    fn default() -> Self {
        Self {
            submissions: Family::default(),
            finished: Family::default(),
            job_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 2.0, 15))),
            queue_wait: Histogram::new(exponential_buckets(0.5, 2.0, 14)),
            result_bytes: Histogram::new(exponential_buckets(64.0, 2.0, 7)),
            log_streams: Gauge::default(),
            watch_streams: Gauge::default(),
            policy_denials: Family::default(),
            kube_quota_refusals: Counter::default(),
            job_counts: Arc::default(),
        }
    }
}

impl JobMetrics {
    /// Add the families to `registry`, under the `oats_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let oats = registry.sub_registry_with_prefix("oats");
        oats.register("job_submissions", "Job submissions by outcome", self.submissions.clone());
        oats.register(
            "jobs_finished",
            "Jobs that reached a final status, counted once across replicas",
            self.finished.clone(),
        );
        oats.register_with_unit(
            "job_duration",
            "Run time of finished jobs, started to finished",
            Unit::Seconds,
            self.job_duration.clone(),
        );
        oats.register_with_unit(
            "job_queue_wait",
            "Time from submission to the agent running",
            Unit::Seconds,
            self.queue_wait.clone(),
        );
        oats.register_with_unit(
            "job_result",
            "Size of results of succeeded jobs",
            Unit::Bytes,
            self.result_bytes.clone(),
        );
        oats.register("log_streams", "Clients following job logs", self.log_streams.clone());
        oats.register("watch_streams", "Clients watching jobs (Server-Sent Events)", self.watch_streams.clone());
        oats.register("policy_denials", "Submissions denied by a policy rule", self.policy_denials.clone());
        oats.register(
            "kube_quota_refusals",
            "Job creations a namespace ResourceQuota refused (answered 429 quota-exhausted)",
            self.kube_quota_refusals.clone(),
        );
        oats.register_collector(Box::new(JobCountCollector(self.job_counts.clone())));
    }

    /// Let scrapes count jobs through `source` (the backend, once it exists).
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
}

impl std::fmt::Debug for JobMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobMetrics").finish_non_exhaustive()
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
