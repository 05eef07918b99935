//! What the domain needs from where jobs run (`crate::backend`: a Kubernetes cluster, or child
//! processes on this machine): the trait each backend implements, its errors and its counts.

use super::{
    CreateOutcome, JobChanges, JobEvent, JobId, JobPhase, JobRecord, ListQuery, LogOptions, LogStream, NewJob, page,
};
use async_trait::async_trait;
use std::{sync::Arc, time::Duration};

/// Why a backend call failed, in terms the domain can act on.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The job does not exist (or no longer does).
    #[error("job {0} not found")]
    NotFound(String),
    /// The backend refuses the job as rendered (e.g. it would fail Pod Security).
    #[error("{0}")]
    Refused(String),
    /// The system of record refuses the job as submitted (a Kubernetes 422, or an admission
    /// webhook's denial); the detail is its message.
    #[error("{0}")]
    Invalid(String),
    /// A namespace ResourceQuota has no room for the job; it may fit later.
    #[error("{detail}")]
    QuotaExhausted { detail: String, retry_after: Duration },
    /// The job already reached a terminal phase.
    #[error("job {0} already finished")]
    AlreadyFinished(String),
    /// The backend cannot be reached or is not ready; the call may succeed later.
    #[error("{detail}")]
    Unavailable { detail: String, retry_after: Duration },
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

/// Current jobs by phase, computed from a backend's cache at scrape time (the `oats_jobs` gauges).
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

/// A dry run of creating a job.
#[derive(Debug, Clone)]
pub struct Preview {
    pub manifest: serde_json::Value,
    pub pod_security_violations: Vec<String>,
}

/// One place jobs run. Reads are cheap (served from memory); writes reach the system of record.
#[async_trait]
pub trait JobBackend: Send + Sync {
    /// `kubernetes` or `local`, for logs and diagnostics.
    fn name(&self) -> &'static str;

    /// Whether reads are complete and writes can be accepted (Kubernetes: watch cache synced).
    fn is_ready(&self) -> bool;

    /// The container image agents run, where there is one (for the image policy).
    fn agent_image(&self) -> Option<String>;

    /// What creating `job` would submit (the Kubernetes manifest, or the local command), and
    /// the Pod Security controls it would fail (none, for a correct configuration).
    fn preview(&self, job: &NewJob) -> Preview;

    /// How many of a tenant's jobs have not finished (for the concurrency rule), without copying
    /// records.
    fn active_jobs(&self, tenant: &str) -> usize;

    /// How many of a tenant's jobs the backend still holds (for `max_kept_jobs`): unfinished
    /// ones, and finished ones until `ttl_seconds_after_finished` removes them. On Kubernetes,
    /// the tenant's Jobs in the namespace as the watch cache knows them (what counts against the
    /// namespace's `count/jobs.batch` quota); locally, the same window over the stored records.
    fn kept_jobs(&self, tenant: &str) -> usize;

    /// Whether the backend already counts the job `id` (so a submission being created is not
    /// counted twice, once as created and once as in creation).
    fn knows(&self, id: &JobId) -> bool;

    /// Jobs removed from the backend since the last call, as last seen, for the archiver (a Job
    /// removed by its TTL, or deleted before it finished). Drains.
    fn departed(&self) -> Vec<Arc<JobRecord>> {
        Vec::new()
    }

    /// A job that left the backend moments ago, as last seen (answered until the history has it).
    fn recently_departed(&self, _id: &JobId) -> Option<Arc<JobRecord>> {
        None
    }

    /// The creation time of the newest job that left the backend since it started (so a list
    /// knows whether the history may hold jobs newer than its page). Not drained.
    fn newest_departed(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        None
    }

    /// Where the backend says which job changed, so watch streams wait for a change instead of
    /// polling. `None`: the backend does not say, and watchers poll.
    fn changes(&self) -> Option<&JobChanges> {
        None
    }

    /// Current jobs by phase, for the `oats_jobs` gauges; cheap enough for every scrape.
    fn counts(&self) -> JobCounts;

    /// Ask the system of record whether it would create `job`, creating nothing (Kubernetes: a
    /// server-side dry-run create, through every admission check and quota). `None` when there is
    /// nothing to ask (the local backend).
    async fn dry_run_create(&self, _job: &NewJob) -> Option<Result<(), BackendError>> {
        None
    }

    /// Create the job, or report the one that already holds its id.
    async fn create(&self, job: NewJob) -> Result<CreateOutcome, BackendError>;

    /// The job's current record, shared with the backend's cache (reads copy nothing).
    async fn get(&self, id: &JobId) -> Result<Option<Arc<JobRecord>>, BackendError>;

    /// Every job this backend knows, in no particular order.
    async fn list(&self) -> Result<Vec<Arc<JobRecord>>, BackendError>;

    /// Up to `query.limit + 1` jobs of `tenant` (or of every tenant) after the query's page
    /// token, newest first, that match its status and selector. This default lists and sorts
    /// every job; a backend that keeps a [`JobIndex`](super::JobIndex) answers in O(page).
    async fn page(&self, tenant: Option<&str>, query: &ListQuery) -> Result<Vec<Arc<JobRecord>>, BackendError> {
        let mut records = self.list().await?;
        if let Some(tenant) = tenant {
            records.retain(|r| r.tenant == tenant);
        }
        Ok(page::candidates(records, query))
    }

    /// Stop the agent and mark the job cancelled; the record stays readable. Cancelling a
    /// cancelled job returns it unchanged.
    async fn cancel(&self, id: &JobId) -> Result<JobRecord, BackendError>;

    async fn logs(&self, id: &JobId, options: LogOptions) -> Result<LogStream, BackendError>;

    /// Newest first.
    async fn events(&self, id: &JobId) -> Result<Vec<JobEvent>, BackendError>;
}
