//! The Kubernetes backend: each job is a `batch/v1` Job in one namespace.
//!
//! Reads come from watch-backed caches of the Jobs and Pods labelled `app=oats-agent`; writes go
//! to the API server, which is the only source of truth, so any number of replicas agree.

pub mod cache;
pub mod kueue;
pub mod pss;
pub mod render;
pub mod status;
pub mod wire;

#[cfg(test)]
mod mock_tests;

use crate::{
    jobs::{
        BackendError, CreateOutcome, JobBackend, JobChanges, JobCounts, JobEvent, JobId, JobRecord, ListQuery,
        LogOptions, LogStream, NewJob, Preview,
    },
    telemetry::{
        self,
        metrics::{Metrics, ResourceLabel},
    },
};
use async_trait::async_trait;
use cache::JobCache;
use futures::StreamExt;
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Event, Pod},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, LogParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use kueue::{QueueMetrics, QueueView};
use render::{AGENT_CONTAINER, AgentTemplate, CANCELLED_AT_ANNOTATION};
use std::{
    collections::{HashMap, HashSet, hash_map},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::Notify;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use wire::{CachedJob, CachedPod};

/// How long clients are told to wait before retrying when the API server is unreachable.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long clients are told to wait when the namespace's ResourceQuota has no room.
const QUOTA_RETRY_AFTER: Duration = Duration::from_secs(30);
/// How often a cancel re-reads the Job and tries again when it changed under the patch.
const CANCEL_ATTEMPTS: usize = 5;
/// How long a job's events, once listed from the API server, answer its events requests.
const EVENTS_TTL: Duration = Duration::from_secs(5);
/// How long a followed output may stay quiet after the agent exited before OATS ends it. A
/// kubelet ends the stream itself within about a second of the exit, having sent everything;
/// one that does not (a lost node, kwok) would otherwise hold the request open forever.
const FOLLOW_DRAIN: Duration = Duration::from_secs(2);
/// How often a quiet followed output looks in the cache for the agent's exit.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// One job's events as last listed, and when.
type EventsSlot = Arc<tokio::sync::Mutex<Option<(Instant, Arc<Vec<JobEvent>>)>>>;

/// Jobs as Kubernetes Jobs.
pub struct KubernetesBackend {
    client: Client,
    template: AgentTemplate,
    cache: Arc<JobCache>,
    health: Arc<CacheHealth>,
    /// Per job, its events as last listed (for [`EVENTS_TTL`]); one listing at a time per job.
    events: Mutex<HashMap<JobId, EventsSlot>>,
    /// With Kueue: the places of waiting jobs.
    queues: Option<Arc<QueueView>>,
    /// Which job the watches just changed, for the API's watch streams.
    changes: Arc<JobChanges>,
}

/// Fails a job Kueue preempted when its tenant's policy says so (`on_preemption: fail`, an
/// annotation on the Job): marks it preempted, then deletes the Job Kueue holds suspended (the
/// history keeps the job, failed). Each replica may try; both steps are idempotent.
struct PreemptionFailer {
    api: Api<CachedJob>,
    cache: Arc<JobCache>,
    failing: Mutex<HashSet<String>>,
}

impl PreemptionFailer {
    fn fail_if_asked(self: &Arc<Self>, job: &str) {
        if !self.cache.fails_on_preemption(job) || !self.failing.lock().unwrap().insert(job.to_owned()) {
            return;
        }
        let (failer, job) = (self.clone(), job.to_owned());
        tokio::spawn(async move {
            let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
            let patch = serde_json::json!({"metadata": {"annotations": {render::PREEMPTED_AT_ANNOTATION: at}}});
            let marked = failer.api.patch(&job, &PatchParams::default(), &Patch::Merge(&patch)).await;
            let deleted = match marked {
                Ok(_) => failer.api.delete(&job, &kube::api::DeleteParams::background()).await.map(drop),
                Err(error) => Err(error),
            };
            match deleted {
                Ok(()) => tracing::info!(job_id = %job, "failed a job Kueue preempted, as its tenant's policy asks"),
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(error) => tracing::warn!(job_id = %job, %error, "cannot fail a preempted job; retrying"),
            }
            failer.failing.lock().unwrap().remove(&job);
        });
    }
}

/// What a watch event changed: one job (by id), or, for a re-list, possibly every job.
enum Changed {
    One(String),
    All,
    Nothing,
}

fn changed_object<K>(event: &watcher::Event<K>, job_of: impl Fn(&K) -> Option<String>) -> Changed {
    match event {
        watcher::Event::Apply(object) | watcher::Event::Delete(object) => {
            job_of(object).map_or(Changed::Nothing, Changed::One)
        }
        watcher::Event::InitDone => Changed::All,
        watcher::Event::Init | watcher::Event::InitApply(_) => Changed::Nothing,
    }
}

/// Wake the watch streams of what changed, once the cache holds it.
fn tell(changes: &JobChanges, changed: Changed) {
    match changed {
        Changed::One(id) => changes.changed(&id),
        Changed::All => changes.changed_all(),
        Changed::Nothing => {}
    }
}

/// Whether one watch has listed once, and whether it is healthy now.
struct WatchHealth {
    resource: &'static str,
    synced: AtomicBool,
    healthy: AtomicBool,
}

impl WatchHealth {
    fn new(resource: &'static str) -> Self {
        Self { resource, synced: AtomicBool::new(false), healthy: AtomicBool::new(false) }
    }

    fn ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed) && self.healthy.load(Ordering::Relaxed)
    }
}

