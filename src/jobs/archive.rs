//! The archiver: every finished job is kept in the history before its backend forgets it.
//!
//! Each replica runs one. A tick lists the backend's finished jobs that are not archived yet,
//! takes a claim on each in the history (so across replicas exactly one collects a job), reads
//! its record, events and the tail of its output through the backend, and archives them. A
//! replica that dies mid-way leaves a claim that runs out; another one takes over. When the
//! database is down, what was collected waits in memory and is written when it answers again.

use super::history::{ArchivedJob, HistoryError, HistoryHorizon, JobHistory, OutputTail};
use super::{JobBackend, JobEvent, JobId, JobRecord, LogOptions};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};
use tracing::Instrument;

/// How often the archiver looks for finished jobs.
const TICK: Duration = Duration::from_secs(1);
/// How long a claim lets one replica archive a job before another may take over.
const CLAIM_LEASE: Duration = Duration::from_secs(60);
/// Jobs archived at once.
const PARALLEL: usize = 8;
/// Most collected jobs held in memory while the database is down (beyond them, a job is
/// collected again when the database answers, from what the backend still has).
const MAX_HELD: usize = 2_000;
/// How often retention is applied.
const PURGE_EVERY: Duration = Duration::from_secs(3600);
/// Longest wait between attempts at one job after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What the operator decides about history.
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    /// Most bytes of output kept per job (the tail).
    pub log_bytes: usize,
    /// How long archived jobs are kept after they finished.
    pub retention: chrono::Duration,
    /// This replica's name in claims (its pod name).
    pub holder: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

/// `oats_archive_*`: is history keeping up?
#[derive(Clone, Default)]
pub struct ArchiveMetrics {
    archived: Counter,
    failures: Family<StageLabel, Counter>,
    pending: Gauge,
    lag: Gauge<f64, AtomicU64>,
    purged: Counter,
}

impl ArchiveMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("oats_archive");
        registry.register("archived", "Finished jobs this replica stored in the history", self.archived.clone());
        registry.register(
            "failures",
            "Failed archive attempts by stage (collect: reading the backend; store: writing the history)",
            self.failures.clone(),
        );
        registry.register("pending", "Finished jobs not archived yet", self.pending.clone());
        registry.register_with_unit(
            "lag",
            "Age of the oldest finished job not archived yet (0 when none)",
            Unit::Seconds,
            self.lag.clone(),
        );
        registry.register("purged", "Archived jobs removed by retention", self.purged.clone());
        // Both stages are shown from the start, at 0.
        for stage in ["collect", "store"] {
            let _ = self.failures.get_or_create(&StageLabel { stage });
        }
    }

    fn failed(&self, stage: &'static str) {
        self.failures.get_or_create(&StageLabel { stage }).inc();
    }
}

/// When a job may be tried again, after how many failures.
struct Backoff {
    failures: u32,
    next: Instant,
}

pub struct Archiver {
    backend: Arc<dyn JobBackend>,
    history: Arc<dyn JobHistory>,
    settings: ArchiveSettings,
    metrics: ArchiveMetrics,
    /// Finished jobs the backend still holds that are known archived (pruned as the backend
    /// forgets them), so a tick asks the database only about new ones.
    archived: Mutex<HashSet<JobId>>,
    /// Jobs collected while the database was down, written first when it answers.
    held: Mutex<HashMap<JobId, ArchivedJob>>,
    backoff: Mutex<HashMap<JobId, Backoff>>,
    horizon: Arc<HistoryHorizon>,
}

impl Archiver {
    pub fn new(
        backend: Arc<dyn JobBackend>,
        history: Arc<dyn JobHistory>,
        settings: ArchiveSettings,
        metrics: ArchiveMetrics,
    ) -> Self {
        Self {
            backend,
            history,
            settings,
            metrics,
            archived: Mutex::default(),
            held: Mutex::default(),
            backoff: Mutex::default(),
            horizon: Arc::default(),
        }
    }

