//! Scenario 4: watch streams. 1,000 and then 10,000 held open on idle jobs (memory and CPU per
//! stream, over one heartbeat period), and the latency of a status change to 1,000 watchers of a
//! job against that of a single watcher; then 10,000 again over HTTP/2, on a server of their own.
//!
//! The HTTP/1.1 watchers are plain TCP connections that send one request and read the raw
//! response (chunked SSE), so the load generator holds 10,000 of them cheaply and timestamps an
//! event as soon as its bytes arrive. Over HTTP/1.1 each stream has its connection, and hyper's
//! two 8 KiB buffers of it; the HTTP/2 watchers share 100 h2c connections (prior knowledge, 100
//! streams each: the server's default `http2_max_concurrent_streams`), through hyper's client.

use crate::{
    Bench,
    procs::{local_env, proc_cpu, proc_status},
    rounds::Spread,
    seed::preload,
};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use oats::jobs::JobPhase;
use oats_testkit::Process;
use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// Streams of the first measure (the row kept from the first version of the scenario).
const STREAMS: usize = 1_000;
/// Streams of the second measure.
const MANY_STREAMS: usize = 10_000;
/// Watchers of one job in the latency measure, and how many jobs (rounds) are cancelled so.
const WATCHERS: usize = 1_000;
const FAN_OUT_ROUNDS: usize = 12;
/// Rounds of the reference: one watcher, one cancel.
const SINGLE_ROUNDS: usize = 50;
/// The server's heartbeat period: CPU is measured over one, so each stream's comment is in it.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// HTTP/2 streams to a connection: the server's default `http2_max_concurrent_streams`.
const STREAMS_PER_CONNECTION: usize = 100;
/// Connections being opened at once (their first event not yet read): more only overflow the
/// listen backlog, and a dropped SYN costs a second.
const OPENING_AT_ONCE: usize = 200;

/// A stream server before any stream: CPU (share of a core) and resident memory (KiB).
struct Baseline {
    idle_cpu: f64,
    rss: u64,
}

/// What the watchers of the idle streams saw, together.
#[derive(Default)]
struct Seen {
    /// Streams whose first `job` event arrived.
    opened: AtomicU64,
    events: AtomicU64,
    heartbeats: AtomicU64,
    /// Streams that got a heartbeat comment (counted over HTTP/2).
    beating: AtomicU64,
}

