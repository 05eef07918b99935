//! Scenario 7: chat completions through `oats serve`'s LLM gateway vs straight to a fake
//! OpenAI-compatible upstream (latency, throughput, CPU per call, time to first streamed chunk),
//! and the memory of 1,000 streamed calls held open.

use crate::{
    Bench, OPEN_LOOP_CONNECTIONS, WARMUP,
    load::{Caller, Load, closed_loop, get_ok, mean, open_loop},
    procs::{local_env, proc_cpu, proc_status, reset_peak},
};
use anyhow::{Result, anyhow, bail};
use futures::StreamExt;
use oats::jobs::JobLimits;
use oats_testkit::Process;
use reqwest::Client;
use serde_json::json;
use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Content chunks of the fake upstream's streamed answer, and the pause before each chunk after
/// the first (so a stream takes ~10 ms and its first chunk is not its whole answer).
pub(crate) const FAST_STREAM_CHUNKS: usize = 8;
pub(crate) const FAST_STREAM_DELAY_MS: u64 = 1;
/// Model calls one job may make: its `max_turns`, whose hard ceiling is 100.
pub(crate) const CALLS_PER_JOB: usize = JobLimits::MAX_TURNS_CEILING as usize;
/// Streamed calls held open at once in 7c.
pub(crate) const GATEWAY_STREAMS: usize = 1_000;
/// The fixed rates at which latency (non-streaming) and time to first chunk (streaming) are
/// measured: far below saturation, so the figures are the path's own cost, not queueing.
pub(crate) const LATENCY_RATE: f64 = 500.0;
pub(crate) const STREAM_RATE: f64 = 200.0;
/// Jobs whose calls calibrate the saturated rate (and warm the gateway up).
pub(crate) const CALIBRATION_JOBS: usize = 50;
/// Credentials for this many times the expected calls of a saturated window (the machine's
/// speed drifts; a pool that runs out makes the window's rate a lower bound, and says so).
pub(crate) const POOL_MARGIN: f64 = 2.0;
/// The agent of the gateway's jobs: it leaves its credential in its workspace and sleeps.
pub(crate) const CREDENTIAL_AGENT: &str = "sh,-c,echo \"$OPENAI_API_KEY\" > key; exec sleep 3600";

/// A chat completion request for `model` (the gateway's name or the upstream's).
pub(crate) fn chat_body(model: &str, stream: bool) -> bytes::Bytes {
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
pub(crate) struct Pool {
    pub(crate) ids: Vec<String>,
    pub(crate) keys: Vec<hyper::header::HeaderValue>,
    pub(crate) next: AtomicU64,
}

impl Pool {
    pub(crate) fn take(&self) -> Option<hyper::header::HeaderValue> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        self.keys.get(n / CALLS_PER_JOB).cloned()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.keys.len() * CALLS_PER_JOB
    }

    pub(crate) fn ran_out(&self) -> bool {
        self.next.load(Ordering::Relaxed) as usize > self.capacity()
    }
}

/// Jobs enough for `calls` calls, with one to spare.
pub(crate) fn jobs_for(calls: f64) -> usize {
    (calls / CALLS_PER_JOB as f64).ceil() as usize + 1
}

#[derive(Clone)]
pub(crate) enum Auth {
    Fixed(hyper::header::HeaderValue),
    Pool(Arc<Pool>),
}

/// Where chat completion calls go, and with what.
#[derive(Clone)]
pub(crate) struct ChatTarget {
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) host: hyper::header::HeaderValue,
    pub(crate) body: bytes::Bytes,
    pub(crate) stream: bool,
    pub(crate) auth: Auth,
    /// The first failure, for the notes.
    pub(crate) failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl ChatTarget {
    pub(crate) fn new(addr: std::net::SocketAddr, model: &str, stream: bool, auth: Auth) -> Self {
        Self {
            addr,
            host: addr.to_string().parse().expect("a valid host"),
            body: chat_body(model, stream),
            stream,
            auth,
            failure: Arc::default(),
        }
    }

    pub(crate) fn direct(addr: std::net::SocketAddr, model: &str, stream: bool) -> Self {
        Self::new(addr, model, stream, Auth::Fixed(hyper::header::HeaderValue::from_static("Bearer sk-bench-direct")))
    }

    pub(crate) fn fail(&self, why: String) {
        self.failure.lock().unwrap().get_or_insert(why);
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap().clone()
    }
}

/// One keep-alive HTTP/1.1 connection making chat completion calls.
pub(crate) struct ChatConnection {
    pub(crate) target: ChatTarget,
    pub(crate) sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>,
}

impl ChatConnection {
    pub(crate) fn new(target: ChatTarget) -> Self {
        Self { target, sender: None }
    }

