//! The JSON shapes of the API. Their doc comments and bounds become the OpenAPI schema.

use super::timestamp;
use crate::jobs::{self, Budget, JobPhase, JobReason, JobRecord, JobRequest, JobUsage, NanoUsd};
use chrono::{DateTime, Utc};
use poem_openapi::{
    Enum, Object,
    registry::MetaSchemaRef,
    types::{Example, ParseError, ParseFromJSON, ParseResult, ToJSON, Type},
};
use serde::Serialize;
use serde_json::Value;
use std::{borrow::Cow, collections::BTreeMap};

/// A JSON string, and only a string: poem-openapi's `String` also accepts numbers and booleans,
/// which would let `{"goal": 1}` through as `"1"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrictString(pub String);

impl AsRef<str> for StrictString {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Type for StrictString {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        String::name()
    }

    fn schema_ref() -> MetaSchemaRef {
        String::schema_ref()
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl ParseFromJSON for StrictString {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::String(text) => Ok(Self(text)),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for StrictString {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

impl From<&str> for StrictString {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

/// A request to run an agent.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields, example)]
pub struct CreateJobRequest {
    /// What the agent should achieve: 1 to 16384 bytes of UTF-8 (the server counts bytes; the
    /// configured limit may be lower), not only whitespace, no NUL characters.
    #[oai(validator(min_length = 1, max_length = 16384))]
    pub goal: StrictString,
    /// The most reasoning turns the agent may take: 1 to 100 (the configured ceiling may be lower).
    #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
    pub max_turns: u32,
    /// Up to 16 labels for filtering, in Kubernetes label syntax. Keys `app` and `oats.dev/*` are
    /// reserved.
    #[oai(validator(max_properties = 16))]
    pub labels: Option<BTreeMap<String, StrictString>>,
    /// Seconds the job may run before it is stopped with reason `DeadlineExceeded`: 10 to 86400,
    /// within the configured maximum (3600 by default). Default: the configured default (600).
    #[oai(validator(minimum(value = "10"), maximum(value = "86400")))]
    pub timeout_seconds: Option<u32>,
    /// Model the agent should use, passed to it as `OATS_MODEL`: 1 to 128 characters of
    /// letters, digits and `-_./:@`.
    #[oai(validator(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9\-_./:@]+$"))]
    pub model: Option<StrictString>,
    /// Resource profile defined by the tenant's policy (e.g. `small`, `medium`, `large`): 1 to 32
    /// characters of a-z, 0-9 and `-`. Default: the policy's default profile.
    #[oai(validator(min_length = 1, max_length = 32, pattern = r"^[a-z0-9-]+$"))]
    pub profile: Option<StrictString>,
    /// What the job may spend on model calls through the LLM gateway. Unset limits take the
    /// tenant's defaults; limits above the tenant's ceiling are refused (`policy/max-budget`).
    /// `max_turns` also caps the number of model calls.
    pub budget: Option<RequestedBudget>,
}

/// The budget a submission asks for; unset (or null) limits take the tenant's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Object)]
#[oai(deny_unknown_fields)]
pub struct RequestedBudget {
    /// Most input plus output tokens: 1 to 1000000000.
    #[oai(validator(minimum(value = "1"), maximum(value = "1000000000")))]
    pub max_tokens: Option<u64>,
    /// Most money, in US dollars, at the configured prices: 0 to 1000000.
    #[oai(validator(minimum(value = "0"), maximum(value = "1000000")))]
    pub max_cost_usd: Option<f64>,
}

impl From<RequestedBudget> for Budget {
    fn from(b: RequestedBudget) -> Self {
        Self { max_tokens: b.max_tokens, max_cost: b.max_cost_usd.and_then(NanoUsd::from_usd) }
    }
}

/// Limits on a job's model calls, enforced before each call is forwarded: a call that the
/// remaining budget cannot pay for is refused, never charged after the fact.
#[derive(Debug, Clone, Copy, PartialEq, Object, Serialize)]
#[oai(skip_serializing_if_is_none)]
pub struct JobBudget {
    /// Most input plus output tokens: 1 to 1000000000.
    #[oai(validator(minimum(value = "1"), maximum(value = "1000000000")))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Most money, in US dollars, at the configured prices: 0 to 1000000.
    #[oai(validator(minimum(value = "0"), maximum(value = "1000000")))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
}

impl From<Budget> for JobBudget {
    fn from(b: Budget) -> Self {
        Self { max_tokens: b.max_tokens, max_cost_usd: b.max_cost.map(NanoUsd::as_usd) }
    }
}

/// What is left of a job's budget.
#[derive(Debug, Clone, Copy, PartialEq, Object, Serialize)]
#[oai(skip_serializing_if_is_none)]
pub struct BudgetLeft {
    /// Tokens left, when the budget limits tokens (reservations of calls in flight excluded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Dollars left, when the budget limits cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// Why the gateway refused one of the job's model calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Serialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum UsageRefusal {
    /// The job's token budget could not pay for the call.
    JobTokens,
    /// The job's cost budget could not pay for the call.
    JobCost,
    /// The tenant's daily spend limit was reached.
    TenantDailySpend,
    /// The job had made `max_turns` calls.
    CallCap,
    /// Too many of the job's calls were in flight at once.
    InFlight,
}

impl From<jobs::Refusal> for UsageRefusal {
    fn from(r: jobs::Refusal) -> Self {
        match r {
            jobs::Refusal::JobTokens => Self::JobTokens,
            jobs::Refusal::JobCost => Self::JobCost,
            jobs::Refusal::TenantDailySpend => Self::TenantDailySpend,
            jobs::Refusal::CallCap => Self::CallCap,
            jobs::Refusal::InFlight => Self::InFlight,
        }
    }
}

/// What a job spent on model calls through the LLM gateway, live while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Object, Serialize)]
#[oai(skip_serializing_if_is_none)]
pub struct Usage {
    /// Calls answered by a provider (refused calls are not counted).
    pub model_calls: u64,
    /// Input (prompt) tokens, as the providers reported them.
    pub input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
    /// Part of `input_tokens` served from a provider's prompt cache.
    pub cached_tokens: u64,
    /// Part of `output_tokens` spent on reasoning.
    pub reasoning_tokens: u64,
    /// Cost in US dollars at the configured prices.
    pub cost_usd: f64,
    /// What the budget has left, when it sets limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_left: Option<BudgetLeft>,
    /// The first refusal the gateway gave the job, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<UsageRefusal>,
}

impl From<&JobUsage> for Usage {
    fn from(u: &JobUsage) -> Self {
        let limited = u.tokens_left.is_some() || u.cost_left.is_some();
        Self {
            model_calls: u.model_calls,
            input_tokens: u.tokens.input,
            output_tokens: u.tokens.output,
            cached_tokens: u.tokens.cached_input,
            reasoning_tokens: u.tokens.reasoning,
            cost_usd: u.cost.as_usd(),
            budget_left: limited
                .then(|| BudgetLeft { tokens: u.tokens_left, cost_usd: u.cost_left.map(NanoUsd::as_usd) }),
            refused: u.refused.map(Into::into),
        }
    }
}

impl Example for CreateJobRequest {
    fn example() -> Self {
        Self {
            goal: "Summarise the open issues of the repository and propose a plan".into(),
            max_turns: 5,
            labels: Some(BTreeMap::from([("team".into(), "research".into())])),
            timeout_seconds: Some(600),
            model: None,
            profile: None,
            budget: Some(RequestedBudget { max_tokens: Some(200_000), max_cost_usd: Some(2.5) }),
        }
    }
}

impl From<CreateJobRequest> for JobRequest {
    fn from(r: CreateJobRequest) -> Self {
        Self {
            goal: r.goal.0,
            max_turns: r.max_turns,
            labels: r.labels.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect(),
            timeout_seconds: r.timeout_seconds,
            model: r.model.map(|m| m.0),
            profile: r.profile.map(|p| p.0),
            budget: r.budget.map(Budget::from).unwrap_or_default(),
        }
    }
}

/// Where a job is in its life. `succeeded`, `failed` and `cancelled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Serialize)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<JobPhase> for JobStatus {
    fn from(phase: JobPhase) -> Self {
        match phase {
            JobPhase::Pending => Self::Pending,
            JobPhase::Running => Self::Running,
            JobPhase::Succeeded => Self::Succeeded,
            JobPhase::Failed => Self::Failed,
            JobPhase::Cancelled => Self::Cancelled,
        }
    }
}

impl From<JobStatus> for JobPhase {
    fn from(status: JobStatus) -> Self {
        match status {
            JobStatus::Pending => Self::Pending,
            JobStatus::Running => Self::Running,
            JobStatus::Succeeded => Self::Succeeded,
            JobStatus::Failed => Self::Failed,
            JobStatus::Cancelled => Self::Cancelled,
        }
    }
}

/// Why a job is in its status. Stable: values are only ever added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Serialize)]
#[oai(rename_all = "PascalCase")]
pub enum JobStatusReason {
    /// The job ran past its timeout.
    DeadlineExceeded,
    /// Every allowed retry of the agent failed.
    BackoffLimitExceeded,
    /// Pending: the agent image cannot be pulled.
    ImagePullFailed,
    /// Pending: the agent container keeps crashing.
    CrashLoop,
    /// Pending: no node can run the agent yet.
    Unschedulable,
    /// The agent exceeded its memory limit.
    #[oai(rename = "OOMKilled")]
    #[serde(rename = "OOMKilled")]
    OomKilled,
    /// The node evicted the agent.
    Evicted,
    /// A user cancelled the job.
    Cancelled,
    /// The agent exited with a non-zero status.
    AgentError,
    /// The server stopped while the job was running.
    ServerRestarted,
    /// The Job was deleted before it finished (not by OATS); the job shows what was last seen.
    Deleted,
    /// Pending: waiting in its queue for Kueue to admit it (see `queue`).
    Queued,
    /// Pending: Kueue stopped the job to make room for another and queued it again.
    Preempted,
    /// The agent could not be started.
    StartFailed,
    /// The job's budget (or its tenant's daily spend limit) could not pay for another model call.
    BudgetExhausted,
    /// The job made `max_turns` model calls.
    MaxTurnsReached,
}

impl From<JobReason> for JobStatusReason {
    fn from(reason: JobReason) -> Self {
        match reason {
            JobReason::DeadlineExceeded => Self::DeadlineExceeded,
            JobReason::BackoffLimitExceeded => Self::BackoffLimitExceeded,
            JobReason::ImagePullFailed => Self::ImagePullFailed,
            JobReason::CrashLoop => Self::CrashLoop,
            JobReason::Unschedulable => Self::Unschedulable,
            JobReason::OOMKilled => Self::OomKilled,
            JobReason::Evicted => Self::Evicted,
            JobReason::Cancelled => Self::Cancelled,
            JobReason::AgentError => Self::AgentError,
            JobReason::ServerRestarted => Self::ServerRestarted,
            JobReason::Deleted => Self::Deleted,
            JobReason::Queued => Self::Queued,
            JobReason::Preempted => Self::Preempted,
            JobReason::StartFailed => Self::StartFailed,
            JobReason::BudgetExhausted => Self::BudgetExhausted,
            JobReason::MaxTurnsReached => Self::MaxTurnsReached,
        }
    }
}

/// Model spend of one tenant on one model on one UTC day.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct DailyUsage {
    /// The tenant that spent.
    pub tenant: String,
    /// The model's configured name (aliases are counted under it).
    pub model: String,
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Calls answered by a provider.
    pub model_calls: u64,
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
    /// Part of `input_tokens` served from a provider's prompt cache.
    pub cached_tokens: u64,
    /// Part of `output_tokens` spent on reasoning.
    pub reasoning_tokens: u64,
    /// Cost in US dollars at the configured prices.
    pub cost_usd: f64,
}

/// Model spend over a range of days.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct UsageReport {
    /// First day covered (UTC).
    pub from: chrono::NaiveDate,
    /// Last day covered (UTC), included.
    pub to: chrono::NaiveDate,
    /// One entry per tenant, model and day with spend, by day, then tenant, then model.
    pub items: Vec<DailyUsage>,
    /// Sum of `cost_usd` over `items`.
    pub total_cost_usd: f64,
}

impl From<jobs::SpendReport> for UsageReport {
    fn from(report: jobs::SpendReport) -> Self {
        let total: u64 = report.rows.iter().map(|r| r.cost.0).sum();
        let items = report
            .rows
            .into_iter()
            .map(|r| DailyUsage {
                tenant: r.tenant,
                model: r.model,
                day: r.day,
                model_calls: r.calls,
                input_tokens: r.tokens.input,
                output_tokens: r.tokens.output,
                cached_tokens: r.tokens.cached_input,
                reasoning_tokens: r.tokens.reasoning,
                cost_usd: r.cost.as_usd(),
            })
            .collect();
        Self { from: report.from, to: report.to, items, total_cost_usd: NanoUsd(total).as_usd() }
    }
}

/// Links to a job's related resources.
#[derive(Debug, Clone, Object, Serialize)]
pub struct JobLinks {
    /// This job.
    #[oai(rename = "self")]
    #[serde(rename = "self")]
    pub self_: String,
    /// The agent's output (`GET`).
    pub logs: String,
    /// What happened to the job and its pods (`GET`).
    pub events: String,
    /// Cancels the job (`POST`).
    pub cancel: String,
}

/// Where a job waits for admission (Kubernetes with Kueue).
#[derive(Debug, Clone, PartialEq, Eq, Object, Serialize)]
pub struct JobQueue {
    /// The Kueue LocalQueue the job waits in.
    pub name: String,
    /// The job's place in that queue: 1 is admitted next. Absent until Kueue reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
}

impl From<&jobs::QueuePlace> for JobQueue {
    fn from(place: &jobs::QueuePlace) -> Self {
        Self { name: place.name.clone(), position: place.position }
    }
}

/// An agent job.
#[derive(Debug, Clone, Object, Serialize)]
#[oai(skip_serializing_if_is_none, example)]
pub struct Job {
    /// Server-assigned id: `job-` and 20 characters of a-z, 2-7. Also the Kubernetes Job name.
    pub id: String,
    /// Where the job is in its life.
    pub status: JobStatus,
    /// Machine-readable reason for the status, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<JobStatusReason>,
    /// Human-readable explanation of the status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// While the job waits for admission (reason `Queued` or `Preempted`): its queue and place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<JobQueue>,
    /// When the job was accepted.
    #[serde(serialize_with = "timestamp::rfc3339")]
    pub created_at: DateTime<Utc>,
    /// When the agent first started running.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "timestamp::rfc3339_opt")]
    pub started_at: Option<DateTime<Utc>>,
    /// When the job reached a final status.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "timestamp::rfc3339_opt")]
    pub finished_at: Option<DateTime<Utc>>,
    /// How many times the agent was started.
    pub attempts: u32,
    /// What the agent was asked to achieve.
    pub goal: String,
    /// The most turns the agent may take.
    pub max_turns: u32,
    /// The timeout in force, in seconds.
    pub timeout_seconds: u32,
    /// The model the agent was asked to use, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The resource profile the job asked for, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The job's labels.
    pub labels: BTreeMap<String, String>,
    /// The limits on the job's model calls in force, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<JobBudget>,
    /// What the job spent on model calls, once it made one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The agent's final answer (at most 4096 bytes), once it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Id of the distributed trace that created the job (and that the agent continues), when
    /// tracing is on: look it up in the trace backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Related resources.
    pub links: JobLinks,
}

impl Job {
    pub fn path(id: &str) -> String {
        format!("/api/v1/jobs/{id}")
    }
}

impl From<&JobRecord> for Job {
    fn from(r: &JobRecord) -> Self {
        Self::with_usage(r, None)
    }
}

impl Job {
    /// The job and what it spent on model calls.
    pub fn with_usage(r: &JobRecord, usage: Option<&JobUsage>) -> Self {
        let path = Self::path(r.id.as_str());
        Self {
            id: r.id.to_string(),
            status: r.status.phase.into(),
            reason: r.status.reason.map(Into::into),
            message: r.status.message.clone(),
            queue: r.queue.as_ref().map(JobQueue::from),
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            attempts: r.attempts,
            goal: r.spec.goal.clone(),
            max_turns: r.spec.max_turns,
            timeout_seconds: r.spec.timeout_seconds,
            model: r.spec.model.clone(),
            profile: r.spec.profile.clone(),
            labels: r.spec.labels.clone(),
            budget: (!r.spec.budget.is_unlimited()).then(|| r.spec.budget.into()),
            usage: usage.map(Usage::from),
            result: r.result.clone(),
            trace_id: r.trace.as_ref().and_then(|t| t.trace_id()).map(str::to_owned),
            links: JobLinks {
                logs: format!("{path}/logs"),
                events: format!("{path}/events"),
                cancel: format!("{path}/cancel"),
                self_: path,
            },
        }
    }
}

impl Example for Job {
    fn example() -> Self {
        let created_at = DateTime::parse_from_rfc3339("2026-11-26T10:00:00Z").unwrap().with_timezone(&Utc);
        let request = CreateJobRequest::example();
        let id = "job-k5qv3xw7hy2mbnd4rzta".to_owned();
        let path = Self::path(&id);
        Self {
            id,
            status: JobStatus::Succeeded,
            reason: None,
            message: None,
            queue: None,
            created_at,
            started_at: Some(created_at + chrono::Duration::seconds(2)),
            finished_at: Some(created_at + chrono::Duration::seconds(9)),
            attempts: 1,
            goal: request.goal.0,
            max_turns: request.max_turns,
            timeout_seconds: 600,
            model: None,
            profile: None,
            labels: request.labels.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect(),
            budget: request.budget.map(|b| JobBudget { max_tokens: b.max_tokens, max_cost_usd: b.max_cost_usd }),
            usage: Some(Usage {
                model_calls: 4,
                input_tokens: 5210,
                output_tokens: 830,
                cached_tokens: 1024,
                reasoning_tokens: 0,
                cost_usd: 0.01875,
                budget_left: Some(BudgetLeft { tokens: Some(193_960), cost_usd: Some(2.48125) }),
                refused: None,
            }),
            result: Some("Plan: triage the 12 open issues by area, then fix the 3 crashers first.".into()),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            links: JobLinks {
                logs: format!("{path}/logs"),
                events: format!("{path}/events"),
                cancel: format!("{path}/cancel"),
                self_: path,
            },
        }
    }
}

/// One page of jobs, newest first.
#[derive(Debug, Clone, Object, Serialize)]
#[oai(skip_serializing_if_is_none)]
pub struct JobList {
    /// At most `limit` jobs, newest first.
    pub items: Vec<Job>,
    /// Pass as `page_token` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// Something that happened to a job or its pods.
#[derive(Debug, Clone, Object)]
pub struct JobEvent {
    /// When it (last) happened.
    pub time: DateTime<Utc>,
    /// `Normal` or `Warning`.
    #[oai(rename = "type")]
    pub kind: String,
    /// Short machine-readable cause, e.g. `Scheduled`, `Failed`, `BackOff`.
    pub reason: String,
    /// What happened, for humans.
    pub message: String,
    /// The object concerned, e.g. `Job/job-…` or `Pod/job-…-x7k2p`.
    pub object: String,
    /// How many times it happened.
    pub count: u32,
}

impl From<jobs::JobEvent> for JobEvent {
    fn from(e: jobs::JobEvent) -> Self {
        Self { time: e.time, kind: e.kind, reason: e.reason, message: e.message, object: e.object, count: e.count }
    }
}

/// A job's events, newest first.
#[derive(Debug, Clone, Object)]
pub struct JobEventList {
    /// The events, newest first.
    pub items: Vec<JobEvent>,
}

/// One invalid field of a request.
#[derive(Debug, Clone, Object)]
pub struct FieldProblem {
    /// The field, e.g. `goal` or `labels.team`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// An RFC 9457 problem: every error answer of this API has this shape.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Problem {
    /// Stable URI naming the kind of problem; branch on this.
    #[oai(rename = "type")]
    pub problem_type: String,
    /// Short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong this time, for humans.
    pub detail: String,
    /// The request path.
    pub instance: Option<String>,
    /// For `validation-failed`: each invalid field.
    pub errors: Option<Vec<FieldProblem>>,
}

/// Why a watch event was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum WatchEventKind {
    /// The job as it is now (the first event, and each change after it).
    Job,
    /// The server is shutting down; reconnect (to any replica) with `Last-Event-ID`.
    Shutdown,
}

/// One Server-Sent Event of `watchJob`.
#[derive(Debug, Clone, Object)]
pub struct JobChange {
    /// What this event is.
    pub event: WatchEventKind,
    /// Names this state of the job (also the SSE `id`): send it as `Last-Event-ID` to resume.
    pub state: String,
    /// The job at this point.
    pub job: Job,
}

/// One policy rule's verdict on a submission.
#[derive(Debug, Clone, Object)]
pub struct RuleVerdict {
    /// The rule, e.g. `max-concurrent-jobs`; a denial's problem `type` ends with it.
    pub rule: String,
    /// Whether the rule lets the submission through.
    pub allowed: bool,
    /// What the rule saw and what it allows.
    pub detail: String,
}

impl From<crate::jobs::policy::Verdict> for RuleVerdict {
    fn from(v: crate::jobs::policy::Verdict) -> Self {
        Self { rule: v.rule.name().into(), allowed: v.allowed, detail: v.detail }
    }
}

/// The outcome of a dry run: nothing was created.
#[derive(Debug, Clone, Object)]
pub struct DryRunResult {
    /// Whether the submission would be accepted.
    pub allowed: bool,
    /// Every rule's verdict, in the order they are checked.
    pub verdicts: Vec<RuleVerdict>,
    /// What would be submitted: the Kubernetes Job manifest, or the local command and environment.
    pub job: serde_json::Value,
}

/// Whether the service can take work.
#[derive(Debug, Clone, Object, Serialize)]
pub struct Health {
    /// `ok`, or `unavailable` while the backend is not ready.
    pub status: String,
    /// `kubernetes` or `local`.
    pub backend: String,
}
