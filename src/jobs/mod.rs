//! The job domain: what a job is, the rules a request must meet, and the service the API calls.
//!
//! Nothing here knows about HTTP or Kubernetes; both backends speak in these types.

pub mod archive;
mod backend;
mod budget;
mod caller;
mod changes;
mod credential;
mod error;
pub mod history;
mod id;
mod index;
pub mod metrics;
pub mod page;
pub mod policy;
pub mod records;
mod selector;
mod service;
mod spec;

pub use backend::{BackendError, JobBackend, JobCounts, Preview};
pub use budget::{Budget, DailySpend, JobUsage, NanoUsd, Prices, Refusal, TokenCounts};
pub use caller::{Caller, Role};
pub use changes::{JobChanges, JobSnapshot, JobSubscription};
pub use credential::AgentCredentials;
pub use error::{FieldError, JobError};
pub use id::{IdempotencyKey, JobId};
pub use index::JobIndex;
pub use page::{JobPage, ListQuery, PageToken};
pub use selector::LabelSelector;
pub use service::{DryRun, JobService, SpendReport, StreamKind, StreamSlot, Submitted, WatchEvent};
pub use spec::{JobLimits, JobRequest, JobSpec, RESERVED_LABEL_PREFIX, agent_env, agent_exit, check_label_value};

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use std::collections::BTreeMap;

/// Where a job is in its life. Terminal phases never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobPhase {
    /// Every phase, in lifecycle order.
    pub const ALL: [JobPhase; 5] = [Self::Pending, Self::Running, Self::Succeeded, Self::Failed, Self::Cancelled];

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A stable, machine-readable explanation of a phase; clients branch on it, so variants are
/// only ever added, never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum JobReason {
    /// The job ran past its timeout.
    DeadlineExceeded,
    /// Every allowed retry of the agent failed.
    BackoffLimitExceeded,
    /// The agent image cannot be pulled (pending while Kubernetes retries).
    ImagePullFailed,
    /// The agent container crashes repeatedly (pending while Kubernetes backs off).
    CrashLoop,
    /// No node can take the agent pod yet.
    Unschedulable,
    /// The agent was killed for exceeding its memory limit.
    OOMKilled,
    /// The node evicted the agent pod.
    Evicted,
    /// A user cancelled the job.
    Cancelled,
    /// The agent exited with a non-zero status.
    AgentError,
    /// The server stopped while the job was running, so its outcome is unknown.
    ServerRestarted,
    /// The agent process or pod could not be started at all.
    StartFailed,
    /// The job's budget (tokens, cost, or its tenant's daily spend) could not pay for another
    /// model call, and the agent stopped.
    BudgetExhausted,
    /// The job made `max_turns` model calls, and the agent stopped.
    MaxTurnsReached,
    /// The job's Kubernetes Job was deleted (by someone else than OATS) before it finished; what
    /// was seen of it is kept.
    Deleted,
    /// Pending: waiting in its queue for Kueue to admit it (see the job's `queue`).
    Queued,
    /// Pending: Kueue stopped the running job to make room for another and queued it again.
    Preempted,
}

impl JobReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeadlineExceeded => "DeadlineExceeded",
            Self::BackoffLimitExceeded => "BackoffLimitExceeded",
            Self::ImagePullFailed => "ImagePullFailed",
            Self::CrashLoop => "CrashLoop",
            Self::Unschedulable => "Unschedulable",
            Self::OOMKilled => "OOMKilled",
            Self::Evicted => "Evicted",
            Self::Cancelled => "Cancelled",
            Self::AgentError => "AgentError",
            Self::ServerRestarted => "ServerRestarted",
            Self::Deleted => "Deleted",
            Self::Queued => "Queued",
            Self::Preempted => "Preempted",
            Self::StartFailed => "StartFailed",
            Self::BudgetExhausted => "BudgetExhausted",
            Self::MaxTurnsReached => "MaxTurnsReached",
        }
    }
}

/// The state of a job: its phase plus why, for humans and machines. (The API calls the phase
/// alone a job's `status`.)
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobState {
    pub phase: JobPhase,
    pub reason: Option<JobReason>,
    pub message: Option<String>,
}

impl JobState {
    pub fn new(phase: JobPhase) -> Self {
        Self { phase, reason: None, message: None }
    }

    pub fn with_reason(phase: JobPhase, reason: JobReason, message: impl Into<String>) -> Self {
        Self { phase, reason: Some(reason), message: Some(message.into()) }
    }
}

/// The agent's final answer is capped so one job cannot bloat every list response.
pub const MAX_RESULT_BYTES: usize = 4096;

/// Cut `text` to at most [`MAX_RESULT_BYTES`] without splitting a UTF-8 character.
pub fn truncate_result(mut text: String) -> String {
    if text.len() > MAX_RESULT_BYTES {
        let mut end = MAX_RESULT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// W3C trace context of the request that created a job; handed to the agent as `TRACEPARENT`
/// and `TRACESTATE` so its spans join the same trace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The W3C trace context of the current span, when tracing is on (captured when a job is
    /// created, so its lifecycle joins the trace of the request that created it).
    pub fn current() -> Option<Self> {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let cx = tracing::Span::current().context();
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = std::collections::HashMap::new();
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.inject_context(&cx, &mut carrier));
        Some(Self {
            traceparent: carrier.remove("traceparent")?,
            tracestate: carrier.remove("tracestate").filter(|s| !s.is_empty()),
        })
    }

    /// The trace id (32 hex digits) of a well-formed `traceparent`.
    pub fn trace_id(&self) -> Option<&str> {
        let mut parts = self.traceparent.split('-');
        let (_version, trace_id) = (parts.next()?, parts.next()?);
        (trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace_id)
    }
}