/// The health of both watches.
///
/// A watch that reconnects after an outage yields nothing until an object changes, so the
/// stream alone cannot say it recovered; after a failure, [`probe_until_reachable`] lists
/// through the API server until it answers and then marks both watches healthy again.
struct CacheHealth {
    jobs: WatchHealth,
    pods: WatchHealth,
    failed: Notify,
    metrics: Arc<Metrics>,
}

impl CacheHealth {
    fn publish(&self, watch: &WatchHealth) {
        let value = i64::from(watch.ready());
        self.metrics.watches.cache_synced.get_or_create(&ResourceLabel { resource: watch.resource }).set(value);
    }
}

/// Counts each job's finish exactly once across replicas: the replica whose annotation patch,
/// guarded by the Job's resourceVersion, succeeds is the one that counts it (and emits its
/// lifecycle spans). A replica that loses the race gets 409 Conflict and counts nothing; a job
/// that changed meanwhile is claimed again at its newer version: the one its watch delivered
/// while the claim was in flight, or the next one it delivers.
struct FinishCounter {
    api: Api<CachedJob>,
    metrics: Arc<Metrics>,
    replica: String,
    /// Jobs whose claim is in flight, with the newest version seen meanwhile.
    claiming: Mutex<HashMap<String, Option<cache::Entry>>>,
}

impl FinishCounter {
    fn count_finish(self: &Arc<Self>, name: String, entry: &cache::Entry) {
        if entry.facts.counted || !entry.record.status.phase.is_terminal() {
            return;
        }
        match self.claiming.lock().unwrap().entry(name.clone()) {
            hash_map::Entry::Occupied(mut claim) => {
                claim.insert(Some(entry.clone()));
                return;
            }
            hash_map::Entry::Vacant(claim) => {
                claim.insert(None);
            }
        }
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": entry.facts.resource_version,
            "annotations": { render::COUNTED_ANNOTATION: self.replica },
        }});
        let counter = self.clone();
        let record = entry.record.clone();
        tokio::spawn(async move {
            let lost = match counter.api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    counter.metrics.jobs.job_finished(&record);
                    telemetry::trace::emit_lifecycle(&record);
                    false
                }
                Err(kube::Error::Api(status)) if status.is_not_found() => false,
                Err(kube::Error::Api(status)) if status.is_conflict() => true,
                Err(error) => {
                    tracing::warn!(job_id = %name, %error, "cannot mark the job's finish as counted");
                    true
                }
            };
            let newer = counter.claiming.lock().unwrap().remove(&name).flatten();
            if lost && let Some(newer) = newer {
                counter.count_finish(name, &newer);
            }
        });
    }
}

