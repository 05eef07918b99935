//! The job service: the one entry point the HTTP layer calls.

use super::{
    BackendError, Caller, CreateOutcome, FieldError, IdempotencyKey, JobBackend, JobError, JobEvent, JobId, JobLimits,
    JobPage, JobPhase, JobRecord, JobRequest, JobUsage, ListQuery, LogOptions, LogStream, NewJob, Role, TraceContext,
    UsageSource,
    changes::{JobSnapshot, JobSubscription},
    history::{self, HistoryError, HistoryHorizon, JobHistory},
    metrics::{JobMetrics, RuleLabel, SubmissionOutcome},
    page,
    policy::{Evaluation, Policy, Rule, Submission, TenantRules, Verdict},
};
use bytes::Bytes;
use chrono::Utc;
use futures::stream::BoxStream;
use prometheus_client::metrics::gauge::Gauge;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// How often a watched job is re-read (from the backend's cache) when its backend does not say when
/// it changes.
const WATCH_POLL: Duration = Duration::from_millis(250);

/// One of a tenant's stream slots (watch or log follow), released when dropped.
pub struct StreamSlot {
    open: Arc<Mutex<HashMap<Arc<str>, u32>>>,
    tenant: Arc<str>,
    gauge: Gauge,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some(count) = self.open.lock().unwrap().get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
        }
        self.gauge.dec();
    }
}

/// A tenant's job being created right now: counted by the concurrency rule from the moment it
/// was admitted until the create has finished (by then the backend counts the job itself, or
/// there is no job). Released when dropped, so a failed or abandoned create gives the slot back.
struct Reservation {
    creating: Arc<Mutex<Creating>>,
    tenant: String,
    id: JobId,
}

/// Per tenant, the ids of the submissions admitted and not yet created.
type Creating = HashMap<String, Vec<JobId>>;

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut creating = self.creating.lock().unwrap();
        if let Some(ids) = creating.get_mut(&self.tenant) {
            ids.retain(|id| *id != self.id);
            if ids.is_empty() {
                creating.remove(&self.tenant);
            }
        }
    }
}

/// Which kind of long-lived stream a slot is for (each has its own gauge).
#[derive(Debug, Clone, Copy)]
pub enum StreamKind {
    Logs,
    Watch,
}

/// What a watch reports: the job's state, shared with the other streams of the same change.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// The job as it is now; its `state` identifies it (for `Last-Event-ID`).
    Changed(Arc<JobSnapshot>),
    /// The server is shutting down; reconnect elsewhere with the last id.
    Closing(Arc<JobSnapshot>),
}

impl WatchEvent {
    pub fn snapshot(&self) -> &JobSnapshot {
        match self {
            Self::Changed(snapshot) | Self::Closing(snapshot) => snapshot,
        }
    }

    /// The event's bytes: `encode` runs for the first stream that sends a shared state, the
    /// others get the same bytes. A stream's own state is encoded and not kept.
    pub fn encoded(&self, encode: impl FnOnce(&Self) -> Bytes) -> Bytes {
        let snapshot = self.snapshot();
        let Some(encoded) = &snapshot.encoded else { return encode(self) };
        let slot = match self {
            Self::Changed(_) => 0,
            Self::Closing(_) => 1,
        };
        encoded[slot].get_or_init(|| encode(self)).clone()
    }
}

/// A short name for a job's observable state: its phase and a hash of the rest.
fn state_id(job: &JobRecord, usage: Option<&JobUsage>) -> String {
    use sha2::{Digest, Sha256};
    let spent = usage.map(|u| (u.model_calls, u.tokens.total(), u.cost.0, u.refused));
    let state =
        serde_json::json!([job.status, job.attempts, job.started_at, job.finished_at, job.result, job.queue, spent]);
    let digest = Sha256::digest(state.to_string());
    let short: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{short}", job.status.phase.as_str())
}

/// One watch stream's view of its job.
struct Watch {
    backend: Arc<dyn JobBackend>,
    usage: Option<Arc<dyn UsageSource>>,
    id: JobId,
    /// Wakes when the backend says the job changed; `None`: poll.
    changes: Option<JobSubscription>,
    /// The next read is this stream's own, not the one shared by the job's watchers: the first
    /// (a new stream sees the job as it is, whatever was read for the last change) and those
    /// after a timer rather than a change.
    read_alone: bool,
}

impl Watch {
    /// The job now and what it spent; `None` once the job is gone. After a change, read once
    /// for all the job's watchers.
    async fn read(&mut self) -> Option<Arc<JobSnapshot>> {
        let alone = std::mem::take(&mut self.read_alone);
        let read = || snapshot(&*self.backend, self.usage.as_deref(), &self.id);
        match &mut self.changes {
            Some(changes) if !alone => changes.latest(read).await,
            _ => read().await.map(Arc::new),
        }
    }

