//! Preloaded job histories: records stored through the local backend's own seeding API
//! (`oats::backend::local::seed`, into the store a server on the directory opens: SQLite
//! `oats.db` in it) before a server starts on the directory.

use anyhow::{Result, anyhow};
use chrono::{DateTime, Utc};
use oats::jobs::{JobEvent, JobId, JobLimits, JobPhase, JobRecord, JobRequest, JobState};
use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

/// A 200-byte goal, numbered.
pub fn goal_text(i: usize) -> String {
    let mut goal = format!("Benchmark job {i:06}: ");
    while goal.len() < 200 {
        goal.push_str("summarise the open issues of the repository and propose a plan. ");
    }
    goal.truncate(200);
    goal
}

fn event(time: DateTime<Utc>, reason: &str, message: &str) -> JobEvent {
    JobEvent {
        time,
        kind: "Normal".into(),
        reason: reason.into(),
        message: message.into(),
        object: "Process/agent".into(),
        count: 1,
    }
}

/// What [`preload`] wrote.
pub struct Preloaded {
    /// The jobs' ids, in an arbitrary order (so not cache-friendly).
    pub ids: Vec<String>,
    pub took: Duration,
    /// Bytes of the records and events as JSON, as the store keeps them.
    pub bytes: u64,
}

/// Store `n` jobs in `phase` for a fresh state directory `dir` (of finished jobs, one in seven
/// failed, so a status filter has something to select), labelled `team=team-<i % 10>`, `env=prod`.
pub async fn preload(dir: &Path, n: usize, phase: JobPhase) -> Result<Preloaded> {
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(dir);
    let base = Utc::now() - chrono::Duration::seconds(n as i64 * 10 + 3600);
    let mut jobs = Vec::with_capacity(n);
    for i in 0..n {
        let spec = JobRequest {
            goal: goal_text(i),
            max_turns: 5,
            labels: BTreeMap::from([
                ("team".to_owned(), format!("team-{}", i % 10)),
                ("env".to_owned(), "prod".to_owned()),
            ]),
            model: Some("gpt-4o-mini".into()),
            ..Default::default()
        }
        .validate(&JobLimits::default())
        .map_err(|e| anyhow!("invalid job: {e:?}"))?;
        let created = base + chrono::Duration::seconds(i as i64 * 10);
        let finished = phase.is_terminal();
        let record = JobRecord {
            id: JobId::random(),
            tenant: "default".into(),
            request_hash: spec.fingerprint(),
            spec,
            status: JobState::new(if finished && i % 7 == 0 { JobPhase::Failed } else { phase }),
            created_at: created,
            started_at: finished.then(|| created + chrono::Duration::seconds(1)),
            finished_at: finished.then(|| created + chrono::Duration::seconds(9)),
            attempts: u32::from(finished),
            result: finished.then(|| format!("done: benchmark job {i} finished after 3 turns")),
            trace: None,
            queue: None,
            json: Default::default(),
        };
        let mut events = vec![event(created, "Submitted", "job accepted; waiting for a free slot")];
        if finished {
            events.push(event(
                created + chrono::Duration::seconds(1),
                "Started",
                "agent started as process group 4242",
            ));
            events.push(event(created + chrono::Duration::seconds(9), "Completed", "the agent finished"));
        }
        jobs.push((record, events));
    }
    // Random ids sorted: an order unrelated to creation (or to where the server keeps them).
    let mut ids: Vec<String> = jobs.iter().map(|(record, _)| record.id.to_string()).collect();
    ids.sort_unstable();
    let mut bytes = 0;
    for (record, events) in &jobs {
        bytes += (serde_json::to_vec(record)?.len() + serde_json::to_vec(events)?.len()) as u64;
    }
    let store = oats::store::Store::open_in(dir).await?;
    oats::backend::local::seed(dir, &store, jobs).await?;
    Ok(Preloaded { ids, took: started.elapsed(), bytes })
}