impl KubernetesBackend {
    /// Start the watches (on the current Tokio runtime) and return at once; `is_ready` turns true
    /// when both caches have synced.
    pub fn start(client: Client, template: AgentTemplate, metrics: Arc<Metrics>, queue_metrics: QueueMetrics) -> Self {
        let selector = format!("{}={}", render::APP_LABEL.0, render::APP_LABEL.1);
        let config = watcher::Config::default().labels(&selector);
        let health = Arc::new(CacheHealth {
            jobs: WatchHealth::new("jobs"),
            pods: WatchHealth::new("pods"),
            failed: Notify::new(),
            metrics: metrics.clone(),
        });
        let job_api: Api<CachedJob> = Api::namespaced(client.clone(), &template.namespace);
        let finishes = Arc::new(FinishCounter {
            api: job_api.clone(),
            metrics,
            replica: std::env::var("HOSTNAME").unwrap_or_else(|_| "oats".into()),
            claiming: Mutex::default(),
        });
        let cache = Arc::new(JobCache::default());
        let changes = Arc::new(JobChanges::default());

        let job_events = watcher(job_api, config.clone()).default_backoff();
        let (jobs, job_changes) = (cache.clone(), changes.clone());
        let on_job = move |event: watcher::Event<CachedJob>| {
            let changed = changed_object(&event, |job: &CachedJob| Some(job.name_any()));
            if let Some((name, entry)) = jobs.apply_job_event(event) {
                finishes.count_finish(name, &entry);
            }
            tell(&job_changes, changed);
        };
        tokio::spawn(drive(job_events, health.clone(), |h| &h.jobs, on_job));

        let pod_api: Api<CachedPod> = Api::namespaced(client.clone(), &template.namespace);
        let pod_events = watcher(pod_api, config).default_backoff();
        let (pods, pod_changes) = (cache.clone(), changes.clone());
        let on_pod = move |event: watcher::Event<CachedPod>| {
            let changed = changed_object(&event, |pod: &CachedPod| pod.job_id().cloned());
            pods.apply_pod_event(event);
            tell(&pod_changes, changed);
        };
        tokio::spawn(drive(pod_events, health.clone(), |h| &h.pods, on_pod));
        tokio::spawn(probe_until_reachable(client.clone(), template.namespace.clone(), selector, health.clone()));

        let queues = template.kueue_default_queue.as_ref().map(|_| {
            let failer = Arc::new(PreemptionFailer {
                api: Api::namespaced(client.clone(), &template.namespace),
                cache: cache.clone(),
                failing: Mutex::default(),
            });
            let on_preempted = Box::new(move |job: &str| failer.fail_if_asked(job));
            let view = QueueView::new(
                client.clone(),
                template.namespace.clone(),
                queue_metrics,
                changes.clone(),
                on_preempted,
            );
            let waiting = cache.clone();
            view.spawn(move || waiting.any_queued());
            view
        });
        Self { client, template, cache, health, events: Mutex::default(), queues, changes }
    }

    /// Reads of the whole cache wait for both watches' first lists.
    fn check_synced(&self) -> Result<(), BackendError> {
        let synced = |w: &WatchHealth| w.synced.load(Ordering::Relaxed);
        if synced(&self.health.jobs) && synced(&self.health.pods) { Ok(()) } else { Err(not_ready()) }
    }

    /// A record as Kueue places it (unchanged without Kueue, or when it does not wait).
    fn placed(&self, record: Arc<JobRecord>) -> Arc<JobRecord> {
        match &self.queues {
            Some(view) if record.queue.is_some() => view.place(&record),
            _ => record,
        }
    }

