//! Scenario 6: resident memory with 0, 10,000 and 100,000 jobs on the local backend, and the
//! time from start to ready.

use crate::{
    Bench, JOBS_10K, JOBS_100K,
    procs::{seeded_env, settled_rss},
    seed::{Preloaded, preload},
};
use anyhow::Result;
use oats::jobs::JobPhase;
use std::{path::Path, time::Duration};

impl Bench {
    pub(crate) async fn memory_scenario(&mut self, dir_10k: &Path, jobs_10k: &Preloaded) -> Result<()> {
        println!("== scenario 6: resident memory and time to ready");
        let empty = self.work.join("state-empty");
        std::fs::create_dir_all(&empty)?;
        let idle = self.start_oats("oats-idle", &seeded_env(&empty), false).await?;
        let rss_idle = settled_rss(&idle).await;
        drop(idle);

        let mut ready = Vec::new();
        let mut rss_10k = 0;
        for _ in 0..3 {
            let oats = self.start_oats("oats-10k", &seeded_env(dir_10k), false).await?;
            ready.push(oats.ready_after());
            rss_10k = settled_rss(&oats).await;
        }
        ready.sort();
        let ready_10k = ready[1];

        let dir_100k = self.work.join("state-100k");
        let took = preload(&dir_100k, JOBS_100K, JobPhase::Succeeded).await?.took;
        println!("preloaded {JOBS_100K} job records in {:.1}s", took.as_secs_f64());
        let oats = self.start_oats("oats-100k", &seeded_env(&dir_100k), false).await?;
        let ready_100k = oats.ready_after();
        let rss_100k = settled_rss(&oats).await;
        drop(oats);
        let _ = std::fs::remove_dir_all(&dir_100k);

        let mib = |k: u64| k as f64 / 1024.0;
        self.row(
            "6",
            "RSS at idle (local backend, 0 jobs)",
            format!("{:.1} MiB", mib(rss_idle)),
            "".into(),
            None,
            "",
            None,
        );
        self.row(
            "6",
            "RSS with 10,000 jobs (200-byte goals)",
            format!("{:.1} MiB", mib(rss_10k)),
            format!("{:.1} MiB (idle)", mib(rss_idle)),
            Some(rss_10k as f64 / rss_idle as f64),
            "< 64 MiB",
            Some(mib(rss_10k) < 64.0),
        );
        self.row(
            "6",
            "RSS with 100,000 jobs",
            format!("{:.1} MiB", mib(rss_100k)),
            format!("{:.1} MiB (10k)", mib(rss_10k)),
            Some(rss_100k as f64 / rss_10k as f64),
            "",
            None,
        );
        let slope = (rss_100k as f64 - rss_10k as f64) / (JOBS_100K - JOBS_10K) as f64;
        let first = (rss_10k as f64 - rss_idle as f64) / JOBS_10K as f64;
        self.row(
            "6",
            "memory per cached job (10k→100k slope)",
            format!("{slope:.2} KiB"),
            format!("{first:.2} KiB (0→10k)"),
            None,
            "< 4 KiB",
            Some(slope < 4.0),
        );
        self.row(
            "6",
            "time from start to ready, 10,000 jobs (median of 3)",
            format!("{:.2} s", ready_10k.as_secs_f64()),
            format!("{:.2} s (100,000 jobs)", ready_100k.as_secs_f64()),
            None,
            "< 2 s",
            Some(ready_10k < Duration::from_secs(2)),
        );
        self.note(format!(
            "6: ready times of the three 10k starts: {}; a job in the store is ~{} bytes of JSON (3 events, 200-byte goal, 2 labels, a result).",
            ready.iter().map(|d| format!("{:.2} s", d.as_secs_f64())).collect::<Vec<_>>().join(", "),
            jobs_10k.bytes / jobs_10k.ids.len().max(1) as u64,
        ));
        Ok(())
    }
}
