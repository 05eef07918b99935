//! The local backend: each job's agent is a child process on this machine.
//!
//! Each job's record and events are kept in the store ([`LocalRecords`]: SQLite in the state
//! directory by default), written through on every change and loaded at start; reads are served
//! from memory. Its output (`output.log`, one timestamped line per agent line, at most
//! `max_log_bytes`), result file and the agent's working directory are files under
//! `<state_dir>/jobs/<id>/`, private to the server's user (directories 0700, files 0600; the
//! server and its agents run with umask 077). A state directory of the format before the store
//! (`jobs/<id>/record.json`) is imported at the first start (`import.rs`).
//!
//! Jobs survive restarts; a job that was running when the server stopped is reported failed
//! with `ServerRestarted`, and no process of any job the last server started survives the
//! restart. While the store cannot be written, nothing the server answered is lost: a
//! submission or a cancel is stored before it is answered (else 503, and nothing changed), a
//! job is started only once its start is stored (pending jobs wait), and what running jobs do
//! meanwhile (finish, time out) and removals past the TTL are kept in memory and written again
//! every second until the store takes them.

mod import;
mod logs;
mod process;

use crate::{
    jobs::{
        BackendError, CreateOutcome, EncodedJson, JobBackend, JobChanges, JobCounts, JobEvent, JobId, JobIndex,
        JobPhase, JobReason, JobRecord, JobState, ListQuery, LogOptions, LogStream, NewJob, Preview, agent_env,
        records::{KeptJob, LocalRecords, RecordsError},
    },
    telemetry::{self, metrics::Metrics},
};
use async_trait::async_trait;
use chrono::Utc;
use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::{Notify, Semaphore};

/// The file holding the state directory's id, under which its jobs are kept in the store.
const OWNER_FILE: &str = "store-owner";
/// How often changes the store did not take are written again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Longest wait of a pending job for the store to take its start.
const MAX_START_BACKOFF: Duration = Duration::from_secs(30);
/// What a client refused while the store cannot be written is told to wait.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    pub state_dir: PathBuf,
    pub concurrency: usize,
    /// Program and arguments of the agent.
    pub command: Vec<String>,
    /// Variables passed through from the server's environment.
    pub env_allowlist: Vec<String>,
    /// Most bytes of output kept per job; then one line says the rest was dropped.
    pub max_log_bytes: u64,
    /// The LLM gateway agents call, when it is on.
    pub gateway: Option<AgentGateway>,
    /// How long a finished job is kept, record, output and workspace, and counts against
    /// `max_kept_jobs` (`ttl_seconds_after_finished`, as on Kubernetes, where the TTL controller
    /// then removes the Job); then it is removed.
    pub kept_after_finish: std::time::Duration,
}

/// How local agents reach the LLM gateway: its URL and a credential per job.
#[derive(Clone)]
pub struct AgentGateway {
    pub base_url: String,
    pub credentials: Arc<crate::jobs::AgentCredentials>,
}

impl std::fmt::Debug for AgentGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentGateway").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

/// A job in memory: what is stored, and the agent's process group while it runs.
#[derive(Debug, Clone)]
struct StoredJob {
    /// Shared with readers; changed copy-on-write.
    record: Arc<JobRecord>,
    /// Oldest first.
    events: Vec<JobEvent>,
    /// Process group of the running agent (not stored: after a restart no agent runs).
    pgid: Option<i32>,
}

impl StoredJob {
    fn new(record: JobRecord, events: Vec<JobEvent>) -> Self {
        Self { record: Arc::new(record), events, pgid: None }
    }

    /// The record, to change: copied first if a reader still holds it, and without the memo of
    /// its old rendering.
    fn record_mut(&mut self) -> &mut JobRecord {
        let record = Arc::make_mut(&mut self.record);
        record.json = EncodedJson::default();
        record
    }
}

struct Entry {
    stored: StoredJob,
    cancel: Arc<Notify>,
}

/// Jobs as local child processes.
pub struct LocalBackend {
    inner: Arc<Inner>,
}

struct Inner {
    settings: LocalSettings,
    metrics: Arc<Metrics>,
    /// Hashed with foldhash rather than SipHash: every request for a job looks it up, and SipHash
    /// was most of that lookup's cost. Its keys are ids this server made (a lookup can only miss),
    /// and foldhash is seeded per process.
    jobs: Mutex<HashMap<JobId, Entry, foldhash::fast::RandomState>>,
    /// The records of `jobs` in list order; changed while `jobs` is locked, after it.
    index: Mutex<JobIndex>,
    slots: Semaphore,
    /// Where jobs are kept, and this state directory's id there.
    records: Arc<dyn LocalRecords>,
    owner: String,
    /// Held while a job is written, so writes of one job land in the order of its changes.
    write_lock: tokio::sync::Mutex<()>,
    /// Jobs whose latest state the store did not take, written again every [`RETRY_EVERY`].
    unsaved: Mutex<HashSet<JobId>>,
    /// Jobs removed from memory whose row the store did not delete, deleted again likewise.
    unremoved: Mutex<HashSet<JobId>>,
    /// Jobs removed past their TTL, until the archiver takes them (it archives a job soon after
    /// it finishes; this covers a TTL shorter than that, or a database that was down).
    departed: Mutex<Vec<Arc<JobRecord>>>,
    /// The newest creation time among them, ever (not drained).
    newest_departed: Mutex<Option<chrono::DateTime<Utc>>>,
    /// Which job just changed, for the API's watch streams.
    changes: JobChanges,
}