    /// Create `manifest`, reading the API server's answer straight into the compact type (the
    /// whole Job, managed fields and all, is never built).
    /// With `dry_run`, the API server runs every check (validation, admission, quota) and
    /// persists nothing.
    async fn create_job(&self, manifest: &Job, dry_run: bool) -> Result<CachedJob, kube::Error> {
        let body = serde_json::to_vec(manifest).map_err(kube::Error::SerdeError)?;
        let jobs = kube::core::Request::new(Job::url_path(&(), Some(&self.template.namespace)));
        let params = PostParams { dry_run, ..Default::default() };
        let mut request = jobs.create(&params, body).map_err(kube::Error::BuildRequest)?;
        request.extensions_mut().insert("create");
        self.client.request::<CachedJob>(request).await
    }

    async fn delete_queued(&self, id: &JobId) -> Result<(), BackendError> {
        let params = kube::api::DeleteParams::background();
        match self.job_api().delete(id.as_str(), &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(other) => Err(write_error(other)),
        }
    }

    fn job_api(&self) -> Api<CachedJob> {
        Api::namespaced(self.client.clone(), &self.template.namespace)
    }

    /// The record of a Job read from the API server, with the cached pods of its job.
    fn record(&self, job: &CachedJob) -> Option<JobRecord> {
        let pods = self.cache.pods(&job.name_any());
        let pods: Vec<&CachedPod> = pods.iter().map(Arc::as_ref).collect();
        status::job_record(job, &pods)
    }

    /// List the events of a job and of its pods from the API server, newest first.
    async fn list_events(&self, id: &JobId) -> Result<Vec<JobEvent>, BackendError> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.template.namespace);
        let mut objects = vec![("Job".to_owned(), id.to_string())];
        objects.extend(self.cache.pods(id.as_str()).iter().map(|p| ("Pod".to_owned(), p.name_any())));
        let mut events = Vec::new();
        for (kind, name) in objects {
            let params =
                ListParams::default().fields(&format!("involvedObject.kind={kind},involvedObject.name={name}"));
            let list = api.list(&params).await.map_err(api_error)?;
            events.extend(list.items.iter().map(|e| to_job_event(e, &kind, &name)));
        }
        events.sort_by_key(|e| std::cmp::Reverse(e.time));
        Ok(events)
    }

    /// The slot of a job's listed events; slots nobody uses and whose listing expired go.
    fn events_slot(&self, id: &JobId) -> EventsSlot {
        let mut slots = self.events.lock().unwrap();
        if let Some(slot) = slots.get(id) {
            return slot.clone();
        }
        if slots.len() >= 64 {
            slots.retain(|_, slot| match slot.try_lock() {
                Ok(listed) => listed.as_ref().is_some_and(|(at, _)| at.elapsed() < EVENTS_TTL),
                Err(_) => true, // being listed now
            });
        }
        slots.entry(id.clone()).or_default().clone()
    }

    fn latest_pod(&self, id: &JobId) -> Option<Arc<CachedPod>> {
        self.cache
            .pods(id.as_str())
            .into_iter()
            .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(status::to_chrono))
    }
}

/// Run one watch forever, keeping its health and metrics current and handing each event to
/// `on_event` (which keeps the cache).
async fn drive<S, K>(
    events: S,
    health: Arc<CacheHealth>,
    watch: fn(&CacheHealth) -> &WatchHealth,
    on_event: impl Fn(watcher::Event<K>),
) where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let state = watch(&health);
        let resource = ResourceLabel { resource: state.resource };
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                health.metrics.watches.errors.get_or_create(&resource).inc();
                if state.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(watch = state.resource, %error, "watch failed; retrying with backoff");
                    health.publish(state);
                }
                health.failed.notify_one();
                continue;
            }
        };
        let (restarted, listed, applied) = (
            matches!(event, watcher::Event::Init),
            matches!(event, watcher::Event::InitDone),
            matches!(event, watcher::Event::Apply(_) | watcher::Event::InitApply(_)),
        );
        on_event(event);
        if restarted {
            health.metrics.watches.restarts.get_or_create(&resource).inc();
        } else if listed {
            state.synced.store(true, Ordering::Relaxed);
            if !state.healthy.swap(true, Ordering::Relaxed) {
                tracing::info!(watch = state.resource, "watch cache synced");
            }
            health.publish(state);
        } else if applied && state.synced.load(Ordering::Relaxed) && !state.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(watch = state.resource, "watch recovered");
            health.publish(state);
        }
    }
}

