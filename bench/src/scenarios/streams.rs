//! Scenario 4: 1,000 watch streams held open (memory and CPU per stream).

use crate::{
    Bench, STREAMS,
    procs::{local_env, proc_cpu, proc_status},
    seed::preload,
};
use anyhow::Result;
use futures::StreamExt;
use oats::jobs::JobPhase;
use reqwest::Client;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

impl Bench {
    pub(crate) async fn streams_scenario(&mut self) -> Result<()> {
        println!("== scenario 4: {STREAMS} concurrent watch streams");
        let dir = self.work.join("state-streams");
        let ids = preload(&dir, STREAMS + 1, JobPhase::Pending).await?.ids;
        let policy = self.work.join("policy-streams.yaml");
        std::fs::write(&policy, format!("defaults:\n  max_streams: {}\n", STREAMS * 2))?;
        let mut env = local_env(&dir);
        env.push(("OATS_POLICY_FILE".into(), policy.display().to_string()));
        // One slot, taken by a long sleep: every other job stays pending, so its watch stays open.
        env.push(("OATS_LOCAL_CONCURRENCY".into(), "1".into()));
        env.push(("OATS_LOCAL_AGENT_COMMAND".into(), "sleep,300".into()));
        let oats = self.start_oats("oats-streams", &env, false).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu0 = proc_cpu(oats.pid() as i32, self.clk_tck);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_cpu = (proc_cpu(oats.pid() as i32, self.clk_tck) - cpu0) / 3.0;
        let before = proc_status(oats.pid() as i32, "VmRSS");
        let client = Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(4096)
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        let opened = Arc::new(AtomicU64::new(0));
        let events = Arc::new(AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let mut tasks = Vec::new();
        let open_started = Instant::now();
        for id in ids.iter().take(STREAMS) {
            let (client, url) = (client.clone(), oats.url(&format!("/api/v1/jobs/{id}/watch")));
            let (opened, events, stop) = (opened.clone(), events.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let Ok(response) = client.get(url).send().await else { return };
                if !response.status().is_success() {
                    return;
                }
                let mut body = response.bytes_stream();
                let mut counted = false;
                loop {
                    tokio::select! {
                        chunk = body.next() => match chunk {
                            Some(Ok(bytes)) => {
                                let n = bytes.windows(10).filter(|w| *w == b"event: job").count() as u64;
                                events.fetch_add(n, Ordering::Relaxed);
                                if n > 0 && !counted {
                                    counted = true;
                                    opened.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            _ => return,
                        },
                        () = stop.cancelled() => return,
                    }
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while opened.load(Ordering::Relaxed) < STREAMS as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let open_took = open_started.elapsed();
        let open = opened.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu1 = proc_cpu(oats.pid() as i32, self.clk_tck);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let held_cpu = (proc_cpu(oats.pid() as i32, self.clk_tck) - cpu1) / 5.0;
        let with = proc_status(oats.pid() as i32, "VmRSS");
        let still_open = tasks.iter().filter(|t| !t.is_finished()).count();
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        drop(client);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = proc_status(oats.pid() as i32, "VmRSS");
        let per_stream = (with as f64 - before as f64) / open.max(1) as f64;
        self.row(
            "4",
            &format!("{open} watch streams held open: RSS"),
            format!("{:.1} MiB", with as f64 / 1024.0),
            format!("{:.1} MiB (same server, no streams)", before as f64 / 1024.0),
            Some(with as f64 / before as f64),
            "",
            None,
        );
        self.row("4", "memory per open watch stream", format!("{per_stream:.1} KiB"), "".into(), None, "", None);
        self.row(
            "4",
            "server CPU while holding the streams (idle jobs)",
            format!("{:.0}% of a core", held_cpu * 100.0),
            format!("{:.1}% (no streams)", idle_cpu * 100.0),
            None,
            "",
            None,
        );
        self.note(format!(
            "4: {open} of {STREAMS} streams got their first event within {:.1} s; {still_open} still open after 7 s; \
             {} `job` events received in all; RSS {:.1} MiB after the clients disconnected. A watch waits for its job's \
             change (src/jobs/changes.rs), so idle streams cost no work but the shared heartbeat.",
            open_took.as_secs_f64(),
            events.load(Ordering::Relaxed),
            after as f64 / 1024.0,
        ));
        drop(oats);
        oats::backend::local::kill_agents(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
