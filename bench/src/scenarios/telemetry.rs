//! Scenario 5: scenario 1 with traces exported to a local OTLP receiver and `/metrics` scraped,
//! sampled as shipped and with every request sampled, vs telemetry off.

use crate::{
    Bench,
    load::{Load, mean, spawn_scraper},
    procs::seeded_env,
    rounds::{PAIRED_ROUNDS, PAIRED_WINDOW, Spread, round_ratios, rounds_note},
    scenarios::reads::Reads,
};
use anyhow::Result;
use oats_testkit::otlp::HttpSink;
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// How often the telemetry-on servers are scraped.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(15);

impl Bench {
    pub(crate) async fn telemetry_scenario(&mut self, reads: &Reads) -> Result<()> {
        let Reads { dir, oats, .. } = reads;
        println!(
            "-- scenario 5: telemetry on (OTLP traces to a local receiver, /metrics scraped) vs off; \
             sampled as shipped (parentbased_traceidratio 0.05) and always_on"
        );
        // One receiver per server, to count what each exports.
        let (sampled_sink, always_sink) = (HttpSink::start().await?, HttpSink::start().await?);
        let traced_env = |sink: &HttpSink, sampler: &str, arg: Option<&str>| {
            let mut env = seeded_env(dir);
            env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), sink.endpoint.clone()));
            env.push(("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()));
            env.push(("OTEL_TRACES_SAMPLER".into(), sampler.into()));
            if let Some(arg) = arg {
                env.push(("OTEL_TRACES_SAMPLER_ARG".into(), arg.into()));
            }
            env
        };
        let shipped = self
            .start_oats("oats-sampled", &traced_env(&sampled_sink, "parentbased_traceidratio", Some("0.05")), self.pin)
            .await?;
        let always = self.start_oats("oats-always-on", &traced_env(&always_sink, "always_on", None), self.pin).await?;
        // A second "off" server, identical to the first: what the comparison reads when there is
        // nothing to find (the noise floor of the paired rounds).
        let twin = self.start_oats("oats-off-twin", &seeded_env(dir), self.pin).await?;
        // Scraped all along, every 15 s (the ServiceMonitor ships 30 s), not per window.
        let scrapers: Vec<_> = [&shipped, &always]
            .iter()
            .map(|server| spawn_scraper(self.http.clone(), server.url("/metrics"), SCRAPE_INTERVAL))
            .collect();
        let servers = [oats, &shipped, &always, &twin].map(|server| (reads.job_paths(server), server));
        let [off, sampled, every, off_twin] = self.paired_rounds(&servers).await;
        scrapers.iter().for_each(|s| s.abort());
        let sampled_spans = settled(&sampled_sink.spans).await;
        let always_spans = settled(&always_sink.spans).await;
        for (loads, name) in [
            (&off, "off"),
            (&sampled, "reads sampled 5% (as shipped)"),
            (&every, "always_on"),
            (&off_twin, "off, a second identical server"),
        ] {
            self.note(rounds_note(&format!("5 telemetry {name}"), loads));
        }

        let off_rps = mean(&off, Load::rps);
        for (loads, name, judged) in
            [(&sampled, "reads sampled 5%, as shipped", true), (&every, "every request sampled, always_on", false)]
        {
            let throughput = Spread::of(&round_ratios(loads, &off, Load::rps));
            let cpu = Spread::of(&round_ratios(loads, &off, Load::cpu_us));
            self.row(
                "5",
                &format!(
                    "GET job, telemetry on ({name}) vs off, saturated: req/s; ratio: median of {PAIRED_ROUNDS} rounds' ratios \
                     ({}s windows, in rotating order)",
                    PAIRED_WINDOW.as_secs()
                ),
                format!("{:.0} (round ratios: {throughput})", mean(loads, Load::rps)),
                format!("{off_rps:.0} (off)"),
                Some(throughput.median),
                if judged { "≥ 0.95 (< 5% cost)" } else { "" },
                judged.then_some(throughput.median >= 0.95),
            );
            self.row(
                "5",
                &format!("GET job, telemetry on ({name}) vs off: server CPU per request"),
                format!("{:.2} µs (round ratios: {cpu})", mean(loads, Load::cpu_us)),
                format!("{:.2} µs (off)", mean(&off, Load::cpu_us)),
                Some(cpu.median),
                "",
                None,
            );
            self.row(
                "5",
                &format!("GET job, telemetry on ({name}) vs off: p99 at saturation (mean of the windows)"),
                format!("{:.2} ms", mean(loads, |l| l.pct(0.99))),
                format!("{:.2} ms", mean(&off, |l| l.pct(0.99))),
                Some(mean(loads, |l| l.pct(0.99)) / mean(&off, |l| l.pct(0.99))),
                "",
                None,
            );
        }
        let noise = Spread::of(&round_ratios(&off_twin, &off, Load::rps));
        self.row(
            "5",
            "noise floor: a second telemetry-off server vs the first, in the same rounds: req/s",
            format!("{:.0} (round ratios: {noise})", mean(&off_twin, Load::rps)),
            format!("{off_rps:.0} (off)"),
            Some(noise.median),
            "",
            None,
        );
        let cpu_noise = Spread::of(&round_ratios(&off_twin, &off, Load::cpu_us));
        self.row(
            "5",
            "noise floor: a second telemetry-off server vs the first: server CPU per request",
            format!("{:.2} µs (round ratios: {cpu_noise})", mean(&off_twin, Load::cpu_us)),
            format!("{:.2} µs (off)", mean(&off, Load::cpu_us)),
            Some(cpu_noise.median),
            "",
            None,
        );
        drop(twin);
        let served = |loads: &[Load]| loads.iter().map(|l| l.total).sum::<u64>();
        let (served_sampled, served_always) = (served(&sampled), served(&every));
        if always_spans * 2 < served_always {
            anyhow::bail!(
                "the OTLP receiver got {always_spans} spans for {served_always} always_on requests: the \"on\" servers \
                 are not exporting, so what exporting costs is not measured"
            );
        }
        self.note(format!(
            "5: with always_on the receiver got {always_spans} spans for {served_always} requests, and with the shipped \
             sampler {sampled_spans} for {served_sampled} ({:.1}%). \"Off\" is the default deployment: no OTLP \
             endpoint, so no request spans; metrics are always recorded (they cannot be turned off) and /metrics is \
             scraped every 15 s (all along, not per window) only in the \"on\" servers. \"Sampled as shipped\" is the \
             sampler the manifests set (parentbased_traceidratio 0.05: a caller's sampled trace is always continued, \
             every write and 5% of untraced reads start one); the batch processor's export thread shares the \
             server's core",
            sampled_spans as f64 / served_sampled.max(1) as f64 * 100.0
        ));
        drop(shipped);
        drop(always);
        Ok(())
    }
}

/// A receiver's span count once the batch processor's exports have stopped arriving: unchanged
/// over longer than its 5 s export interval, or after 30 s.
async fn settled(spans: &AtomicU64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = spans.load(Ordering::Relaxed);
    let mut unchanged_since = Instant::now();
    while Instant::now() < deadline && unchanged_since.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = spans.load(Ordering::Relaxed);
        if now != last {
            (last, unchanged_since) = (now, Instant::now());
        }
    }
    last
}