/// After each watch failure, list Jobs and Pods once a second until the API server answers,
/// then report the watches healthy (they reconnect on their own backoff).
async fn probe_until_reachable(client: Client, namespace: String, selector: String, health: Arc<CacheHealth>) {
    const PROBE_EVERY: Duration = Duration::from_secs(1);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let params = ListParams::default().labels(&selector).limit(1);
    loop {
        health.failed.notified().await;
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            if jobs.list_metadata(&params).await.is_ok() && pods.list_metadata(&params).await.is_ok() {
                break;
            }
        }
        let mut recovered = false;
        for watch in [&health.jobs, &health.pods] {
            if !watch.healthy.swap(true, Ordering::Relaxed) {
                recovered = true;
                health.publish(watch);
            }
        }
        if recovered {
            tracing::info!("the Kubernetes API answers again; watches marked healthy");
        }
    }
}

/// Map client errors: transport failures and 5xx/429 are retryable unavailability.
fn api_error(error: kube::Error) -> BackendError {
    match &error {
        kube::Error::Api(status) if status.code == 429 || status.code >= 500 => BackendError::Unavailable {
            detail: format!("the Kubernetes API is unavailable: {}", status.message),
            retry_after: RETRY_AFTER,
        },
        kube::Error::Api(status) => {
            BackendError::Internal(format!("the Kubernetes API refused the call ({}): {}", status.code, status.message))
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::HttpError(_) => BackendError::Unavailable {
            detail: format!("the Kubernetes API cannot be reached: {error}"),
            retry_after: RETRY_AFTER,
        },
        _ => BackendError::Internal(format!("Kubernetes client error: {error}")),
    }
}

/// Map the errors of a write: what the API server refuses about the object itself (422, 400,
/// an admission webhook's denial) carries its message; a ResourceQuota without room is its own
/// retryable refusal; the rest as [`api_error`].
fn write_error(error: kube::Error) -> BackendError {
    match &error {
        kube::Error::Api(status) if status.code == 403 && status.message.contains("exceeded quota") => {
            BackendError::QuotaExhausted {
                detail: format!(
                    "the namespace's ResourceQuota has no room for another job; retry when jobs finish \
                     ({})",
                    status.message
                ),
                retry_after: QUOTA_RETRY_AFTER,
            }
        }
        kube::Error::Api(status) if status.code == 403 && status.message.contains("status unknown for quota") => {
            BackendError::Unavailable {
                detail: format!("the namespace's ResourceQuota is not computed yet: {}", status.message),
                retry_after: RETRY_AFTER,
            }
        }
        kube::Error::Api(status)
            if status.code == 422
                || status.code == 400
                || (status.code == 403 && status.message.contains("denied the request")) =>
        {
            BackendError::Invalid(format!("the Kubernetes API refused the Job: {}", status.message))
        }
        _ => api_error(error),
    }
}

fn not_ready() -> BackendError {
    BackendError::Unavailable {
        detail: "the Kubernetes watch cache is not synced yet".into(),
        retry_after: RETRY_AFTER,
    }
}

#[async_trait]
impl JobBackend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn is_ready(&self) -> bool {
        self.health.jobs.ready() && self.health.pods.ready()
    }

    fn agent_image(&self) -> Option<String> {
        Some(self.template.image.clone())
    }

    fn preview(&self, job: &NewJob) -> Preview {
        let manifest = render::render_job(job, &self.template);
        Preview {
            pod_security_violations: pod_security_violations(&manifest),
            manifest: serde_json::to_value(&manifest).expect("a Job serialises"),
        }
    }

    fn active_jobs(&self, tenant: &str) -> usize {
        self.cache.active_jobs(tenant)
    }

    fn kept_jobs(&self, tenant: &str) -> usize {
        self.cache.kept_jobs(tenant)
    }

    fn knows(&self, id: &JobId) -> bool {
        self.cache.get(id.as_str()).is_some()
    }

    fn counts(&self) -> JobCounts {
        self.cache.counts(chrono::Utc::now())
    }

    fn departed(&self) -> Vec<Arc<JobRecord>> {
        self.cache.take_departed()
    }

    fn changes(&self) -> Option<&JobChanges> {
        Some(&self.changes)
    }

    fn newest_departed(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.cache.newest_departed()
    }

    fn recently_departed(&self, id: &JobId) -> Option<Arc<JobRecord>> {
        self.cache.recently_departed(id.as_str())
    }

    async fn create(&self, job: NewJob) -> Result<CreateOutcome, BackendError> {
        let manifest = render::render_job(&job, &self.template);
        let violations = pod_security_violations(&manifest);
        if !violations.is_empty() {
            return Err(BackendError::Refused(format!(
                "the rendered Job fails Pod Security restricted: {}",
                violations.join("; ")
            )));
        }
        match self.create_job(&manifest, false).await {
            Ok(created) => {
                tracing::info!(job_id = %job.id, "created Kubernetes Job");
                let record = status::job_record(&created, &[]).unwrap_or_else(|| job.pending_record());
                // Counted and readable from now on, not from when the watch delivers it.
                self.cache.note_created(job.id.as_str(), Arc::new(record.clone()));
                Ok(CreateOutcome::Created(record))
            }
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                let existing = self
                    .job_api()
                    .get_opt(job.id.as_str())
                    .await
                    .map_err(api_error)?
                    .ok_or_else(|| BackendError::Internal(format!("job {} exists but cannot be read", job.id)))?;
                let record = self.record(&existing).ok_or_else(|| {
                    BackendError::Internal(format!("a Job named {} exists that OATS did not create", job.id))
                })?;
                self.cache.note_created(job.id.as_str(), Arc::new(record.clone()));
                Ok(CreateOutcome::Exists(record))
            }
            Err(error) => Err(write_error(error)),
        }
    }

    async fn dry_run_create(&self, job: &NewJob) -> Option<Result<(), BackendError>> {
        let manifest = render::render_job(job, &self.template);
        Some(self.create_job(&manifest, true).await.map(drop).map_err(write_error))
    }

    async fn get(&self, id: &JobId) -> Result<Option<Arc<JobRecord>>, BackendError> {
        if let Some(record) = self.cache.get(id.as_str()) {
            return Ok(Some(self.placed(record)));
        }
        if !self.is_ready() {
            return Err(not_ready());
        }
        // The synced cache knows every Job (and this replica's creates from their answers): an
        // unknown id is answered here and never costs a call to the API server.
        Ok(None)
    }

    /// Every cached job as the watch has it: the archiver's pass over finished jobs needs no
    /// queue places (pages get theirs in `page`).
    async fn list(&self) -> Result<Vec<Arc<JobRecord>>, BackendError> {
        self.check_synced()?;
        Ok(self.cache.records())
    }

    async fn page(&self, tenant: Option<&str>, query: &ListQuery) -> Result<Vec<Arc<JobRecord>>, BackendError> {
        self.check_synced()?;
        Ok(self.cache.page(tenant, query).into_iter().map(|r| self.placed(r)).collect())
    }

    async fn cancel(&self, id: &JobId) -> Result<JobRecord, BackendError> {
        let not_found = || BackendError::NotFound(id.to_string());
        for _ in 0..CANCEL_ATTEMPTS {
            // Decide on the API server's copy, not the cache, and patch only that version of the
            // Job: if it finished (or changed at all) since, the patch is refused with 409 and the
            // Job is read again, so a job whose outcome already happened keeps it.
            let job = self.job_api().get_opt(id.as_str()).await.map_err(api_error)?.ok_or_else(not_found)?;
            let record = self.record(&job).ok_or_else(not_found)?;
            self.cache.note_read(id.as_str(), Arc::new(record.clone()));
            if record.status.phase == crate::jobs::JobPhase::Cancelled {
                return Ok(record);
            }
            if record.status.phase.is_terminal() {
                return Err(BackendError::AlreadyFinished(id.to_string()));
            }
            // A one-second deadline makes the Job controller terminate the pods and mark the Job
            // failed, which starts its TTL; the annotation says the failure was a cancellation.
            let patch = serde_json::json!({
                "metadata": {
                    "resourceVersion": job.metadata.resource_version,
                    "annotations": {
                        CANCELLED_AT_ANNOTATION: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
                    },
                },
                "spec": { "activeDeadlineSeconds": 1 },
            });
            match self.job_api().patch(id.as_str(), &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(patched) => {
                    tracing::info!(job_id = %id, "cancelled Kubernetes Job");
                    if record.queue.is_some() {
                        // A Job Kueue holds suspended has no deadline running: it goes (the
                        // history keeps it, cancelled).
                        self.delete_queued(id).await?;
                    }
                    let record = self.record(&patched).ok_or_else(not_found)?;
                    self.cache.note_read(id.as_str(), Arc::new(record.clone()));
                    self.cache.note_cancelled(&patched);
                    self.changes.changed(id.as_str());
                    return Ok(record);
                }
                Err(kube::Error::Api(s)) if s.is_conflict() => continue,
                Err(kube::Error::Api(s)) if s.is_not_found() => return Err(not_found()),
                Err(other) => return Err(write_error(other)),
            }
        }
        Err(BackendError::Unavailable {
            detail: format!("job {id} kept changing while it was being cancelled; retry"),
            retry_after: Duration::from_secs(1),
        })
    }

    async fn logs(&self, id: &JobId, options: LogOptions) -> Result<LogStream, BackendError> {
        let mut pod = self.latest_pod(id);
        if options.follow {
            // Wait for the agent to start (or the job to end) before following its output.
            while !pod.as_deref().is_some_and(has_started) {
                let finished = self.get(id).await?.is_none_or(|r| r.status.phase.is_terminal());
                if finished {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                pod = self.latest_pod(id);
            }
        }
        let Some(pod) = pod.filter(|p| has_started(p)) else {
            return Ok(futures::stream::empty().boxed());
        };
        let params = LogParams {
            container: Some(AGENT_CONTAINER.into()),
            follow: options.follow,
            tail_lines: options.tail_lines.map(i64::from),
            since_seconds: options.since_seconds.map(i64::from),
            timestamps: options.timestamps,
            ..Default::default()
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.template.namespace);
        let name = pod.name_any();
        let reader = pods.log_stream(&name, &params).await.map_err(api_error)?;
        let output = tokio_util::io::ReaderStream::new(reader.compat());
        if !options.follow {
            return Ok(output.boxed());
        }
        let (cache, id) = (self.cache.clone(), id.clone());
        let exited =
            move || cache.pods(id.as_str()).iter().find(|p| p.name_any() == name).is_none_or(|p| has_exited(p));
        Ok(end_after_exit(output, exited).boxed())
    }

    /// Listed from the API server at most once per [`EVENTS_TTL`] per job, however often they
    /// are asked for (concurrent requests wait for the one listing).
    async fn events(&self, id: &JobId) -> Result<Vec<JobEvent>, BackendError> {
        let slot = self.events_slot(id);
        let mut listed = slot.lock().await;
        if let Some((at, events)) = listed.as_ref()
            && at.elapsed() < EVENTS_TTL
        {
            return Ok(Vec::clone(events));
        }
        let events = self.list_events(id).await?;
        *listed = Some((Instant::now(), Arc::new(events.clone())));
        Ok(events)
    }
}

