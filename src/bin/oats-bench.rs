//! `oats-bench`: the benchmark suite of issue 7. It starts the real `oats` binary (and, for the
//! references, a bare poem server, an OTLP/HTTP sink and a kube client) on loopback, drives it
//! with a fixed-concurrency or fixed-rate HTTP load, and prints a results table that it also
//! writes to `bench/results.md`.
//!
//! ```text
//! bench/run.sh                       # build both binaries in release mode, run every scenario
//! target/release/oats-bench --all    # the same, once built
//! target/release/oats-bench --scenarios 1,5 --duration 5
//! ```
//!
//! Scenarios (see README "Benchmarks"):
//! 1. `GET /api/v1/jobs/{id}` with 10,000 jobs vs a bare poem handler with a body of the same size;
//! 2. `GET /api/v1/jobs?limit=50` first and deep page vs a bare handler with a body of the same size;
//! 3. `POST /api/v1/jobs` on the test control plane vs creating the same Job with a kube client;
//! 4. 1,000 concurrent watch streams: memory (and CPU) per stream;
//! 5. scenario 1 with tracing exported to a local OTLP receiver and metrics scraped vs off;
//! 6. resident memory with 0, 10,000 and 100,000 jobs; time to ready; the Kubernetes cache;
//! 7. the LLM gateway: chat completions through `oats serve`'s gateway vs straight to a fake
//!    OpenAI-compatible upstream (latency, throughput, CPU per call, time to first streamed chunk),
//!    and the memory of 1,000 streamed calls held open.
//!
//! On a machine with two or more cores, load scenarios pin the server under test to CPU 1 and
//! this program (the load generator) to CPU 0, so client and server never steal each other's
//! core and the server's throughput is that of one core.

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use oats::jobs::{JobId, JobLimits, JobPhase, JobRecord, JobRequest, JobStatus, NewJob};
use reqwest::Client;
use serde_json::json;
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

#[derive(Parser)]
#[command(name = "oats-bench", about = "Benchmarks of the OATS server against bare references (issue 7)")]
struct Args {
    /// Run every scenario (1-7, including the Kubernetes ones).
    #[arg(long)]
    all: bool,
    /// Scenarios to run, e.g. `1,2,5` (`6k` = the Kubernetes-cache part of 6; `6` includes it).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Seconds of each measured load window (after 1 s of warm-up).
    #[arg(long, default_value_t = 6)]
    duration: u64,
    /// Concurrent connections of the saturating (closed-loop) load.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The `oats` binary to benchmark (default: next to this program).
    #[arg(long)]
    oats: Option<PathBuf>,
    /// Where to write the results table. A run of some scenarios only (`--scenarios`) keeps the
    /// rows and details of the others from the file's earlier contents, saying which run they are from.
    #[arg(long, default_value = "bench/results.md")]
    out: PathBuf,
    /// Use this kubeconfig instead of starting the test control plane (testenv/).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Do not pin the server and the load generator to separate cores.
    #[arg(long)]
    no_pin: bool,
    /// Skip the scenarios that need a Kubernetes API server (3 and the cache part of 6).
    #[arg(long)]
    skip_kube: bool,
    #[command(subcommand)]
    command: Option<Helper>,
}

