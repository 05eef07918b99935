//! Scenario 1: `GET /api/v1/jobs/{id}` with 10,000 jobs vs a bare poem handler answering the
//! same bytes; saturated and at half the saturated rate.

use crate::{
    Bench,
    load::{Load, Target, mean},
    procs::seeded_env,
    rounds::{PAIRED_ROUNDS, PAIRED_WINDOW, Spread, round_ratios, rounds_note},
    scenarios::reads::Reads,
};
use anyhow::Result;
use oats_testkit::Process;

impl Bench {
    pub(crate) async fn get_job_scenario(&mut self, reads: &Reads, bare: &Process) -> Result<()> {
        let Reads { dir, oats, job_body, .. } = reads;
        let job_paths = |server: &Process| reads.job_paths(server);
        println!("-- scenario 1: GET /api/v1/jobs/{{id}} ({} bytes) vs bare poem handler", job_body.len());
        // Paired rounds of reference and OATS windows, so drift of the machine's speed hits both.
        // A third server, identical but for RUST_LOG=warn, shows what the log layer's handling
        // of the request span costs (nothing is logged per request either way).
        let mut quiet_env = seeded_env(dir);
        quiet_env.push(("RUST_LOG".into(), "warn".into()));
        let quiet = self.start_oats("oats-quiet", &quiet_env, self.pin).await?;
        let servers = [bare, oats, &quiet].map(|server| (job_paths(server), server));
        let [bare_runs, oats_runs, quiet_runs] = self.paired_rounds(&servers).await;
        drop(quiet);
        for (loads, name) in [
            (&bare_runs, "bare handler"),
            (&oats_runs, "OATS GET job"),
            (&quiet_runs, "diagnosis: OATS GET job with RUST_LOG=warn"),
        ] {
            self.note(rounds_note(&format!("1 {name}, saturated"), loads));
        }
        let (bare_rps, oats_rps) = (mean(&bare_runs, Load::rps), mean(&oats_runs, Load::rps));
        let throughput = Spread::of(&round_ratios(&oats_runs, &bare_runs, Load::rps));
        self.row(
            "1",
            &format!(
                "GET job, 10k jobs, saturated (c={}): req/s; ratio: median of {PAIRED_ROUNDS} rounds' ratios ({}s windows, in rotating order)",
                self.concurrency,
                PAIRED_WINDOW.as_secs()
            ),
            format!("{oats_rps:.0} (round ratios: {throughput})"),
            format!("{bare_rps:.0} (bare poem, {} B body)", job_body.len()),
            Some(throughput.median),
            "≥ 0.75",
            Some(throughput.median >= 0.75),
        );
        let (bare_cpu, oats_cpu) = (mean(&bare_runs, Load::cpu_us), mean(&oats_runs, Load::cpu_us));
        self.row(
            "1",
            "GET job: server CPU per request (ratio: median of the rounds' ratios)",
            format!("{oats_cpu:.1} µs"),
            format!("{bare_cpu:.1} µs (bare)"),
            Some(Spread::of(&round_ratios(&oats_runs, &bare_runs, Load::cpu_us)).median),
            "",
            None,
        );
        // The fixed cost of any API request, measured from outside: /healthz goes through
        // routing, the body limit, the request span, the metrics and poem-openapi, but no backend.
        let health = self.closed(Target::new(oats, ["/healthz".to_owned()]), oats).await;
        self.load_note("1 diagnosis: OATS GET /healthz, saturated", &health);
        let quiet_cpu = mean(&quiet_runs, Load::cpu_us);
        self.row(
            "1",
            "diagnosis: CPU per request of GET /healthz (no backend)",
            format!("{:.1} µs", health.cpu_us()),
            format!("{bare_cpu:.1} µs (bare)"),
            Some(health.cpu_us() / bare_cpu),
            "",
            None,
        );
        self.row(
            "1",
            "diagnosis: CPU per GET job with RUST_LOG=warn (span not formatted by the log layer)",
            format!("{quiet_cpu:.1} µs ({:.0} req/s)", mean(&quiet_runs, Load::rps)),
            format!("{oats_cpu:.1} µs (RUST_LOG=info, default)"),
            Some(quiet_cpu / oats_cpu),
            "",
            None,
        );
        let rate = oats_rps / 2.0;
        let oats_half = self.open(job_paths(oats), oats, rate).await;
        self.load_note(&format!("1 OATS GET job at half saturation ({rate:.0} req/s offered)"), &oats_half);
        let bare_half = self.open(job_paths(bare), bare, rate).await;
        self.load_note(&format!("1 bare handler at {rate:.0} req/s offered"), &bare_half);
        self.row(
            "1",
            &format!("GET job at half saturation ({rate:.0} req/s): p99"),
            format!("{:.2} ms (p50 {:.2}, p99.9 {:.2})", oats_half.pct(0.99), oats_half.pct(0.5), oats_half.pct(0.999)),
            format!("{:.2} ms (bare, same rate)", bare_half.pct(0.99)),
            Some(oats_half.pct(0.99) / bare_half.pct(0.99)),
            "p99 < 5 ms",
            Some(oats_half.pct(0.99) < 5.0),
        );
        self.row(
            "1",
            "GET job: server peak RSS while saturated",
            format!("{:.1} MiB", peak_rss_mib(&oats_runs)),
            format!("{:.1} MiB", peak_rss_mib(&bare_runs)),
            None,
            "",
            None,
        );
        Ok(())
    }
}

/// The highest peak RSS of the windows, in MiB.
fn peak_rss_mib(loads: &[Load]) -> f64 {
    loads.iter().map(|l| l.server_hwm_kib).max().unwrap_or(0) as f64 / 1024.0
}