impl LocalBackend {
    /// Import a state directory of the format before the store, load every stored job, settle
    /// those the last server left running, queue those it left pending, and start serving.
    pub async fn start(
        settings: LocalSettings,
        metrics: Arc<Metrics>,
        records: Arc<dyn LocalRecords>,
    ) -> Result<Self, BackendError> {
        // Whatever this server and its agents create (output, results, workspaces, the store) is
        // private to its user; agents inherit the mask.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let owner = owner_of(&settings.state_dir).await?;
        let jobs_dir = settings.state_dir.join("jobs");
        import::import_record_files(&jobs_dir, records.as_ref(), &owner).await?;
        let kept = records.load(&owner).await.map_err(|e| BackendError::Internal(e.to_string()))?;
        let inner = Arc::new(Inner {
            slots: Semaphore::new(settings.concurrency),
            settings,
            metrics,
            jobs: Mutex::default(),
            index: Mutex::default(),
            records,
            owner,
            write_lock: tokio::sync::Mutex::new(()),
            unsaved: Mutex::default(),
            unremoved: Mutex::default(),
            departed: Mutex::default(),
            newest_departed: Mutex::default(),
            changes: JobChanges::default(),
        });
        let mut pending = Vec::new();
        let mut interrupted = Vec::new();
        for job in kept {
            let mut stored = StoredJob::new(job.record, job.events);
            match stored.record.status.phase {
                JobPhase::Running => {
                    let now = Utc::now();
                    let record = stored.record_mut();
                    record.status = JobState::with_reason(
                        JobPhase::Failed,
                        JobReason::ServerRestarted,
                        "the server stopped while the agent was running",
                    );
                    record.finished_at = Some(now);
                    stored.events.push(event("Warning", "ServerRestarted", "the server restarted; the run was lost"));
                    interrupted.push(stored.record.id.clone());
                }
                JobPhase::Pending => pending.push((stored.record.created_at, stored.record.id.clone())),
                _ => {}
            }
            let id = stored.record.id.clone();
            inner.remember(id, Entry { stored, cancel: Arc::new(Notify::new()) });
        }
        // Whatever the last server started, in any phase (an agent started just before its job
        // was saved as running, a process that left its group, one a cancel did not reach):
        // nothing of it runs on.
        let known: Vec<JobId> = inner.jobs.lock().unwrap().keys().cloned().collect();
        let killed = process::kill_marked(&known).await;
        if killed > 0 {
            tracing::warn!(processes = killed, "killed agent processes left over from a previous server");
        }
        for id in &interrupted {
            inner.save(id).await?;
        }
        pending.sort();
        let count = inner.jobs.lock().unwrap().len();
        tracing::info!(
            jobs = count,
            requeued = pending.len(),
            interrupted = interrupted.len(),
            "local jobs loaded from the store"
        );
        for (_, id) in pending {
            tokio::spawn(inner.clone().run(id));
        }
        Inner::remove_expired_every(&inner);
        Inner::retry_writes_every(&inner);
        Ok(Self { inner })
    }
}