impl Bench {
    pub(crate) async fn streams_scenario(&mut self) -> Result<()> {
        println!("== scenario 4: {STREAMS} and {MANY_STREAMS} concurrent watch streams; watch latency");
        let files = raise_open_files_limit();
        let wanted = (MANY_STREAMS + 3 * WATCHERS + 200) as u64;
        if files < wanted {
            bail!("scenario 4 needs {wanted} open files (ulimit -n); the hard limit is {files}");
        }
        let dir = self.work.join("state-streams");
        let jobs = 1 + MANY_STREAMS + FAN_OUT_ROUNDS + SINGLE_ROUNDS;
        let (oats, ids, Baseline { idle_cpu, rss: before }) = self.stream_server("oats-streams", &dir, jobs).await?;
        let pid = oats.pid() as i32;
        let address = oats.api();

        // Idle streams: the first 1,000, then up to 10,000; one stream per job.
        let (idle_ids, rest) = ids.split_at(1 + MANY_STREAMS);
        let seen = Arc::new(Seen::default());
        let stop = CancellationToken::new();
        let opening = Arc::new(Semaphore::new(OPENING_AT_ONCE));
        let mut tasks = Vec::new();
        let mut figures = Vec::new();
        for (count, from) in [(STREAMS, 0), (MANY_STREAMS, STREAMS)] {
            let started = Instant::now();
            for id in &idle_ids[from..count] {
                let path = format!("/api/v1/jobs/{id}/watch");
                tasks.push(tokio::spawn(idle_watcher(address, path, seen.clone(), opening.clone(), stop.clone())));
            }
            let deadline = Instant::now() + Duration::from_secs(120);
            while seen.opened.load(Ordering::Relaxed) < count as u64 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let open_took = started.elapsed();
            let open = seen.opened.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (cpu1, beats1) = (proc_cpu(pid, self.clk_tck), seen.heartbeats.load(Ordering::Relaxed));
            tokio::time::sleep(HEARTBEAT).await;
            let held_cpu = (proc_cpu(pid, self.clk_tck) - cpu1) / HEARTBEAT.as_secs_f64();
            let beats = seen.heartbeats.load(Ordering::Relaxed) - beats1;
            let rss = proc_status(pid, "VmRSS");
            let still_open = tasks.iter().filter(|t| !t.is_finished()).count();
            figures.push(Held { open, open_took, held_cpu, beats, rss, still_open });
        }
        stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = proc_status(pid, "VmRSS");

        // Latency: 1,000 watchers of one job, the job cancelled; then one watcher, one cancel.
        let (fan_out_ids, single_ids) = rest.split_at(FAN_OUT_ROUNDS);
        let cpu_before_latency = proc_cpu(pid, self.clk_tck);
        let mut fan_out = Vec::new();
        let mut fan_out_missing = 0;
        for id in fan_out_ids {
            let (latencies, missing) = self.cancel_watched(address, &oats.url(""), id, WATCHERS, &opening).await?;
            fan_out.push(latencies);
            fan_out_missing += missing;
        }
        let mut single = Vec::new();
        for id in single_ids {
            single.extend(self.cancel_watched(address, &oats.url(""), id, 1, &opening).await?.0);
        }
        let latency_cpu = proc_cpu(pid, self.clk_tck) - cpu_before_latency;

        for (count, held) in [STREAMS, MANY_STREAMS].into_iter().zip(&figures) {
            let per_stream = (held.rss as f64 - before as f64) / held.open.max(1) as f64;
            let (memory_target, cpu_target, cpu_limit) =
                if count == STREAMS { ("", "< 0.5% of a core", 0.005) } else { ("< 8 KiB", "< 1% of a core", 0.01) };
            self.row(
                "4",
                &format!("{} watch streams held open: RSS", held.open),
                format!("{:.1} MiB", held.rss as f64 / 1024.0),
                format!("{:.1} MiB (same server, no streams)", before as f64 / 1024.0),
                Some(held.rss as f64 / before as f64),
                "",
                None,
            );
            let label = if count == STREAMS {
                "memory per open watch stream".to_owned()
            } else {
                format!("memory per open watch stream, {} streams", held.open)
            };
            let pass = (count == MANY_STREAMS).then_some(per_stream < 8.0);
            self.row("4", &label, format!("{per_stream:.1} KiB"), "".into(), None, memory_target, pass);
            self.row(
                "4",
                &format!("server CPU while holding {} streams (idle jobs; over one 15 s heartbeat period)", held.open),
                format!("{:.2}% of a core", held.held_cpu * 100.0),
                format!("{:.2}% (no streams)", idle_cpu * 100.0),
                None,
                cpu_target,
                Some(held.held_cpu < cpu_limit),
            );
        }
        // Each change's p99 over its watchers, then the median change: one change that a burst of
        // the host's load fell on would otherwise be a twelfth of the pooled samples.
        let per_change: Vec<f64> = fan_out.iter().map(|latencies| percentile(latencies, 0.99)).collect();
        let changes = Spread::of(&per_change);
        let pooled: Vec<f64> = fan_out.concat();
        let (p50, p99, max) = (percentile(&pooled, 0.5), percentile(&pooled, 0.99), percentile(&pooled, 1.0));
        let (single_p50, single_p99) = (percentile(&single, 0.5), percentile(&single, 0.99));
        self.row(
            "4",
            &format!(
                "watch latency: a status change (cancel) reaches {WATCHERS} watchers of the job, p99 (median of \
                 {FAN_OUT_ROUNDS} changes)"
            ),
            format!(
                "{:.1} ms (changes' p99s: quartiles {:.1}-{:.1}, range {:.1}-{:.1}; all samples: p50 {p50:.1}, p99 \
                 {p99:.1}, max {max:.1})",
                changes.median, changes.quartiles.0, changes.quartiles.1, changes.range.0, changes.range.1
            ),
            format!("{single_p99:.1} ms (one watcher; p50 {single_p50:.1})"),
            Some(changes.median / single_p99.max(0.001)),
            "< 50 ms",
            Some(changes.median < 50.0 && fan_out_missing == 0),
        );
        for (count, held) in [STREAMS, MANY_STREAMS].into_iter().zip(&figures) {
            self.note(format!(
                "4 ({count} streams): {} of {count} streams got their first event within {:.1} s; {} still open after the \
                 {} s hold, {} heartbeat comments received in it (one per stream per 15 s expected)",
                held.open,
                held.open_took.as_secs_f64(),
                held.still_open,
                HEARTBEAT.as_secs() + 2,
                held.beats,
            ));
        }
        self.note(format!(
            "4: {} `job` events received on the idle streams in all; RSS {:.1} MiB after the clients disconnected. \
             A watch waits for its job's change (src/jobs/changes.rs); heartbeats come from one shared timer. \
             Latency is from the job's `finished_at` (the cancel, as the server recorded it) to the moment the \
             watcher's read returned the event's bytes, on the same clock; {FAN_OUT_ROUNDS} jobs × {WATCHERS} \
             watchers ({} samples, {fan_out_missing} events missing), the reference {SINGLE_ROUNDS} jobs × 1. \
             {}; the server used {:.1} CPU s during the latency rounds",
            seen.events.load(Ordering::Relaxed),
            after as f64 / 1024.0,
            pooled.len(),
            if self.pin { "Server pinned to CPU 1, watchers on CPU 0" } else { "Not pinned" },
            latency_cpu,
        ));
        drop(oats);
        oats::backend::local::kill_agents(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        self.http2_streams().await
    }

    /// A server for watch streams on `jobs` pending jobs preloaded into `dir`, their ids, and the
    /// server's CPU and memory before any stream (settled for 12 s, CPU over the next 3 s). The
    /// threads that loaded the jobs at start (Tokio's blocking pool) exit after 10 s idle, and
    /// mimalloc returns their memory only then: measured sooner, it would be counted against the
    /// streams' memory.
    async fn stream_server(&self, name: &str, dir: &Path, jobs: usize) -> Result<(Process, Vec<String>, Baseline)> {
        let ids = preload(dir, jobs, JobPhase::Pending).await?.ids;
        let oats = self.start_oats(name, &self.streams_env(dir)?, self.pin).await?;
        let pid = oats.pid() as i32;
        tokio::time::sleep(Duration::from_secs(12)).await;
        let cpu0 = proc_cpu(pid, self.clk_tck);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_cpu = (proc_cpu(pid, self.clk_tck) - cpu0) / 3.0;
        Ok((oats, ids, Baseline { idle_cpu, rss: proc_status(pid, "VmRSS") }))
    }

    /// The environment of a server for watch streams on the jobs of `dir`.
    fn streams_env(&self, dir: &Path) -> Result<Vec<(String, String)>> {
        let policy = self.work.join("policy-streams.yaml");
        std::fs::write(&policy, format!("defaults:\n  max_streams: {}\n", 2 * (MANY_STREAMS + WATCHERS)))?;
        let mut env = local_env(dir);
        env.push(("OATS_POLICY_FILE".into(), policy.display().to_string()));
        env.push(("OATS_HTTP_MAX_CONNECTIONS".into(), (2 * (MANY_STREAMS + WATCHERS)).to_string()));
        // One slot, taken by a long sleep: every other job stays pending, so its watch stays open.
        env.push(("OATS_LOCAL_CONCURRENCY".into(), "1".into()));
        env.push(("OATS_LOCAL_AGENT_COMMAND".into(), "sleep,300".into()));
        Ok(env)
    }

    /// 10,000 watch streams over HTTP/2, 100 to a connection, held open over one heartbeat
    /// period on a server of their own (its memory is not the HTTP/1.1 streams' memory reused).
    /// Fails unless every stream opened, stayed open and got a heartbeat.
    async fn http2_streams(&mut self) -> Result<()> {
        let dir = self.work.join("state-streams-h2");
        let (oats, ids, Baseline { idle_cpu, rss: before }) =
            self.stream_server("oats-streams-h2", &dir, 1 + MANY_STREAMS).await?;
        let pid = oats.pid() as i32;
        let address = oats.api();

        let seen = Arc::new(Seen::default());
        let stop = CancellationToken::new();
        let opening = Arc::new(Semaphore::new(OPENING_AT_ONCE));
        let started = Instant::now();
        let mut connections = Vec::new();
        let mut streams = Vec::new();
        for ids in ids[..MANY_STREAMS].chunks(STREAMS_PER_CONNECTION) {
            let stream = TcpStream::connect(address).await.context("connecting for HTTP/2")?;
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .context("HTTP/2 handshake")?;
            let stopped = stop.clone();
            connections.push(tokio::spawn(async move {
                tokio::select! {
                    _ = connection => {}
                    () = stopped.cancelled() => {}
                }
            }));
            for id in ids {
                let uri = format!("http://{address}/api/v1/jobs/{id}/watch");
                let watcher = http2_watcher(sender.clone(), uri, seen.clone(), opening.clone(), stop.clone());
                streams.push(tokio::spawn(watcher));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while seen.opened.load(Ordering::Relaxed) < MANY_STREAMS as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let open_took = started.elapsed();
        let open = seen.opened.load(Ordering::Relaxed);
        if open < MANY_STREAMS as u64 {
            stop.cancel();
            bail!("only {open} of {MANY_STREAMS} HTTP/2 watch streams got their first event within 120 s");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (cpu1, beats1) = (proc_cpu(pid, self.clk_tck), seen.heartbeats.load(Ordering::Relaxed));
        tokio::time::sleep(HEARTBEAT).await;
        let held_cpu = (proc_cpu(pid, self.clk_tck) - cpu1) / HEARTBEAT.as_secs_f64();
        let beats = seen.heartbeats.load(Ordering::Relaxed) - beats1;
        let rss = proc_status(pid, "VmRSS");
        // Each stream has been open longer than a heartbeat period: its first comment is due.
        let deadline = Instant::now() + HEARTBEAT;
        while seen.beating.load(Ordering::Relaxed) < open && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let beating = seen.beating.load(Ordering::Relaxed);
        let still_open = streams.iter().filter(|t| !t.is_finished()).count();
        stop.cancel();
        for task in streams.into_iter().chain(connections) {
            let _ = task.await;
        }
        if still_open < MANY_STREAMS || beating < open {
            bail!(
                "of {MANY_STREAMS} HTTP/2 watch streams, {still_open} stayed open over the {} s hold and {beating} \
                 got a heartbeat comment",
                HEARTBEAT.as_secs() + 2
            );
        }

        let per_stream = (rss as f64 - before as f64) / open as f64;
        self.row(
            "4",
            &format!("{open} watch streams over HTTP/2 ({STREAMS_PER_CONNECTION} per connection): RSS"),
            format!("{:.1} MiB", rss as f64 / 1024.0),
            format!("{:.1} MiB (same server, no streams)", before as f64 / 1024.0),
            Some(rss as f64 / before as f64),
            "",
            None,
        );
        self.row(
            "4",
            &format!("memory per open watch stream over HTTP/2, {open} streams"),
            format!("{per_stream:.1} KiB"),
            "".into(),
            None,
            "< 8 KiB",
            Some(per_stream < 8.0),
        );
        self.row(
            "4",
            &format!("server CPU while holding {open} HTTP/2 streams (idle jobs; over one 15 s heartbeat period)"),
            format!("{:.2}% of a core", held_cpu * 100.0),
            format!("{:.2}% (no streams)", idle_cpu * 100.0),
            None,
            "< 1% of a core",
            Some(held_cpu < 0.01),
        );
        self.note(format!(
            "4 ({MANY_STREAMS} HTTP/2 streams): {} h2c connections (prior knowledge) of {STREAMS_PER_CONNECTION} \
             streams each, on a server of their own; all streams got their first event within {:.1} s and stayed \
             open over the {} s hold, {beats} heartbeat comments received in its last 15 s",
            MANY_STREAMS / STREAMS_PER_CONNECTION,
            open_took.as_secs_f64(),
            HEARTBEAT.as_secs() + 2,
        ));
        drop(oats);
        oats::backend::local::kill_agents(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// Open `watchers` watch streams of job `id`, wait for each one's first event, cancel the job
    /// and return how long after its `finished_at` each watcher read the cancelled state (ms),
    /// and how many never did.
    async fn cancel_watched(
        &self,
        address: SocketAddr,
        base: &str,
        id: &str,
        watchers: usize,
        opening: &Arc<Semaphore>,
    ) -> Result<(Vec<f64>, usize)> {
        let opened = Arc::new(AtomicU64::new(0));
        let path = format!("/api/v1/jobs/{id}/watch");
        let tasks: Vec<JoinHandle<Option<SystemTime>>> = (0..watchers)
            .map(|_| tokio::spawn(final_watcher(address, path.clone(), opened.clone(), opening.clone())))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while opened.load(Ordering::Relaxed) < watchers as u64 {
            if Instant::now() > deadline {
                bail!("only {} of {watchers} watchers of {id} opened", opened.load(Ordering::Relaxed));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let response = self.http.post(format!("{base}/api/v1/jobs/{id}/cancel")).send().await?;
        if !response.status().is_success() {
            bail!("cancelling {id}: {}", response.status());
        }
        let job: serde_json::Value = response.json().await?;
        let finished = job["finished_at"].as_str().context("a cancelled job has finished_at")?;
        let finished: SystemTime = DateTime::parse_from_rfc3339(finished)?.with_timezone(&Utc).into();
        let mut latencies = Vec::with_capacity(watchers);
        let mut missing = 0;
        for task in tasks {
            match tokio::time::timeout(Duration::from_secs(30), task).await {
                Ok(Ok(Some(seen))) => {
                    let late =
                        seen.duration_since(finished).map_or_else(|e| -e.duration().as_secs_f64(), |d| d.as_secs_f64());
                    latencies.push(late * 1e3);
                }
                _ => missing += 1,
            }
        }
        Ok((latencies, missing))
    }
}

/// What one step of scenario 4 measured with its streams held open.
struct Held {
    open: u64,
    open_took: Duration,
    held_cpu: f64,
    beats: u64,
    rss: u64,
    still_open: usize,
}

/// A watch request on a new connection; `None` when it cannot connect.
async fn open_watch(address: SocketAddr, path: &str) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    Some(stream)
}

/// Occurrences of `pattern` in `tail` (the end of what was read before) followed by `new`,
/// counting only those that end in `new`; then `tail` becomes the end of `new`.
fn count_new(tail: &mut Vec<u8>, new: &[u8], pattern: &[u8]) -> u64 {
    let before = tail.len();
    tail.extend_from_slice(new);
    let count = tail.windows(pattern.len()).enumerate().filter(|(i, w)| *w == pattern && i + w.len() > before).count();
    let keep = tail.len().saturating_sub(pattern.len());
    tail.drain(..keep);
    count as u64
}

/// Watch until `stop`, counting events and heartbeat comments.
async fn idle_watcher(
    address: SocketAddr,
    path: String,
    seen: Arc<Seen>,
    opening: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let permit = opening.acquire_owned().await;
    let Some(mut stream) = open_watch(address, &path).await else { return };
    let mut permit = Some(permit);
    let mut buffer = vec![0u8; 4096];
    let (mut event_tail, mut beat_tail) = (Vec::new(), Vec::new());
    loop {
        let read = tokio::select! {
            read = stream.read(&mut buffer) => read,
            () = stop.cancelled() => return,
        };
        let Ok(n @ 1..) = read else { return };
        let events = count_new(&mut event_tail, &buffer[..n], b"event: job");
        // A comment alone in its chunk: the chunk's size line, then `:` and the blank line.
        let beats = count_new(&mut beat_tail, &buffer[..n], b"\n:\n\n");
        seen.events.fetch_add(events, Ordering::Relaxed);
        seen.heartbeats.fetch_add(beats, Ordering::Relaxed);
        if events > 0 && permit.take().is_some() {
            seen.opened.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Watch over HTTP/2 until `stop`, counting events and heartbeat comments.
async fn http2_watcher(
    mut sender: http2::SendRequest<Empty<Bytes>>,
    uri: String,
    seen: Arc<Seen>,
    opening: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let permit = opening.acquire_owned().await;
    let Ok(request) = hyper::Request::get(uri).header("accept", "text/event-stream").body(Empty::new()) else {
        return;
    };
    let Ok(response) = sender.send_request(request).await else { return };
    let mut body = response.into_body();
    let mut permit = Some(permit);
    let (mut event_tail, mut beat_tail) = (Vec::new(), Vec::new());
    let mut beating = false;
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = stop.cancelled() => return,
        };
        let Some(Ok(frame)) = frame else { return };
        let Ok(data) = frame.into_data() else { continue };
        let events = count_new(&mut event_tail, &data, b"event: job");
        // A comment follows the blank line that ends an event or another comment.
        let beats = count_new(&mut beat_tail, &data, b"\n\n:\n\n");
        seen.events.fetch_add(events, Ordering::Relaxed);
        seen.heartbeats.fetch_add(beats, Ordering::Relaxed);
        if events > 0 && permit.take().is_some() {
            seen.opened.fetch_add(1, Ordering::Relaxed);
        }
        if beats > 0 && !beating {
            beating = true;
            seen.beating.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Watch until the job is cancelled: when the read that brought the cancelled state returned.
async fn final_watcher(
    address: SocketAddr,
    path: String,
    opened: Arc<AtomicU64>,
    opening: Arc<Semaphore>,
) -> Option<SystemTime> {
    let permit = opening.acquire_owned().await;
    let mut stream = open_watch(address, &path).await?;
    let mut permit = Some(permit);
    let mut buffer = vec![0u8; 16384];
    let (mut event_tail, mut final_tail) = (Vec::new(), Vec::new());
    loop {
        let n = match stream.read(&mut buffer).await {
            Ok(n @ 1..) => n,
            _ => return None,
        };
        let now = SystemTime::now();
        if count_new(&mut final_tail, &buffer[..n], br#""status":"cancelled""#) > 0 {
            return Some(now);
        }
        if count_new(&mut event_tail, &buffer[..n], b"event: job") > 0 && permit.take().is_some() {
            opened.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The `q` quantile of `samples` (nearest rank); 0 when there are none.
fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n => sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    }
}

/// Raise this process's soft limit of open files to its hard limit (the servers it starts
/// inherit it); the limit now in force.
fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 0 };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}
