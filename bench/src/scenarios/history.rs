//! Scenario 8: the job history (issue 13).
//! - Archiving: the archiver (the one `oats serve` runs) archives finished jobs a backend hands
//!   it, each with two events and a 2 KiB output, into SQLite (and PostgreSQL with
//!   `OATS_BENCH_DATABASE_URL`): jobs/s, vs the same rows written straight to the store (the
//!   database's own pace, the floor of any archiver).
//! - Reading: 100,000 archived jobs behind `oats serve` (local backend, nothing live): the list's
//!   first page and a page after 90,000 jobs, read again and again (the server keeps what it
//!   decoded), 90 different pages in turn, GET of 1,031 jobs again and again, and of every job in
//!   turn (decoded afresh each time): saturated (req/s and CPU, vs the bare handler answering the
//!   same bytes) and at half that rate, where p99 is judged.
//! - Storage per archived job (record and events; the output excluded), from the database.

use crate::{
    Bench,
    load::{Load, Target},
    procs::local_env,
};
use anyhow::{Context, Result, anyhow};
use base64::Engine;
use chrono::{DateTime, Duration as Days, Utc};
use finished_backend::FinishedJobs;
use oats::{
    jobs::{
        JobEvent, JobId, JobRecord,
        archive::{ArchiveMetrics, ArchiveSettings, Archiver},
        history::{ArchivedJob, JobHistory},
    },
    store::Store,
};
use oats_testkit::Process;
use std::{sync::Arc, time::Instant};

/// Jobs archived per measurement of the archiver.
const ARCHIVED: usize = 2_000;
/// Jobs in the history read through `oats serve`.
const HISTORY: usize = 100_000;
/// Rows written at once while seeding.
const SEED_PARALLEL: usize = 16;

impl Bench {
    pub(crate) async fn history_scenario(&mut self) -> Result<()> {
        println!("-- scenario 8: job history (archiving, reads of {HISTORY} archived jobs, bytes per job)");
        let dir = self.work.join("history-sqlite");
        let sqlite = Store::open_in(&dir).await?;
        self.archiving_rows("SQLite", &sqlite).await?;
        let postgres = match std::env::var("OATS_BENCH_DATABASE_URL") {
            Ok(url) => {
                let store = Store::open(&url).await.context("OATS_BENCH_DATABASE_URL")?;
                self.archiving_rows("PostgreSQL", &store).await?;
                Some((url, store))
            }
            Err(_) => None,
        };
        self.reading_rows("SQLite", &dir, &sqlite, local_env(&dir)).await?;
        let bytes = store_bytes_per_job(&dir, HISTORY + 4 * ARCHIVED);
        self.row("8", "storage per archived job (record + events, SQLite file)", bytes, String::new(), None, "", None);
        if let Some((url, store)) = postgres {
            let dir = self.work.join("history-postgres");
            let mut env = local_env(&dir);
            env.push(("OATS_DATABASE_URL".into(), url));
            self.reading_rows("PostgreSQL", &dir, &store, env).await?;
        }
        Ok(())
    }

