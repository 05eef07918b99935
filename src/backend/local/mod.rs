//! The local backend: each job's agent is a child process on this machine.
//!
//! Every job has a directory under `<state_dir>/jobs/<id>/` holding its record (`record.json`,
//! written atomically on every change), its output (`output.log`, one timestamped line per agent
//! line, at most `max_log_bytes`), the result file and the agent's working directory, all private
//! to the server's user (directories 0700, files 0600; the server and its agents run with umask
//! 077). Records survive restarts; a job that was running when the server stopped is reported
//! failed with `ServerRestarted`, and no process of any job the last server started survives the
//! restart.

mod logs;
mod process;

use crate::{
    jobs::{
        BackendError, CreateOutcome, EncodedJson, JobBackend, JobChanges, JobCounts, JobEvent, JobId, JobIndex,
        JobPhase, JobReason, JobRecord, JobState, ListQuery, LogOptions, LogStream, NewJob, Preview, agent_env,
    },
    telemetry::{self, metrics::Metrics},
};
use async_trait::async_trait;
use chrono::Utc;
use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};
use tokio::sync::{Notify, Semaphore};

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

/// What is persisted per job.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StoredJob {
    /// Shared with readers; changed copy-on-write.
    record: Arc<JobRecord>,
    events: Vec<JobEvent>,
    /// Process group of the running agent, to clean up after a crash of the server.
    pgid: Option<i32>,
}

impl StoredJob {
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
    jobs: Mutex<HashMap<JobId, Entry>>,
    /// The records of `jobs` in list order; changed while `jobs` is locked, after it.
    index: Mutex<JobIndex>,
    slots: Semaphore,
    write_lock: tokio::sync::Mutex<()>,
    /// Jobs removed past their TTL, until the archiver takes them (it archives a job soon after
    /// it finishes; this covers a TTL shorter than that, or a database that was down).
    departed: Mutex<Vec<Arc<JobRecord>>>,
    /// The newest creation time among them, ever (not drained).
    newest_departed: Mutex<Option<chrono::DateTime<Utc>>>,
    /// Which job just changed, for the API's watch streams.
    changes: JobChanges,
}

impl LocalBackend {
    /// Load every stored job, settle those the last server left running, queue those it left
    /// pending, and start serving.
    pub async fn start(settings: LocalSettings, metrics: Arc<Metrics>) -> Result<Self, BackendError> {
        // Whatever this server and its agents create (records, output, results, workspaces, the
        // store) is private to its user; agents inherit the mask.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let jobs_dir = settings.state_dir.join("jobs");
        private_dir(&jobs_dir)
            .await
            .map_err(|e| BackendError::Internal(format!("cannot create {}: {e}", jobs_dir.display())))?;
        let inner = Arc::new(Inner {
            slots: Semaphore::new(settings.concurrency),
            settings,
            metrics,
            jobs: Mutex::new(HashMap::new()),
            index: Mutex::default(),
            write_lock: tokio::sync::Mutex::new(()),
            departed: Mutex::default(),
            newest_departed: Mutex::default(),
            changes: JobChanges::default(),
        });
        let mut pending = Vec::new();
        let mut interrupted = Vec::new();
        let mut dir = tokio::fs::read_dir(&jobs_dir)
            .await
            .map_err(|e| BackendError::Internal(format!("cannot read {}: {e}", jobs_dir.display())))?;
        while let Ok(Some(entry)) = dir.next_entry().await {
            // Directories written by older versions become private too.
            let _ = tokio::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o700)).await;
            let path = entry.path().join("record.json");
            let Ok(text) = tokio::fs::read(&path).await else { continue };
            let mut stored: StoredJob = match serde_json::from_slice(&text) {
                Ok(stored) => stored,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "skipping unreadable job record");
                    continue;
                }
            };
            match stored.record.status.phase {
                JobPhase::Running => {
                    stored.pgid = None;
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
            let mut jobs = inner.jobs.lock().unwrap();
            inner.index.lock().unwrap().put(stored.record.clone());
            jobs.insert(id, Entry { stored, cancel: Arc::new(Notify::new()) });
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
            "local job store loaded"
        );
        for (_, id) in pending {
            tokio::spawn(inner.clone().run(id));
        }
        Inner::remove_expired_every(&inner);
        Ok(Self { inner })
    }
}

/// Write `jobs` (each record with its events, oldest first) into `state_dir` as this backend
/// stores them, for a server started on the directory later: a history made up front (the
/// benchmark's 100,000 jobs) without anyone else knowing the file format. Returns the bytes
/// written.
pub fn seed(state_dir: &Path, jobs: impl IntoIterator<Item = (JobRecord, Vec<JobEvent>)>) -> std::io::Result<u64> {
    let jobs_dir = state_dir.join("jobs");
    std::fs::create_dir_all(&jobs_dir)?;
    let mut written = 0;
    for (record, events) in jobs {
        let dir = jobs_dir.join(record.id.as_str());
        let stored = StoredJob { record: Arc::new(record), events, pgid: None };
        let bytes = serde_json::to_vec_pretty(&stored).expect("records serialise");
        std::fs::create_dir(&dir)?;
        std::fs::write(dir.join("record.json"), &bytes)?;
        written += bytes.len() as u64;
    }
    Ok(written)
}

