//! The load generator: a closed loop (each worker sends its next request when the last is
//! answered) and an open loop (requests at a fixed rate), over keep-alive HTTP/1.1 connections,
//! with the server's CPU and peak memory measured over the same window.

use crate::{
    Bench, OPEN_LOOP_CONNECTIONS, WARMUP,
    procs::{proc_cpu, proc_status, reset_peak},
};
use oats_testkit::Process;
use reqwest::Client;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

pub(crate) struct Load {
    /// Requests completed within the window.
    pub(crate) requests: u64,
    /// Requests completed in all, warm-up included.
    pub(crate) total: u64,
    pub(crate) errors: u64,
    pub(crate) secs: f64,
    /// Sorted latencies in microseconds.
    pub(crate) latencies: Vec<u32>,
    pub(crate) server_cpu: f64,
    pub(crate) server_hwm_kib: u64,
    pub(crate) client_cpu: f64,
}

pub(crate) fn mean(loads: &[Load], figure: fn(&Load) -> f64) -> f64 {
    loads.iter().map(figure).sum::<f64>() / loads.len().max(1) as f64
}

impl Load {
    pub(crate) fn rps(&self) -> f64 {
        self.requests as f64 / self.secs
    }

    /// Server CPU time per request, in microseconds.
    pub(crate) fn cpu_us(&self) -> f64 {
        self.server_cpu / self.requests.max(1) as f64 * 1e6
    }

    /// Latency percentile in milliseconds.
    pub(crate) fn pct(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((p * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        f64::from(self.latencies[i]) / 1e3
    }
}

pub(crate) struct WorkerResult {
    pub(crate) latencies: Vec<u32>,
    pub(crate) errors: u64,
    pub(crate) total: u64,
}

impl WorkerResult {
    /// One request: its latency (`None` if it failed), counted if it belongs to the window.
    pub(crate) fn record(&mut self, latency: Option<Duration>, in_window: bool) {
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
pub(crate) trait Caller: Send + 'static {
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
pub(crate) fn connections(target: &Target, n: usize) -> Vec<(Connection, usize)> {
    (0..n).map(|w| (Connection::new(target.clone()), w * target.paths.len() / n.max(1))).collect()
}

/// Where load goes: the server's address and the request targets (`/api/v1/jobs/...`).
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) host: hyper::header::HeaderValue,
    pub(crate) paths: Arc<Vec<hyper::Uri>>,
}

impl Target {
    /// The API of `server`.
    pub(crate) fn new(server: &Process, paths: impl IntoIterator<Item = String>) -> Self {
        Self::at(server.api(), paths)
    }

    pub(crate) fn at(addr: std::net::SocketAddr, paths: impl IntoIterator<Item = String>) -> Self {
        let paths = paths.into_iter().map(|p| p.parse().expect("a valid request target")).collect();
        Self { addr, host: addr.to_string().parse().expect("a valid host"), paths: Arc::new(paths) }
    }
}

/// One keep-alive HTTP/1.1 connection of the load generator (hyper's client connection: no
/// pool, no URL parsing per request, so the generator spends its core on requests).
pub(crate) struct Connection {
    pub(crate) target: Target,
    pub(crate) sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>>,
}

impl Connection {
    pub(crate) fn new(target: Target) -> Self {
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

    /// GET the `i`-th path; true for a 2xx answer read to its end.
    pub(crate) async fn get(&mut self, i: usize) -> bool {
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
pub(crate) async fn observe_window(pid: i32, from: Instant, to: Instant, clk_tck: f64) -> (f64, u64, f64) {
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
pub(crate) async fn closed_loop<C: Caller>(
    callers: Vec<(C, usize)>,
    duration: Duration,
    pid: i32,
    clk_tck: f64,
) -> Load {
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
pub(crate) async fn open_loop<C: Caller>(
    callers: Vec<C>,
    rate: f64,
    duration: Duration,
    pid: i32,
    clk_tck: f64,
) -> Load {
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

pub(crate) async fn collect(
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

pub(crate) async fn get_ok(http: &Client, url: &str) -> bool {
    match http.get(url).send().await {
        Ok(response) => {
            let ok = response.status().is_success();
            response.bytes().await.is_ok() && ok
        }
        Err(_) => false,
    }
}

/// Scrape `url` every `every`, as Prometheus does, until aborted.
pub(crate) fn spawn_scraper(http: Client, url: String, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let _ = get_ok(&http, &url).await;
            tokio::time::sleep(every).await;
        }
    })
}

impl Bench {
    /// The saturating load on `server`.
    pub(crate) async fn closed(&self, target: Target, server: &Process) -> Load {
        closed_loop(connections(&target, self.concurrency), self.duration, server.pid() as i32, self.clk_tck).await
    }

    /// `rate` requests per second to `server`.
    pub(crate) async fn open(&self, target: Target, server: &Process, rate: f64) -> Load {
        let callers = (0..OPEN_LOOP_CONNECTIONS).map(|_| Connection::new(target.clone())).collect();
        open_loop(callers, rate, self.duration, server.pid() as i32, self.clk_tck).await
    }
}