    /// Until the job may have changed: the backend's word, or a poll where it gives none. Usage
    /// settled by another replica's gateway is seen at the next change, or within
    /// [`USAGE_REFRESH`] while the job runs.
    async fn next_change(&mut self, job: &JobRecord) {
        let Some(changes) = &mut self.changes else { return tokio::time::sleep(WATCH_POLL).await };
        let refresh = self.usage.is_some() && job.status.phase == JobPhase::Running;
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    // The backend dropped the channel: fall back to polling.
                    self.read_alone = true;
                    tokio::time::sleep(WATCH_POLL).await;
                }
            }
            () = tokio::time::sleep(USAGE_REFRESH), if refresh => self.read_alone = true,
        }
    }
}

/// The job in `backend` and what it spent; `None` once it is gone.
async fn snapshot(backend: &dyn JobBackend, usage: Option<&dyn UsageSource>, id: &JobId) -> Option<JobSnapshot> {
    let job = backend.get(id).await.ok().flatten()?;
    let spent = match usage {
        Some(source) => source.usage_of(std::slice::from_ref(id)).await.remove(id),
        None => None,
    };
    Some(JobSnapshot::new(state_id(&job, spent.as_ref()), job, spent))
}

/// How often a watch of a running job re-reads its usage without a change (another replica's
/// gateway settles calls without telling this one).
const USAGE_REFRESH: Duration = Duration::from_secs(5);

/// The longest range of days one spend report covers.
const MAX_SPEND_DAYS: i64 = 366;

/// Spend over a range of days.
#[derive(Debug)]
pub struct SpendReport {
    pub from: chrono::NaiveDate,
    pub to: chrono::NaiveDate,
    pub rows: Vec<super::DailySpend>,
}

/// A successful submission: the job, and whether this call created it or found it by its key.
#[derive(Debug)]
pub struct Submitted {
    pub job: JobRecord,
    pub created: bool,
}

/// What a dry run would do: each rule's verdict and what would be submitted.
#[derive(Debug)]
pub struct DryRun {
    pub verdicts: Vec<Verdict>,
    pub manifest: serde_json::Value,
}

impl DryRun {
    pub fn allowed(&self) -> bool {
        self.verdicts.iter().all(|v| v.allowed)
    }
}

/// Validates requests, applies the policy, names jobs, enforces idempotency and tenancy, and
/// delegates to a backend.
pub struct JobService {
    backend: Arc<dyn JobBackend>,
    limits: JobLimits,
    policy: Arc<Policy>,
    metrics: Arc<JobMetrics>,
    streams: Arc<Mutex<HashMap<Arc<str>, u32>>>,
    /// Per tenant, the submissions admitted and not yet created (see [`Reservation`]). Admission
    /// (count, judge, reserve) happens under this lock, so a burst on one replica cannot pass
    /// `max_concurrent_jobs` between the count and the create.
    creating: Arc<Mutex<Creating>>,
    usage: Option<Arc<dyn UsageSource>>,
    /// Finished jobs the backend no longer holds.
    history: Option<Arc<dyn JobHistory>>,
    /// How new the jobs are that the history may hold and the backend not.
    horizon: Arc<HistoryHorizon>,
}

/// Where a readable job is now.
enum Located {
    Live(Arc<JobRecord>),
    Archived(Arc<JobRecord>),
    /// Gone from the backend moments ago and not archived yet: as last seen.
    Departed(Arc<JobRecord>),
}

impl Located {
    /// The record, wherever it was found.
    fn job(&self) -> &Arc<JobRecord> {
        match self {
            Self::Live(job) | Self::Archived(job) | Self::Departed(job) => job,
        }
    }
}

impl JobService {
    pub fn new(backend: Arc<dyn JobBackend>, limits: JobLimits, policy: Arc<Policy>, metrics: Arc<JobMetrics>) -> Self {
        Self {
            backend,
            limits,
            policy,
            metrics,
            streams: Arc::default(),
            creating: Arc::default(),
            usage: None,
            history: None,
            horizon: Arc::default(),
        }
    }

    /// Show jobs' model usage from `source`.
    pub fn with_usage(mut self, source: Arc<dyn UsageSource>) -> Self {
        self.usage = Some(source);
        self
    }

    /// Answer for finished jobs the backend forgot from `history`; `horizon` is kept by the
    /// archiver (see [`HistoryHorizon`]).
    pub fn with_history(mut self, history: Arc<dyn JobHistory>, horizon: Arc<HistoryHorizon>) -> Self {
        self.history = Some(history);
        self.horizon = horizon;
        self
    }

    /// What each of `ids` spent on model calls (jobs that made none are absent).
    pub async fn usage_of(&self, ids: &[JobId]) -> HashMap<JobId, JobUsage> {
        match &self.usage {
            Some(source) if !ids.is_empty() => source.usage_of(ids).await,
            _ => HashMap::new(),
        }
    }