#[derive(Subcommand)]
enum Helper {
    /// (internal) The bare poem reference server: fixed bodies on the OATS routes.
    #[command(hide = true)]
    BareServer {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        job_body: PathBuf,
        #[arg(long)]
        list_body: PathBuf,
    },
    /// (internal) A fake OpenAI-compatible upstream: fixed answers to `POST /v1/chat/completions`.
    #[command(hide = true)]
    FakeLlm {
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Content chunks of a streamed answer (besides the role, finish and usage chunks).
        #[arg(long, default_value_t = FAST_STREAM_CHUNKS)]
        chunks: usize,
        /// Pause between two chunks of a streamed answer, in milliseconds.
        #[arg(long, default_value_t = FAST_STREAM_DELAY_MS)]
        chunk_delay_ms: u64,
        /// Length of a slow stream (model `fake-slow`): one chunk per second for this many seconds.
        #[arg(long, default_value_t = 600)]
        slow_seconds: u64,
    },
    /// (internal) Open-loop probe of a running server: `--rate` req/s of GET `--path`.
    #[command(hide = true)]
    Probe {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = OPEN_LOOP_CONNECTIONS)]
        workers: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Helper::BareServer { listen, job_body, list_body }) = &args.command {
        return bare_server(*listen, job_body, list_body);
    }
    if let Some(Helper::FakeLlm { listen, chunks, chunk_delay_ms, slow_seconds }) = &args.command {
        return fake_llm_server(*listen, *chunks, Duration::from_millis(*chunk_delay_ms), *slow_seconds);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = !args.no_pin && cores >= 2;
    // A little priority over background work (other sessions' builds) for the generator and,
    // through inheritance, every server it starts; references and OATS alike. Best effort.
    let _ = Command::new("renice")
        .args(["-n", "-10", "-p", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if pin {
        // Before the runtime exists, so every thread of the load generator inherits CPU 0.
        let pid = std::process::id().to_string();
        let status = Command::new("taskset").args(["-a", "-p", "-c", "0", &pid]).stdout(Stdio::null()).status();
        if !status.is_ok_and(|s| s.success()) {
            bail!("taskset failed; install util-linux or pass --no-pin");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if let Some(Helper::Probe { addr, path, rate, workers, seconds }) = &args.command {
        let target = Target { addr: *addr, host: addr.to_string().parse()?, paths: Arc::new(vec![path.parse()?]) };
        let callers = (0..*workers).map(|_| Connection::new(target.clone())).collect();
        let load = runtime.block_on(open_loop(callers, *rate, Duration::from_secs(*seconds), 0, 100.0));
        println!(
            "{:.0} req/s, p50 {:.3} ms, p90 {:.3}, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms, {} errors, client CPU {:.0}%",
            load.rps(),
            load.pct(0.5),
            load.pct(0.9),
            load.pct(0.99),
            load.pct(0.999),
            load.pct(1.0),
            load.errors,
            load.client_cpu / load.secs * 100.0
        );
        return Ok(());
    }
    runtime.block_on(run(args, cores, pin))
}

// ---------------------------------------------------------------------------------------------
// The run: scenarios in an order that reuses state, then the table.
// ---------------------------------------------------------------------------------------------

struct Bench {
    oats: PathBuf,
    work: PathBuf,
    pin: bool,
    duration: Duration,
    concurrency: usize,
    clk_tck: f64,
    http: Client,
    rows: Vec<Row>,
    notes: Vec<String>,
}

struct Row {
    scenario: String,
    figure: String,
    value: String,
    reference: String,
    ratio: String,
    target: String,
    verdict: String,
}

const WARMUP: Duration = Duration::from_secs(1);
/// Connections of the fixed-rate load: at half saturation one or two requests are in flight, so
/// 16 never queue; more idle connections only add the VM's scheduling noise to the tail.
const OPEN_LOOP_CONNECTIONS: usize = 16;
const JOBS_10K: usize = 10_000;
const JOBS_100K: usize = 100_000;
const STREAMS: usize = 1_000;

async fn run(args: Args, cores: usize, pin: bool) -> Result<()> {
    let wanted = |s: &str| {
        args.all
            || args.scenarios.iter().any(|x| x == s || (s == "6k" && x == "6"))
            || (args.scenarios.is_empty() && s != "none")
    };
    let oats = match &args.oats {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("oats"),
    };
    if !oats.exists() {
        bail!("{} does not exist; build it first (cargo build --release --bin oats) or pass --oats", oats.display());
    }
    let work = std::env::temp_dir().join(format!("oats-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let clk_tck = command_output("getconf", &["CLK_TCK"]).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(100.0);
    let mut bench = Bench {
        oats,
        work: work.clone(),
        pin,
        duration: Duration::from_secs(args.duration),
        concurrency: args.concurrency,
        clk_tck,
        http: Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(4096)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .build()?,
        rows: Vec::new(),
        notes: Vec::new(),
    };
    let started = Instant::now();
    let header = machine_header(cores, pin, &args);
    println!("{header}");

    let result = async {
        if wanted("1") || wanted("2") || wanted("5") || wanted("6") {
            let dir = work.join("state-10k");
            let took = preload(&dir, JOBS_10K, JobPhase::Succeeded)?;
            println!("preloaded {JOBS_10K} job records in {:.1}s", took.as_secs_f64());
            if wanted("1") || wanted("2") || wanted("5") {
                bench.get_scenarios(&dir, wanted("1"), wanted("2"), wanted("5")).await?;
            }
            if wanted("4") {
                bench.streams_scenario().await?;
            }
            if wanted("6") {
                bench.memory_scenario(&dir).await?;
            }
        } else if wanted("4") {
            bench.streams_scenario().await?;
        }
        if !args.skip_kube && (wanted("3") || wanted("6k")) {
            bench.kube_scenarios(args.kubeconfig.clone(), wanted("3"), wanted("6k")).await?;
        }
        if wanted("7") {
            bench.gateway_scenario().await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(error) = &result {
        bench.notes.push(format!("The run stopped early: {error:#}"));
    }
    let _ = std::fs::remove_dir_all(&work);

    let table = bench.table();
    let (mut rows, mut notes, mut header) = (bench.table_rows(), bench.notes.clone(), header);
    let partial = !args.all && !args.scenarios.is_empty();
    if partial && let Ok(earlier) = std::fs::read_to_string(&args.out) {
        let ran: Vec<&str> =
            SCENARIOS.into_iter().filter(|s| wanted(s) && !(args.skip_kube && (*s == "3" || *s == "6k"))).collect();
        let merged = merge_results(&earlier, &ran, rows, notes);
        (rows, notes) = (merged.rows, merged.notes);
        if let Some(carried) = merged.carried {
            header.push_str(&format!("\n- Scenarios run this time: {}. {carried}", ran.join(", ")));
        }
    }
    let mut document = String::new();
    writeln!(document, "# OATS benchmark results\n\n{header}\n")?;
    writeln!(document, "{TABLE_HEAD}")?;
    for row in &rows {
        writeln!(document, "{row}")?;
    }
    if !notes.is_empty() {
        writeln!(document, "\n## Details\n")?;
        for note in &notes {
            writeln!(document, "- {note}")?;
        }
    }
    writeln!(document, "\nTotal run time: {:.0} s.", started.elapsed().as_secs_f64())?;
    println!("\n{table}");
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &document).with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("written to {}", args.out.display());
    result
}

const TABLE_HEAD: &str = "| # | figure | OATS | reference | ratio | target | result |\n|---|---|---|---|---|---|---|";
/// Every scenario, as the first column of the table names it.
const SCENARIOS: [&str; 8] = ["1", "2", "3", "4", "5", "6", "6k", "7"];

/// A results file with the scenarios of this run replaced.
struct Merged {
    rows: Vec<String>,
    notes: Vec<String>,
    /// Which rows come from earlier runs, and from which: a sentence for the header.
    carried: Option<String>,
}

/// Merge this run's rows and notes (of the scenarios in `ran`) into an earlier results file:
/// the earlier rows and details of the scenarios that did not run stay where they were, those
/// of the scenarios that ran are replaced in place, and new scenarios go last.
fn merge_results(earlier: &str, ran: &[&str], rows: Vec<String>, notes: Vec<String>) -> Merged {
    let row_id = |line: &str| line.trim_start_matches('|').split('|').next().unwrap_or("").trim().to_owned();
    let note_id = |note: &str| note.split([' ', ':']).next().unwrap_or("").to_owned();
    let lines: Vec<&str> = earlier.lines().collect();
    let old_rows: Vec<(String, String)> = lines
        .iter()
        .skip_while(|l| !l.starts_with("|---"))
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|l| (row_id(l), (*l).to_owned()))
        .collect();
    let old_notes: Vec<(String, String)> = lines
        .iter()
        .skip_while(|l| !l.starts_with("## Details"))
        .skip(1)
        .filter_map(|l| l.strip_prefix("- "))
        .map(|n| (note_id(n), n.to_owned()))
        .filter(|(id, _)| SCENARIOS.contains(&id.as_str()))
        .collect();
    let merge = |old: &[(String, String)], new: Vec<(String, String)>| {
        let mut out = Vec::new();
        let mut placed = Vec::<String>::new();
        for (id, line) in old {
            if !ran.contains(&id.as_str()) {
                out.push(line.clone());
            } else if !placed.contains(id) {
                placed.push(id.clone());
                out.extend(new.iter().filter(|(i, _)| i == id).map(|(_, l)| l.clone()));
            }
        }
        out.extend(new.iter().filter(|(i, _)| !placed.contains(i)).map(|(_, l)| l.clone()));
        out
    };
    let new_rows: Vec<(String, String)> = rows.into_iter().map(|r| (row_id(&r), r)).collect();
    let new_notes: Vec<(String, String)> = notes.into_iter().map(|n| (note_id(&n), n)).collect();

    // Where each carried scenario's rows come from: the earlier file's own run, or the run its
    // "carried over" line names.
    let earlier_run = lines.iter().find_map(|l| l.strip_prefix("- Date: ")).unwrap_or("an unknown date").to_owned();
    let mut sources: Vec<(String, String)> = Vec::new();
    if let Some(line) = lines.iter().find_map(|l| l.split_once("Rows carried over from earlier runs: ").map(|(_, r)| r))
    {
        for part in line.trim_end_matches('.').split("; ") {
            if let Some((ids, from)) = part.strip_prefix("scenarios ").and_then(|p| p.split_once(" from ")) {
                sources.extend(ids.split(", ").map(|id| (id.to_owned(), from.to_owned())));
            }
        }
    }
    let mut carried: Vec<(String, Vec<String>)> = Vec::new();
    let mut seen = Vec::new();
    for (id, _) in old_rows.iter().filter(|(id, _)| !ran.contains(&id.as_str())) {
        if seen.contains(id) {
            continue;
        }
        seen.push(id.clone());
        let from = sources.iter().find(|(s, _)| s == id).map_or(earlier_run.clone(), |(_, f)| f.clone());
        match carried.iter_mut().find(|(f, _)| *f == from) {
            Some((_, ids)) => ids.push(id.clone()),
            None => carried.push((from, vec![id.clone()])),
        }
    }
    let carried = (!carried.is_empty()).then(|| {
        let parts: Vec<String> =
            carried.iter().map(|(from, ids)| format!("scenarios {} from {from}", ids.join(", "))).collect();
        format!("Rows carried over from earlier runs: {}.", parts.join("; "))
    });
    Merged { rows: merge(&old_rows, new_rows), notes: merge(&old_notes, new_notes), carried }
}

fn machine_header(cores: usize, pin: bool, args: &Args) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let revision =
        command_output("git", &["rev-parse", "--short", "HEAD"]).map(|s| s.trim().to_owned()).unwrap_or_default();
    let dirty =
        command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_ok_and(|s| !s.trim().is_empty());
    let pinning = if pin {
        "server under test pinned to CPU 1, load generator to CPU 0 (taskset) in scenarios 1, 2, 5 and 7 (in 7 the fake upstream of the gateway runs on CPU 0 too)"
    } else {
        "no CPU pinning"
    };
    format!(
        "- Machine: **{cores} cores** ({cpu}), load average at start {}\n- Date: {}, revision `{revision}`{}\n- Load: {} s measured per window after 1 s warm-up, {} connections when saturating; {pinning}",
        load.join(" "),
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        if dirty { " (with uncommitted changes)" } else { "" },
        args.duration,
        args.concurrency,
    )
}

fn command_output(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program).args(args).stderr(Stdio::null()).output()?;
    if !output.status.success() {
        bail!("{program} failed");
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl Bench {
    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        scenario: &str,
        figure: &str,
        value: String,
        reference: String,
        ratio: Option<f64>,
        target: &str,
        pass: Option<bool>,
    ) {
        let row = Row {
            scenario: scenario.into(),
            figure: figure.into(),
            value,
            reference,
            ratio: ratio.map_or("".into(), |r| format!("{r:.2}")),
            target: target.into(),
            verdict: match pass {
                Some(true) => "pass".into(),
                Some(false) => "**miss**".into(),
                None => "".into(),
            },
        };
        println!(
            "  [{}] {}: {} | ref {} | ratio {} | target {} {}",
            row.scenario, row.figure, row.value, row.reference, row.ratio, row.target, row.verdict
        );
        self.rows.push(row);
    }

    fn note(&mut self, text: String) {
        println!("  note: {text}");
        self.notes.push(text);
    }

    fn table(&self) -> String {
        let mut out = format!("{TABLE_HEAD}\n");
        for row in self.table_rows() {
            let _ = writeln!(out, "{row}");
        }
        out
    }

    fn table_rows(&self) -> Vec<String> {
        self.rows
            .iter()
            .map(|r| {
                format!(
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    r.scenario, r.figure, r.value, r.reference, r.ratio, r.target, r.verdict
                )
            })
            .collect()
    }

    fn load_note(&mut self, name: &str, load: &Load) {
        let text = format!(
            "{name}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, {} errors; server {:.2} CPU s ({:.0} µs CPU/request, {:.0}% of one core), peak RSS {:.1} MiB; load generator {:.0}% of its core",
            load.rps(),
            load.pct(0.50),
            load.pct(0.99),
            load.pct(0.999),
            load.errors,
            load.server_cpu,
            load.server_cpu / load.requests.max(1) as f64 * 1e6,
            load.server_cpu / load.secs * 100.0,
            load.server_hwm_kib as f64 / 1024.0,
            load.client_cpu / load.secs * 100.0,
        );
        self.note(text);
    }

    // -----------------------------------------------------------------------------------------
    // Scenarios 1, 2 and 5: GET throughput and latency.
    // -----------------------------------------------------------------------------------------

    async fn get_scenarios(&mut self, dir: &Path, s1: bool, s2: bool, s5: bool) -> Result<()> {
        println!("== scenarios 1/2/5: GET with {JOBS_10K} jobs");
        let oats = self.start_oats("oats-off", &local_env(dir), self.pin).await?;
        let ids = job_ids(dir)?;
        // Bodies of the same size for the bare reference: the very bytes OATS answers.
        let job_body = self.http.get(oats.url(&format!("/api/v1/jobs/{}", ids[0]))).send().await?.bytes().await?;
        let list_body = self.http.get(oats.url("/api/v1/jobs?limit=50")).send().await?.bytes().await?;
        let deep_token = self.deep_page_token(&oats, 9_000).await?;
        let deep_body = self
            .http
            .get(oats.url(&format!("/api/v1/jobs?limit=50&page_token={deep_token}")))
            .send()
            .await?
            .bytes()
            .await?;
        let job_file = self.work.join("job-body.json");
        let list_file = self.work.join("list-body.json");
        std::fs::write(&job_file, &job_body)?;
        std::fs::write(&list_file, &list_body)?;
        let bare = self.start_bare(&job_file, &list_file).await?;
        let job_paths = |server: &Proc| Target::new(server, ids.iter().map(|id| format!("/api/v1/jobs/{id}")));

        if s1 {
            println!("-- scenario 1: GET /api/v1/jobs/{{id}} ({} bytes) vs bare poem handler", job_body.len());
            // Alternate reference and OATS windows, so drift of the machine's speed hits both. A
            // third server, identical but for RUST_LOG=warn, shows what the log layer's handling
            // of the request span costs (nothing is logged per request either way).
            let mut quiet_env = local_env(dir);
            quiet_env.push(("RUST_LOG".into(), "warn".into()));
            let quiet = self.start_oats("oats-quiet", &quiet_env, self.pin).await?;
            let (mut bare_runs, mut oats_runs, mut quiet_runs) = (Vec::new(), Vec::new(), Vec::new());
            for round in 1..=2 {
                let l = self.closed(job_paths(&bare), &bare).await;
                self.load_note(&format!("1 bare handler, saturated, round {round}"), &l);
                bare_runs.push(l);
                let l = self.closed(job_paths(&oats), &oats).await;
                self.load_note(&format!("1 OATS GET job, saturated, round {round}"), &l);
                oats_runs.push(l);
                let l = self.closed(job_paths(&quiet), &quiet).await;
                self.load_note(&format!("1 diagnosis: OATS GET job with RUST_LOG=warn, saturated, round {round}"), &l);
                quiet_runs.push(l);
            }
            drop(quiet);
            let (bare_rps, oats_rps) = (mean(&bare_runs, Load::rps), mean(&oats_runs, Load::rps));
            let ratio = oats_rps / bare_rps;
            self.row(
                "1",
                &format!("GET job, 10k jobs, saturated (c={}, mean of 2 alternating rounds): req/s", self.concurrency),
                format!("{oats_rps:.0}"),
                format!("{bare_rps:.0} (bare poem, {} B body)", job_body.len()),
                Some(ratio),
                "≥ 0.60",
                Some(ratio >= 0.60),
            );
            let (bare_cpu, oats_cpu) = (mean(&bare_runs, Load::cpu_us), mean(&oats_runs, Load::cpu_us));
            self.row(
                "1",
                "GET job: server CPU per request",
                format!("{oats_cpu:.1} µs"),
                format!("{bare_cpu:.1} µs (bare)"),
                Some(oats_cpu / bare_cpu),
                "",
                None,
            );
            // The fixed cost of any API request, measured from outside: /healthz goes through
            // routing, the body limit, the request span, the metrics and poem-openapi, but no backend.
            let health = self.closed(Target::new(&oats, ["/healthz".to_owned()]), &oats).await;
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
            let oats_sat = oats_runs.pop().expect("two rounds");
            let bare_sat = bare_runs.pop().expect("two rounds");
            let rate = oats_sat.rps() / 2.0;
            let oats_half = self.open(job_paths(&oats), &oats, rate).await;
            self.load_note(&format!("1 OATS GET job at half saturation ({rate:.0} req/s offered)"), &oats_half);
            let bare_half = self.open(job_paths(&bare), &bare, rate).await;
            self.load_note(&format!("1 bare handler at {rate:.0} req/s offered"), &bare_half);
            self.row(
                "1",
                &format!("GET job at half saturation ({rate:.0} req/s): p99"),
                format!(
                    "{:.2} ms (p50 {:.2}, p99.9 {:.2})",
                    oats_half.pct(0.99),
                    oats_half.pct(0.5),
                    oats_half.pct(0.999)
                ),
                format!("{:.2} ms (bare, same rate)", bare_half.pct(0.99)),
                Some(oats_half.pct(0.99) / bare_half.pct(0.99)),
                "p99 < 5 ms",
                Some(oats_half.pct(0.99) < 5.0),
            );
            self.row(
                "1",
                "GET job: server peak RSS while saturated",
                format!("{:.1} MiB", oats_sat.server_hwm_kib as f64 / 1024.0),
                format!("{:.1} MiB", bare_sat.server_hwm_kib as f64 / 1024.0),
                None,
                "",
                None,
            );
        }

        if s2 {
            println!("-- scenario 2: GET /api/v1/jobs?limit=50 ({} bytes) vs bare poem handler", list_body.len());
            let bare_list = self.closed(Target::new(&bare, ["/api/v1/jobs?limit=50".to_owned()]), &bare).await;
            self.load_note("2 bare handler, list-sized body, saturated", &bare_list);
            let first = self.closed(Target::new(&oats, ["/api/v1/jobs?limit=50".to_owned()]), &oats).await;
            self.load_note("2 OATS list first page, saturated", &first);
            let deep_path = format!("/api/v1/jobs?limit=50&page_token={deep_token}");
            let deep = self.closed(Target::new(&oats, [deep_path]), &oats).await;
            self.load_note("2 OATS list page after 9,000 jobs, saturated", &deep);
            self.row(
                "2",
                "list first page (limit=50), 10k jobs: req/s",
                format!("{:.0} (p50 {:.1} ms, p99 {:.1} ms)", first.rps(), first.pct(0.5), first.pct(0.99)),
                format!("{:.0} (bare, {} B body)", bare_list.rps(), list_body.len()),
                Some(first.rps() / bare_list.rps()),
                "",
                None,
            );
            self.row(
                "2",
                "list deep page (after 9,000 jobs): req/s",
                format!("{:.0} (p50 {:.1} ms, p99 {:.1} ms)", deep.rps(), deep.pct(0.5), deep.pct(0.99)),
                format!("{:.0} (bare, {} B body)", bare_list.rps(), deep_body.len()),
                Some(deep.rps() / bare_list.rps()),
                "",
                None,
            );
            let per_req = |l: &Load| l.server_cpu / l.requests.max(1) as f64 * 1e3;
            self.row(
                "2",
                "list first page: server CPU per request",
                format!("{:.2} ms", per_req(&first)),
                format!("{:.3} ms (bare)", per_req(&bare_list)),
                Some(per_req(&first) / per_req(&bare_list)),
                "",
                None,
            );
            self.row(
                "2",
                "list: server peak RSS while saturated",
                format!("{:.1} MiB", first.server_hwm_kib.max(deep.server_hwm_kib) as f64 / 1024.0),
                format!("{:.1} MiB (bare)", bare_list.server_hwm_kib as f64 / 1024.0),
                None,
                "",
                None,
            );
        }
        drop(bare);

        if s5 {
            println!(
                "-- scenario 5: telemetry on (OTLP traces to a local receiver, /metrics scraped) vs off; \
                 sampled as shipped (parentbased_traceidratio 0.05) and always_on"
            );
            let sink = OtlpSink::start().await?;
            let traced_env = |sampler: &str, arg: Option<&str>| {
                let mut env = local_env(dir);
                env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), sink.endpoint.clone()));
                env.push(("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()));
                env.push(("OTEL_TRACES_SAMPLER".into(), sampler.into()));
                if let Some(arg) = arg {
                    env.push(("OTEL_TRACES_SAMPLER_ARG".into(), arg.into()));
                }
                env
            };
            let shipped = self
                .start_oats("oats-sampled", &traced_env("parentbased_traceidratio", Some("0.05")), self.pin)
                .await?;
            let always = self.start_oats("oats-always-on", &traced_env("always_on", None), self.pin).await?;
            let (mut off, mut sampled, mut every) = (Vec::new(), Vec::new(), Vec::new());
            let mut served_always = 0;
            let mut spans_always = 0;
            for round in 0..3 {
                let l = self.closed(job_paths(&oats), &oats).await;
                self.load_note(&format!("5 telemetry off, round {}", round + 1), &l);
                off.push(l);
                for (server, runs, name) in
                    [(&shipped, &mut sampled, "reads sampled 5% (as shipped)"), (&always, &mut every, "always_on")]
                {
                    let before = sink.spans.load(Ordering::Relaxed);
                    let scraper = spawn_scraper(self.http.clone(), server.url("/metrics"));
                    let l = self.closed(job_paths(server), server).await;
                    scraper.abort();
                    if name == "always_on" {
                        // Let the batch processor's export of this window (every 5 s) arrive.
                        tokio::time::sleep(Duration::from_secs(6)).await;
                        spans_always += sink.spans.load(Ordering::Relaxed) - before;
                        served_always += l.total;
                    }
                    self.load_note(&format!("5 telemetry on, {name}, round {}", round + 1), &l);
                    runs.push(l);
                }
            }
            let rps = |v: &[Load]| v.iter().map(Load::rps).sum::<f64>() / v.len() as f64;
            let p99 = |v: &[Load]| v.iter().map(|l| l.pct(0.99)).sum::<f64>() / v.len() as f64;
            let off_rps = rps(&off);
            for (runs, name, judged) in
                [(&sampled, "reads sampled 5%, as shipped", true), (&every, "every request sampled, always_on", false)]
            {
                let ratio = rps(runs) / off_rps;
                self.row(
                    "5",
                    &format!("GET job, telemetry on ({name}) vs off, saturated, mean of 3 alternating rounds: req/s"),
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
            self.note(format!(
                "5: with always_on the receiver got {spans_always} spans for {served_always} requests (one span per request \
                 is exported, none dropped by the batch processor's queue). \"Off\" is the default deployment: no OTLP \
                 endpoint, so no request spans; metrics are always recorded (they cannot be turned off) and /metrics is \
                 scraped every second only in the \"on\" runs. \"Sampled as shipped\" is the sampler the manifests set \
                 (parentbased_traceidratio 0.05: a caller's sampled trace is always continued, every write and 5% of \
                 untraced reads start one); the batch processor's export thread shares the server's core"
            ));
            drop(shipped);
            drop(always);
        }
        drop(oats);
        Ok(())
    }

    async fn deep_page_token(&self, oats: &Proc, depth: usize) -> Result<String> {
        let mut token: Option<String> = None;
        let mut seen = 0;
        while seen < depth {
            let mut url = oats.url("/api/v1/jobs?limit=500");
            if let Some(t) = &token {
                url.push_str(&format!("&page_token={t}"));
            }
            let page: serde_json::Value = self.http.get(url).send().await?.json().await?;
            seen += page["items"].as_array().map_or(0, Vec::len);
            token = page["next_page_token"].as_str().map(String::from);
            if token.is_none() {
                bail!("the listing ended after {seen} jobs");
            }
        }
        token.ok_or_else(|| anyhow!("no page token"))
    }

    async fn closed(&self, target: Target, server: &Proc) -> Load {
        closed_loop(connections(&target, self.concurrency), self.duration, server.pid, self.clk_tck).await
    }

    async fn open(&self, target: Target, server: &Proc, rate: f64) -> Load {
        let callers = (0..OPEN_LOOP_CONNECTIONS).map(|_| Connection::new(target.clone())).collect();
        open_loop(callers, rate, self.duration, server.pid, self.clk_tck).await
    }

    // -----------------------------------------------------------------------------------------
    // Scenario 4: 1,000 watch streams.
    // -----------------------------------------------------------------------------------------

    async fn streams_scenario(&mut self) -> Result<()> {
        println!("== scenario 4: {STREAMS} concurrent watch streams");
        let dir = self.work.join("state-streams");
        preload(&dir, STREAMS + 1, JobPhase::Pending)?;
        let policy = self.work.join("policy-streams.yaml");
        std::fs::write(&policy, format!("defaults:\n  max_streams: {}\n", STREAMS * 2))?;
        let mut env = local_env(&dir);
        env.push(("OATS_POLICY_FILE".into(), policy.display().to_string()));
        // One slot, taken by a long sleep: every other job stays pending, so its watch stays open.
        env.push(("OATS_LOCAL_CONCURRENCY".into(), "1".into()));
        env.push(("OATS_LOCAL_AGENT_COMMAND".into(), "sleep,300".into()));
        let oats = self.start_oats("oats-streams", &env, false).await?;
        let ids = job_ids(&dir)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu0 = proc_cpu(oats.pid, self.clk_tck);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_cpu = (proc_cpu(oats.pid, self.clk_tck) - cpu0) / 3.0;
        let before = proc_status(oats.pid, "VmRSS");
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
        let cpu1 = proc_cpu(oats.pid, self.clk_tck);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let held_cpu = (proc_cpu(oats.pid, self.clk_tck) - cpu1) / 5.0;
        let with = proc_status(oats.pid, "VmRSS");
        let still_open = tasks.iter().filter(|t| !t.is_finished()).count();
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        drop(client);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = proc_status(oats.pid, "VmRSS");
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
             {} `job` events received in all; RSS {:.1} MiB after the clients disconnected. Each watch re-reads its job every 250 ms \
             (src/jobs/service.rs WATCH_POLL), so 1,000 idle streams cost ~4,000 backend reads and state hashes per second.",
            open_took.as_secs_f64(),
            events.load(Ordering::Relaxed),
            after as f64 / 1024.0,
        ));
        drop(oats);
        kill_agents(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Scenario 6: memory and start-up with the local store.
    // -----------------------------------------------------------------------------------------

    async fn memory_scenario(&mut self, dir_10k: &Path) -> Result<()> {
        println!("== scenario 6: resident memory and time to ready");
        let empty = self.work.join("state-empty");
        std::fs::create_dir_all(&empty)?;
        let idle = self.start_oats("oats-idle", &local_env(&empty), false).await?;
        let rss_idle = settled_rss(&idle).await;
        drop(idle);

        let mut ready = Vec::new();
        let mut rss_10k = 0;
        for _ in 0..3 {
            let oats = self.start_oats("oats-10k", &local_env(dir_10k), false).await?;
            ready.push(oats.ready_after);
            rss_10k = settled_rss(&oats).await;
        }
        ready.sort();
        let ready_10k = ready[1];

        let dir_100k = self.work.join("state-100k");
        let took = preload(&dir_100k, JOBS_100K, JobPhase::Succeeded)?;
        println!("preloaded {JOBS_100K} job records in {:.1}s", took.as_secs_f64());
        let oats = self.start_oats("oats-100k", &local_env(&dir_100k), false).await?;
        let ready_100k = oats.ready_after;
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
            "6: ready times of the three 10k starts: {}; a record on disk is ~{} bytes of JSON (3 events, 200-byte goal, 2 labels, a result).",
            ready.iter().map(|d| format!("{:.2} s", d.as_secs_f64())).collect::<Vec<_>>().join(", "),
            std::fs::read_dir(dir_10k.join("jobs"))?
                .next()
                .and_then(|e| e.ok())
                .and_then(|e| std::fs::metadata(e.path().join("record.json")).ok())
                .map_or(0, |m| m.len()),
        ));
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Scenario 3 and the Kubernetes part of 6.
    // -----------------------------------------------------------------------------------------

    async fn kube_scenarios(&mut self, kubeconfig: Option<PathBuf>, s3: bool, s6k: bool) -> Result<()> {
        println!("== Kubernetes scenarios (3: POST vs direct create; 6k: watch-cache memory)");
        let testenv = match kubeconfig {
            Some(path) => TestEnv { dir: None, kubeconfig: path },
            None => TestEnv::up().await?,
        };
        let result = self.kube_inner(&testenv.kubeconfig, s3, s6k).await;
        testenv.down();
        result
    }

    async fn kube_inner(&mut self, kubeconfig: &Path, s3: bool, s6k: bool) -> Result<()> {
        use k8s_openapi::api::{
            batch::v1::Job,
            core::v1::{Namespace, ServiceAccount},
        };
        use kube::{Api, api::PostParams};
        let options = kube::config::KubeConfigOptions::default();
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
        let client = kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &options).await?)?;
        let suffix: String = JobId::random().as_str()[4..12].to_owned();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let make_ns = |name: String| {
            let namespaces = namespaces.clone();
            let client = client.clone();
            async move {
                namespaces
                    .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": name}}))?)
                    .await?;
                let sas: Api<ServiceAccount> = Api::namespaced(client, &name);
                sas.create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": "oats-agent"}}))?,
                )
                .await?;
                anyhow::Ok(name)
            }
        };
        let kube_env = |ns: &str| -> Vec<(String, String)> {
            vec![
                ("OATS_BACKEND".into(), "kubernetes".into()),
                ("OATS_NAMESPACE".into(), ns.into()),
                ("KUBECONFIG".into(), kubeconfig.display().to_string()),
                ("OATS_LOG_FORMAT".into(), "json".into()),
            ]
        };
        let config = oats::config::Config::default();
        let request = || JobRequest {
            goal: goal_text(0),
            max_turns: 5,
            labels: BTreeMap::from([("kwok.oats.dev/outcome".to_owned(), "run".to_owned())]),
            ..Default::default()
        };
        let new_job = |template_ns: &str| -> Result<Job> {
            let spec = request().validate(&JobLimits::default()).map_err(|e| anyhow!("invalid request: {e:?}"))?;
            let job = NewJob {
                id: JobId::random(),
                tenant: config.tenant.clone(),
                request_hash: spec.fingerprint(),
                spec,
                created_at: Utc::now(),
                trace: None,
                resources: None,
            };
            Ok(oats::backend::kubernetes::render::render_job(
                &job,
                &oats::backend::kubernetes::render::AgentTemplate::from_config(&config, template_ns),
            ))
        };

        if s3 {
            println!("-- scenario 3: POST /api/v1/jobs through OATS vs the same Job created directly");
            let ns = make_ns(format!("oats-bench-post-{suffix}")).await?;
            let oats = self.start_oats("oats-kube", &kube_env(&ns), false).await?;
            let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
            let body = json!({"goal": goal_text(0), "max_turns": 5, "labels": {"kwok.oats.dev/outcome": "run"}});
            let url = oats.url("/api/v1/jobs");
            let post = |http: Client, url: String, body: serde_json::Value| async move {
                let t = Instant::now();
                let r = http.post(url).json(&body).send().await?;
                let status = r.status();
                let text = r.text().await?;
                if status.as_u16() != 201 {
                    bail!("POST answered {status}: {text}");
                }
                anyhow::Ok(t.elapsed())
            };
            let direct = |jobs: Api<Job>, job: Job| async move {
                let t = Instant::now();
                jobs.create(&PostParams::default(), &job).await?;
                anyhow::Ok(t.elapsed())
            };
            for _ in 0..5 {
                post(self.http.clone(), url.clone(), body.clone()).await?;
                direct(jobs.clone(), new_job(&ns)?).await?;
            }
            let pairs = 100;
            let (mut via, mut raw) = (Vec::new(), Vec::new());
            let cpu0 = proc_cpu(oats.pid, self.clk_tck);
            for i in 0..pairs {
                // Alternate which goes first, so neither always meets the API server right after the other.
                if i % 2 == 0 {
                    via.push(post(self.http.clone(), url.clone(), body.clone()).await?);
                    raw.push(direct(jobs.clone(), new_job(&ns)?).await?);
                } else {
                    raw.push(direct(jobs.clone(), new_job(&ns)?).await?);
                    via.push(post(self.http.clone(), url.clone(), body.clone()).await?);
                }
            }
            let oats_cpu = proc_cpu(oats.pid, self.clk_tck) - cpu0;
            let ms = |v: &mut Vec<Duration>, p: f64| {
                v.sort();
                v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1].as_secs_f64() * 1e3
            };
            let (v50, r50) = (ms(&mut via, 0.5), ms(&mut raw, 0.5));
            let (v90, r90) = (ms(&mut via, 0.9), ms(&mut raw, 0.9));
            let (v99, r99) = (ms(&mut via, 0.99), ms(&mut raw, 0.99));
            self.row(
                "3",
                &format!("POST job on the test control plane, median of {pairs} (sequential)"),
                format!("{v50:.2} ms (p90 {v90:.2}, p99 {v99:.2})"),
                format!("{r50:.2} ms direct kube create (p90 {r90:.2}, p99 {r99:.2})"),
                Some(v50 / r50),
                "≤ 1.20 (< 20% added)",
                Some(v50 / r50 <= 1.20),
            );
            self.note(format!(
                "3: OATS overhead at the median {:.2} ms; OATS server CPU {:.1} ms per POST (including its watch-cache updates); \
                 jobs carry label kwok.oats.dev/outcome=run so their pods stay Running",
                v50 - r50,
                oats_cpu / pairs as f64 * 1e3,
            ));
            drop(oats);
            if s6k {
                // The same namespace now holds ~210 Jobs and (some of) their pods: the cache as it is in use.
                tokio::time::sleep(Duration::from_secs(3)).await;
                let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
                let pod_count = pods.list(&Default::default()).await?.items.len();
                let job_count = jobs.list(&Default::default()).await?.items.len();
                let full = self.start_oats("oats-kube-full", &kube_env(&ns), false).await?;
                let rss = settled_rss(&full).await;
                drop(full);
                let empty = make_ns(format!("oats-bench-empty-{suffix}")).await?;
                let base = self.start_oats("oats-kube-empty", &kube_env(&empty), false).await?;
                let rss0 = settled_rss(&base).await;
                drop(base);
                self.row(
                    "6k",
                    &format!(
                        "kube cache in use: RSS with {job_count} Jobs + {pod_count} Pods (scenario 3's namespace)"
                    ),
                    format!("{:.1} MiB", rss as f64 / 1024.0),
                    format!("{:.1} MiB (empty namespace)", rss0 as f64 / 1024.0),
                    None,
                    "",
                    None,
                );
                self.note(format!(
                    "6k: scenario 3's namespace afterwards ({job_count} Jobs, {pod_count} Pods so far; the controller \
                     manager creates pods at ~20/s): {:.1} KiB more per job than an empty namespace. Too few objects for a \
                     per-object figure (fixed costs of the first LIST dominate); the 2,000-Job row below is the one to read.",
                    (rss as f64 - rss0 as f64) / job_count.max(1) as f64
                ));
            }
        }

        if s6k {
            const STEPS: [usize; 2] = [2_000, 10_000];
            println!("-- scenario 6k: OATS watch cache with {STEPS:?} Jobs (suspended: no pods)");
            let ns = make_ns(format!("oats-bench-cache-{suffix}")).await?;
            let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
            let empty = make_ns(format!("oats-bench-none-{suffix}")).await?;
            let base = self.start_oats("oats-kube-none", &kube_env(&empty), false).await?;
            let rss0 = settled_rss(&base).await;
            drop(base);
            self.row(
                "6k",
                "kube cache: RSS with an empty namespace (baseline)",
                format!("{:.1} MiB", rss0 as f64 / 1024.0),
                "".into(),
                None,
                "",
                None,
            );
            let (mut cached, mut previous, mut names) = (0usize, None::<(usize, u64)>, Vec::new());
            for step in STEPS {
                let t = Instant::now();
                let manifests: Vec<Job> = (cached..step)
                    .map(|_| {
                        let mut job = new_job(&ns)?;
                        job.spec.as_mut().expect("rendered Jobs have a spec").suspend = Some(true);
                        Ok(job)
                    })
                    .collect::<Result<_>>()?;
                let created: Vec<Result<Job, kube::Error>> = futures::stream::iter(manifests)
                    .map(|job| {
                        let jobs = jobs.clone();
                        async move { jobs.create(&PostParams::default(), &job).await }
                    })
                    .buffer_unordered(8)
                    .collect()
                    .await;
                let failed = created.iter().filter(|r| r.is_err()).count();
                cached += created.len() - failed;
                names.extend(created.iter().flatten().filter_map(|job| job.metadata.name.clone()));
                println!("created {} Jobs in {:.1}s ({failed} failed)", created.len(), t.elapsed().as_secs_f64());
                let full = self.start_oats(&format!("oats-kube-{step}"), &kube_env(&ns), false).await?;
                let mut readies = vec![full.ready_after];
                let rss = settled_rss(&full).await;
                let hwm = proc_status(full.pid, "VmHWM");
                if step == 10_000 {
                    // Reads on the Kubernetes backend: the same shared records, from the watch cache.
                    let paths = names.iter().map(|name| format!("/api/v1/jobs/{name}"));
                    let load = self.closed(Target::new(&full, paths), &full).await;
                    self.load_note(&format!("6k GET job on the Kubernetes backend, {cached} Jobs, saturated"), &load);
                    self.row(
                        "6k",
                        &format!(
                            "kube backend: GET job, {cached} cached Jobs, saturated (not pinned; the control plane shares \
                             the cores): req/s"
                        ),
                        format!("{:.0} ({:.1} µs CPU/request)", load.rps(), load.server_cpu / load.requests.max(1) as f64 * 1e6),
                        "".into(),
                        None,
                        "",
                        None,
                    );
                }
                drop(full);
                for again in 1..3 {
                    let server = self.start_oats(&format!("oats-kube-{step}-{again}"), &kube_env(&ns), false).await?;
                    readies.push(server.ready_after);
                }
                readies.sort();
                let ready = readies[1];
                self.row(
                    "6k",
                    &format!("kube cache: RSS with {cached} Jobs (no pods)"),
                    format!("{:.1} MiB (peak {:.1})", rss as f64 / 1024.0, hwm as f64 / 1024.0),
                    format!("{:.1} MiB (empty namespace)", rss0 as f64 / 1024.0),
                    Some(rss as f64 / rss0 as f64),
                    if step == 10_000 { "< 64 MiB" } else { "" },
                    (step == 10_000).then_some(rss < 64 * 1024),
                );
                self.row(
                    "6k",
                    &format!("kube: time from start to ready, {cached} Jobs (median of 3)"),
                    format!("{:.2} s", ready.as_secs_f64()),
                    format!("{:.2} s, {:.2} s (the others)", readies[0].as_secs_f64(), readies[2].as_secs_f64()),
                    None,
                    if step == 10_000 { "< 2 s" } else { "" },
                    (step == 10_000).then_some(ready < Duration::from_secs(2)),
                );
                if let Some((before, rss_before)) = previous {
                    let slope = (rss as f64 - rss_before as f64) / (cached - before) as f64;
                    let average = (rss as f64 - rss0 as f64) / cached as f64;
                    self.row(
                        "6k",
                        &format!("kube cache: memory per cached Job ({before}→{cached} slope)"),
                        format!("{slope:.2} KiB"),
                        format!("{average:.2} KiB (average over the empty namespace)"),
                        None,
                        "< 4 KiB",
                        Some(slope < 4.0),
                    );
                }
                previous = Some((cached, rss));
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Processes.
    // -----------------------------------------------------------------------------------------

    async fn start_oats(&self, name: &str, env: &[(String, String)], pin: bool) -> Result<Proc> {
        let port = free_port()?;
        let log = self.work.join(format!("{name}-{port}.log"));
        let mut command = if pin {
            let mut c = Command::new("taskset");
            c.args(["-c", "1"]).arg(&self.oats);
            c
        } else {
            Command::new(&self.oats)
        };
        command.args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
        for (key, _) in std::env::vars() {
            if key.starts_with("OATS_") || key.starts_with("OTEL_") || key == "KUBECONFIG" || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command.env("OATS_SHUTDOWN_DELAY_SECONDS", "0").envs(env.iter().cloned());
        Proc::spawn(command, port, log, &self.http).await
    }

    async fn start_bare(&self, job_body: &Path, list_body: &Path) -> Result<Proc> {
        let port = free_port()?;
        let log = self.work.join(format!("bare-{port}.log"));
        let exe = std::env::current_exe()?;
        let mut command = if self.pin {
            let mut c = Command::new("taskset");
            c.args(["-c", "1"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        command.args(["bare-server", "--listen", &format!("127.0.0.1:{port}")]);
        command.arg("--job-body").arg(job_body).arg("--list-body").arg(list_body);
        Proc::spawn(command, port, log, &self.http).await
    }
}

fn local_env(dir: &Path) -> Vec<(String, String)> {
    vec![
        ("OATS_BACKEND".into(), "local".into()),
        ("OATS_STATE_DIR".into(), dir.display().to_string()),
        ("OATS_LOG_FORMAT".into(), "json".into()),
    ]
}

async fn settled_rss(proc: &Proc) -> u64 {
    tokio::time::sleep(Duration::from_secs(1)).await;
    proc_status(proc.pid, "VmRSS")
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A server process of this run, killed when dropped.
struct Proc {
    child: Child,
    pid: i32,
    addr: std::net::SocketAddr,
    base: String,
    log: PathBuf,
    ready_after: Duration,
}

impl Proc {
    async fn spawn(mut command: Command, port: u16, log: PathBuf, http: &Client) -> Result<Self> {
        let log_file = std::fs::File::create(&log)?;
        let started = Instant::now();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("cannot start a server")?;
        let mut proc = Self {
            pid: child.id() as i32,
            child,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            base: format!("http://127.0.0.1:{port}"),
            log,
            ready_after: Duration::ZERO,
        };
        let deadline = started + Duration::from_secs(120);
        loop {
            let answer = http.get(proc.url("/readyz")).timeout(Duration::from_secs(2)).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                proc.ready_after = started.elapsed();
                return Ok(proc);
            }
            if let Some(status) = proc.child.try_wait()? {
                bail!("the server exited ({status}) before it was ready:\n{}", proc.log_tail());
            }
            if Instant::now() > deadline {
                bail!("the server was not ready within 120 s:\n{}", proc.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A field of `/proc/<pid>/status`, in KiB.
fn proc_status(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU seconds of a process (all its threads).
fn proc_cpu(pid: i32, clk_tck: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| rest.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clk_tck
}

/// Reset the peak resident set (`VmHWM`) so it covers only what follows.
fn reset_peak(pid: i32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

// ---------------------------------------------------------------------------------------------
// Load generation.
// ---------------------------------------------------------------------------------------------

struct Load {
    /// Requests completed within the window.
    requests: u64,
    /// Requests completed in all, warm-up included.
    total: u64,
    errors: u64,
    secs: f64,
    /// Sorted latencies in microseconds.
    latencies: Vec<u32>,
    server_cpu: f64,
    server_hwm_kib: u64,
    client_cpu: f64,
}

fn mean(loads: &[Load], figure: fn(&Load) -> f64) -> f64 {
    loads.iter().map(figure).sum::<f64>() / loads.len().max(1) as f64
}

impl Load {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs
    }

    /// Server CPU time per request, in microseconds.
    fn cpu_us(&self) -> f64 {
        self.server_cpu / self.requests.max(1) as f64 * 1e6
    }

    /// Latency percentile in milliseconds.
    fn pct(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((p * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        f64::from(self.latencies[i]) / 1e3
    }
}

struct WorkerResult {
    latencies: Vec<u32>,
    errors: u64,
    total: u64,
}

impl WorkerResult {
    /// One request: its latency (`None` if it failed), counted if it belongs to the window.
    fn record(&mut self, latency: Option<Duration>, in_window: bool) {
        self.total += 1;
        if in_window {
            match latency {
                Some(latency) => self.latencies.push(latency.as_micros().min(u128::from(u32::MAX)) as u32),
                None => self.errors += 1,
            }
        }
    }
}

/// One worker of a load: makes its `i`-th request and says what latency to record.
trait Caller: Send + 'static {
    /// The latency to record, measured from the start of the call; `None` if the call failed.
    fn call(&mut self, i: usize) -> impl std::future::Future<Output = Option<Duration>> + Send;
}

impl Caller for Connection {
    async fn call(&mut self, i: usize) -> Option<Duration> {
        let sent = Instant::now();
        self.get(i).await.then(|| sent.elapsed())
    }
}

/// `n` connections to `target`, each starting at its own share of the paths.
fn connections(target: &Target, n: usize) -> Vec<(Connection, usize)> {
    (0..n).map(|w| (Connection::new(target.clone()), w * target.paths.len() / n.max(1))).collect()
}

/// Where load goes: the server's address and the request targets (`/api/v1/jobs/...`).
#[derive(Clone)]
struct Target {
    addr: std::net::SocketAddr,
    host: hyper::header::HeaderValue,
    paths: Arc<Vec<hyper::Uri>>,
}

impl Target {
    fn new(server: &Proc, paths: impl IntoIterator<Item = String>) -> Self {
        let paths = paths.into_iter().map(|p| p.parse().expect("a valid request target")).collect();
        Self { addr: server.addr, host: server.addr.to_string().parse().expect("a valid host"), paths: Arc::new(paths) }
    }
}

/// One keep-alive HTTP/1.1 connection of the load generator (hyper's client connection: no
/// pool, no URL parsing per request, so the generator spends its core on requests).
struct Connection {
    target: Target,
    sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>>,
}

impl Connection {
    fn new(target: Target) -> Self {
        Self { target, sender: None }
    }

    async fn connect(&mut self) -> Option<()> {
        let stream = tokio::net::TcpStream::connect(self.target.addr).await.ok()?;
        stream.set_nodelay(true).ok()?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
        tokio::spawn(connection);
        self.sender = Some(sender);
        Some(())
    }

    /// GET the `i`-th path; true for a 2xx answer read to its end.
    async fn get(&mut self, i: usize) -> bool {
        use http_body_util::BodyExt as _;
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) && self.connect().await.is_none() {
            return false;
        }
        let sender = self.sender.as_mut().expect("connected");
        if sender.ready().await.is_err() {
            self.sender = None;
            return false;
        }
        let uri = self.target.paths[i % self.target.paths.len()].clone();
        let request = hyper::Request::get(uri)
            .header(hyper::header::HOST, self.target.host.clone())
            .body(http_body_util::Empty::new())
            .expect("a valid request");
        match sender.send_request(request).await {
            Ok(response) => {
                let ok = response.status().is_success();
                response.into_body().collect().await.is_ok() && ok
            }
            Err(_) => {
                self.sender = None;
                false
            }
        }
    }
}

/// Measure the window between `from` and `to`: server CPU and peak RSS, our own CPU.
async fn observe_window(pid: i32, from: Instant, to: Instant, clk_tck: f64) -> (f64, u64, f64) {
    let me = std::process::id() as i32;
    tokio::time::sleep_until(from.into()).await;
    reset_peak(pid);
    let (server0, client0) = (proc_cpu(pid, clk_tck), proc_cpu(me, clk_tck));
    tokio::time::sleep_until(to.into()).await;
    let (server1, client1) = (proc_cpu(pid, clk_tck), proc_cpu(me, clk_tck));
    (server1 - server0, proc_status(pid, "VmHWM"), client1 - client0)
}

/// Workers (callers with their first request index), each sending its next request as soon as
/// the last one is answered.
async fn closed_loop<C: Caller>(callers: Vec<(C, usize)>, duration: Duration, pid: i32, clk_tck: f64) -> Load {
    let start = Instant::now();
    let (from, to) = (start + WARMUP, start + WARMUP + duration);
    let workers: Vec<_> = callers
        .into_iter()
        .map(|(mut caller, mut i)| {
            tokio::spawn(async move {
                let mut result = WorkerResult { latencies: Vec::with_capacity(1 << 16), errors: 0, total: 0 };
                loop {
                    let t0 = Instant::now();
                    if t0 >= to {
                        break;
                    }
                    let latency = caller.call(i).await;
                    i += 1;
                    result.record(latency, t0 >= from);
                }
                result
            })
        })
        .collect();
    let (server_cpu, server_hwm_kib, client_cpu) = observe_window(pid, from, to, clk_tck).await;
    collect(workers, duration, server_cpu, server_hwm_kib, client_cpu).await
}

/// Requests at a fixed rate over the `callers`, one connection each (an open loop: a request is
/// due at its time whether or not earlier ones were answered). A pacing thread releases due requests
/// every 100 µs. Latency counts from the send: with far more connections than requests in flight
/// a due request never waits for a connection, and counting from the due time would blame the
/// server for the pacing thread's own scheduling delays on the generator's core.
async fn open_loop<C: Caller>(callers: Vec<C>, rate: f64, duration: Duration, pid: i32, clk_tck: f64) -> Load {
    let start = Instant::now();
    let (from, to) = (start + WARMUP, start + WARMUP + duration);
    let total = ((WARMUP + duration).as_secs_f64() * rate) as u64;
    let permits = Arc::new(tokio::sync::Semaphore::new(0));
    let pacer = {
        let permits = permits.clone();
        std::thread::spawn(move || {
            let mut released = 0u64;
            while released < total {
                std::thread::sleep(Duration::from_micros(100));
                let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
                if due > released {
                    permits.add_permits((due - released) as usize);
                    released = due;
                }
            }
            permits.close();
        })
    };
    let next = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = callers
        .into_iter()
        .map(|mut caller| {
            let (next, permits) = (next.clone(), permits.clone());
            tokio::spawn(async move {
                let mut result = WorkerResult { latencies: Vec::with_capacity(1 << 14), errors: 0, total: 0 };
                while let Ok(permit) = permits.acquire().await {
                    permit.forget();
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let due = start + Duration::from_secs_f64(n as f64 / rate);
                    let latency = caller.call(n as usize).await;
                    result.record(latency, due >= from && due < to);
                }
                result
            })
        })
        .collect();
    let (server_cpu, server_hwm_kib, client_cpu) = observe_window(pid, from, to, clk_tck).await;
    let load = collect(handles, duration, server_cpu, server_hwm_kib, client_cpu).await;
    let _ = pacer.join();
    load
}

async fn collect(
    workers: Vec<tokio::task::JoinHandle<WorkerResult>>,
    duration: Duration,
    server_cpu: f64,
    server_hwm_kib: u64,
    client_cpu: f64,
) -> Load {
    let mut load = Load {
        requests: 0,
        total: 0,
        errors: 0,
        secs: duration.as_secs_f64(),
        latencies: Vec::new(),
        server_cpu,
        server_hwm_kib,
        client_cpu,
    };
    for worker in workers {
        if let Ok(r) = worker.await {
            load.errors += r.errors;
            load.total += r.total;
            load.latencies.extend(r.latencies);
        }
    }
    load.requests = load.latencies.len() as u64;
    load.latencies.sort_unstable();
    load
}

async fn get_ok(http: &Client, url: &str) -> bool {
    match http.get(url).send().await {
        Ok(response) => {
            let ok = response.status().is_success();
            response.bytes().await.is_ok() && ok
        }
        Err(_) => false,
    }
}

fn spawn_scraper(http: Client, url: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let _ = get_ok(&http, &url).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Preloaded job records (the local backend's on-disk layout).
// ---------------------------------------------------------------------------------------------

fn goal_text(i: usize) -> String {
    let mut goal = format!("Benchmark job {i:06}: ");
    while goal.len() < 200 {
        goal.push_str("summarise the open issues of the repository and propose a plan. ");
    }
    goal.truncate(200);
    goal
}

fn event(time: DateTime<Utc>, reason: &str, message: &str) -> serde_json::Value {
    json!({"time": time, "kind": "Normal", "reason": reason, "message": message, "object": "Process/agent", "count": 1})
}

/// Write `n` job records into a fresh `<dir>/jobs/`, as the local backend stores them.
fn preload(dir: &Path, n: usize, phase: JobPhase) -> Result<Duration> {
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(dir);
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs)?;
    let base = Utc::now() - chrono::Duration::seconds(n as i64 * 10 + 3600);
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
            status: JobStatus::new(phase),
            created_at: created,
            started_at: finished.then(|| created + chrono::Duration::seconds(1)),
            finished_at: finished.then(|| created + chrono::Duration::seconds(9)),
            attempts: u32::from(finished),
            result: finished.then(|| format!("done: benchmark job {i} finished after 3 turns")),
            trace: None,
            rendered: Default::default(),
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
        let stored = json!({"record": record, "events": events, "pgid": null});
        let job_dir = jobs.join(record.id.as_str());
        std::fs::create_dir(&job_dir)?;
        std::fs::write(job_dir.join("record.json"), serde_json::to_vec_pretty(&stored)?)?;
    }
    Ok(started.elapsed())
}

/// The ids of the preloaded jobs, in directory order (arbitrary, so not cache-friendly).
fn job_ids(dir: &Path) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir.join("jobs"))? {
        ids.push(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(ids)
}

/// Kill the agent process groups a local-backend state directory records as running.
fn kill_agents(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join("jobs")) else { return };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read(entry.path().join("record.json")) else { continue };
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&text) else { continue };
        if let Some(pgid) = value["pgid"].as_i64().filter(|p| *p > 1) {
            let _ =
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario 7: the LLM gateway.
// ---------------------------------------------------------------------------------------------

/// Content chunks of the fake upstream's streamed answer, and the pause before each chunk after
/// the first (so a stream takes ~10 ms and its first chunk is not its whole answer).
const FAST_STREAM_CHUNKS: usize = 8;
const FAST_STREAM_DELAY_MS: u64 = 1;
/// Model calls one job may make: its `max_turns`, whose hard ceiling is 100.
const CALLS_PER_JOB: usize = JobLimits::MAX_TURNS_CEILING as usize;
/// Streamed calls held open at once in 7c.
const GATEWAY_STREAMS: usize = 1_000;
/// The fixed rates at which latency (non-streaming) and time to first chunk (streaming) are
/// measured: far below saturation, so the figures are the path's own cost, not queueing.
const LATENCY_RATE: f64 = 500.0;
const STREAM_RATE: f64 = 200.0;
/// Jobs whose calls calibrate the saturated rate (and warm the gateway up).
const CALIBRATION_JOBS: usize = 50;
/// Credentials for this many times the expected calls of a saturated window (the machine's
/// speed drifts; a pool that runs out makes the window's rate a lower bound, and says so).
const POOL_MARGIN: f64 = 2.0;
/// The agent of the gateway's jobs: it leaves its credential in its workspace and sleeps.
const CREDENTIAL_AGENT: &str = "sh,-c,echo \"$OPENAI_API_KEY\" > key; exec sleep 3600";

/// A chat completion request for `model` (the gateway's name or the upstream's).
fn chat_body(model: &str, stream: bool) -> bytes::Bytes {
    let mut body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hello in one short sentence."},
        ],
        "max_tokens": 64,
    });
    if stream {
        // Both paths ask for the usage chunk, so the upstream's answer is the same byte for byte
        // (the gateway always asks for it; this way it passes it on rather than dropping it).
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    bytes::Bytes::from(serde_json::to_vec(&body).expect("JSON serialises"))
}

/// Credentials of running jobs, each handed out for exactly [`CALLS_PER_JOB`] calls (a job's
/// call cap), so no call is refused for it.
struct Pool {
    ids: Vec<String>,
    keys: Vec<hyper::header::HeaderValue>,
    next: AtomicU64,
}

impl Pool {
    fn take(&self) -> Option<hyper::header::HeaderValue> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        self.keys.get(n / CALLS_PER_JOB).cloned()
    }

    fn capacity(&self) -> usize {
        self.keys.len() * CALLS_PER_JOB
    }

    fn ran_out(&self) -> bool {
        self.next.load(Ordering::Relaxed) as usize > self.capacity()
    }
}

/// Jobs enough for `calls` calls, with one to spare.
fn jobs_for(calls: f64) -> usize {
    (calls / CALLS_PER_JOB as f64).ceil() as usize + 1
}

#[derive(Clone)]
enum Auth {
    Fixed(hyper::header::HeaderValue),
    Pool(Arc<Pool>),
}

/// Where chat completion calls go, and with what.
#[derive(Clone)]
struct ChatTarget {
    addr: std::net::SocketAddr,
    host: hyper::header::HeaderValue,
    body: bytes::Bytes,
    stream: bool,
    auth: Auth,
    /// The first failure, for the notes.
    failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl ChatTarget {
    fn new(addr: std::net::SocketAddr, model: &str, stream: bool, auth: Auth) -> Self {
        Self {
            addr,
            host: addr.to_string().parse().expect("a valid host"),
            body: chat_body(model, stream),
            stream,
            auth,
            failure: Arc::default(),
        }
    }

    fn direct(addr: std::net::SocketAddr, model: &str, stream: bool) -> Self {
        Self::new(addr, model, stream, Auth::Fixed(hyper::header::HeaderValue::from_static("Bearer sk-bench-direct")))
    }

    fn fail(&self, why: String) {
        self.failure.lock().unwrap().get_or_insert(why);
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap().clone()
    }
}

/// One keep-alive HTTP/1.1 connection making chat completion calls.
struct ChatConnection {
    target: ChatTarget,
    sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>,
}

impl ChatConnection {
    fn new(target: ChatTarget) -> Self {
        Self { target, sender: None }
    }

    async fn connect(&mut self) -> Option<()> {
        let stream = tokio::net::TcpStream::connect(self.target.addr).await.ok()?;
        stream.set_nodelay(true).ok()?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
        tokio::spawn(connection);
        self.sender = Some(sender);
        Some(())
    }

    /// One call: the time to the whole answer, or to the first chunk of a streamed one (which
    /// is still read to its `[DONE]`); `None` if it failed.
    async fn chat(&mut self) -> Option<Duration> {
        use http_body_util::BodyExt as _;
        let auth = match &self.target.auth {
            Auth::Fixed(value) => value.clone(),
            Auth::Pool(pool) => match pool.take() {
                Some(key) => key,
                None => {
                    self.target.fail("the pool of job credentials ran out".into());
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    return None;
                }
            },
        };
        let sent = Instant::now();
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) && self.connect().await.is_none() {
            self.target.fail("cannot connect".into());
            return None;
        }
        let sender = self.sender.as_mut().expect("connected");
        if sender.ready().await.is_err() {
            self.sender = None;
            return None;
        }
        let request = hyper::Request::post("/v1/chat/completions")
            .header(hyper::header::HOST, self.target.host.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::AUTHORIZATION, auth)
            .body(http_body_util::Full::new(self.target.body.clone()))
            .expect("a valid request");
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(error) => {
                self.sender = None;
                self.target.fail(format!("the request failed: {error}"));
                return None;
            }
        };
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            self.target.fail(format!("{status}: {}", String::from_utf8_lossy(&text)));
            return None;
        }
        if !self.target.stream {
            return body.collect().await.ok().map(|_| sent.elapsed());
        }
        let mut first = None;
        let mut tail = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                self.sender = None;
                self.target.fail("a stream broke off".into());
                return None;
            };
            if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                first.get_or_insert_with(|| sent.elapsed());
                tail.extend_from_slice(data);
                if tail.len() > 64 {
                    tail.drain(..tail.len() - 64);
                }
            }
        }
        if !tail.ends_with(b"data: [DONE]\n\n") {
            self.target.fail(format!("a stream did not end with [DONE]: {:?}", String::from_utf8_lossy(&tail)));
            return None;
        }
        first
    }
}

impl Caller for ChatConnection {
    async fn call(&mut self, _i: usize) -> Option<Duration> {
        match tokio::time::timeout(Duration::from_secs(30), self.chat()).await {
            Ok(latency) => latency,
            Err(_) => {
                self.sender = None;
                self.target.fail("no answer within 30 s".into());
                None
            }
        }
    }
}

/// Calls on `concurrency` connections until the target's pool is used up: (calls answered, time).
async fn drain(target: &ChatTarget, concurrency: usize) -> (u64, Duration) {
    let Auth::Pool(pool) = &target.auth else { return (0, Duration::ZERO) };
    let answered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut connection, pool, answered) =
                (ChatConnection::new(target.clone()), pool.clone(), answered.clone());
            tokio::spawn(async move {
                while (pool.next.load(Ordering::Relaxed) as usize) < pool.capacity() {
                    if connection.call(0).await.is_some() {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    (answered.load(Ordering::Relaxed), started.elapsed())
}

/// `oats serve` with its LLM gateway on, and where the gateway listens. Dropping it stops the
/// server and the agents of its jobs.
struct GatewayServer {
    proc: Proc,
    gateway: std::net::SocketAddr,
    dir: PathBuf,
}

impl Drop for GatewayServer {
    fn drop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        kill_agents(&self.dir);
    }
}

/// What holding streamed calls open showed.
struct Held {
    opened: u64,
    open_took: Duration,
    still_open: usize,
    rss_kib: u64,
    hwm_kib: u64,
    cpu: f64,
    events_in_hold: u64,
    failure: Option<String>,
}

impl Bench {
    async fn gateway_scenario(&mut self) -> Result<()> {
        println!("== scenario 7: the LLM gateway vs straight to a fake OpenAI-compatible upstream");
        // Two identical fakes: the gateway's upstream shares the load generator's core, so the
        // server under test (OATS) has CPU 1 to itself; the direct reference runs on CPU 1 in
        // OATS's place, as the bare references of scenarios 1 and 2 do.
        let upstream = self.start_fake("fake-upstream", 0).await?;
        let direct = self.start_fake("fake-direct", 1).await?;
        let baseline = self.gateway_calls(&upstream, &direct, None, None).await?;
        if let Ok(url) = std::env::var("OATS_BENCH_DATABASE_URL")
            && !url.is_empty()
        {
            self.gateway_calls(&upstream, &direct, Some(&url), Some(baseline)).await?;
        }
        self.gateway_streams(&upstream, &direct).await?;
        Ok(())
    }

    /// 7a and 7b: non-streaming latency and throughput, streaming time to first chunk. Returns the
    /// direct reference's saturated rate, against which a later phase can see the machine's drift.
    async fn gateway_calls(
        &mut self,
        upstream: &Proc,
        direct: &Proc,
        database_url: Option<&str>,
        baseline: Option<f64>,
    ) -> Result<f64> {
        let (ledger, prefix) = match database_url {
            Some(_) => ("PostgreSQL", "PostgreSQL ledger: "),
            None => ("SQLite", ""),
        };
        println!("-- scenario 7a/7b: chat completions through the gateway ({ledger} ledger) vs straight to the fake");
        let oats = self
            .start_gateway(&format!("oats-gateway-{}", ledger.to_lowercase()), upstream, database_url, self.pin)
            .await?;
        let through = |pool: &Arc<Pool>, stream: bool| {
            ChatTarget::new(oats.gateway, "bench-model", stream, Auth::Pool(pool.clone()))
        };

        // The saturated rate, to size the pools of the saturated windows (and a warm-up).
        let pool = self.make_pool(&oats, CALIBRATION_JOBS).await?;
        let (calls, took) = drain(&through(&pool, false), self.concurrency).await;
        self.cancel_pool(&oats, &pool).await;
        let calibrated = calls as f64 / took.as_secs_f64().max(1e-3);
        println!(
            "calibration: {calls} calls in {:.2} s through the gateway: {calibrated:.0} calls/s",
            took.as_secs_f64()
        );
        if calls == 0 {
            bail!("no call went through the gateway:\n{}", oats.proc.log_tail());
        }
        let window = (WARMUP + self.duration).as_secs_f64();

        // Non-streaming and streaming at fixed rates, alternating with the direct reference.
        // The same rates in every run, unless the gateway is so slow that they would load it.
        let latency_rate = if calibrated > 2.0 * LATENCY_RATE { LATENCY_RATE } else { (calibrated / 4.0).round() };
        let stream_rate = if calibrated > 5.0 * STREAM_RATE { STREAM_RATE } else { (calibrated / 10.0).round() };
        let (mut direct_lat, mut gateway_lat, mut direct_ttfc, mut gateway_ttfc) = (vec![], vec![], vec![], vec![]);
        for round in 1..=2 {
            for (stream, rate, direct_runs, gateway_runs, what) in [
                (false, latency_rate, &mut direct_lat, &mut gateway_lat, "non-streaming"),
                (true, stream_rate, &mut direct_ttfc, &mut gateway_ttfc, "streaming (latency = time to first chunk)"),
            ] {
                let target = ChatTarget::direct(direct.addr, "fake-model", stream);
                let l = self.chat_open(&target, direct.pid, rate).await;
                self.load_note(
                    &format!("7 {prefix}straight to the fake, {what}, {rate:.0} calls/s, round {round}"),
                    &l,
                );
                self.failure_note(&target);
                direct_runs.push(l);
                let pool = self.make_pool(&oats, jobs_for(rate * window)).await?;
                let target = through(&pool, stream);
                let l = self.chat_open(&target, oats.proc.pid, rate).await;
                self.load_note(&format!("7 {prefix}through the gateway, {what}, {rate:.0} calls/s, round {round}"), &l);
                self.failure_note(&target);
                gateway_runs.push(l);
                self.cancel_pool(&oats, &pool).await;
            }
        }

        // Saturated, non-streaming.
        let (mut direct_sat, mut gateway_sat) = (vec![], vec![]);
        let mut ran_out = false;
        let mut expected = calibrated;
        for round in 1..=2 {
            let target = ChatTarget::direct(direct.addr, "fake-model", false);
            let l = self.chat_closed(&target, direct.pid).await;
            self.load_note(&format!("7 {prefix}straight to the fake, non-streaming, saturated, round {round}"), &l);
            self.failure_note(&target);
            direct_sat.push(l);
            let pool = self.make_pool(&oats, jobs_for(expected * window * POOL_MARGIN)).await?;
            let target = through(&pool, false);
            let l = self.chat_closed(&target, oats.proc.pid).await;
            self.load_note(
                &format!(
                    "7 {prefix}through the gateway, non-streaming, saturated, round {round} ({} jobs' credentials)",
                    pool.keys.len()
                ),
                &l,
            );
            self.failure_note(&target);
            ran_out |= pool.ran_out();
            expected = expected.max(l.rps());
            gateway_sat.push(l);
            self.cancel_pool(&oats, &pool).await;
        }
        drop(oats);

        let p = |runs: &[Load], q: f64| runs.iter().map(|l| l.pct(q)).sum::<f64>() / runs.len().max(1) as f64;
        let (g50, d50) = (p(&gateway_lat, 0.5), p(&direct_lat, 0.5));
        self.row(
            "7",
            &format!("{prefix}non-streaming chat completion at {latency_rate:.0} calls/s (mean of 2 alternating rounds): p50 latency"),
            format!("{g50:.3} ms (p99 {:.2})", p(&gateway_lat, 0.99)),
            format!("{d50:.3} ms straight to the fake (p99 {:.2})", p(&direct_lat, 0.99)),
            Some(g50 / d50),
            "",
            None,
        );
        self.row(
            "7",
            &format!("{prefix}gateway: added p50 latency, non-streaming"),
            format!("{:.3} ms", g50 - d50),
            "".into(),
            None,
            "< 0.5 ms",
            Some(g50 - d50 < 0.5),
        );
        let (g50, d50) = (p(&gateway_ttfc, 0.5), p(&direct_ttfc, 0.5));
        self.row(
            "7",
            &format!(
                "{prefix}streaming ({FAST_STREAM_CHUNKS} chunks {FAST_STREAM_DELAY_MS} ms apart) at {stream_rate:.0} calls/s: p50 time to first chunk"
            ),
            format!("{g50:.3} ms (p99 {:.2})", p(&gateway_ttfc, 0.99)),
            format!("{d50:.3} ms straight to the fake (p99 {:.2})", p(&direct_ttfc, 0.99)),
            Some(g50 / d50),
            "",
            None,
        );
        self.row(
            "7",
            &format!("{prefix}gateway: added p50 time to first chunk"),
            format!("{:.3} ms", g50 - d50),
            "".into(),
            None,
            "< 0.5 ms",
            Some(g50 - d50 < 0.5),
        );
        let (g_rps, d_rps) = (mean(&gateway_sat, Load::rps), mean(&direct_sat, Load::rps));
        self.row(
            "7",
            &format!(
                "{prefix}non-streaming, saturated (c={}, mean of 2 alternating rounds): calls/s{}",
                self.concurrency,
                if ran_out { " (a pool of credentials ran out: a lower bound)" } else { "" }
            ),
            format!("{g_rps:.0} (p50 {:.2} ms, p99 {:.2} ms)", p(&gateway_sat, 0.5), p(&gateway_sat, 0.99)),
            format!("{d_rps:.0} straight to the fake (p50 {:.2} ms)", p(&direct_sat, 0.5)),
            Some(g_rps / d_rps),
            "",
            None,
        );
        let (g_cpu, d_cpu) = (mean(&gateway_sat, Load::cpu_us), mean(&direct_sat, Load::cpu_us));
        self.row(
            "7",
            &format!("{prefix}server CPU per non-streaming call (saturated)"),
            format!("{g_cpu:.0} µs"),
            format!("{d_cpu:.1} µs (the fake itself)"),
            Some(g_cpu / d_cpu),
            "",
            None,
        );
        let (g_cpu, d_cpu) = (mean(&gateway_ttfc, Load::cpu_us), mean(&direct_ttfc, Load::cpu_us));
        self.row(
            "7",
            &format!("{prefix}server CPU per streamed call ({} events relayed)", FAST_STREAM_CHUNKS + 4),
            format!("{g_cpu:.0} µs"),
            format!("{d_cpu:.1} µs (the fake itself)"),
            Some(g_cpu / d_cpu),
            "",
            None,
        );
        if database_url.is_none() {
            self.note(format!(
                "7: every call through the gateway is authenticated (the job's credential), checked against the policy, \
                 reserved in the ledger before it is forwarded and settled after it ({ledger}: oats.db in the state dir, WAL, \
                 one connection), and counted in the GenAI metrics; it also writes a `model call` log line. A job may \
                 make {CALLS_PER_JOB} calls (max_turns' ceiling), so the load rotates over the credentials of many running \
                 jobs (agents: `sh` that writes its credential and sleeps), each used exactly {CALLS_PER_JOB} times; the \
                 jobs of a window are created before it and cancelled after it. The fake upstream answers a fixed \
                 chat.completion (or a stream of {} events, {FAST_STREAM_DELAY_MS} ms apart); the gateway's copy runs on \
                 CPU 0 with the load generator, the direct reference on CPU 1 where OATS runs. Calibration: \
                 {calls} calls at c={} in {:.2} s ({calibrated:.0} calls/s).",
                FAST_STREAM_CHUNKS + 4,
                self.concurrency,
                took.as_secs_f64()
            ));
        }
        if let Some(baseline) = baseline {
            self.note(format!(
                "7 PostgreSQL ledger: the database is the one OATS_BENCH_DATABASE_URL names, not pinned (here it shares \
                 both cores with the gateway, the fake and the load generator). Straight to the fake, this phase \
                 measured {d_rps:.0} calls/s saturated against {baseline:.0} in the SQLite phase{}",
                if d_rps < 0.7 * baseline {
                    ": the machine was busier during this phase, so its figures are not comparable with the SQLite ones"
                } else {
                    ""
                }
            ));
        }
        Ok(d_rps)
    }

    /// 7c: streamed calls held open, the gateway's memory and CPU, and the fake's as a reference.
    async fn gateway_streams(&mut self, upstream: &Proc, direct: &Proc) -> Result<()> {
        println!("-- scenario 7c: {GATEWAY_STREAMS} streamed calls held open through the gateway");
        let oats = self.start_gateway("oats-gateway-streams", upstream, None, false).await?;
        // Warm the gateway up first (its upstream connections, the ledger, the metrics' series),
        // so the idle figure is that of a server that has served calls.
        let warm = self.make_pool(&oats, 2).await?;
        drain(&ChatTarget::new(oats.gateway, "bench-model", false, Auth::Pool(warm.clone())), 4).await;
        let warm_streams = self.make_pool(&oats, 1).await?;
        drain(&ChatTarget::new(oats.gateway, "bench-model", true, Auth::Pool(warm_streams.clone())), 4).await;
        self.cancel_pool(&oats, &warm).await;
        self.cancel_pool(&oats, &warm_streams).await;
        let pool = self.make_pool(&oats, GATEWAY_STREAMS.div_ceil(CALLS_PER_JOB)).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = proc_status(oats.proc.pid, "VmRSS");
        let cpu0 = proc_cpu(oats.proc.pid, self.clk_tck);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle_cpu = (proc_cpu(oats.proc.pid, self.clk_tck) - cpu0) / 2.0;
        let through = self.hold_streams(oats.gateway, "bench-slow", Auth::Pool(pool.clone()), oats.proc.pid).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = proc_status(oats.proc.pid, "VmRSS");
        drop(oats);

        let direct_idle = proc_status(direct.pid, "VmRSS");
        let auth = Auth::Fixed(hyper::header::HeaderValue::from_static("Bearer sk-bench-direct"));
        let straight = self.hold_streams(direct.addr, "fake-slow", auth, direct.pid).await?;
        let mib = |k: u64| k as f64 / 1024.0;
        let extra = through.rss_kib.saturating_sub(idle);
        let direct_extra = straight.rss_kib.saturating_sub(direct_idle);
        self.row(
            "7",
            &format!(
                "{} streamed calls held open through the gateway (one chunk per second each): RSS",
                through.opened
            ),
            format!("{:.1} MiB (peak {:.1})", mib(through.rss_kib), mib(through.hwm_kib)),
            format!("{:.1} MiB (same server, idle)", mib(idle)),
            Some(through.rss_kib as f64 / idle as f64),
            "",
            None,
        );
        self.row(
            "7",
            &format!("extra RSS of {} open streamed calls", through.opened),
            format!("{:.1} MiB ({:.1} KiB per call)", mib(extra), extra as f64 / through.opened.max(1) as f64),
            format!("{:.1} MiB (the fake upstream holding {} direct streams)", mib(direct_extra), straight.opened),
            None,
            "< 64 MiB",
            Some(through.opened as usize == GATEWAY_STREAMS && mib(extra) < 64.0),
        );
        self.row(
            "7",
            &format!("server CPU while relaying {} streams (one chunk per second each)", through.opened),
            format!("{:.0}% of a core", through.cpu * 100.0),
            format!("{:.1}% idle; the fake, direct: {:.0}%", idle_cpu * 100.0, straight.cpu * 100.0),
            None,
            "",
            None,
        );
        self.note(format!(
            "7 (held streams): through the gateway {} of {GATEWAY_STREAMS} streams got their first chunk within {:.1} s ({} jobs' \
             credentials, 100 calls each); {} still open after the {} s hold, {} events received in it (one a second per \
             stream expected); RSS {:.1} MiB 2 s after the clients left{}. Straight to the fake: {} of {GATEWAY_STREAMS} \
             opened in {:.1} s, {} still open, {} events in the hold, RSS {:.1} → {:.1} MiB{}. Not pinned.",
            through.opened,
            through.open_took.as_secs_f64(),
            pool.keys.len(),
            through.still_open,
            self.duration.as_secs(),
            through.events_in_hold,
            mib(after),
            through.failure.map(|f| format!("; first failure: {f}")).unwrap_or_default(),
            straight.opened,
            straight.open_took.as_secs_f64(),
            straight.still_open,
            straight.events_in_hold,
            mib(direct_idle),
            mib(straight.rss_kib),
            straight.failure.map(|f| format!("; first failure: {f}")).unwrap_or_default(),
        ));
        Ok(())
    }

    /// Open [`GATEWAY_STREAMS`] slow streamed calls to `addr`, hold them for the window, and say
    /// what the server `pid` used meanwhile.
    async fn hold_streams(&self, addr: std::net::SocketAddr, model: &str, auth: Auth, pid: i32) -> Result<Held> {
        let client = Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(4096)
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        let url = format!("http://{addr}/v1/chat/completions");
        let body = chat_body(model, true);
        let opened = Arc::new(AtomicU64::new(0));
        let events = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(std::sync::Mutex::new(None::<String>));
        let stop = tokio_util::sync::CancellationToken::new();
        reset_peak(pid);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..GATEWAY_STREAMS {
            let key = match &auth {
                Auth::Fixed(value) => value.clone(),
                Auth::Pool(pool) => pool.take().ok_or_else(|| anyhow!("the pool of credentials ran out"))?,
            };
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            let (opened, events, failure, stop) = (opened.clone(), events.clone(), failure.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let fail = |why: String| {
                    failure.lock().unwrap().get_or_insert(why);
                };
                let response = match client
                    .post(url)
                    .header("authorization", key)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(response) => response,
                    Err(error) => return fail(format!("{error}")),
                };
                if !response.status().is_success() {
                    let status = response.status();
                    return fail(format!("{status}: {}", response.text().await.unwrap_or_default()));
                }
                let mut body = response.bytes_stream();
                let mut counted = false;
                loop {
                    tokio::select! {
                        chunk = body.next() => match chunk {
                            Some(Ok(bytes)) => {
                                let n = bytes.windows(6).filter(|w| *w == b"data: ").count() as u64;
                                events.fetch_add(n, Ordering::Relaxed);
                                if n > 0 && !counted {
                                    counted = true;
                                    opened.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Some(Err(error)) => return fail(format!("a stream broke off: {error}")),
                            None => return fail("a slow stream ended early".into()),
                        },
                        () = stop.cancelled() => return,
                    }
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while opened.load(Ordering::Relaxed) < GATEWAY_STREAMS as u64 && Instant::now() < deadline {
            if tasks.iter().all(|t| t.is_finished()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let open_took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (cpu0, events0) = (proc_cpu(pid, self.clk_tck), events.load(Ordering::Relaxed));
        tokio::time::sleep(self.duration).await;
        let cpu = (proc_cpu(pid, self.clk_tck) - cpu0) / self.duration.as_secs_f64();
        let events_in_hold = events.load(Ordering::Relaxed) - events0;
        let (rss_kib, hwm_kib) = (proc_status(pid, "VmRSS"), proc_status(pid, "VmHWM"));
        let still_open = tasks.iter().filter(|t| !t.is_finished()).count();
        stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
        let failure = failure.lock().unwrap().clone();
        Ok(Held {
            opened: opened.load(Ordering::Relaxed),
            open_took,
            still_open,
            rss_kib,
            hwm_kib,
            cpu,
            events_in_hold,
            failure,
        })
    }

    async fn chat_closed(&self, target: &ChatTarget, pid: i32) -> Load {
        let callers = (0..self.concurrency).map(|_| (ChatConnection::new(target.clone()), 0)).collect();
        closed_loop(callers, self.duration, pid, self.clk_tck).await
    }

    async fn chat_open(&self, target: &ChatTarget, pid: i32, rate: f64) -> Load {
        let callers = (0..OPEN_LOOP_CONNECTIONS).map(|_| ChatConnection::new(target.clone())).collect();
        open_loop(callers, rate, self.duration, pid, self.clk_tck).await
    }

    fn failure_note(&mut self, target: &ChatTarget) {
        if let Some(failure) = target.failure() {
            self.note(format!("7: first failed call of the window above: {failure}"));
        }
    }

    /// The fake upstream as a process of its own, on `cpu` when pinning.
    async fn start_fake(&self, name: &str, cpu: usize) -> Result<Proc> {
        let port = free_port()?;
        let log = self.work.join(format!("{name}-{port}.log"));
        let exe = std::env::current_exe()?;
        let mut command = if self.pin {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string()]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        command.args(["fake-llm", "--listen", &format!("127.0.0.1:{port}")]);
        Proc::spawn(command, port, log, &self.http).await
    }

    /// `oats serve` on the local backend with the gateway forwarding to `upstream`.
    async fn start_gateway(
        &self,
        name: &str,
        upstream: &Proc,
        database_url: Option<&str>,
        pin: bool,
    ) -> Result<GatewayServer> {
        let dir = self.work.join(format!("state-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let providers = self.work.join(format!("{name}-providers.yaml"));
        let mut models = String::new();
        for (model, upstream_name) in [("bench-model", "fake-model"), ("bench-slow", "fake-slow")] {
            let _ = write!(
                models,
                "      - name: {model}\n        upstream: {upstream_name}\n        input_per_million_usd: 0.15\n        \
                 output_per_million_usd: 0.60\n        max_output_tokens: 256\n"
            );
        }
        std::fs::write(
            &providers,
            format!(
                "providers:\n  - name: fake\n    base_url: {}/v1\n    timeout_seconds: 600\n    max_concurrency: 4096\n    \
                 max_retries: 0\n    models:\n{models}",
                upstream.base
            ),
        )?;
        let policy = self.work.join(format!("{name}-policy.yaml"));
        std::fs::write(
            &policy,
            "defaults:\n  max_in_flight_calls: 1000\n  submissions_per_minute: 100000\n  max_concurrent_jobs: 100000\n",
        )?;
        let gateway = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut env = local_env(&dir);
        env.extend(
            [
                ("OATS_LLM_PROVIDERS_FILE", providers.display().to_string()),
                ("OATS_LLM_LISTEN", gateway.to_string()),
                ("OATS_POLICY_FILE", policy.display().to_string()),
                ("OATS_LOCAL_AGENT_COMMAND", CREDENTIAL_AGENT.to_owned()),
                ("OATS_LOCAL_CONCURRENCY", "100000".to_owned()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        if let Some(url) = database_url {
            env.push(("OATS_DATABASE_URL".into(), url.to_owned()));
        }
        let proc = self.start_oats(name, &env, pin).await?;
        let server = GatewayServer { proc, gateway, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !get_ok(&self.http, &format!("http://{gateway}/healthz")).await {
            if Instant::now() > deadline {
                bail!("the gateway did not answer on {gateway}:\n{}", server.proc.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(server)
    }

    /// `jobs` running jobs, and their credentials as their agents wrote them.
    async fn make_pool(&self, server: &GatewayServer, jobs: usize) -> Result<Arc<Pool>> {
        let url = server.proc.url("/api/v1/jobs");
        let submitted = Instant::now();
        let created: Vec<Result<String>> = futures::stream::iter(0..jobs)
            .map(|i| {
                let (http, url) = (self.http.clone(), url.clone());
                async move {
                    let body = json!({
                        "goal": format!("gateway benchmark job {i}"),
                        "max_turns": CALLS_PER_JOB,
                        "timeout_seconds": 3600,
                        "budget": {"max_tokens": 1_000_000_000u64, "max_cost_usd": 1000.0},
                    });
                    let response = http.post(url).json(&body).send().await?;
                    let status = response.status();
                    let answer: serde_json::Value = response.json().await?;
                    if status.as_u16() != 201 {
                        bail!("POST /api/v1/jobs answered {status}: {answer}");
                    }
                    answer["id"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no id in {answer}"))
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let ids: Vec<String> = created.into_iter().collect::<Result<_>>()?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(120);
        let mut keys = Vec::with_capacity(ids.len());
        for id in &ids {
            let path = server.dir.join("jobs").join(id).join("workspace").join("key");
            loop {
                if let Ok(text) = std::fs::read_to_string(&path)
                    && text.ends_with('\n')
                    && !text.trim().is_empty()
                {
                    keys.push(format!("Bearer {}", text.trim()).parse()?);
                    break;
                }
                if Instant::now() > deadline {
                    bail!("job {id}'s agent wrote no credential within 120 s:\n{}", server.proc.log_tail());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        println!(
            "{jobs} jobs created in {:.1} s, their credentials read {:.1} s later",
            (started - submitted).as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        Ok(Arc::new(Pool { ids, keys, next: AtomicU64::new(0) }))
    }

    /// Cancel the pool's jobs (their agents stop; their ledger rows stay).
    async fn cancel_pool(&self, server: &GatewayServer, pool: &Pool) {
        futures::stream::iter(pool.ids.iter())
            .map(|id| {
                let (http, url) = (self.http.clone(), server.proc.url(&format!("/api/v1/jobs/{id}/cancel")));
                async move {
                    let _ = http.post(url).send().await;
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<()>>()
            .await;
    }
}

/// The fake OpenAI-compatible upstream: a fixed `chat.completion`, or a stream of a role chunk,
/// `chunks` content chunks `delay` apart, a finish chunk, the usage chunk and `[DONE]`. A request
/// for the model `fake-slow` streams one content chunk per second for `slow_seconds`.
fn fake_llm_server(listen: std::net::SocketAddr, chunks: usize, delay: Duration, slow_seconds: u64) -> Result<()> {
    use poem::{Body, EndpointExt as _, Response, Route, get, handler, post, web::Data};
    struct Fake {
        completion: bytes::Bytes,
        role: bytes::Bytes,
        content: bytes::Bytes,
        last: bytes::Bytes,
        chunks: usize,
        delay: Duration,
        slow_seconds: u64,
    }
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        let chunk = json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_767_225_600,
            "model": "fake-model", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": null});
        format!("data: {chunk}\n\n")
    };
    let usage = json!({"prompt_tokens": 24, "completion_tokens": 9, "total_tokens": 33});
    let usage_chunk = json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_767_225_600,
        "model": "fake-model", "choices": [], "usage": usage});
    let fake = Arc::new(Fake {
        completion: bytes::Bytes::from(
            json!({"id": "chatcmpl-bench", "object": "chat.completion", "created": 1_767_225_600, "model": "fake-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                    "finish_reason": "stop"}],
                "usage": usage})
            .to_string(),
        ),
        role: chunk(json!({"role": "assistant", "content": ""}), serde_json::Value::Null).into(),
        content: chunk(json!({"content": "Hello "}), serde_json::Value::Null).into(),
        last: format!("{}data: {usage_chunk}\n\ndata: [DONE]\n\n", chunk(json!({}), json!("stop"))).into(),
        chunks,
        delay,
        slow_seconds,
    });

    #[handler]
    async fn chat(body: Body, fake: Data<&Arc<Fake>>) -> Response {
        let body = body.into_bytes().await.unwrap_or_default();
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        if !has(b"\"stream\":true") {
            return Response::builder().content_type("application/json").body(fake.completion.clone());
        }
        let fake = fake.0.clone();
        let (events, pause) = if has(b"fake-slow") {
            (fake.slow_seconds as usize + 2, Duration::from_secs(1))
        } else {
            (fake.chunks + 2, fake.delay)
        };
        let stream = futures::stream::unfold(0usize, move |i| {
            let fake = fake.clone();
            async move {
                if i >= events {
                    return None;
                }
                if i > 0 && !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                let bytes = match i {
                    0 => fake.role.clone(),
                    i if i + 1 == events => fake.last.clone(),
                    _ => fake.content.clone(),
                };
                Some((Ok::<_, std::io::Error>(bytes), i + 1))
            }
        });
        Response::builder()
            .content_type("text/event-stream")
            .header("cache-control", "no-cache")
            .body(Body::from_bytes_stream(stream))
    }

    #[handler]
    fn ready() -> &'static str {
        "ok"
    }

    let app = Route::new().at("/v1/chat/completions", post(chat)).at("/readyz", get(ready)).data(fake);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(poem::Server::new(poem::listener::TcpListener::bind(listen)).run(app))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// References: the bare poem server and the OTLP receiver.
// ---------------------------------------------------------------------------------------------

fn bare_server(listen: std::net::SocketAddr, job_body: &Path, list_body: &Path) -> Result<()> {
    use poem::{EndpointExt as _, Response, Route, endpoint::make_sync, get};
    let job = bytes::Bytes::from(std::fs::read(job_body)?);
    let list = bytes::Bytes::from(std::fs::read(list_body)?);
    let json = |body: bytes::Bytes| {
        make_sync(move |_| Response::builder().content_type("application/json; charset=utf-8").body(body.clone()))
    };
    let app = Route::new()
        .at("/api/v1/jobs/:id", get(json(job)))
        .at("/api/v1/jobs", get(json(list)))
        .at("/readyz", get(json(bytes::Bytes::from_static(b"{\"status\":\"ok\"}"))))
        .map_to_response();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(poem::Server::new(poem::listener::TcpListener::bind(listen)).run(app))?;
    Ok(())
}

/// An OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf) that counts what it gets.
struct OtlpSink {
    endpoint: String,
    spans: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpSink {
    async fn start() -> Result<Self> {
        use poem::{Body, EndpointExt as _, Response, Route, handler, post, web::Data};
        #[handler]
        async fn traces(body: Body, spans: Data<&Arc<AtomicU64>>) -> Response {
            let bytes = body.into_bytes().await.unwrap_or_default();
            spans.fetch_add(count_spans(&bytes), Ordering::Relaxed);
            Response::builder().content_type("application/x-protobuf").body(Vec::<u8>::new())
        }
        let spans = Arc::new(AtomicU64::new(0));
        let port = free_port()?;
        let app = Route::new().at("/v1/traces", post(traces)).data(spans.clone());
        let task = tokio::spawn(async move {
            let _ = poem::Server::new(poem::listener::TcpListener::bind(("127.0.0.1", port))).run(app).await;
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(Self { endpoint: format!("http://127.0.0.1:{port}"), spans, task })
    }
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Length-delimited fields number `field` of a protobuf message.
fn proto_fields(mut buf: &[u8], field: u64) -> Vec<&[u8]> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first()?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut out = Vec::new();
    while let Some(key) = varint(&mut buf) {
        let skip = match key & 7 {
            0 => {
                varint(&mut buf);
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let Some(len) = varint(&mut buf) else { break };
                let len = len as usize;
                if len > buf.len() {
                    break;
                }
                if key >> 3 == field {
                    out.push(&buf[..len]);
                }
                len
            }
            _ => break,
        };
        if skip > buf.len() {
            break;
        }
        buf = &buf[skip..];
    }
    out
}

/// Spans in an `ExportTraceServiceRequest` (resource_spans = 1, scope_spans = 2, spans = 2).
fn count_spans(request: &[u8]) -> u64 {
    proto_fields(request, 1)
        .into_iter()
        .flat_map(|rs| proto_fields(rs, 2))
        .map(|ss| proto_fields(ss, 2).len() as u64)
        .sum()
}

// ---------------------------------------------------------------------------------------------
// The test control plane.
// ---------------------------------------------------------------------------------------------

struct TestEnv {
    /// Set when this run started it (and so stops it).
    dir: Option<PathBuf>,
    kubeconfig: PathBuf,
}

impl TestEnv {
    const DIR: &'static str = "/tmp/oats-te-bench";

    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testenv/testenv.sh")
    }

    async fn up() -> Result<Self> {
        println!("starting the test control plane in {} (testenv/testenv.sh up)", Self::DIR);
        let t = Instant::now();
        let log = std::fs::File::create(std::env::temp_dir().join("oats-bench-testenv.log"))?;
        let status = tokio::process::Command::new(Self::script())
            .arg("up")
            .env("OATS_TESTENV_DIR", Self::DIR)
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .await?;
        let env =
            Self { dir: Some(PathBuf::from(Self::DIR)), kubeconfig: Path::new(Self::DIR).join("admin.kubeconfig") };
        if !status.success() {
            env.down();
            bail!(
                "testenv/testenv.sh up failed; see {}",
                std::env::temp_dir().join("oats-bench-testenv.log").display()
            );
        }
        println!("control plane up in {:.0}s", t.elapsed().as_secs_f64());
        Ok(env)
    }

    fn down(&self) {
        if let Some(dir) = &self.dir {
            let _ = std::io::stdout().flush();
            let _ = Command::new(Self::script())
                .arg("down")
                .env("OATS_TESTENV_DIR", dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
