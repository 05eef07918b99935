//! The operations. Each one parses, calls the job service, and shapes the answer; nothing else.

use super::{
    ApiState,
    json::{JobJson, JobListJson, JsonBody, PlainJson as Json},
    problem::ProblemResponse,
    sse::WatchEvents,
    types::{
        CreateJobRequest, DryRunResult, Health, Job, JobChange, JobEventList, JobList, JobStatus, RuleVerdict,
        UsageReport, WatchEventKind,
    },
};
use crate::jobs::{Caller, ListQuery, LogOptions, Role, StreamKind, WatchEvent};
use bytes::Bytes;
use futures::StreamExt;
use poem::web::sse::Event;
use poem::{Body, web::Data};
use poem_openapi::{
    ApiResponse, OpenApi, SecurityScheme, Tags,
    auth::Bearer,
    param::{Header, Path, Query},
    payload::Binary,
};
use std::sync::Arc;

/// An API token or an OIDC access token (JWT), sent as `Authorization: Bearer <token>`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "opaque token or JWT")]
pub struct BearerToken(Bearer);

/// Credentials of a call: a bearer token, or none (accepted only while authentication is off).
#[derive(SecurityScheme)]
pub enum Credentials {
    Bearer(BearerToken),
    #[oai(fallback)]
    Absent,
}

impl Credentials {
    async fn caller(&self, state: &ApiState) -> std::result::Result<Caller, ProblemResponse> {
        let token = match self {
            Self::Bearer(BearerToken(bearer)) => Some(bearer.token.as_str()),
            Self::Absent => None,
        };
        state.auth.authenticate(token).await.map_err(ProblemResponse::from)
    }
}

#[derive(Tags)]
pub enum ApiTags {
    /// Submit agent jobs and follow them to their result.
    Jobs,
    /// Liveness and readiness of the service.
    Health,
}

/// The versioned job API.
pub struct JobsApi;

/// Probes for the orchestrator.
pub struct HealthApi;

/// Answer of `createJob`.
#[derive(ApiResponse)]
pub enum CreateJobResponse {
    /// The job was created and is pending.
    #[oai(status = 201)]
    Created(JsonBody<Job>, #[oai(header = "Location")] String),
    /// An earlier request with the same `Idempotency-Key` and the same body created this job;
    /// nothing new was created.
    #[oai(status = 200)]
    Existing(JsonBody<Job>, #[oai(header = "Location")] String),
    /// `dry_run=true`: every rule's verdict and what would be submitted; nothing was created.
    #[oai(status = 202)]
    DryRun(Json<DryRunResult>),
}

/// Answer of `getJobLogs`.
#[derive(ApiResponse)]
pub enum LogsResponse {
    /// The agent's output as UTF-8 text, one line per line it wrote. With `follow=true` the body
    /// is streamed with chunked transfer encoding as lines are written, and ends when the agent
    /// exits.
    #[oai(status = 200, content_type = "text/plain; charset=utf-8")]
    Ok(Binary<Body>),
}

/// Answer of `watchJob`.
#[derive(ApiResponse)]
pub enum WatchResponse {
    /// Server-Sent Events: `event: job` with the job now, then one per change until it finishes;
    /// each `id` names the job's state, so reconnecting with `Last-Event-ID` sends only what
    /// changed since. `event: shutdown` ends the stream when the server stops. Comment lines every
    /// 15 s keep idle connections open.
    #[oai(status = 200)]
    Events(WatchEvents),
}

/// Answer of the readiness probe.
#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// The backend can serve reads and writes.
    #[oai(status = 200)]
    Ready(JsonBody<Health>),
    /// The backend is not ready (e.g. the Kubernetes watch cache has not synced).
    #[oai(status = 503)]
    NotReady(JsonBody<Health>),
}

type Result<T> = std::result::Result<T, ProblemResponse>;

#[OpenApi(prefix_path = "/api/v1", tag = "ApiTags::Jobs")]
impl JobsApi {
    /// Submit a job
    ///
    /// Validates the request and starts an agent for it. With an `Idempotency-Key`, retrying the
    /// same request returns the job created the first time (200) instead of a second job, on
    /// every replica; reusing the key for a different request is a 409 problem.
    #[oai(path = "/jobs", method = "post", operation_id = "createJob")]
    async fn create_job(
        &self,
        state: Data<&Arc<ApiState>>,
        credentials: Credentials,
        body: Json<CreateJobRequest>,
        /// Makes retries safe: 1 to 255 printable ASCII characters, unique per intended job
        /// (a UUID is ideal). Scoped to the tenant.
        #[oai(name = "Idempotency-Key", validator(min_length = 1, max_length = 255))]
        idempotency_key: Header<Option<String>>,
        /// Judge the request by every policy rule and return the verdicts and the rendered job,
        /// creating nothing.
        #[oai(default)]
        dry_run: Query<bool>,
    ) -> Result<CreateJobResponse> {
        let caller = credentials.caller(&state).await?;
        if dry_run.0 {
            let mut dry = state.jobs.dry_run(&caller, body.0.into()).await?;
            if caller.role != Role::Admin {
                super::redact::redact_internal(&mut dry.manifest);
            }
            return Ok(CreateJobResponse::DryRun(Json(DryRunResult {
                allowed: dry.allowed(),
                verdicts: dry.verdicts.into_iter().map(RuleVerdict::from).collect(),
                job: dry.manifest,
            })));
        }
        let submitted = state.jobs.submit(&caller, body.0.into(), idempotency_key.0.as_deref()).await?;
        let job = Job::from(&submitted.job);
        let location = job.links.self_.clone();
        Ok(if submitted.created {
            CreateJobResponse::Created(JsonBody::new(job), location)
        } else {
            CreateJobResponse::Existing(JsonBody::new(job), location)
        })
    }