    /// Settled model spend by tenant, model and day over `from..=to` (default: the last 30 days):
    /// admins see every tenant (or the one they name), others only their own.
    pub async fn daily_spend(
        &self,
        caller: &Caller,
        from: Option<chrono::NaiveDate>,
        to: Option<chrono::NaiveDate>,
        tenant: Option<&str>,
    ) -> Result<SpendReport, JobError> {
        let to = to.unwrap_or_else(|| Utc::now().date_naive());
        let from = from.unwrap_or(to - chrono::Days::new(29));
        if from > to {
            return Err(JobError::Invalid(vec![FieldError::new("from", "must not be after `to`")]));
        }
        if (to - from).num_days() >= MAX_SPEND_DAYS {
            let message = format!("the range may span at most {MAX_SPEND_DAYS} days");
            return Err(JobError::Invalid(vec![FieldError::new("to", message)]));
        }
        let tenant = match tenant {
            Some(tenant) if !caller.sees(tenant) => {
                return Err(JobError::Forbidden(format!(
                    "tenant {} may not see the spend of tenant {tenant}",
                    caller.tenant
                )));
            }
            Some(tenant) => Some(tenant),
            None if caller.role == Role::Admin => None,
            None => Some(&*caller.tenant),
        };
        let rows = match &self.usage {
            Some(source) => source
                .daily_spend(from, to, tenant)
                .await
                .map_err(|detail| JobError::Unavailable { detail, retry_after: Duration::from_secs(5) })?,
            None => Vec::new(),
        };
        Ok(SpendReport { from, to, rows })
    }

    /// What one job spent on model calls, if it made any.
    async fn usage(&self, id: &JobId) -> Option<JobUsage> {
        let source = self.usage.as_ref()?;
        source.usage_of(std::slice::from_ref(id)).await.remove(id)
    }

    /// Take one of the tenant's stream slots, or refuse with the `max-streams` rule.
    pub fn open_stream(&self, caller: &Caller, kind: StreamKind) -> Result<StreamSlot, JobError> {
        let max = self.policy.rules_for(&caller.tenant).max_streams;
        let mut open = self.streams.lock().unwrap();
        let count = open.entry(caller.tenant.clone()).or_default();
        if *count >= max {
            self.metrics.policy_denials.get_or_create(&RuleLabel { rule: Rule::MaxStreams.name() }).inc();
            return Err(JobError::PolicyDenied {
                rule: Rule::MaxStreams,
                detail: format!("tenant {} already has {count} open streams; the limit is {max}", caller.tenant),
                retry_after: Some(Duration::from_secs(5)),
            });
        }
        *count += 1;
        let gauge = match kind {
            StreamKind::Logs => self.metrics.log_streams.clone(),
            StreamKind::Watch => self.metrics.watch_streams.clone(),
        };
        gauge.inc();
        Ok(StreamSlot { open: self.streams.clone(), tenant: caller.tenant.clone(), gauge })
    }