/// The id of the state directory in the store: read from its file, or made and written there
/// on the first start.
async fn owner_of(state_dir: &Path) -> Result<String, BackendError> {
    let path = state_dir.join(OWNER_FILE);
    let failed = |e: std::io::Error| BackendError::Internal(format!("cannot read or write {}: {e}", path.display()));
    match tokio::fs::read_to_string(&path).await {
        Ok(owner) if !owner.trim().is_empty() => return Ok(owner.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    private_dir(state_dir).await.map_err(failed)?;
    let owner = format!("state-{}", JobId::random().as_str().trim_start_matches("job-"));
    write_atomically(state_dir, OWNER_FILE, format!("{owner}\n").as_bytes()).await.map_err(failed)?;
    Ok(owner)
}

/// Store `jobs` (each record with its events, oldest first) as this backend keeps them for the
/// state directory `state_dir`, for a server started on it later: a history made up front (the
/// benchmark's 100,000 jobs) without anyone else knowing how jobs are kept. One transaction;
/// jobs already stored are left as they are. Returns how many were new.
pub async fn seed(
    state_dir: &Path,
    records: &dyn LocalRecords,
    jobs: impl IntoIterator<Item = (JobRecord, Vec<JobEvent>)>,
) -> Result<u64, BackendError> {
    let owner = owner_of(state_dir).await?;
    let jobs: Vec<KeptJob> = jobs.into_iter().map(|(record, events)| KeptJob { record, events }).collect();
    records.put_missing(&owner, &jobs).await.map_err(|e| BackendError::Internal(e.to_string()))
}

/// Kill every process of every job with a directory in `state_dir` (every job that ran has
/// one): what a server killed without a shutdown leaves behind (the next server on the
/// directory would kill them at start). Blocks.
pub fn kill_agents(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir.join("jobs")) else { return };
    let ids: Vec<JobId> =
        entries.flatten().filter_map(|entry| JobId::parse(entry.file_name().to_str()?).ok()).collect();
    if !ids.is_empty() {
        process::kill_marked_now(&ids);
    }
}

fn unavailable(error: RecordsError) -> BackendError {
    BackendError::Unavailable { detail: format!("{error}; retry later"), retry_after: RETRY_AFTER }
}

impl Inner {
    fn job_dir(&self, id: &JobId) -> PathBuf {
        self.settings.state_dir.join("jobs").join(id.as_str())
    }

    /// Count a job's finish and emit its lifecycle spans (one process: each job ends once).
    fn finished(&self, record: &JobRecord) {
        self.metrics.jobs.job_finished(record);
        telemetry::trace::emit_lifecycle(record);
    }

    fn snapshot(&self, id: &JobId) -> Option<StoredJob> {
        self.jobs.lock().unwrap().get(id).map(|e| e.stored.clone())
    }

    /// Hold a job (or its newer state).
    fn remember(&self, id: JobId, entry: Entry) {
        let mut jobs = self.jobs.lock().unwrap();
        self.index.lock().unwrap().put(entry.stored.record.clone());
        jobs.insert(id, entry);
    }

    fn forget(&self, id: &JobId) -> Option<Entry> {
        let mut jobs = self.jobs.lock().unwrap();
        self.index.lock().unwrap().remove(id.as_str());
        jobs.remove(id)
    }

    fn update(&self, id: &JobId, change: impl FnOnce(&mut StoredJob)) {
        if let Some(entry) = self.jobs.lock().unwrap().get_mut(id) {
            change(&mut entry.stored);
            self.index.lock().unwrap().put(entry.stored.record.clone());
        }
        self.changes.changed(id.as_str());
    }

    /// Write the job's current state; the snapshot is taken under the write lock, so the last
    /// write always holds the latest state. What the store does not take is written again
    /// later (see [`Self::retry_writes_every`]).
    async fn save(&self, id: &JobId) -> Result<(), BackendError> {
        let _guard = self.write_lock.lock().await;
        let Some(stored) = self.snapshot(id) else {
            self.unsaved.lock().unwrap().remove(id);
            return Ok(());
        };
        match self.records.put(&self.owner, &stored.record, &stored.events).await {
            Ok(()) => {
                self.unsaved.lock().unwrap().remove(id);
                Ok(())
            }
            Err(error) => {
                self.unsaved.lock().unwrap().insert(id.clone());
                tracing::warn!(job_id = %id, %error, "cannot store the job's state; writing it again every second");
                Err(unavailable(error))
            }
        }
    }

    /// Store the job as `change` will make it, before anyone sees the change: a state the API
    /// reports is stored first, so it survives a crash (a job shown running is reported
    /// `ServerRestarted` after a restart, never run again). Whether the store took it (a job
    /// that is gone is not written).
    async fn store_ahead(&self, id: &JobId, change: impl Fn(&mut StoredJob)) -> Result<bool, BackendError> {
        let _guard = self.write_lock.lock().await;
        let Some(mut next) = self.snapshot(id) else { return Ok(false) };
        change(&mut next);
        self.records.put(&self.owner, &next.record, &next.events).await.map_err(unavailable)?;
        Ok(true)
    }

    /// Write again, every [`RETRY_EVERY`], what the store did not take, for as long as the
    /// backend lives.
    fn retry_writes_every(inner: &Arc<Self>) {
        let inner = Arc::downgrade(inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RETRY_EVERY).await;
                let Some(inner) = inner.upgrade() else { return };
                inner.retry_writes().await;
            }
        });
    }

    async fn retry_writes(&self) {
        let unsaved: Vec<JobId> = self.unsaved.lock().unwrap().iter().cloned().collect();
        for id in unsaved {
            if self.save(&id).await.is_err() {
                return; // still down: the rest waits for the next round
            }
            tracing::info!(job_id = %id, "stored the job's state after a failed write");
        }
        let unremoved: Vec<JobId> = self.unremoved.lock().unwrap().iter().cloned().collect();
        for id in unremoved {
            if self.records.remove(&self.owner, &id).await.is_err() {
                return;
            }
            self.unremoved.lock().unwrap().remove(&id);
        }
    }

    /// Remove finished jobs past `kept_after_finish`, checking every tenth of it (at least
    /// every second, at most every minute), for as long as the backend lives.
    fn remove_expired_every(inner: &Arc<Self>) {
        let every = (inner.settings.kept_after_finish / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let inner = Arc::downgrade(inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = inner.upgrade() else { return };
                inner.remove_expired().await;
            }
        });
    }

    /// Forget finished jobs kept longer than `kept_after_finish`: their rows in the store and
    /// their directories (output, result, workspace).
    async fn remove_expired(&self) {
        let Ok(kept) = chrono::Duration::from_std(self.settings.kept_after_finish) else { return };
        let now = Utc::now();
        let expired: Vec<JobId> = {
            let jobs = self.jobs.lock().unwrap();
            jobs.values()
                .filter(|e| e.stored.record.status.phase.is_terminal() && e.stored.pgid.is_none())
                .filter(|e| e.stored.record.finished_at.is_some_and(|f| f + kept <= now))
                .map(|e| e.stored.record.id.clone())
                .collect()
        };
        for id in expired {
            let _guard = self.write_lock.lock().await;
            let removed = self.forget(&id);
            self.unsaved.lock().unwrap().remove(&id);
            self.changes.changed(id.as_str());
            if let Some(entry) = removed {
                let mut newest = self.newest_departed.lock().unwrap();
                *newest = (*newest).max(Some(entry.stored.record.created_at));
                self.departed.lock().unwrap().push(entry.stored.record);
            }
            if let Err(error) = tokio::fs::remove_dir_all(self.job_dir(&id)).await
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(job_id = %id, %error, "cannot remove an expired job's directory");
            }
            if let Err(error) = self.records.remove(&self.owner, &id).await {
                tracing::warn!(job_id = %id, %error, "cannot remove an expired job from the store; retrying");
                self.unremoved.lock().unwrap().insert(id.clone());
            }
            tracing::info!(job_id = %id, "removed a finished job past ttl_seconds_after_finished");
        }
    }

    /// Wait for a slot and for the store to take the job's start, run the agent, record the
    /// outcome.
    async fn run(self: Arc<Self>, id: JobId) {
        let mut backoff = RETRY_EVERY;
        // Made once: what is stored ahead and what is shown hold the same start.
        let started_at = Utc::now();
        let start = |s: &mut StoredJob| {
            // A cancel that landed while the agent was starting stays in force; the agent is
            // stopped as soon as it is waited on.
            if s.record.status.phase == JobPhase::Pending {
                let record = s.record_mut();
                record.status = JobState::new(JobPhase::Running);
                record.started_at = Some(started_at);
                record.attempts = 1;
            }
        };
        let (permit, stored) = loop {
            let Ok(permit) = self.slots.acquire().await else { return };
            let Some(stored) = self.snapshot(&id) else { return };
            if stored.record.status.phase != JobPhase::Pending {
                return; // cancelled while waiting
            }
            match self.store_ahead(&id, start).await {
                Ok(true) => break (permit, stored),
                Ok(false) => return,
                Err(error) => {
                    drop(permit);
                    tracing::warn!(job_id = %id, %error, "cannot store the job's start; it waits");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_START_BACKOFF);
                }
            }
        };
        let cancel = self.jobs.lock().unwrap().get(&id).map(|e| e.cancel.clone());
        let Some(cancel) = cancel else { return };
        let dir = self.job_dir(&id);
        let outcome = match process::spawn_agent(&self.settings, &dir, &stored.record).await {
            Ok(agent) => {
                self.metrics.local.running.inc();
                let pgid = agent.pgid();
                let started = event("Normal", "Started", &format!("agent started as process group {pgid}"));
                self.update(&id, |s| {
                    s.pgid = Some(pgid);
                    start(s);
                    s.events.push(started);
                });
                // A failed write is written again later; the agent runs on.
                let _ = self.save(&id).await;
                let outcome = agent.wait(stored.record.spec.timeout_seconds, &cancel).await;
                self.metrics.local.running.dec();
                outcome
            }
            Err(outcome) => outcome,
        };
        self.update(&id, |s| {
            s.pgid = None;
            if s.record.status.phase == JobPhase::Cancelled {
                // The agent's partial result, written when it was stopped.
                if outcome.result.is_some() {
                    s.record_mut().result = outcome.result.clone();
                }
                return;
            }
            let record = s.record_mut();
            record.finished_at = Some(Utc::now());
            record.result = outcome.result.clone();
            s.events.push(event(
                if outcome.status.phase == JobPhase::Succeeded { "Normal" } else { "Warning" },
                outcome.status.reason.map_or("Completed", |r| r.as_str()),
                outcome.status.message.as_deref().unwrap_or("the agent finished"),
            ));
            s.record_mut().status = outcome.status.clone();
        });
        let _ = self.save(&id).await;
        if let Some(stored) = self.snapshot(&id)
            && stored.record.status.phase != JobPhase::Cancelled
        {
            self.finished(&stored.record);
        }
        drop(permit);
        tracing::info!(job_id = %id, phase = outcome.status.phase.as_str(), "local job finished");
    }
}