/// Kill the agents that the records in `state_dir` say are running: what a server killed
/// without a shutdown leaves behind (the next server on the directory would kill them at start).
pub fn kill_agents(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir.join("jobs")) else { return };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read(entry.path().join("record.json")) else { continue };
        let Ok(stored) = serde_json::from_slice::<StoredJob>(&text) else { continue };
        if let Some(pgid) = stored.pgid.filter(|p| *p > 1) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
        }
    }
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

    fn forget(&self, id: &JobId) -> Option<Entry> {
        let mut jobs = self.jobs.lock().unwrap();
        self.index.lock().unwrap().remove(id.as_str());
        jobs.remove(id)
    }

    fn snapshot(&self, id: &JobId) -> Option<StoredJob> {
        self.jobs.lock().unwrap().get(id).map(|e| e.stored.clone())
    }

    fn update(&self, id: &JobId, change: impl FnOnce(&mut StoredJob)) {
        if let Some(entry) = self.jobs.lock().unwrap().get_mut(id) {
            change(&mut entry.stored);
            self.index.lock().unwrap().put(entry.stored.record.clone());
        }
        self.changes.changed(id.as_str());
    }

    /// Write the job's current state; the snapshot is taken under the write lock, so the last
    /// write always holds the latest state.
    async fn save(&self, id: &JobId) -> Result<(), BackendError> {
        let _guard = self.write_lock.lock().await;
        let Some(stored) = self.snapshot(id) else { return Ok(()) };
        let dir = self.job_dir(id);
        write_atomically(&dir, "record.json", &serde_json::to_vec_pretty(&stored).expect("records serialise"))
            .await
            .map_err(|e| BackendError::Internal(format!("cannot persist job {id}: {e}")))
    }

    /// Apply `change` durably first, then visibly: the record is written with the change before
    /// readers see it, so a state the API reported survives a crash (a job shown running is
    /// reported `ServerRestarted` after a restart, never run again). `change` must be idempotent
    /// and respect what happened in between (it is applied to a copy, then to the live state).
    async fn change_durably(&self, id: &JobId, change: impl Fn(&mut StoredJob)) -> Result<(), BackendError> {
        let _guard = self.write_lock.lock().await;
        let Some(mut next) = self.snapshot(id) else { return Ok(()) };
        change(&mut next);
        let written = write_atomically(
            &self.job_dir(id),
            "record.json",
            &serde_json::to_vec_pretty(&next).expect("records serialise"),
        )
        .await
        .map_err(|e| BackendError::Internal(format!("cannot persist job {id}: {e}")));
        self.update(id, change);
        written
    }

    /// Remove finished jobs past `kept_after_finish`, checking every tenth of it (at least
    /// every second, at most every minute), for as long as the backend lives.
    fn remove_expired_every(inner: &Arc<Self>) {
        let every = (inner.settings.kept_after_finish / 10)
            .clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(60));
        let inner = Arc::downgrade(inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = inner.upgrade() else { return };
                inner.remove_expired().await;
            }
        });
    }

    /// Forget finished jobs kept longer than `kept_after_finish` and delete their directories
    /// (record, output, result, workspace).
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
            self.changes.changed(id.as_str());
            if let Some(entry) = removed {
                let mut newest = self.newest_departed.lock().unwrap();
                *newest = (*newest).max(Some(entry.stored.record.created_at));
                self.departed.lock().unwrap().push(entry.stored.record);
            }
            if let Err(error) = tokio::fs::remove_dir_all(self.job_dir(&id)).await {
                tracing::warn!(job_id = %id, %error, "cannot remove an expired job's directory");
            }
            tracing::info!(job_id = %id, "removed a finished job past ttl_seconds_after_finished");
        }
    }

    /// Wait for a slot, run the agent, record the outcome.
    async fn run(self: Arc<Self>, id: JobId) {
        let Ok(_permit) = self.slots.acquire().await else { return };
        let Some(stored) = self.snapshot(&id) else { return };
        if stored.record.status.phase != JobPhase::Pending {
            return; // cancelled while waiting
        }
        let cancel = self.jobs.lock().unwrap().get(&id).map(|e| e.cancel.clone());
        let Some(cancel) = cancel else { return };
        let dir = self.job_dir(&id);
        let outcome = match process::spawn_agent(&self.settings, &dir, &stored.record).await {
            Ok(agent) => {
                self.metrics.local.running.inc();
                let pgid = agent.pgid();
                let started_at = Utc::now();
                let started = event("Normal", "Started", &format!("agent started as process group {pgid}"));
                let start = |s: &mut StoredJob| {
                    s.pgid = Some(pgid);
                    // A cancel that landed while the agent was starting stays in force; the
                    // agent is stopped as soon as it is waited on.
                    if s.record.status.phase == JobPhase::Pending {
                        s.record_mut().status = JobState::new(JobPhase::Running);
                    }
                    let record = s.record_mut();
                    record.started_at = Some(started_at);
                    record.attempts = 1;
                    s.events.push(started.clone());
                };
                if let Err(error) = self.change_durably(&id, start).await {
                    tracing::error!(%error, "cannot persist job start");
                }
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
        if let Err(error) = self.save(&id).await {
            tracing::error!(%error, "cannot persist job outcome");
        }
        if let Some(stored) = self.snapshot(&id)
            && stored.record.status.phase != JobPhase::Cancelled
        {
            self.finished(&stored.record);
        }
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
            let stored = StoredJob {
                record: Arc::new(job.pending_record()),
                events: vec![event("Normal", "Submitted", "job accepted; waiting for a free slot")],
                pgid: None,
            };
            self.inner.index.lock().unwrap().put(stored.record.clone());
            jobs.insert(id.clone(), Entry { stored, cancel: Arc::new(Notify::new()) });
        }
        if let Err(error) = self.inner.save(&id).await {
            self.inner.forget(&id);
            return Err(error);
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
        let record = {
            let mut jobs = self.inner.jobs.lock().unwrap();
            let entry = jobs.get_mut(id).ok_or_else(|| BackendError::NotFound(id.to_string()))?;
            match entry.stored.record.status.phase {
                JobPhase::Cancelled => return Ok(JobRecord::clone(&entry.stored.record)),
                phase if phase.is_terminal() => return Err(BackendError::AlreadyFinished(id.to_string())),
                _ => {}
            }
            let record = entry.stored.record_mut();
            record.status = JobState::with_reason(JobPhase::Cancelled, JobReason::Cancelled, "cancelled by request");
            record.finished_at = Some(Utc::now());
            let record = record.clone();
            self.inner.index.lock().unwrap().put(entry.stored.record.clone());
            entry.stored.events.push(event("Normal", "Cancelled", "cancelled by request; stopping the agent"));
            entry.cancel.notify_one();
            record
        };
        self.inner.changes.changed(id.as_str());
        self.inner.save(id).await?;
        self.inner.finished(&record);
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
    use crate::jobs::{JobLimits, JobRequest};

    #[tokio::test]
    async fn a_seeded_history_is_what_a_server_on_the_directory_loads() {
        let dir = tempfile::tempdir().unwrap();
        let spec = JobRequest { goal: "seeded".into(), max_turns: 3, ..Default::default() }
            .validate(&JobLimits::default())
            .unwrap();
        let created_at = Utc::now() - chrono::Duration::hours(1);
        let new = NewJob {
            id: JobId::random(),
            tenant: "t".into(),
            spec,
            created_at,
            request_hash: "h".into(),
            trace: None,
            resources: None,
            queue: Default::default(),
        };
        let mut record = new.pending_record();
        record.status = JobState::new(JobPhase::Succeeded);
        record.finished_at = Some(created_at + chrono::Duration::seconds(9));
        record.result = Some("done".into());
        let events = vec![event("Normal", "Submitted", "accepted"), event("Normal", "Completed", "finished")];
        assert!(seed(dir.path(), [(record.clone(), events)]).unwrap() > 0);

        let settings = LocalSettings {
            state_dir: dir.path().to_owned(),
            concurrency: 1,
            command: vec!["true".into()],
            env_allowlist: vec![],
            max_log_bytes: 1024,
            gateway: None,
            kept_after_finish: std::time::Duration::from_secs(3600),
        };
        let backend = LocalBackend::start(settings, Arc::new(Metrics::new())).await.unwrap();
        let loaded = backend.get(&record.id).await.unwrap().expect("the seeded job");
        assert_eq!(serde_json::to_value(&*loaded).unwrap(), serde_json::to_value(&record).unwrap());
        let reasons: Vec<String> = backend.events(&record.id).await.unwrap().into_iter().map(|e| e.reason).collect();
        assert_eq!(reasons, ["Completed", "Submitted"]);
    }

    #[test]
    fn a_record_changed_in_place_drops_its_old_rendering() {
        let spec = JobRequest { goal: "g".into(), max_turns: 1, ..Default::default() }
            .validate(&JobLimits::default())
            .unwrap();
        let new = NewJob {
            id: JobId::random(),
            tenant: "t".into(),
            spec,
            created_at: Utc::now(),
            request_hash: "h".into(),
            trace: None,
            resources: None,
            queue: Default::default(),
        };
        let mut stored = StoredJob { record: Arc::new(new.pending_record()), events: vec![], pgid: None };
        let rendered = |record: &JobRecord| {
            record.json.get_or_try_init(|| Ok::<_, ()>(record.status.phase.as_str().to_owned().into())).unwrap()
        };
        assert_eq!(rendered(&stored.record), "pending");
        // No other holder: the record is changed in place, and must render afresh.
        stored.record_mut().status = JobState::new(JobPhase::Running);
        assert_eq!(rendered(&stored.record), "running");
    }
}
