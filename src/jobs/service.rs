//! The job service: the one entry point the HTTP layer calls.

use super::{
    CreateOutcome, IdempotencyKey, JobError, JobEvent, JobId, JobLimits, JobPage, JobRecord, JobRequest, ListQuery,
    LogOptions, LogStream, NewJob, page,
};
use crate::{
    backend::{BackendError, JobBackend},
    telemetry::{
        self,
        metrics::{Metrics, SubmissionOutcome},
    },
};
use chrono::Utc;
use std::sync::Arc;

/// A successful submission: the job, and whether this call created it or found it by its key.
#[derive(Debug)]
pub struct Submitted {
    pub job: JobRecord,
    pub created: bool,
}

/// Validates requests, names jobs, enforces idempotency and tenancy, and delegates to a backend.
pub struct JobService {
    backend: Arc<dyn JobBackend>,
    limits: JobLimits,
    metrics: Arc<Metrics>,
}

impl JobService {
    pub fn new(backend: Arc<dyn JobBackend>, limits: JobLimits, metrics: Arc<Metrics>) -> Self {
        Self { backend, limits, metrics }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn limits(&self) -> &JobLimits {
        &self.limits
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
        tenant: &str,
        request: JobRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Submitted, JobError> {
        let result = self.create(tenant, request, idempotency_key).await;
        let outcome = match &result {
            Ok(Submitted { created: true, .. }) => SubmissionOutcome::Accepted,
            Ok(Submitted { created: false, .. }) => SubmissionOutcome::Existing,
            Err(JobError::Invalid(_) | JobError::IdempotencyConflict(_)) => SubmissionOutcome::Invalid,
            Err(_) => SubmissionOutcome::Error,
        };
        self.metrics.submission(outcome);
        if let Ok(submitted) = &result {
            tracing::info!(job_id = %submitted.job.id, created = submitted.created, "job submitted");
        }
        result
    }

    async fn create(
        &self,
        tenant: &str,
        request: JobRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Submitted, JobError> {
        let key = idempotency_key.map(IdempotencyKey::parse).transpose();
        let spec = request.validate(&self.limits);
        let (key, spec) = match (key, spec) {
            (Ok(key), Ok(spec)) => (key, spec),
            (key, spec) => {
                let mut errors = key.err().into_iter().collect::<Vec<_>>();
                errors.extend(spec.err().unwrap_or_default());
                return Err(JobError::Invalid(errors));
            }
        };
        let id = match &key {
            Some(key) => JobId::for_idempotency_key(tenant, key),
            None => JobId::random(),
        };
        tracing::Span::current().record("oats.job.id", id.as_str());
        let request_hash = spec.fingerprint();
        let trace = telemetry::trace::current();
        let job = NewJob { id, tenant: tenant.to_owned(), spec, created_at: Utc::now(), request_hash, trace };
        match self.backend.create(job.clone()).await.map_err(JobError::from)? {
            CreateOutcome::Created(job) => Ok(Submitted { job, created: true }),
            CreateOutcome::Exists(existing) => {
                if existing.tenant == job.tenant && existing.request_hash == job.request_hash {
                    Ok(Submitted { job: existing, created: false })
                } else if key.is_some() {
                    Err(JobError::IdempotencyConflict(existing.id.to_string()))
                } else {
                    Err(JobError::Internal(format!("random job id {} collided", job.id)))
                }
            }
        }
    }

    pub async fn get(&self, tenant: &str, id: &str) -> Result<JobRecord, JobError> {
        let id = parse_id(id)?;
        match self.backend.get(&id).await? {
            Some(job) if job.tenant == tenant => Ok(job),
            _ => Err(JobError::NotFound(id.to_string())),
        }
    }

    pub async fn list(&self, tenant: &str, query: &ListQuery) -> Result<JobPage, JobError> {
        let mut jobs = self.backend.list().await?;
        jobs.retain(|j| j.tenant == tenant);
        Ok(page::paginate(jobs, query))
    }

    /// Cancel a job. Cancelling a cancelled job is harmless; cancelling a finished one is refused.
    pub async fn cancel(&self, tenant: &str, id: &str) -> Result<JobRecord, JobError> {
        let job = self.get(tenant, id).await?;
        if job.status.phase.is_terminal() && job.status.phase != super::JobPhase::Cancelled {
            return Err(JobError::AlreadyFinished { id: job.id.to_string(), phase: job.status.phase.as_str() });
        }
        match self.backend.cancel(&job.id).await {
            Err(BackendError::AlreadyFinished(_)) => {
                let job = self.get(tenant, id).await?;
                Err(JobError::AlreadyFinished { id: job.id.to_string(), phase: job.status.phase.as_str() })
            }
            other => Ok(other?),
        }
    }

    pub async fn logs(&self, tenant: &str, id: &str, options: LogOptions) -> Result<LogStream, JobError> {
        let job = self.get(tenant, id).await?;
        Ok(self.backend.logs(&job.id, options).await?)
    }

    pub async fn events(&self, tenant: &str, id: &str) -> Result<Vec<JobEvent>, JobError> {
        let job = self.get(tenant, id).await?;
        Ok(self.backend.events(&job.id).await?)
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
            BackendError::Internal(message) => JobError::Internal(message),
        }
    }
}
