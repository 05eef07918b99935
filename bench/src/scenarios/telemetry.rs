//! Scenario 5: scenario 1 with traces exported to a local OTLP receiver and `/metrics` scraped,
//! sampled as shipped and with every request sampled, vs telemetry off.

use crate::{
    Bench,
    load::{Load, spawn_scraper},
    procs::seeded_env,
    scenarios::reads::Reads,
};
use anyhow::Result;
use oats_testkit::{Process, otlp::HttpSink};
use std::{sync::atomic::Ordering, time::Duration};

/// How often the telemetry-on servers are scraped.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(15);

impl Bench {
    pub(crate) async fn telemetry_scenario(&mut self, reads: &Reads) -> Result<()> {
        let Reads { dir, oats, .. } = reads;
        let job_paths = |server: &Process| reads.job_paths(server);
        println!(
            "-- scenario 5: telemetry on (OTLP traces to a local receiver, /metrics scraped) vs off; \
             sampled as shipped (parentbased_traceidratio 0.05) and always_on"
        );
        let sink = HttpSink::start().await?;
        let traced_env = |sampler: &str, arg: Option<&str>| {
            let mut env = seeded_env(dir);
            env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), sink.endpoint.clone()));
            env.push(("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()));
            env.push(("OTEL_TRACES_SAMPLER".into(), sampler.into()));
            if let Some(arg) = arg {
                env.push(("OTEL_TRACES_SAMPLER_ARG".into(), arg.into()));
            }
            env
        };
        let shipped =
            self.start_oats("oats-sampled", &traced_env("parentbased_traceidratio", Some("0.05")), self.pin).await?;
        let always = self.start_oats("oats-always-on", &traced_env("always_on", None), self.pin).await?;
        // Scraped all along, every 15 s (the ServiceMonitor ships 30 s), not per window.
        let scrapers: Vec<_> = [&shipped, &always]
            .iter()
            .map(|server| spawn_scraper(self.http.clone(), server.url("/metrics"), SCRAPE_INTERVAL))
            .collect();
        // Each round runs the three servers in another order (off first, then second, then third),
        // so a drift within a round, or whatever the window after another costs, does not fall on
        // one configuration only.
        let configurations =
            [(oats, "off"), (&shipped, "on, reads sampled 5% (as shipped)"), (&always, "on, always_on")];
        let mut runs: [Vec<Load>; 3] = Default::default();
        let mut served_always = 0;
        let mut spans_always = 0;
        for round in 0..3 {
            for turn in 0..3 {
                let which = (round + turn) % 3;
                let (server, name) = configurations[which];
                let before = sink.spans.load(Ordering::Relaxed);
                let l = self.closed(job_paths(server), server).await;
                if which == 2 {
                    // Let the batch processor's export of this window (every 5 s) arrive.
                    tokio::time::sleep(Duration::from_secs(6)).await;
                    spans_always += sink.spans.load(Ordering::Relaxed) - before;
                    served_always += l.total;
                }
                self.load_note(&format!("5 telemetry {name}, round {}", round + 1), &l);
                runs[which].push(l);
            }
        }
        let [off, sampled, every] = runs;
        scrapers.iter().for_each(|s| s.abort());
        let rps = |v: &[Load]| v.iter().map(Load::rps).sum::<f64>() / v.len() as f64;
        let p99 = |v: &[Load]| v.iter().map(|l| l.pct(0.99)).sum::<f64>() / v.len() as f64;
        let off_rps = rps(&off);
        for (runs, name, judged) in
            [(&sampled, "reads sampled 5%, as shipped", true), (&every, "every request sampled, always_on", false)]
        {
            let ratio = rps(runs) / off_rps;
            self.row(
                "5",
                &format!(
                    "GET job, telemetry on ({name}) vs off, saturated, mean of 3 rounds, each in another order: req/s"
                ),
                format!("{:.0}", rps(runs)),
                format!("{off_rps:.0} (off)"),
                Some(ratio),
                if judged { "≥ 0.95 (< 5% cost)" } else { "" },
                judged.then_some(ratio >= 0.95),
            );
            self.row(
                "5",
                &format!("GET job, telemetry on ({name}) vs off: p99 at saturation"),
                format!("{:.2} ms", p99(runs)),
                format!("{:.2} ms", p99(&off)),
                Some(p99(runs) / p99(&off)),
                "",
                None,
            );
        }
        if spans_always * 2 < served_always {
            anyhow::bail!(
                "the OTLP receiver got {spans_always} spans for {served_always} always_on requests: the \"on\" servers \
                 are not exporting, so what exporting costs is not measured"
            );
        }
        self.note(format!(
            "5: with always_on the receiver got {spans_always} spans for {served_always} requests (one span per request \
             is exported, none dropped by the batch processor's queue). \"Off\" is the default deployment: no OTLP \
             endpoint, so no request spans; metrics are always recorded (they cannot be turned off) and /metrics is \
             scraped every 15 s (all along, not per window) only in the \"on\" servers. \"Sampled as shipped\" is the sampler the manifests set \
             (parentbased_traceidratio 0.05: a caller's sampled trace is always continued, every write and 5% of \
             untraced reads start one); the batch processor's export thread shares the server's core"
        ));
        drop(shipped);
        drop(always);
        Ok(())
    }
}