    /// The horizon the job service reads (see [`HistoryHorizon`]), raised to the newest archived
    /// job now; unknown while the history cannot be read.
    pub async fn horizon(&self) -> Arc<HistoryHorizon> {
        match self.history.newest_created().await {
            Ok(Some(newest)) => self.horizon.raise(newest),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot read the job history's newest job; every list will ask it");
                self.horizon.raise_to_unknown();
            }
        }
        self.horizon.clone()
    }

    /// Archive and purge in the background, for as long as the process runs.
    pub fn spawn(self: Arc<Self>) {
        let archiver = self.clone();
        tokio::spawn(async move {
            loop {
                archiver.tick().await;
                tokio::time::sleep(TICK).await;
            }
        });
        tokio::spawn(async move {
            loop {
                self.purge().await;
                tokio::time::sleep(PURGE_EVERY).await;
            }
        });
    }

    /// One pass: archive what finished since the last one. Public so tests can drive it.
    pub async fn tick(&self) {
        let mut waiting = self.finished_unarchived().await;
        self.write_held().await;
        if !waiting.is_empty() {
            match self.history.archived_among(&waiting.iter().map(|r| r.id.clone()).collect::<Vec<_>>()).await {
                Ok(done) => {
                    self.archived.lock().unwrap().extend(done.iter().cloned());
                    waiting.retain(|r| !done.contains(&r.id));
                }
                Err(error) => self.store_failed(&error),
            }
        }
        self.publish(&waiting);
        let due: Vec<_> = waiting.into_iter().filter(|r| self.due(&r.id)).collect();
        futures::stream::iter(due).for_each_concurrent(PARALLEL, |record| self.archive_one(record)).await;
    }

    /// Finished jobs of the backend, and jobs it forgot before they were archived, that this
    /// replica does not know to be archived. Also prunes what the backend no longer holds.
    async fn finished_unarchived(&self) -> Vec<Arc<JobRecord>> {
        let Ok(records) = self.backend.list().await else { return Vec::new() };
        let finished: Vec<_> = records.into_iter().filter(|r| r.status.phase.is_terminal()).collect();
        let held: HashSet<JobId> = self.held.lock().unwrap().keys().cloned().collect();
        let mut archived = self.archived.lock().unwrap();
        let present: HashSet<&JobId> = finished.iter().map(|r| &r.id).collect();
        archived.retain(|id| present.contains(id));
        self.backoff.lock().unwrap().retain(|id, _| present.contains(id) || held.contains(id));
        finished
            .iter()
            .cloned()
            .chain(self.backend.departed())
            .filter(|r| !archived.contains(&r.id) && !held.contains(&r.id))
            .collect()
    }

    /// Write the jobs collected during an outage.
    async fn write_held(&self) {
        let held: Vec<ArchivedJob> = self.held.lock().unwrap().values().cloned().collect();
        for job in held {
            match self.history.archive(&job).await {
                Ok(stored) => {
                    self.held.lock().unwrap().remove(&job.record.id);
                    if stored {
                        self.metrics.archived.inc();
                    }
                }
                Err(error) => return self.store_failed(&error),
            }
        }
    }

    async fn archive_one(&self, record: Arc<JobRecord>) {
        let id = record.id.clone();
        let span = tracing::info_span!("archive job", oats.job.id = %id, oats.tenant = %record.tenant);
        async {
            let claimed = self.history.claim(&id, &self.settings.holder, CLAIM_LEASE).await;
            if let Ok(false) = claimed {
                return; // another replica is on it
            }
            let job = self.collect(record).await;
            if let Err(error) = claimed {
                self.store_failed(&error);
                return self.hold(job);
            }
            match self.history.archive(&job).await {
                Ok(stored) => {
                    if stored {
                        self.metrics.archived.inc();
                    }
                    self.archived.lock().unwrap().insert(id.clone());
                    self.backoff.lock().unwrap().remove(&id);
                    tracing::debug!(job_id = %id, "archived");
                }
                Err(error) => {
                    self.store_failed(&error);
                    self.hold(job);
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Read what the backend has of a finished job: its record now, its events and its output.
    /// What cannot be read is archived as missing (counted as a collect failure), never waited
    /// for: the backend may be about to forget the job.
    async fn collect(&self, record: Arc<JobRecord>) -> ArchivedJob {
        let id = &record.id.clone();
        let record = match self.backend.get(id).await {
            Ok(Some(now)) if now.status.phase.is_terminal() => now,
            _ => record,
        };
        let events = self.backend.events(id).await.unwrap_or_else(|error| {
            self.metrics.failed("collect");
            tracing::warn!(job_id = %id, %error, "cannot read the job's events to archive them");
            Vec::<JobEvent>::new()
        });
        let (logs, logs_truncated) = self.collect_logs(id).await;
        ArchivedJob { record: JobRecord::clone(&record), events, logs, logs_truncated }
    }

    async fn collect_logs(&self, id: &JobId) -> (Vec<u8>, bool) {
        let options = LogOptions { tail_lines: None, since_seconds: None, timestamps: true, follow: false };
        let mut tail = OutputTail::new(self.settings.log_bytes);
        match self.backend.logs(id, options).await {
            Ok(mut stream) => {
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(bytes) => tail.push(&bytes),
                        Err(error) => {
                            self.metrics.failed("collect");
                            tracing::warn!(job_id = %id, %error, "the job's output broke off while archiving it");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                self.metrics.failed("collect");
                tracing::warn!(job_id = %id, %error, "cannot read the job's output to archive it");
            }
        }
        tail.finish()
    }

    /// Keep a collected job until the database answers (bounded by [`MAX_HELD`]).
    fn hold(&self, job: ArchivedJob) {
        self.back_off(&job.record.id);
        let mut held = self.held.lock().unwrap();
        if held.len() < MAX_HELD {
            held.insert(job.record.id.clone(), job);
        }
    }

    fn store_failed(&self, error: &HistoryError) {
        self.metrics.failed("store");
        tracing::warn!(%error, "cannot write the job history; retrying with backoff");
    }

    fn due(&self, id: &JobId) -> bool {
        self.backoff.lock().unwrap().get(id).is_none_or(|b| Instant::now() >= b.next)
    }

    fn back_off(&self, id: &JobId) {
        let mut backoff = self.backoff.lock().unwrap();
        let entry = backoff.entry(id.clone()).or_insert(Backoff { failures: 0, next: Instant::now() });
        entry.failures += 1;
        let wait = TICK.saturating_mul(1 << entry.failures.min(6)).min(MAX_BACKOFF);
        entry.next = Instant::now() + wait;
    }

    fn publish(&self, waiting: &[Arc<JobRecord>]) {
        let held = self.held.lock().unwrap();
        let now = Utc::now();
        let oldest = waiting
            .iter()
            .map(|r| r.finished_at.unwrap_or(r.created_at))
            .chain(held.values().map(|j| j.record.finished_at.unwrap_or(j.record.created_at)))
            .min();
        self.metrics.pending.set(i64::try_from(waiting.len() + held.len()).unwrap_or(i64::MAX));
        self.metrics.lag.set(oldest.map_or(0.0, |t| age(t, now)));
    }

    /// Apply retention once.
    pub async fn purge(&self) {
        let before = Utc::now() - self.settings.retention;
        match self.history.purge(before).await {
            Ok(0) => {}
            Ok(purged) => {
                self.metrics.purged.inc_by(purged);
                tracing::info!(purged, "archived jobs past retention removed");
            }
            Err(error) => self.store_failed(&error),
        }
    }
}

fn age(time: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    (now - time).num_milliseconds().max(0) as f64 / 1000.0
}