    /// The job now (unless its state is `last_seen`), then each change until it finishes or
    /// `stop` fires (then a closing event).
    pub async fn watch(
        &self,
        caller: &Caller,
        id: &str,
        last_seen: Option<String>,
        stop: CancellationToken,
    ) -> Result<BoxStream<'static, WatchEvent>, JobError> {
        let job = self.get(caller, id).await?;
        let changes = self.backend.changes().map(|changes| changes.subscribe(&job.id));
        let watch = Watch {
            backend: self.backend.clone(),
            usage: self.usage.clone(),
            id: job.id.clone(),
            changes,
            read_alone: true,
        };
        let start = (watch, last_seen, None::<Arc<JobSnapshot>>, false);
        let events = futures::stream::unfold(start, move |(mut watch, last, mut seen, done)| {
            let stop = stop.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    // The state last read, sent already or the client's: wait for a change first.
                    if let Some(now) = seen.take() {
                        if now.job.status.phase.is_terminal() {
                            return None;
                        }
                        tokio::select! {
                            () = watch.next_change(&now.job) => {}
                            () = stop.cancelled() => return Some((WatchEvent::Closing(now), (watch, last, None, true))),
                        }
                    }
                    let now = watch.read().await?;
                    if last.as_deref() != Some(now.state.as_str()) {
                        let state = now.state.clone();
                        return Some((WatchEvent::Changed(now.clone()), (watch, Some(state), Some(now), false)));
                    }
                    seen = Some(now);
                }
            }
        });
        Ok(Box::pin(events))
    }

    /// A job's usage changed (the gateway settled one of its calls): wake its watchers.
    pub fn usage_changed(&self, id: &JobId) {
        if let Some(changes) = self.backend.changes() {
            changes.changed(id.as_str());
        }
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn is_ready(&self) -> bool {
        self.backend.is_ready()
    }

    /// Create a job. With a key, a retry of the same request returns the first job, and a
    /// different request under the same key is refused.
    #[tracing::instrument(name = "create job", skip_all, fields(oats.job.id = tracing::field::Empty))]
    pub async fn submit(
        &self,
        caller: &Caller,
        request: JobRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Submitted, JobError> {
        let result = match self.prepare(caller, request, idempotency_key).await {
            Ok(Prepared::Existing(job)) => Ok(Submitted { job, created: false }),
            Ok(Prepared::New(job, reservation)) => {
                let created = self.create(job, idempotency_key.is_some()).await;
                // Only now: a created job is counted by the backend from here on.
                drop(reservation);
                created
            }
            Err(error) => Err(error),
        };
        let outcome = match &result {
            Ok(Submitted { created: true, .. }) => SubmissionOutcome::Accepted,
            Ok(Submitted { created: false, .. }) => SubmissionOutcome::Existing,
            Err(JobError::Invalid(_) | JobError::IdempotencyConflict(_)) => SubmissionOutcome::Invalid,
            Err(JobError::PolicyDenied { .. } | JobError::Forbidden(_) | JobError::QuotaExhausted { .. }) => {
                SubmissionOutcome::Rejected
            }
            Err(_) => SubmissionOutcome::Error,
        };
        self.metrics.submission(outcome);
        if let Ok(submitted) = &result {
            tracing::info!(job_id = %submitted.job.id, created = submitted.created, "job submitted");
        }
        result
    }

    /// Judge a submission by every rule and show what would be created, creating nothing. On
    /// Kubernetes the API server judges it too (a server-side dry-run create), so a dry run is
    /// "not allowed" for anything the real create would be refused for.
    pub async fn dry_run(&self, caller: &Caller, request: JobRequest) -> Result<DryRun, JobError> {
        let mut job = self.new_job(caller, request, None)?.1;
        let creating = self.in_creation(&self.creating.lock().unwrap(), &job.tenant);
        let evaluation = self.evaluate(&job, false, creating);
        job.resources = evaluation.resources;
        let preview = self.backend.preview(&job);
        let mut verdicts = evaluation.verdicts;
        verdicts.push(pod_security_verdict(&preview.pod_security_violations));
        if let Some(answer) = self.backend.dry_run_create(&job).await {
            verdicts.push(match answer {
                Ok(()) => Verdict::allow(
                    Rule::KubernetesAdmission,
                    "the Kubernetes API server accepts the Job (server-side dry run)",
                ),
                Err(BackendError::Invalid(detail)) => Verdict::deny(Rule::KubernetesAdmission, detail),
                Err(BackendError::QuotaExhausted { detail, retry_after }) => {
                    Verdict { retry_after: Some(retry_after), ..Verdict::deny(Rule::NamespaceQuota, detail) }
                }
                Err(error) => return Err(error.into()),
            });
        }
        Ok(DryRun { verdicts, manifest: preview.manifest })
    }

    fn new_job(
        &self,
        caller: &Caller,
        request: JobRequest,
        idempotency_key: Option<&str>,
    ) -> Result<(Option<IdempotencyKey>, NewJob), JobError> {
        if !caller.may_write() {
            return Err(JobError::Forbidden(format!("role {:?} may not submit jobs", caller.role)));
        }
        let key = idempotency_key.map(IdempotencyKey::parse).transpose();
        let spec = request.validate(&self.limits);
        let (key, mut spec) = match (key, spec) {
            (Ok(key), Ok(spec)) => (key, spec),
            (key, spec) => {
                let mut errors = key.err().into_iter().collect::<Vec<_>>();
                errors.extend(spec.err().unwrap_or_default());
                return Err(JobError::Invalid(errors));
            }
        };
        let rules = self.policy.rules_for(&caller.tenant);
        spec.budget = spec.budget.or(rules.default_budget);
        let id = match &key {
            Some(key) => JobId::for_idempotency_key(&caller.tenant, key),
            None => JobId::random(),
        };
        tracing::Span::current().record("oats.job.id", id.as_str());
        let job = NewJob {
            id,
            tenant: caller.tenant.to_string(),
            request_hash: spec.fingerprint(),
            spec,
            created_at: Utc::now(),
            trace: TraceContext::current(),
            resources: None,
            queue: rules.queue_choice(),
        };
        Ok((key, job))
    }

    /// How many of the tenant's admitted submissions the backend does not count yet (a create
    /// that has reached the backend is counted there, once).
    fn in_creation(&self, creating: &Creating, tenant: &str) -> usize {
        creating.get(tenant).map_or(0, |ids| ids.iter().filter(|id| !self.backend.knows(id)).count())
    }

    /// Judge `job` by the policy; `creating` more of the tenant's jobs are being created now.
    fn evaluate(&self, job: &NewJob, consume: bool, creating: usize) -> Evaluation {
        let active_jobs = self.backend.active_jobs(&job.tenant) + creating;
        // A submission being created will hold a Job too.
        let kept_jobs = self.backend.kept_jobs(&job.tenant) + creating;
        let image = self.backend.agent_image();
        let submission =
            Submission { tenant: &job.tenant, spec: &job.spec, active_jobs, kept_jobs, image: image.as_deref() };
        self.policy.evaluate(&submission, consume)
    }

    /// Validate, find an idempotent replay, or judge a new job by the policy.
    async fn prepare(
        &self,
        caller: &Caller,
        request: JobRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Prepared, JobError> {
        let (key, mut job) = self.new_job(caller, request, idempotency_key)?;
        if key.is_some()
            && let Some(existing) = self.backend.get(&job.id).await?
        {
            return replay(JobRecord::clone(&existing), &job).map(Prepared::Existing);
        }
        // Count, judge and reserve at once: a burst of parallel submissions cannot all see room.
        let (evaluation, reservation) = {
            let mut creating = self.creating.lock().unwrap();
            let in_flight = self.in_creation(&creating, &job.tenant);
            let evaluation = self.evaluate(&job, true, in_flight);
            let reservation = evaluation.denial().is_none().then(|| {
                creating.entry(job.tenant.clone()).or_default().push(job.id.clone());
                Reservation { creating: self.creating.clone(), tenant: job.tenant.clone(), id: job.id.clone() }
            });
            (evaluation, reservation)
        };
        if let Some(denial) = evaluation.denial() {
            self.metrics.policy_denials.get_or_create(&RuleLabel { rule: denial.rule.name() }).inc();
            return Err(JobError::PolicyDenied {
                rule: denial.rule,
                detail: denial.detail.clone(),
                retry_after: denial.retry_after,
            });
        }
        job.resources = evaluation.resources;
        Ok(Prepared::New(job, reservation.expect("an admitted submission holds a reservation")))
    }

    async fn create(&self, job: NewJob, keyed: bool) -> Result<Submitted, JobError> {
        match self.backend.create(job.clone()).await {
            Ok(CreateOutcome::Created(job)) => Ok(Submitted { job, created: true }),
            Ok(CreateOutcome::Exists(existing)) if keyed => {
                replay(existing, &job).map(|job| Submitted { job, created: false })
            }
            Ok(CreateOutcome::Exists(_)) => Err(JobError::Internal(format!("random job id {} collided", job.id))),
            Err(BackendError::Refused(detail)) => {
                self.metrics.policy_denials.get_or_create(&RuleLabel { rule: Rule::PodSecurity.name() }).inc();
                Err(JobError::PolicyDenied { rule: Rule::PodSecurity, detail, retry_after: None })
            }
            Err(BackendError::Invalid(detail)) => {
                let rule = Rule::KubernetesAdmission;
                self.metrics.policy_denials.get_or_create(&RuleLabel { rule: rule.name() }).inc();
                Err(JobError::PolicyDenied { rule, detail, retry_after: None })
            }
            Err(BackendError::QuotaExhausted { detail, retry_after }) => {
                self.metrics.kube_quota_refusals.inc();
                tracing::warn!(job_id = %job.id, %detail, "the namespace's ResourceQuota refused a job");
                Err(JobError::QuotaExhausted { detail, retry_after })
            }
            Err(error) => Err(error.into()),
        }
    }

    /// A job by id for a trusted caller inside the service (the LLM gateway, which has already
    /// identified the job by its credential); tenancy is the caller's business.
    pub async fn job(&self, id: &JobId) -> Result<Option<Arc<JobRecord>>, JobError> {
        Ok(self.backend.get(id).await?)
    }

    /// The policy's rules for `tenant` now.
    pub fn rules_for(&self, tenant: &str) -> TenantRules {
        self.policy.rules_for(tenant)
    }

    pub async fn get(&self, caller: &Caller, id: &str) -> Result<Arc<JobRecord>, JobError> {
        Ok(self.locate(caller, id).await?.job().clone())
    }

    /// A job the caller may see and what it spent. The job first: reading an archived job may
    /// bring its final usage along, and then the usage needs no read of its own.
    pub async fn get_with_usage(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(Arc<JobRecord>, Option<JobUsage>), JobError> {
        let id = parse_id(id)?;
        let job = self.locate_id(caller, &id).await?.job().clone();
        Ok((job, self.usage(&id).await))
    }

    /// Find a job the caller may see: in the backend, else in the history.
    async fn locate(&self, caller: &Caller, id: &str) -> Result<Located, JobError> {
        self.locate_id(caller, &parse_id(id)?).await
    }

    /// [`Self::locate`] with the id parsed (once per request: parsing copies it).
    async fn locate_id(&self, caller: &Caller, id: &JobId) -> Result<Located, JobError> {
        let found = match self.backend.get(id).await? {
            Some(job) => Some(Located::Live(job)),
            None => match &self.history {
                Some(history) => history.record(id).await.map_err(history_error)?.map(Located::Archived),
                None => None,
            },
        };
        let found = found.or_else(|| self.backend.recently_departed(id).map(Located::Departed));
        // Another tenant's job is answered as one that does not exist.
        match found {
            Some(located) if caller.sees(&located.job().tenant) => Ok(located),
            _ => Err(JobError::NotFound(id.to_string())),
        }
    }

    /// A page of the caller's jobs: live ones and archived ones in one order. While the history
    /// cannot be read, the page holds the live jobs (and says so in the server's log).
    pub async fn list(&self, caller: &Caller, query: &ListQuery) -> Result<JobPage, JobError> {
        let tenant = caller.listed_tenant();
        let live = self.backend.page(tenant, query).await?;
        let Some(history) = &self.history else { return Ok(page::cut(live, query.limit)) };
        // A full page of live jobs all newer than any job the backend forgot needs nothing from
        // the history (it would sort after the page): no database call.
        let departed_since = |t| self.backend.newest_departed().is_some_and(|d| d >= t);
        let more_live = live.len() > query.limit;
        if let Some(last) = live.get(query.limit - 1).map(|j| j.created_at)
            && more_live
            && !self.horizon.may_hold_newer_than(last)
            && !departed_since(last)
        {
            return Ok(page::cut(live, query.limit));
        }
        let archived = match history.page(tenant, query).await {
            Ok(archived) => archived,
            Err(error) => {
                tracing::warn!(%error, "listing without archived jobs: the history cannot be read");
                return Ok(page::cut(live, query.limit));
            }
        };
        Ok(page::cut(page::merge(live, archived, query.limit), query.limit))
    }

    /// Cancel a job. Cancelling a cancelled job is harmless; cancelling a finished one is refused.
    pub async fn cancel(&self, caller: &Caller, id: &str) -> Result<JobRecord, JobError> {
        let job = self.get(caller, id).await?;
        if !caller.may_write() {
            return Err(JobError::Forbidden(format!("role {:?} may not cancel jobs", caller.role)));
        }
        if job.status.phase.is_terminal() && job.status.phase != JobPhase::Cancelled {
            return Err(JobError::AlreadyFinished { id: job.id.to_string(), phase: job.status.phase.as_str() });
        }
        match self.backend.cancel(&job.id).await {
            Err(BackendError::AlreadyFinished(_)) => {
                let job = self.get(caller, id).await?;
                Err(JobError::AlreadyFinished { id: job.id.to_string(), phase: job.status.phase.as_str() })
            }
            other => Ok(other?),
        }
    }

    pub async fn logs(&self, caller: &Caller, id: &str, options: LogOptions) -> Result<LogStream, JobError> {
        match self.locate(caller, id).await? {
            Located::Live(job) => Ok(self.backend.logs(&job.id, options).await?),
            Located::Archived(job) => {
                let logs = self.history()?.logs(&job.id).await.map_err(history_error)?.unwrap_or_default();
                Ok(history::archived_log_stream(logs, &options, chrono::Utc::now()))
            }
            // Its pods went with it; the history will have its output once it is archived.
            Located::Departed(_) => Ok(Box::pin(futures::stream::empty())),
        }
    }

    pub async fn events(&self, caller: &Caller, id: &str) -> Result<Vec<JobEvent>, JobError> {
        match self.locate(caller, id).await? {
            Located::Live(job) | Located::Departed(job) => Ok(self.backend.events(&job.id).await?),
            Located::Archived(job) => {
                Ok(self.history()?.events(&job.id).await.map_err(history_error)?.unwrap_or_default())
            }
        }
    }

    /// The history (there is one when a job was found in it).
    fn history(&self) -> Result<&dyn JobHistory, JobError> {
        self.history.as_deref().ok_or_else(|| JobError::Internal("no job history".into()))
    }
}

/// The history is the store: when it cannot answer, the API says so (503), never "not found".
fn history_error(error: HistoryError) -> JobError {
    match error {
        HistoryError::Unavailable(detail) => JobError::Unavailable { detail, retry_after: Duration::from_secs(5) },
        HistoryError::Corrupt { .. } => JobError::Internal(error.to_string()),
    }
}

enum Prepared {
    New(NewJob, Reservation),
    Existing(JobRecord),
}

/// An idempotent retry returns the job its key created, if the request is the same.
fn replay(existing: JobRecord, job: &NewJob) -> Result<JobRecord, JobError> {
    if existing.tenant == job.tenant && existing.request_hash == job.request_hash {
        Ok(existing)
    } else {
        Err(JobError::IdempotencyConflict(existing.id.to_string()))
    }
}

fn pod_security_verdict(violations: &[String]) -> Verdict {
    if violations.is_empty() {
        Verdict::allow(Rule::PodSecurity, "the rendered pod meets the restricted profile")
    } else {
        Verdict::deny(Rule::PodSecurity, violations.join("; "))
    }
}

/// A malformed id names no job, so it is "not found" like any other unknown id.
fn parse_id(id: &str) -> Result<JobId, JobError> {
    JobId::parse(id).map_err(|_| JobError::NotFound(id.chars().take(64).collect()))
}

impl From<BackendError> for JobError {
    fn from(err: BackendError) -> Self {
        match err {
            BackendError::NotFound(id) => JobError::NotFound(id),
            BackendError::AlreadyFinished(id) => JobError::AlreadyFinished { id, phase: "finished" },
            BackendError::Unavailable { detail, retry_after } => JobError::Unavailable { detail, retry_after },
            BackendError::Refused(detail) => {
                JobError::PolicyDenied { rule: Rule::PodSecurity, detail, retry_after: None }
            }
            BackendError::Invalid(detail) => {
                JobError::PolicyDenied { rule: Rule::KubernetesAdmission, detail, retry_after: None }
            }
            BackendError::QuotaExhausted { detail, retry_after } => JobError::QuotaExhausted { detail, retry_after },
            BackendError::Internal(message) => JobError::Internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{CreateOutcome, JobChanges, JobCounts, LogStream, Preview};
    use async_trait::async_trait;
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A backend whose create takes a while (an API server round trip) and that counts a job
    /// from the moment its create returns, as every backend must.
    #[derive(Default)]
    struct SlowBackend {
        jobs: Mutex<Vec<Arc<JobRecord>>>,
        fail_creates: bool,
        /// Count the job before the create returns (the local backend stores it, then writes).
        counts_before_returning: bool,
        /// Say which job changed (watchers wait for it), and count the reads of a job.
        changes: Option<JobChanges>,
        gets: AtomicUsize,
    }

    #[async_trait]
    impl JobBackend for SlowBackend {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn is_ready(&self) -> bool {
            true
        }
        fn agent_image(&self) -> Option<String> {
            None
        }
        fn preview(&self, _job: &NewJob) -> Preview {
            Preview { manifest: serde_json::Value::Null, pod_security_violations: vec![] }
        }
        fn active_jobs(&self, tenant: &str) -> usize {
            self.jobs.lock().unwrap().iter().filter(|j| j.tenant == tenant && !j.status.phase.is_terminal()).count()
        }
        fn kept_jobs(&self, tenant: &str) -> usize {
            self.jobs.lock().unwrap().iter().filter(|j| j.tenant == tenant).count()
        }
        fn knows(&self, id: &JobId) -> bool {
            self.jobs.lock().unwrap().iter().any(|j| &j.id == id)
        }
        fn counts(&self) -> JobCounts {
            JobCounts::default()
        }
        async fn create(&self, job: NewJob) -> Result<CreateOutcome, BackendError> {
            if self.counts_before_returning {
                let record = job.pending_record();
                self.jobs.lock().unwrap().push(Arc::new(record.clone()));
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Ok(CreateOutcome::Created(record));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.fail_creates {
                return Err(BackendError::Unavailable { detail: "down".into(), retry_after: Duration::from_secs(1) });
            }
            let record = job.pending_record();
            self.jobs.lock().unwrap().push(Arc::new(record.clone()));
            Ok(CreateOutcome::Created(record))
        }
        fn changes(&self) -> Option<&JobChanges> {
            self.changes.as_ref()
        }
        async fn get(&self, id: &JobId) -> Result<Option<Arc<JobRecord>>, BackendError> {
            self.gets.fetch_add(1, Ordering::Relaxed);
            Ok(self.jobs.lock().unwrap().iter().find(|j| &j.id == id).cloned())
        }
        async fn list(&self) -> Result<Vec<Arc<JobRecord>>, BackendError> {
            Ok(self.jobs.lock().unwrap().clone())
        }
        async fn cancel(&self, id: &JobId) -> Result<JobRecord, BackendError> {
            Err(BackendError::NotFound(id.to_string()))
        }
        async fn logs(&self, id: &JobId, _options: LogOptions) -> Result<LogStream, BackendError> {
            Err(BackendError::NotFound(id.to_string()))
        }
        async fn events(&self, _id: &JobId) -> Result<Vec<JobEvent>, BackendError> {
            Ok(vec![])
        }
    }

    #[tokio::test]
    async fn a_job_the_backend_counts_before_its_create_returns_is_not_counted_twice() {
        let backend = Arc::new(SlowBackend { counts_before_returning: true, ..SlowBackend::default() });
        let (_dir, service) = service(backend.clone(), 2);
        let results = burst(&service, "t", 10).await;
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2, "exactly the limit");
        assert!(service.creating.lock().unwrap().is_empty(), "every reservation is released");
    }

    fn service(backend: Arc<SlowBackend>, max_concurrent_jobs: u32) -> (tempfile::TempDir, JobService) {
        service_with(backend, &format!("defaults:\n  max_concurrent_jobs: {max_concurrent_jobs}\n"))
    }

    fn service_with(backend: Arc<SlowBackend>, policy: &str) -> (tempfile::TempDir, JobService) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, policy).unwrap();
        let policy = Policy::load(&path).unwrap();
        (dir, JobService::new(backend, JobLimits::default(), policy, Arc::default()))
    }

    fn caller(tenant: &str) -> Caller {
        Caller { tenant: tenant.into(), role: Role::Submitter, name: "t".into() }
    }

    async fn burst(service: &JobService, tenant: &str, n: usize) -> Vec<Result<Submitted, JobError>> {
        let caller = caller(tenant);
        let submissions = (0..n).map(|i| {
            let request = JobRequest { goal: format!("job {i}"), max_turns: 1, ..Default::default() };
            service.submit(&caller, request, None)
        });
        futures::future::join_all(submissions).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_parallel_submissions_never_passes_max_concurrent_jobs() {
        let backend = Arc::new(SlowBackend::default());
        let (_dir, service) = service(backend.clone(), 2);
        let results = burst(&service, "t", 50).await;
        let accepted = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(accepted, 2, "{:?}", results.iter().filter_map(|r| r.as_ref().err()).next());
        for error in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                matches!(error, JobError::PolicyDenied { rule: Rule::MaxConcurrentJobs, retry_after: Some(_), .. }),
                "{error:?}"
            );
        }
        assert_eq!(backend.jobs.lock().unwrap().len(), 2);
        // Another tenant has its own room.
        assert_eq!(burst(&service, "u", 5).await.iter().filter(|r| r.is_ok()).count(), 2);
        assert!(service.creating.lock().unwrap().is_empty(), "every reservation is released");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finished_jobs_still_kept_count_against_max_kept_jobs_even_in_a_burst() {
        let backend = Arc::new(SlowBackend::default());
        let (_dir, service) =
            service_with(backend.clone(), "defaults:\n  max_concurrent_jobs: 100\n  max_kept_jobs: 3\n");
        let results = burst(&service, "t", 20).await;
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
        for error in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                matches!(error, JobError::PolicyDenied { rule: Rule::MaxKeptJobs, retry_after: Some(_), .. }),
                "{error:?}"
            );
        }
        // Finished, but still held: still counted.
        for job in backend.jobs.lock().unwrap().iter_mut() {
            let mut record = JobRecord::clone(job);
            record.status.phase = JobPhase::Succeeded;
            *job = Arc::new(record);
        }
        let result = burst(&service, "t", 1).await.pop().unwrap();
        assert!(matches!(result, Err(JobError::PolicyDenied { rule: Rule::MaxKeptJobs, .. })), "{result:?}");
        // Removed (the TTL): room again.
        backend.jobs.lock().unwrap().pop();
        assert!(burst(&service, "t", 1).await.pop().unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_failed_create_gives_its_reservation_back() {
        let backend = Arc::new(SlowBackend { fail_creates: true, ..Default::default() });
        let (_dir, service) = service(backend, 1);
        for _ in 0..3 {
            let result = burst(&service, "t", 1).await.pop().unwrap();
            assert!(matches!(result, Err(JobError::Unavailable { .. })), "{result:?}");
        }
        assert!(service.creating.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_watchers_of_a_change_share_one_read_and_one_encoding_of_it() {
        const WATCHERS: usize = 20;
        let backend = Arc::new(SlowBackend { changes: Some(JobChanges::default()), ..SlowBackend::default() });
        let (_dir, service) = service(backend.clone(), 1);
        let id = burst(&service, "t", 1).await.pop().unwrap().unwrap().job.id;
        let mut streams = Vec::new();
        for _ in 0..WATCHERS {
            let mut events = service.watch(&caller("t"), id.as_str(), None, CancellationToken::new()).await.unwrap();
            let first = events.next().await.unwrap();
            assert!(matches!(&first, WatchEvent::Changed(now) if now.job.status.phase == JobPhase::Pending));
            streams.push(events);
        }

        let reads_before = backend.gets.load(Ordering::Relaxed);
        for job in backend.jobs.lock().unwrap().iter_mut() {
            let mut record = JobRecord::clone(job);
            record.status.phase = JobPhase::Cancelled;
            *job = Arc::new(record);
        }
        backend.changes.as_ref().unwrap().changed(id.as_str());
        let encodings = AtomicUsize::new(0);
        let mut sent = Vec::new();
        for events in &mut streams {
            let change = events.next().await.unwrap();
            assert!(matches!(&change, WatchEvent::Changed(now) if now.job.status.phase == JobPhase::Cancelled));
            sent.push(change.encoded(|event| {
                encodings.fetch_add(1, Ordering::Relaxed);
                Bytes::from(event.snapshot().state.clone())
            }));
            assert!(events.next().await.is_none(), "a watch ends with its job");
        }
        assert_eq!(backend.gets.load(Ordering::Relaxed) - reads_before, 1, "one read of the change for all");
        assert_eq!(encodings.load(Ordering::Relaxed), 1, "one encoding of the change for all");
        assert!(sent.iter().all(|bytes| bytes.as_ptr() == sent[0].as_ptr()), "every stream sends the same bytes");
        assert!(sent[0].starts_with(b"cancelled-"));
    }

    #[tokio::test]
    async fn a_watch_ends_with_a_closing_event_of_the_state_last_sent_when_stopped() {
        let backend = Arc::new(SlowBackend { changes: Some(JobChanges::default()), ..SlowBackend::default() });
        let (_dir, service) = service(backend.clone(), 1);
        let id = burst(&service, "t", 1).await.pop().unwrap().unwrap().job.id;
        let stop = CancellationToken::new();
        let mut events = service.watch(&caller("t"), id.as_str(), None, stop.clone()).await.unwrap();
        let WatchEvent::Changed(sent) = events.next().await.unwrap() else { panic!("a change first") };
        stop.cancel();
        let closing = events.next().await.unwrap();
        assert!(matches!(&closing, WatchEvent::Closing(now) if now.state == sent.state), "{closing:?}");
        assert!(events.next().await.is_none(), "nothing after the closing event");
    }
}