    /// List jobs
    ///
    /// Newest first. Pages are cut by an opaque cursor, so jobs created while paging never
    /// shift or repeat entries.
    #[oai(path = "/jobs", method = "get", operation_id = "listJobs")]
    async fn list_jobs(
        &self,
        state: Data<&Arc<ApiState>>,
        credentials: Credentials,
        /// Only jobs in this status.
        status: Query<Option<JobStatus>>,
        /// Only jobs whose labels match this Kubernetes label selector, e.g.
        /// `team=ml,env in (dev,prod),!legacy`.
        #[oai(validator(max_length = 1024))]
        label: Query<Option<String>>,
        /// Page size: 1 to 500, default 50.
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
        /// `next_page_token` of the previous page.
        #[oai(validator(max_length = 256))]
        page_token: Query<Option<String>>,
    ) -> Result<JsonBody<JobList, JobListJson>> {
        let caller = credentials.caller(&state).await?;
        let query = ListQuery::parse(status.0.map(Into::into), label.0.as_deref(), limit.0, page_token.0.as_deref())?;
        let page = state.jobs.list(&caller, &query).await?;
        let ids: Vec<_> = page.items.iter().map(|job| job.id.clone()).collect();
        let usage = state.jobs.usage_of(&ids).await;
        Ok(JsonBody::new(JobListJson { items: page.items, next_page_token: page.next_page_token, usage }))
    }

    /// Get a job
    ///
    /// The job's status, reason, timings and, once it succeeded, its result.
    #[oai(path = "/jobs/:id", method = "get", operation_id = "getJob")]
    async fn get_job(
        &self,
        state: Data<&Arc<ApiState>>,
        credentials: Credentials,
        /// The job id.
        id: Path<String>,
    ) -> Result<JsonBody<Job, JobJson>> {
        let caller = credentials.caller(&state).await?;
        let (job, usage) = state.jobs.get_with_usage(&caller, &id.0).await?;
        Ok(JsonBody::new(JobJson(job, usage)))
    }

    /// Cancel a job
    ///
    /// Stops the agent and keeps the record, whose status becomes `cancelled`. Cancelling a
    /// cancelled job changes nothing; cancelling a job that already finished is a 409 problem.
    #[oai(path = "/jobs/:id/cancel", method = "post", operation_id = "cancelJob")]
    async fn cancel_job(
        &self,
        state: Data<&Arc<ApiState>>,
        credentials: Credentials,
        /// The job id.
        id: Path<String>,
    ) -> Result<JsonBody<Job>> {
        let caller = credentials.caller(&state).await?;
        Ok(JsonBody::new(Job::from(&state.jobs.cancel(&caller, &id.0).await?)))
    }

    /// Read a job's logs
    ///
    /// The agent's output as plain text. `follow=true` streams new lines (chunked transfer
    /// encoding, not SSE) until the agent exits; a job that has not started yet is waited for.
    #[oai(path = "/jobs/:id/logs", method = "get", operation_id = "getJobLogs")]
    #[expect(clippy::too_many_arguments, reason = "one argument per parameter of the operation")]
    async fn get_job_logs(
        &self,
        state: Data<&Arc<ApiState>>,
        credentials: Credentials,
        /// The job id.
        id: Path<String>,
        /// Only the last this many lines (1 to 100000).
        #[oai(validator(minimum(value = "1"), maximum(value = "100000")))]
        tail_lines: Query<Option<u32>>,
        /// Only lines written in the last this many seconds.
        #[oai(validator(minimum(value = "1"), maximum(value = "2592000")))]
        since_seconds: Query<Option<u32>>,
        /// Prefix each line with its RFC 3339 time.
        #[oai(default)]
        timestamps: Query<bool>,
        /// Keep streaming until the agent exits.
        #[oai(default)]
        follow: Query<bool>,
    ) -> Result<LogsResponse> {
        let options = LogOptions {
            tail_lines: tail_lines.0,
            since_seconds: since_seconds.0,
            timestamps: timestamps.0,
            follow: follow.0,
        };
        let caller = credentials.caller(&state).await?;
        let follow = options.follow;
        let slot = if follow { Some(state.jobs.open_stream(&caller, StreamKind::Logs)?) } else { None };
        let lines = state.jobs.logs(&caller, &id.0, options).await?;
        // A follower holds its slot for as long as its stream lives, and stops at shutdown.
        let lines = lines.take_until(state.shutdown.clone().cancelled_owned()).map(move |chunk| {
            let _held = &slot;
            chunk
        });
        Ok(LogsResponse::Ok(Binary(Body::from_bytes_stream(lines))))
    }