    pub(crate) async fn connect(&mut self) -> Option<()> {
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
    pub(crate) async fn chat(&mut self) -> Option<Duration> {
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
pub(crate) async fn drain(target: &ChatTarget, concurrency: usize) -> (u64, Duration) {
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
pub(crate) struct GatewayServer {
    pub(crate) proc: Process,
    pub(crate) gateway: std::net::SocketAddr,
    pub(crate) dir: PathBuf,
}

impl Drop for GatewayServer {
    fn drop(&mut self) {
        self.proc.kill();
        oats::backend::local::kill_agents(&self.dir);
    }
}

/// What holding streamed calls open showed.
pub(crate) struct Held {
    pub(crate) opened: u64,
    pub(crate) open_took: Duration,
    pub(crate) still_open: usize,
    pub(crate) rss_kib: u64,
    pub(crate) hwm_kib: u64,
    pub(crate) cpu: f64,
    pub(crate) events_in_hold: u64,
    pub(crate) failure: Option<String>,
}

impl Bench {
    pub(crate) async fn gateway_scenario(&mut self) -> Result<()> {
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
    pub(crate) async fn gateway_calls(
        &mut self,
        upstream: &Process,
        direct: &Process,
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
            bail!("no call went through the gateway:\n{}", oats.proc.log_tail(20));
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
                let target = ChatTarget::direct(direct.api(), "fake-model", stream);
                let l = self.chat_open(&target, direct.pid() as i32, rate).await;
                self.load_note(
                    &format!("7 {prefix}straight to the fake, {what}, {rate:.0} calls/s, round {round}"),
                    &l,
                );
                self.failure_note(&target);
                direct_runs.push(l);
                let pool = self.make_pool(&oats, jobs_for(rate * window)).await?;
                let target = through(&pool, stream);
                let l = self.chat_open(&target, oats.proc.pid() as i32, rate).await;
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
            let target = ChatTarget::direct(direct.api(), "fake-model", false);
            let l = self.chat_closed(&target, direct.pid() as i32).await;
            self.load_note(&format!("7 {prefix}straight to the fake, non-streaming, saturated, round {round}"), &l);
            self.failure_note(&target);
            direct_sat.push(l);
            let pool = self.make_pool(&oats, jobs_for(expected * window * POOL_MARGIN)).await?;
            let target = through(&pool, false);
            let l = self.chat_closed(&target, oats.proc.pid() as i32).await;
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
    pub(crate) async fn gateway_streams(&mut self, upstream: &Process, direct: &Process) -> Result<()> {
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
        let idle = proc_status(oats.proc.pid() as i32, "VmRSS");
        let cpu0 = proc_cpu(oats.proc.pid() as i32, self.clk_tck);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle_cpu = (proc_cpu(oats.proc.pid() as i32, self.clk_tck) - cpu0) / 2.0;
        let through =
            self.hold_streams(oats.gateway, "bench-slow", Auth::Pool(pool.clone()), oats.proc.pid() as i32).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = proc_status(oats.proc.pid() as i32, "VmRSS");
        drop(oats);

        let direct_idle = proc_status(direct.pid() as i32, "VmRSS");
        let auth = Auth::Fixed(hyper::header::HeaderValue::from_static("Bearer sk-bench-direct"));
        let straight = self.hold_streams(direct.api(), "fake-slow", auth, direct.pid() as i32).await?;
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
    pub(crate) async fn hold_streams(
        &self,
        addr: std::net::SocketAddr,
        model: &str,
        auth: Auth,
        pid: i32,
    ) -> Result<Held> {
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

    pub(crate) async fn chat_closed(&self, target: &ChatTarget, pid: i32) -> Load {
        let callers = (0..self.concurrency).map(|_| (ChatConnection::new(target.clone()), 0)).collect();
        closed_loop(callers, self.duration, pid, self.clk_tck).await
    }

    pub(crate) async fn chat_open(&self, target: &ChatTarget, pid: i32, rate: f64) -> Load {
        let callers = (0..OPEN_LOOP_CONNECTIONS).map(|_| ChatConnection::new(target.clone())).collect();
        open_loop(callers, rate, self.duration, pid, self.clk_tck).await
    }

    pub(crate) fn failure_note(&mut self, target: &ChatTarget) {
        if let Some(failure) = target.failure() {
            self.note(format!("7: first failed call of the window above: {failure}"));
        }
    }

    /// `oats serve` on the local backend with the gateway forwarding to `upstream`.
    pub(crate) async fn start_gateway(
        &self,
        name: &str,
        upstream: &Process,
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
                "providers:\n  - name: fake\n    base_url: http://{}/v1\n    timeout_seconds: 600\n    max_concurrency: 4096\n    \
                 max_retries: 0\n    models:\n{models}",
                upstream.api()
            ),
        )?;
        let policy = self.work.join(format!("{name}-policy.yaml"));
        std::fs::write(
            &policy,
            "defaults:\n  max_in_flight_calls: 1000\n  submissions_per_minute: 100000\n  max_concurrent_jobs: 100000\n",
        )?;
        let mut env = local_env(&dir);
        env.extend(
            [
                ("OATS_LLM_PROVIDERS_FILE", providers.display().to_string()),
                ("OATS_LLM_LISTEN", "127.0.0.1:0".to_owned()),
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
        let gateway = proc.address("llm").ok_or_else(|| anyhow!("the server reported no gateway address"))?;
        let server = GatewayServer { proc, gateway, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !get_ok(&self.http, &format!("http://{gateway}/healthz")).await {
            if Instant::now() > deadline {
                bail!("the gateway did not answer on {gateway}:\n{}", server.proc.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(server)
    }

    /// `jobs` running jobs, and their credentials as their agents wrote them.
    pub(crate) async fn make_pool(&self, server: &GatewayServer, jobs: usize) -> Result<Arc<Pool>> {
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
                    bail!("job {id}'s agent wrote no credential within 120 s:\n{}", server.proc.log_tail(20));
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
    pub(crate) async fn cancel_pool(&self, server: &GatewayServer, pool: &Pool) {
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