/// Everything known about one job, as both backends report it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub tenant: String,
    pub spec: JobSpec,
    pub status: JobState,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// How many times the agent was started (retries count).
    pub attempts: u32,
    pub result: Option<String>,
    /// Fingerprint of the normalised request, so an idempotent retry can be told from a reuse.
    pub request_hash: String,
    /// The trace that created the job, when tracing was on.
    #[serde(default)]
    pub trace: Option<TraceContext>,
    /// The queue the job waits in for admission, while it waits (Kubernetes with Kueue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueuePlace>,
    /// How the API last wrote this record (records are shared immutably, so a poll of an
    /// unchanged job reuses it). Not part of the record's value: never stored, compared or copied.
    #[serde(skip)]
    pub json: EncodedJson,
}

/// A memo of a record's JSON, filled on first use by whoever encodes it. A copy starts empty, so
/// a record changed after copying (copy-on-write) is never served its old encoding.
#[derive(Default)]
pub struct EncodedJson(std::sync::OnceLock<bytes::Bytes>);

impl EncodedJson {
    /// The memoized encoding, made by `encode` the first time.
    pub fn get_or_try_init<E>(&self, encode: impl FnOnce() -> Result<bytes::Bytes, E>) -> Result<bytes::Bytes, E> {
        if let Some(bytes) = self.0.get() {
            return Ok(bytes.clone());
        }
        let bytes = encode()?;
        Ok(self.0.get_or_init(|| bytes).clone())
    }
}

impl Clone for EncodedJson {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for EncodedJson {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for EncodedJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "EncodedJson" } else { "EncodedJson(empty)" })
    }
}

/// Where a job waits for admission.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePlace {
    /// The Kueue LocalQueue.
    pub name: String,
    /// 1 for the next job to be admitted; `None` until Kueue reports it.
    pub position: Option<u32>,
}

/// The queue and priority the policy gives a tenant's jobs (used when queueing is on).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueChoice {
    /// The LocalQueue; `None` for the server's `kueue_default_queue`.
    pub local_queue: Option<String>,
    /// A Kueue WorkloadPriorityClass; `None` for Kueue's default priority.
    pub priority_class: Option<String>,
    /// When Kueue preempts the job: fail it (`true`) or let Kueue queue it again.
    pub fail_on_preemption: bool,
}

/// A job the domain has validated and named, ready for a backend to create.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub tenant: String,
    pub spec: JobSpec,
    pub created_at: DateTime<Utc>,
    pub request_hash: String,
    pub trace: Option<TraceContext>,
    /// Resources of the job's profile; `None` for the server's configured defaults.
    pub resources: Option<policy::ResourceProfile>,
    /// Where the job queues for admission, when the backend queues (Kueue).
    pub queue: QueueChoice,
}

impl NewJob {
    /// The record of this job before anything has run.
    pub fn pending_record(&self) -> JobRecord {
        JobRecord {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            spec: self.spec.clone(),
            status: JobState::new(JobPhase::Pending),
            created_at: self.created_at,
            started_at: None,
            finished_at: None,
            attempts: 0,
            result: None,
            request_hash: self.request_hash.clone(),
            trace: self.trace.clone(),
            queue: None,
            json: EncodedJson::default(),
        }
    }
}

/// What a backend's create call did.
#[derive(Debug)]
pub enum CreateOutcome {
    Created(JobRecord),
    /// A job with this id existed already (an idempotent retry, or a key reused for another body).
    Exists(JobRecord),
}

/// Something that happened to a job or its agent, for "why is it stuck?".
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobEvent {
    pub time: DateTime<Utc>,
    /// `Normal` or `Warning`, as Kubernetes uses them.
    pub kind: String,
    pub reason: String,
    pub message: String,
    /// What the event is about, e.g. `Job/job-abc` or `Pod/job-abc-x7k2p`.
    pub object: String,
    pub count: u32,
}

/// Where jobs' model usage is read (the LLM gateway's ledger); the API shows it beside each job.
#[async_trait::async_trait]
pub trait UsageSource: Send + Sync {
    /// The usage of each of `ids` that made a model call. A source that cannot answer right now
    /// answers with nothing: usage is shown when it can be, and never stops a read.
    async fn usage_of(&self, ids: &[JobId]) -> std::collections::HashMap<JobId, JobUsage>;

    /// Settled spend by tenant, model and day for `from..=to`, of one tenant or all.
    async fn daily_spend(
        &self,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
        tenant: Option<&str>,
    ) -> Result<Vec<DailySpend>, String>;
}

/// Which part of a job's output to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    pub tail_lines: Option<u32>,
    pub since_seconds: Option<u32>,
    pub timestamps: bool,
    pub follow: bool,
}

/// Output lines as they are read; ends when the job's output ends (or, when following, when the
/// agent exits).
pub type LogStream = BoxStream<'static, std::io::Result<bytes::Bytes>>;

/// User labels, sorted so that hashing and rendering are deterministic.
pub type Labels = BTreeMap<String, String>;