    /// Watch a job
    ///
    /// Server-Sent Events with the job's state: now, then on every change until it finishes.
    /// `Last-Event-ID` resumes without resending what the client has seen.
    #[oai(path = "/jobs/:id/watch", method = "get", operation_id = "watchJob")]
    async fn watch_job(
        &self,
        state: Data<&Arc<ApiState>>,
        credentials: Credentials,
        /// The job id.
        id: Path<String>,
        /// The `id` of the last event received, to resume after a reconnect.
        #[oai(name = "Last-Event-ID", validator(max_length = 64))]
        last_event_id: Header<Option<String>>,
    ) -> Result<WatchResponse> {
        let caller = credentials.caller(&state).await?;
        let slot = state.jobs.open_stream(&caller, StreamKind::Watch)?;
        let events = state.jobs.watch(&caller, &id.0, last_event_id.0, state.shutdown.clone()).await?;
        let changes = events.map(move |event| {
            let _held = &slot;
            event.encoded(sse_event)
        });
        let stream = WatchEvents::new(changes, state.heartbeat.clone());
        Ok(WatchResponse::Events(stream))
    }

    /// List a job's events
    ///
    /// What happened to the job and its pods, newest first: scheduling, image pulls, OOM kills,
    /// failures to create pods. The place to look when a job seems stuck.
    #[oai(path = "/jobs/:id/events", method = "get", operation_id = "listJobEvents")]
    async fn list_job_events(
        &self,
        state: Data<&Arc<ApiState>>,
        credentials: Credentials,
        /// The job id.
        id: Path<String>,
    ) -> Result<Json<JobEventList>> {
        let caller = credentials.caller(&state).await?;
        let events = state.jobs.events(&caller, &id.0).await?;
        Ok(Json(JobEventList { items: events.into_iter().map(Into::into).collect() }))
    }

    /// Report model spend
    ///
    /// Tokens and cost of the model calls that went through the LLM gateway, by tenant, model
    /// and UTC day, for chargeback. Admins see every tenant (or the one named by `tenant`);
    /// other callers see their own tenant.
    #[oai(path = "/usage", method = "get", operation_id = "getUsage")]
    async fn get_usage(
        &self,
        state: Data<&Arc<ApiState>>,
        credentials: Credentials,
        /// First day (UTC), `YYYY-MM-DD`. Default: 29 days before `to`.
        from: Query<Option<chrono::NaiveDate>>,
        /// Last day (UTC), included. Default: today. The range spans at most 366 days.
        to: Query<Option<chrono::NaiveDate>>,
        /// Only this tenant (admins; others may name only their own).
        #[oai(validator(min_length = 1, max_length = 63))]
        tenant: Query<Option<String>>,
    ) -> Result<Json<UsageReport>> {
        let caller = credentials.caller(&state).await?;
        let report = state.jobs.daily_spend(&caller, from.0, to.0, tenant.0.as_deref()).await?;
        Ok(Json(UsageReport::from(report)))
    }
}

#[OpenApi(tag = "ApiTags::Health")]
impl HealthApi {
    /// Liveness
    ///
    /// 200 while the process is alive.
    #[oai(path = "/healthz", method = "get", operation_id = "getHealth")]
    async fn healthz(&self, state: Data<&Arc<ApiState>>) -> JsonBody<Health> {
        JsonBody::new(Health { status: "ok".into(), backend: state.jobs.backend_name().into() })
    }

    /// Readiness
    ///
    /// 200 once the backend can serve (on Kubernetes: the watch cache has synced and its watches
    /// are healthy), else 503.
    #[oai(path = "/readyz", method = "get", operation_id = "getReadiness")]
    async fn readyz(&self, state: Data<&Arc<ApiState>>) -> ReadyResponse {
        let backend = state.jobs.backend_name().to_owned();
        if state.jobs.is_ready() && !state.shutdown.is_cancelled() {
            ReadyResponse::Ready(JsonBody::new(Health { status: "ok".into(), backend }))
        } else {
            ReadyResponse::NotReady(JsonBody::new(Health { status: "unavailable".into(), backend }))
        }
    }
}

/// One change as an SSE event: `event: job` (or `shutdown`), the state as its `id`, the change as
/// JSON data.
fn sse_event(event: &WatchEvent) -> Bytes {
    let (kind, name) = match event {
        WatchEvent::Changed(_) => (WatchEventKind::Job, "job"),
        WatchEvent::Closing(_) => (WatchEventKind::Shutdown, "shutdown"),
    };
    let now = event.snapshot();
    let change =
        JobChange { event: kind, state: now.state.clone(), job: Job::with_usage(&now.job, now.usage.as_ref()) };
    let json = poem_openapi::types::ToJSON::to_json(&change).map(|v| v.to_string()).unwrap_or_default();
    Bytes::from(Event::message(json).event_type(name).id(change.state).to_string())
}