/// Every Pod Security restricted control (and OATS hardening rule) the Job's template fails.
fn pod_security_violations(job: &Job) -> Vec<String> {
    let Some(template) = job.spec.as_ref().map(|s| &s.template) else { return vec!["the Job has no spec".into()] };
    pss::check_restricted(template)
        .into_iter()
        .chain(pss::check_hardening(template))
        .map(|v| format!("{}: {}", v.control, v.detail))
        .collect()
}

fn has_started(pod: &CachedPod) -> bool {
    agent_state(pod).is_some_and(|s| s.running.is_some() || s.terminated.is_some())
}

fn has_exited(pod: &CachedPod) -> bool {
    agent_state(pod).is_some_and(|s| s.terminated.is_some())
}

fn agent_state(pod: &CachedPod) -> Option<&k8s_openapi::api::core::v1::ContainerState> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == AGENT_CONTAINER))
        .and_then(|c| c.state.as_ref())
}

/// A followed output that ends by itself, or once `exited` says the agent exited (or its pod
/// is gone) and then nothing more came for [`FOLLOW_DRAIN`]: what arrives meanwhile is passed on.
fn end_after_exit<S>(
    output: S,
    exited: impl Fn() -> bool + Send + Sync + 'static,
) -> impl futures::Stream<Item = S::Item>
where
    S: futures::Stream + Unpin + Send,
{
    let exited = Arc::new(exited);
    futures::stream::unfold((output, false), move |(mut output, mut draining)| {
        let exited = exited.clone();
        async move {
            loop {
                let quiet = if draining { FOLLOW_DRAIN } else { FOLLOW_POLL };
                match tokio::time::timeout(quiet, output.next()).await {
                    Ok(Some(item)) => return Some((item, (output, draining))),
                    Ok(None) => return None,
                    Err(_) if draining => return None,
                    Err(_) => draining = exited(),
                }
            }
        }
    })
}