    /// Archiver vs straight writes, alternating, on one engine.
    async fn archiving_rows(&mut self, engine: &str, store: &Store) -> Result<()> {
        let (mut archiver_rates, mut direct_rates) = (Vec::new(), Vec::new());
        for round in 1..=2 {
            let jobs = finished_jobs(ARCHIVED, Utc::now());
            let backend = Arc::new(FinishedJobs::new(jobs.clone()));
            let settings = ArchiveSettings {
                log_bytes: 1024 * 1024,
                retention: Days::days(30),
                holder: format!("bench-{}", std::process::id()),
            };
            let history: Arc<dyn JobHistory> = Arc::new(store.clone());
            let archiver = Archiver::new(backend, history.clone(), settings, ArchiveMetrics::default());
            let ids: Vec<JobId> = jobs.iter().map(|j| j.id.clone()).collect();
            let started = Instant::now();
            while history.archived_among(&ids).await?.len() < ids.len() {
                archiver.tick().await;
            }
            archiver_rates.push(ARCHIVED as f64 / started.elapsed().as_secs_f64());

            let rows: Vec<ArchivedJob> = finished_jobs(ARCHIVED, Utc::now()).into_iter().map(archived).collect();
            let started = Instant::now();
            write_all(store, rows).await?;
            direct_rates.push(ARCHIVED as f64 / started.elapsed().as_secs_f64());
            self.notes.push(format!(
                "8 archiving on {engine}, round {round}: archiver {:.0} jobs/s, straight writes {:.0} jobs/s",
                archiver_rates[round - 1],
                direct_rates[round - 1]
            ));
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (archiver, direct) = (mean(&archiver_rates), mean(&direct_rates));
        self.row(
            "8",
            &format!("archiving finished jobs ({engine}, 2 KiB output each): jobs/s"),
            format!("{archiver:.0}"),
            format!("{direct:.0} (the same rows written straight)"),
            Some(archiver / direct),
            "≥ 100 jobs/s",
            Some(archiver >= 100.0),
        );
        Ok(())
    }

    /// 100,000 archived jobs read through `oats serve`.
    async fn reading_rows(
        &mut self,
        engine: &str,
        dir: &std::path::Path,
        store: &Store,
        env: Vec<(String, String)>,
    ) -> Result<()> {
        let newest = Utc::now() - Days::days(1);
        let jobs = finished_jobs(HISTORY, newest);
        let started = Instant::now();
        write_all(store, jobs.iter().cloned().map(archived).collect()).await?;
        println!("seeded {HISTORY} archived jobs ({engine}) in {:.1}s", started.elapsed().as_secs_f64());
        // Newest first: the page after 90,000 jobs starts after the 90,000th newest.
        let mut by_age = jobs.clone();
        by_age.sort_by(|a, b| (b.created_at, b.id.as_str()).cmp(&(a.created_at, a.id.as_str())));
        let deep_token = page_token(&by_age[89_999]);

        std::fs::create_dir_all(dir)?;
        let oats = self.start_oats("oats-history", &env, self.pin).await?;
        let first_path = "/api/v1/jobs?limit=50".to_owned();
        let deep_path = format!("/api/v1/jobs?limit=50&page_token={deep_token}");
        // 90 pages (after 10,000, 11,000, ... 99,000 jobs): more records than the server keeps
        // decoded, so each page is read and decoded afresh.
        let many_pages: Vec<String> = (10..100)
            .map(|k| format!("/api/v1/jobs?limit=50&page_token={}", page_token(&by_age[k * 1000 - 1])))
            .collect();
        // Read again and again (kept decoded), and every job in turn (each read afresh).
        let job_paths: Vec<String> = jobs.iter().step_by(97).map(|j| format!("/api/v1/jobs/{}", j.id)).collect();
        let every_job: Vec<String> = jobs.iter().map(|j| format!("/api/v1/jobs/{}", j.id)).collect();
        let list_body = self.http.get(oats.url(&first_path)).send().await?.bytes().await?;
        let job_body = self.http.get(oats.url(&job_paths[0])).send().await?.bytes().await?;
        if list_body.len() < 1000 || job_body.len() < 100 {
            return Err(anyhow!(
                "the server does not answer from the history: {}",
                String::from_utf8_lossy(&list_body)
            ));
        }
        let (list_file, job_file) = (self.work.join("history-list.json"), self.work.join("history-job.json"));
        std::fs::write(&list_file, &list_body)?;
        std::fs::write(&job_file, &job_body)?;
        let bare = self.start_bare(&job_file, &list_file).await?;

        let bare_list = self.closed(Target::new(&bare, ["/api/v1/jobs?limit=50".to_owned()]), &bare).await;
        let bare_job = self.closed(Target::new(&bare, ["/api/v1/jobs/job-x".to_owned()]), &bare).await;
        self.load_note(&format!("8 bare list, 100k archived ({engine}), saturated"), &bare_list);
        self.load_note(&format!("8 bare job, 100k archived ({engine}), saturated"), &bare_job);
        let reads = [
            ("list first page, 100k archived", Target::new(&oats, [first_path]), 20.0, &bare_list),
            ("list page after 90,000 archived", Target::new(&oats, [deep_path]), 20.0, &bare_list),
            (
                "list 90 pages in turn, after 10,000 to 99,000 archived",
                Target::new(&oats, many_pages),
                20.0,
                &bare_list,
            ),
            ("GET one of 1,031 archived jobs, 100k archived", Target::new(&oats, job_paths), 5.0, &bare_job),
            ("GET each of 100k archived jobs in turn", Target::new(&oats, every_job), 5.0, &bare_job),
        ];
        for (figure, target, limit_ms, bare) in reads {
            self.archived_read_rows(engine, figure, target, &oats, limit_ms, bare).await;
        }
        Ok(())
    }

    /// One read of the history: saturated (its throughput and CPU), then at half that rate, where
    /// its p99 is judged, as scenario 1 judges GET's (at saturation p99 is the queue of 32 clients).
    async fn archived_read_rows(
        &mut self,
        engine: &str,
        figure: &str,
        target: Target,
        oats: &Process,
        limit_ms: f64,
        bare: &Load,
    ) {
        let saturated = self.closed(target.clone(), oats).await;
        self.load_note(&format!("8 {figure} ({engine}), saturated"), &saturated);
        let rate = saturated.rps() / 2.0;
        let half = self.open(target, oats, rate).await;
        self.load_note(&format!("8 {figure} ({engine}), at half saturation ({rate:.0} req/s offered)"), &half);
        self.row(
            "8",
            &format!("{figure} ({engine}), saturated c={}: req/s", self.concurrency),
            format!(
                "{:.0} (p99 {:.1} ms, {:.0} µs CPU/request)",
                saturated.rps(),
                saturated.pct(0.99),
                saturated.cpu_us()
            ),
            format!("{:.0} (bare, same body)", bare.rps()),
            Some(saturated.rps() / bare.rps()),
            "",
            None,
        );
        self.row(
            "8",
            &format!("{figure} ({engine}), at half saturation ({rate:.0} req/s): p99"),
            format!("{:.2} ms (p50 {:.2}, p99.9 {:.2})", half.pct(0.99), half.pct(0.5), half.pct(0.999)),
            String::new(),
            None,
            &format!("p99 < {limit_ms:.0} ms"),
            Some(half.pct(0.99) < limit_ms),
        );
    }
}

/// `count` finished jobs, one second apart, the newest created at `newest`.
fn finished_jobs(count: usize, newest: DateTime<Utc>) -> Vec<Arc<JobRecord>> {
    (0..count)
        .map(|i| {
            let created = newest - Days::seconds(i as i64);
            let record: JobRecord = serde_json::from_value(serde_json::json!({
                "id": JobId::random().as_str(),
                "tenant": "default",
                "spec": {"goal": "Summarise the quarterly report and list three risks", "max_turns": 5,
                         "labels": {"team": "research", "run": format!("r{}", i % 100)},
                         "timeout_seconds": 600, "model": "gpt-4o-mini"},
                "status": {"phase": "succeeded", "reason": null, "message": null},
                "created_at": created,
                "started_at": created + Days::seconds(2),
                "finished_at": created + Days::seconds(40),
                "attempts": 1,
                "result": "Three risks: currency exposure, supplier concentration, and a delayed product launch.",
                "request_hash": "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
                "trace": null,
            }))
            .expect("a job record");
            Arc::new(record)
        })
        .collect()
}

fn events(record: &JobRecord) -> Vec<JobEvent> {
    let event = |reason: &str, message: &str, object: String| JobEvent {
        time: record.created_at,
        kind: "Normal".into(),
        reason: reason.into(),
        message: message.into(),
        object,
        count: 1,
    };
    vec![
        event("Completed", "Job completed", format!("Job/{}", record.id)),
        event("Started", "Started container agent", format!("Pod/{}-x7k2p", record.id)),
    ]
}

/// Two KiB of timestamped output.
fn output(record: &JobRecord) -> Vec<u8> {
    let stamp = record.created_at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    (0..32)
        .flat_map(|i| {
            format!("{stamp} turn {i:02}: reading section {i} of the report, noting risks ...\n").into_bytes()
        })
        .collect()
}

fn archived(record: Arc<JobRecord>) -> ArchivedJob {
    ArchivedJob {
        events: events(&record),
        logs: output(&record),
        logs_truncated: false,
        record: JobRecord::clone(&record),
    }
}

async fn write_all(store: &Store, rows: Vec<ArchivedJob>) -> Result<()> {
    use futures::StreamExt;
    let results: Vec<_> = futures::stream::iter(rows)
        .map(|row| async move { store.archive(&row).await })
        .buffer_unordered(SEED_PARALLEL)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<bool>, _>>()?;
    Ok(())
}

/// The page token the API hands out after `record` (`v1:<created nanoseconds>:<id>`, base64).
fn page_token(record: &JobRecord) -> String {
    let nanos = record.created_at.timestamp_nanos_opt().unwrap_or(i64::MAX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{nanos}:{}", record.id.as_str()))
}

/// What an archived job stores: its record and events as the store writes them (JSON), and the
/// SQLite file's size per archived row, indexes and outputs included.
fn store_bytes_per_job(dir: &std::path::Path, rows: usize) -> String {
    let sample = finished_jobs(100, Utc::now());
    let json: usize = sample
        .iter()
        .map(|record| {
            let events = serde_json::to_string(&events(record)).expect("events serialise");
            serde_json::to_string(record.as_ref()).expect("a record serialises").len() + events.len()
        })
        .sum();
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    let total = size("oats.db") + size("oats.db-wal");
    format!(
        "{} B per job (its record and events as stored, JSON); the SQLite file: {} B per job incl. indexes and \
         its 2 KiB output compressed ({:.1} MiB for {rows} jobs)",
        json / sample.len(),
        total / rows as u64,
        total as f64 / 1048576.0
    )
}

/// A backend holding finished jobs only: what the archiver reads.
mod finished_backend {
    use oats::jobs::{
        BackendError, CreateOutcome, JobBackend, JobCounts, JobEvent, JobId, JobRecord, LogOptions, LogStream, NewJob,
        Preview,
    };
    use std::{collections::HashMap, sync::Arc};

    pub struct FinishedJobs {
        jobs: HashMap<JobId, Arc<JobRecord>>,
    }

    impl FinishedJobs {
        pub fn new(jobs: Vec<Arc<JobRecord>>) -> Self {
            Self { jobs: jobs.into_iter().map(|j| (j.id.clone(), j)).collect() }
        }
    }

    #[async_trait::async_trait]
    impl JobBackend for FinishedJobs {
        fn name(&self) -> &'static str {
            "bench"
        }
        fn is_ready(&self) -> bool {
            true
        }
        fn agent_image(&self) -> Option<String> {
            None
        }
        fn preview(&self, _job: &NewJob) -> Preview {
            Preview { manifest: serde_json::Value::Null, pod_security_violations: Vec::new() }
        }
        fn active_jobs(&self, _tenant: &str) -> usize {
            0
        }
        fn kept_jobs(&self, _tenant: &str) -> usize {
            self.jobs.len()
        }
        fn knows(&self, id: &JobId) -> bool {
            self.jobs.contains_key(id)
        }
        fn counts(&self) -> JobCounts {
            JobCounts::default()
        }
        async fn create(&self, _job: NewJob) -> Result<CreateOutcome, BackendError> {
            Err(BackendError::Internal("the benchmark's backend creates nothing".into()))
        }
        async fn get(&self, id: &JobId) -> Result<Option<Arc<JobRecord>>, BackendError> {
            Ok(self.jobs.get(id).cloned())
        }
        async fn list(&self) -> Result<Vec<Arc<JobRecord>>, BackendError> {
            Ok(self.jobs.values().cloned().collect())
        }
        async fn cancel(&self, id: &JobId) -> Result<JobRecord, BackendError> {
            Err(BackendError::AlreadyFinished(id.to_string()))
        }
        async fn logs(&self, id: &JobId, _options: LogOptions) -> Result<LogStream, BackendError> {
            let record = self.jobs.get(id).ok_or_else(|| BackendError::NotFound(id.to_string()))?;
            let bytes = bytes::Bytes::from(super::output(record));
            Ok(Box::pin(futures::stream::iter([Ok(bytes)])))
        }
        async fn events(&self, id: &JobId) -> Result<Vec<JobEvent>, BackendError> {
            let record = self.jobs.get(id).ok_or_else(|| BackendError::NotFound(id.to_string()))?;
            Ok(super::events(record))
        }
    }
}