fn event(kind: &str, reason: &str, message: &str) -> JobEvent {
    JobEvent {
        time: Utc::now(),
        kind: kind.into(),
        reason: reason.into(),
        message: message.into(),
        object: "Process/agent".into(),
        count: 1,
    }
}

async fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    private_dir(dir).await?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = tokio::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).await?;
    tokio::io::AsyncWriteExt::write_all(&mut file, bytes).await?;
    drop(file);
    tokio::fs::rename(&tmp, dir.join(name)).await
}

/// Create a directory (and its parents) readable only by this user; an existing one is made so.
pub(crate) async fn private_dir(dir: &Path) -> std::io::Result<()> {
    tokio::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).await?;
    let mode = tokio::fs::metadata(dir).await?.permissions().mode() & 0o777;
    if mode != 0o700 {
        tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).await?;
    }
    Ok(())
}

#[async_trait]
impl JobBackend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn agent_image(&self) -> Option<String> {
        None
    }

    fn preview(&self, job: &NewJob) -> Preview {
        let job_dir = self.inner.job_dir(&job.id);
        let env: serde_json::Map<String, serde_json::Value> = job
            .spec
            .agent_env(&job.id, &job_dir.join("result").to_string_lossy(), &job_dir.join("workspace").to_string_lossy())
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect();
        let mut env = env;
        if let Some(gateway) = &self.inner.settings.gateway {
            env.insert(agent_env::OPENAI_BASE_URL.into(), gateway.base_url.clone().into());
            // The credential itself is minted at start and never shown.
            env.insert(agent_env::OPENAI_API_KEY.into(), "(a credential of this job, valid while it runs)".into());
        }
        Preview {
            manifest: serde_json::json!({"command": self.inner.settings.command, "environment": env}),
            pod_security_violations: Vec::new(),
        }
    }

    fn active_jobs(&self, tenant: &str) -> usize {
        let jobs = self.inner.jobs.lock().unwrap();
        jobs.values()
            .filter(|e| e.stored.record.tenant == tenant && !e.stored.record.status.phase.is_terminal())
            .count()
    }

    fn knows(&self, id: &JobId) -> bool {
        self.inner.jobs.lock().unwrap().contains_key(id)
    }

    fn kept_jobs(&self, tenant: &str) -> usize {
        let kept_after_finish =
            chrono::Duration::from_std(self.inner.settings.kept_after_finish).unwrap_or(chrono::Duration::MAX);
        let now = Utc::now();
        let jobs = self.inner.jobs.lock().unwrap();
        jobs.values()
            .map(|e| &e.stored.record)
            .filter(|r| r.tenant == tenant)
            .filter(|r| match r.finished_at {
                Some(finished) if r.status.phase.is_terminal() => {
                    finished.checked_add_signed(kept_after_finish).is_none_or(|until| until > now)
                }
                _ => true,
            })
            .count()
    }

    fn departed(&self) -> Vec<Arc<JobRecord>> {
        std::mem::take(&mut *self.inner.departed.lock().unwrap())
    }

    fn changes(&self) -> Option<&JobChanges> {
        Some(&self.inner.changes)
    }

    fn newest_departed(&self) -> Option<chrono::DateTime<Utc>> {
        *self.inner.newest_departed.lock().unwrap()
    }

    fn counts(&self) -> JobCounts {
        let mut counts = JobCounts::default();
        for entry in self.inner.jobs.lock().unwrap().values() {
            counts.add(entry.stored.record.status.phase);
        }
        counts
    }

    async fn create(&self, job: NewJob) -> Result<CreateOutcome, BackendError> {
        let id = job.id.clone();
        {
            let mut jobs = self.inner.jobs.lock().unwrap();
            if let Some(existing) = jobs.get(&id) {
                return Ok(CreateOutcome::Exists(JobRecord::clone(&existing.stored.record)));
            }
            let events = vec![event("Normal", "Submitted", "job accepted; waiting for a free slot")];
            let stored = StoredJob::new(job.pending_record(), events);
            self.inner.index.lock().unwrap().put(stored.record.clone());
            jobs.insert(id.clone(), Entry { stored, cancel: Arc::new(Notify::new()) });
        }
        // Stored before it is answered; a job the store did not take is not kept.
        {
            let _guard = self.inner.write_lock.lock().await;
            let Some(stored) = self.inner.snapshot(&id) else {
                return Err(BackendError::Internal(format!("job {id} vanished while it was created")));
            };
            if let Err(error) = self.inner.records.put(&self.inner.owner, &stored.record, &stored.events).await {
                self.inner.forget(&id);
                tracing::warn!(job_id = %id, %error, "cannot store a new job; refusing it");
                return Err(unavailable(error));
            }
        }
        tokio::spawn(self.inner.clone().run(id));
        Ok(CreateOutcome::Created(job.pending_record()))
    }

    async fn get(&self, id: &JobId) -> Result<Option<Arc<JobRecord>>, BackendError> {
        Ok(self.inner.jobs.lock().unwrap().get(id).map(|e| e.stored.record.clone()))
    }

    async fn list(&self) -> Result<Vec<Arc<JobRecord>>, BackendError> {
        Ok(self.inner.index.lock().unwrap().records().cloned().collect())
    }

    async fn page(&self, tenant: Option<&str>, query: &ListQuery) -> Result<Vec<Arc<JobRecord>>, BackendError> {
        Ok(self.inner.index.lock().unwrap().page(tenant, query))
    }

    async fn cancel(&self, id: &JobId) -> Result<JobRecord, BackendError> {
        // Made once: the stored copy and the live state must hold the same times.
        let finished_at = Utc::now();
        let cancelled = event("Normal", "Cancelled", "cancelled by request; stopping the agent");
        let cancel = |s: &mut StoredJob| {
            if !s.record.status.phase.is_terminal() {
                let record = s.record_mut();
                record.status =
                    JobState::with_reason(JobPhase::Cancelled, JobReason::Cancelled, "cancelled by request");
                record.finished_at = Some(finished_at);
                s.events.push(cancelled.clone());
            }
        };
        let inner = &self.inner;
        // Stored before the agent is stopped and the cancel answered: a pending job cancelled
        // here never runs, even after a crash.
        let _guard = inner.write_lock.lock().await;
        let mut next = inner.snapshot(id).ok_or_else(|| BackendError::NotFound(id.to_string()))?;
        match next.record.status.phase {
            JobPhase::Cancelled => return Ok(JobRecord::clone(&next.record)),
            phase if phase.is_terminal() => return Err(BackendError::AlreadyFinished(id.to_string())),
            _ => {}
        }
        cancel(&mut next);
        inner.records.put(&inner.owner, &next.record, &next.events).await.map_err(unavailable)?;
        let record = {
            let mut jobs = inner.jobs.lock().unwrap();
            let entry = jobs.get_mut(id).ok_or_else(|| BackendError::NotFound(id.to_string()))?;
            if !entry.stored.record.status.phase.is_terminal() {
                cancel(&mut entry.stored);
                inner.index.lock().unwrap().put(entry.stored.record.clone());
                entry.cancel.notify_one();
            }
            JobRecord::clone(&entry.stored.record)
        };
        inner.changes.changed(id.as_str());
        if record.status.phase != JobPhase::Cancelled {
            // The agent finished while the cancel was written: its outcome stands, and is
            // written over the cancel.
            inner.unsaved.lock().unwrap().insert(id.clone());
            return Err(BackendError::AlreadyFinished(id.to_string()));
        }
        inner.finished(&record);
        Ok(record)
    }

    async fn logs(&self, id: &JobId, options: LogOptions) -> Result<LogStream, BackendError> {
        let path = self.inner.job_dir(id).join(process::OUTPUT_FILE);
        let inner = self.inner.clone();
        let id = id.clone();
        let finished = move || {
            let jobs = inner.jobs.lock().unwrap();
            jobs.get(&id).is_none_or(|e| e.stored.record.status.phase.is_terminal() && e.stored.pgid.is_none())
        };
        Ok(logs::read(path, options, finished))
    }

    async fn events(&self, id: &JobId) -> Result<Vec<JobEvent>, BackendError> {
        let mut events = self.inner.jobs.lock().unwrap().get(id).map(|e| e.stored.events.clone()).unwrap_or_default();
        events.reverse();
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        jobs::{JobLimits, JobRequest},
        store::Store,
    };

    const SOON: Duration = Duration::from_secs(30);

    fn settings(state_dir: &Path, command: &[&str], concurrency: usize) -> LocalSettings {
        LocalSettings {
            state_dir: state_dir.to_owned(),
            concurrency,
            command: command.iter().map(|s| s.to_string()).collect(),
            env_allowlist: vec!["PATH".into()],
            max_log_bytes: 65_536,
            gateway: None,
            kept_after_finish: Duration::from_secs(3600),
        }
    }

    fn new_job(goal: &str, created_at: chrono::DateTime<Utc>) -> NewJob {
        let spec = JobRequest { goal: goal.into(), max_turns: 3, ..Default::default() }
            .validate(&JobLimits::default())
            .unwrap();
        NewJob {
            id: JobId::random(),
            tenant: "t".into(),
            spec,
            created_at,
            request_hash: "h".into(),
            trace: None,
            resources: None,
            queue: Default::default(),
        }
    }

    /// Wait until `check` holds, or fail after [`SOON`].
    async fn until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
        let deadline = std::time::Instant::now() + SOON;
        while !check().await {
            assert!(std::time::Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn phase(backend: &LocalBackend, id: &JobId) -> Option<JobPhase> {
        backend.get(id).await.unwrap().map(|r| r.status.phase)
    }

    /// The phase of a job as the store holds it.
    async fn stored_phase(store: &Store, state_dir: &Path, id: &JobId) -> Option<JobPhase> {
        let owner = owner_of(state_dir).await.unwrap();
        store.load(&owner).await.unwrap().into_iter().find(|j| j.record.id == *id).map(|j| j.record.status.phase)
    }

    fn json(record: &JobRecord, events: &[JobEvent]) -> serde_json::Value {
        serde_json::json!({"record": record, "events": events})
    }

    #[tokio::test]
    async fn a_seeded_history_is_what_a_server_on_the_directory_loads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in(dir.path()).await.unwrap();
        let created_at = Utc::now() - chrono::Duration::hours(1);
        let mut record = new_job("seeded", created_at).pending_record();
        record.status = JobState::new(JobPhase::Succeeded);
        record.finished_at = Some(created_at + chrono::Duration::seconds(9));
        record.result = Some("done".into());
        let events = vec![event("Normal", "Submitted", "accepted"), event("Normal", "Completed", "finished")];
        assert_eq!(seed(dir.path(), &store, [(record.clone(), events.clone())]).await.unwrap(), 1);
        assert_eq!(
            seed(dir.path(), &store, [(record.clone(), events)]).await.unwrap(),
            0,
            "seeding again adds nothing"
        );

        let backend =
            LocalBackend::start(settings(dir.path(), &["true"], 1), Arc::new(Metrics::new()), Arc::new(store))
                .await
                .unwrap();
        let loaded = backend.get(&record.id).await.unwrap().expect("the seeded job");
        assert_eq!(serde_json::to_value(&*loaded).unwrap(), serde_json::to_value(&record).unwrap());
        let reasons: Vec<String> = backend.events(&record.id).await.unwrap().into_iter().map(|e| e.reason).collect();
        assert_eq!(reasons, ["Completed", "Submitted"]);
    }

    #[tokio::test]
    async fn jobs_and_their_events_survive_a_restart_of_the_backend() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in(dir.path()).await.unwrap();
        let gate = dir.path().join("go");
        let wait_for_gate = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
        let command = ["sh", "-c", &wait_for_gate];
        let start = || {
            LocalBackend::start(settings(dir.path(), &command, 1), Arc::new(Metrics::new()), Arc::new(store.clone()))
        };
        let backend = start().await.unwrap();
        let finished = new_job("finished", Utc::now());
        backend.create(finished.clone()).await.unwrap();
        until("the first job runs", || async { phase(&backend, &finished.id).await == Some(JobPhase::Running) }).await;
        let queued = new_job("queued", Utc::now());
        let cancelled = new_job("cancelled", Utc::now());
        backend.create(queued.clone()).await.unwrap();
        backend.create(cancelled.clone()).await.unwrap();
        backend.cancel(&cancelled.id).await.unwrap();
        std::fs::write(&gate, "").unwrap();
        until("the first job finishes", || async { phase(&backend, &finished.id).await == Some(JobPhase::Succeeded) })
            .await;
        until("the queued job finishes", || async { phase(&backend, &queued.id).await == Some(JobPhase::Succeeded) })
            .await;
        let mut before = Vec::new();
        for id in [&finished.id, &queued.id, &cancelled.id] {
            let record = backend.get(id).await.unwrap().unwrap();
            before.push(json(&record, &backend.events(id).await.unwrap()));
        }
        drop(backend);

        let again = start().await.unwrap();
        let mut after = Vec::new();
        for id in [&finished.id, &queued.id, &cancelled.id] {
            let record = again.get(id).await.unwrap().unwrap();
            after.push(json(&record, &again.events(id).await.unwrap()));
        }
        assert_eq!(after, before);
        assert_eq!(again.list().await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn while_the_store_refuses_writes_no_accepted_job_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in(dir.path()).await.unwrap();
        let gate = dir.path().join("go");
        let wait_for_gate = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
        let backend = LocalBackend::start(
            settings(dir.path(), &["sh", "-c", &wait_for_gate], 1),
            Arc::new(Metrics::new()),
            Arc::new(store.clone()),
        )
        .await
        .unwrap();
        let running = new_job("running", Utc::now());
        let queued = new_job("queued", Utc::now());
        backend.create(running.clone()).await.unwrap();
        until("the first job runs", || async { phase(&backend, &running.id).await == Some(JobPhase::Running) }).await;
        backend.create(queued.clone()).await.unwrap();

        store.refuse_writes(true).await;
        // A submission is refused, and not kept.
        let refused = new_job("refused", Utc::now());
        let error = backend.create(refused.clone()).await.unwrap_err();
        assert!(matches!(error, BackendError::Unavailable { .. }), "{error:?}");
        assert_eq!(phase(&backend, &refused.id).await, None);
        // A cancel is refused, and changes nothing.
        let error = backend.cancel(&running.id).await.unwrap_err();
        assert!(matches!(error, BackendError::Unavailable { .. }), "{error:?}");
        assert_eq!(phase(&backend, &running.id).await, Some(JobPhase::Running));
        // The running job finishes in memory; the queued one does not start while its start
        // cannot be stored.
        std::fs::write(&gate, "").unwrap();
        until("the running job finishes", || async { phase(&backend, &running.id).await == Some(JobPhase::Succeeded) })
            .await;
        assert_eq!(stored_phase(&store, dir.path(), &running.id).await, Some(JobPhase::Running));
        assert_eq!(phase(&backend, &queued.id).await, Some(JobPhase::Pending));

        store.refuse_writes(false).await;
        until("the finish is stored", || async {
            stored_phase(&store, dir.path(), &running.id).await == Some(JobPhase::Succeeded)
        })
        .await;
        until("the queued job runs to its end", || async {
            stored_phase(&store, dir.path(), &queued.id).await == Some(JobPhase::Succeeded)
        })
        .await;
        backend.create(refused.clone()).await.unwrap();
    }

    /// The record files of the fixture state directory (written by the server before the
    /// store), as they say.
    fn fixture_jobs(jobs_dir: &Path) -> Vec<serde_json::Value> {
        let mut jobs: Vec<serde_json::Value> = std::fs::read_dir(jobs_dir)
            .unwrap()
            .map(|entry| {
                let text = std::fs::read(entry.unwrap().path().join(import::RECORD_FILE)).unwrap();
                let file: serde_json::Value = serde_json::from_slice(&text).unwrap();
                serde_json::json!({"record": file["record"], "events": file["events"]})
            })
            .collect();
        jobs.sort_by_key(|j| j["record"]["id"].as_str().unwrap().to_owned());
        jobs
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.path().is_dir() {
                copy_dir(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn an_import_cut_short_and_done_again_stores_every_job_once() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-dir-3075997/jobs");
        let expected = fixture_jobs(&fixture);
        assert_eq!(expected.len(), 7);
        let dir = tempfile::tempdir().unwrap();
        let jobs_dir = dir.path().join("jobs");
        copy_dir(&fixture, &jobs_dir);
        let store = Store::open_in(dir.path()).await.unwrap();
        let owner = owner_of(dir.path()).await.unwrap();
        // A first start that stored some of the jobs and died before renaming any file.
        let some: Vec<KeptJob> = expected[..3]
            .iter()
            .map(|j| KeptJob {
                record: serde_json::from_value(j["record"].clone()).unwrap(),
                events: serde_json::from_value(j["events"].clone()).unwrap(),
            })
            .collect();
        store.put_missing(&owner, &some).await.unwrap();

        assert_eq!(import::import_record_files(&jobs_dir, &store, &owner).await.unwrap(), 7);
        let stored = |jobs: Vec<KeptJob>| {
            let mut jobs: Vec<_> = jobs.iter().map(|j| json(&j.record, &j.events)).collect();
            jobs.sort_by_key(|j| j["record"]["id"].as_str().unwrap().to_owned());
            jobs
        };
        assert_eq!(stored(store.load(&owner).await.unwrap()), expected);
        for entry in std::fs::read_dir(&jobs_dir).unwrap() {
            let job_dir = entry.unwrap().path();
            assert!(!job_dir.join(import::RECORD_FILE).exists() && job_dir.join(import::IMPORTED_FILE).exists());
        }
        // A crash after the import but before every file was renamed: done again, nothing doubles.
        copy_dir(&fixture, &jobs_dir);
        assert_eq!(import::import_record_files(&jobs_dir, &store, &owner).await.unwrap(), 7);
        assert_eq!(stored(store.load(&owner).await.unwrap()), expected);
        // Nothing left to import.
        assert_eq!(import::import_record_files(&jobs_dir, &store, &owner).await.unwrap(), 0);
    }

    #[test]
    fn a_record_changed_in_place_drops_its_old_rendering() {
        let mut stored = StoredJob::new(new_job("g", Utc::now()).pending_record(), vec![]);
        let rendered = |record: &JobRecord| {
            record.json.get_or_try_init(|| Ok::<_, ()>(record.status.phase.as_str().to_owned().into())).unwrap()
        };
        assert_eq!(rendered(&stored.record), "pending");
        // No other holder: the record is changed in place, and must render afresh.
        stored.record_mut().status = JobState::new(JobPhase::Running);
        assert_eq!(rendered(&stored.record), "running");
    }
}