fn to_job_event(event: &Event, kind: &str, name: &str) -> JobEvent {
    let time = event
        .last_timestamp
        .as_ref()
        .or(event.first_timestamp.as_ref())
        .map(status::to_chrono)
        .or_else(|| {
            event.event_time.as_ref().map(|t| {
                chrono::DateTime::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond().max(0) as u32)
                    .unwrap_or_default()
            })
        })
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(status::to_chrono))
        .unwrap_or_default();
    JobEvent {
        time,
        kind: event.type_.clone().unwrap_or_else(|| "Normal".into()),
        reason: event.reason.clone().unwrap_or_default(),
        message: event.message.clone().unwrap_or_default(),
        object: format!("{kind}/{name}"),
        count: event.count.unwrap_or(1).max(1) as u32,
    }
}

#[cfg(test)]
mod follow_tests {
    use super::*;

    /// A followed output whose source never ends (kwok, a lost node) stays open while the agent
    /// runs, passes on what comes after the exit, and ends once it has been quiet after it.
    #[tokio::test]
    async fn a_followed_output_ends_once_quiet_after_the_agent_exited() {
        let (source, output) = futures::channel::mpsc::unbounded::<u8>();
        let exited = Arc::new(AtomicBool::new(false));
        let seen = exited.clone();
        let mut output = std::pin::pin!(end_after_exit(output, move || seen.load(Ordering::Relaxed)));
        source.unbounded_send(1).unwrap();
        assert_eq!(output.next().await, Some(1));
        assert!(
            tokio::time::timeout(FOLLOW_POLL * 3, output.next()).await.is_err(),
            "open while the agent runs, however quiet"
        );
        exited.store(true, Ordering::Relaxed);
        source.unbounded_send(2).unwrap();
        assert_eq!(output.next().await, Some(2));
        let end = tokio::time::timeout(FOLLOW_POLL + FOLLOW_DRAIN * 2, output.next()).await;
        assert_eq!(end, Ok(None), "ended although its source is still open");
        drop(source);
    }
}
