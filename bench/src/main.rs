//! `oats-bench`: the benchmark suite of issue 7. It starts the real `oats` binary (and, for the
//! references, a bare poem server, an OTLP/HTTP sink and a kube client) on loopback, drives it
//! with a fixed-concurrency or fixed-rate HTTP load, and prints a results table that it also
//! writes to `bench/results.md`.
//!
//! ```text
//! bench/run.sh                       # build both binaries in release mode, run every scenario
//! target/release/oats-bench --all    # the same, once built (`cargo build --release -p oats -p oats-bench`)
//! target/release/oats-bench --scenarios 1,5 --duration 5
//! ```
//!
//! Scenarios (see README "Benchmarks"):
//! 1. `GET /api/v1/jobs/{id}` with 10,000 jobs vs a bare poem handler with a body of the same size;
//! 2. `GET /api/v1/jobs?limit=50` first and deep page vs a bare handler with a body of the same size;
//! 3. `POST /api/v1/jobs` on the test control plane vs creating the same Job with a kube client;
//! 4. 1,000 and 10,000 concurrent watch streams: memory and CPU per stream; a status change's
//!    latency to 1,000 watchers;
//! 5. scenario 1 with tracing exported to a local OTLP receiver and metrics scraped vs off;
//! 6. resident memory with 0, 10,000 and 100,000 jobs; time to ready; the Kubernetes cache;
//! 7. the LLM gateway: chat completions through `oats serve`'s gateway vs straight to a fake
//!    OpenAI-compatible upstream (latency, throughput, CPU per call, time to first streamed chunk),
//!    and the memory of 1,000 streamed calls held open;
//! 8. the job history: the archiver's pace (SQLite, and PostgreSQL with `OATS_BENCH_DATABASE_URL`)
//!    vs the same rows written straight, and list/GET p99 with 100,000 archived jobs vs the bare
//!    handler, and the storage per archived job.
//!
//! On a machine with two or more cores, load scenarios pin the server under test to CPU 1 and
//! this program (the load generator) to CPU 0, so client and server never steal each other's
//! core and the server's throughput is that of one core.
//!
//! Modules: `load` (the load generator), `procs` (the servers under test and the process
//! figures), `references` (the bare and fake servers it compares against), `seed` (preloaded
//! job histories), `report` (the results table) and one file per scenario in `scenarios`. The
//! servers and the OTLP sink are the test kit's (`oats-testkit`), as the tests use them.

mod load;
mod procs;
mod references;
mod report;
mod rounds;
mod scenarios;
mod seed;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use load::{Connection, Target, open_loop};
use oats::jobs::JobPhase;
use report::{Row, SCENARIOS, TABLE_HEAD, command_output, machine_header, merge_results};
use reqwest::Client;
use scenarios::gateway::{FAST_STREAM_CHUNKS, FAST_STREAM_DELAY_MS};
use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

#[derive(Parser)]
#[command(name = "oats-bench", about = "Benchmarks of the OATS server against bare references (issue 7)")]
struct Args {
    /// Run every scenario (1-8, including the Kubernetes ones).
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
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Where to write the bound address (`api ADDRESS`), as `oats serve` does.
        #[arg(long, env = oats_testkit::ADDRESSES_FILE_ENV)]
        addresses_file: Option<PathBuf>,
        #[arg(long)]
        job_body: PathBuf,
        #[arg(long)]
        list_body: PathBuf,
    },
    /// (internal) A fake OpenAI-compatible upstream: fixed answers to `POST /v1/chat/completions`.
    #[command(hide = true)]
    FakeLlm {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Where to write the bound address (`api ADDRESS`), as `oats serve` does.
        #[arg(long, env = oats_testkit::ADDRESSES_FILE_ENV)]
        addresses_file: Option<PathBuf>,
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

/// The allocator `oats` uses, so the bare reference (and the load generator) run on the same one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Helper::BareServer { listen, addresses_file, job_body, list_body }) = &args.command {
        return references::bare_server(*listen, addresses_file.as_deref(), job_body, list_body);
    }
    if let Some(Helper::FakeLlm { listen, addresses_file, chunks, chunk_delay_ms, slow_seconds }) = &args.command {
        let delay = Duration::from_millis(*chunk_delay_ms);
        return references::fake_llm_server(*listen, addresses_file.as_deref(), *chunks, delay, *slow_seconds);
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
        let target = Target::at(*addr, [path.clone()]);
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

const WARMUP: Duration = Duration::from_secs(1);
/// Connections of the fixed-rate load: at half saturation one or two requests are in flight, so
/// 16 never queue; more idle connections only add the VM's scheduling noise to the tail.
const OPEN_LOOP_CONNECTIONS: usize = 16;
const JOBS_10K: usize = 10_000;
const JOBS_100K: usize = 100_000;

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
            let jobs = seed::preload(&dir, JOBS_10K, JobPhase::Succeeded).await?;
            println!("preloaded {JOBS_10K} job records in {:.1}s", jobs.took.as_secs_f64());
            if wanted("1") || wanted("2") || wanted("5") {
                bench.read_scenarios(&dir, &jobs.ids, wanted("1"), wanted("2"), wanted("5")).await?;
            }
            if wanted("4") {
                bench.streams_scenario().await?;
            }
            if wanted("6") {
                bench.memory_scenario(&dir, &jobs).await?;
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
        if wanted("8") {
            bench.history_scenario().await?;
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
