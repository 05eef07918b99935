//! Starting, timing out, cancelling and reaping one agent and everything it started.
//!
//! An agent runs in its own process group, but a process may leave its group (`setsid`), so every
//! process of a job is also found by its marker: the job's `OATS_JOB_ID=<id>` in its environment,
//! which children inherit (read from `/proc/<pid>/environ`). Stopping a job signals the group and
//! every marked process; after a crash of the server, the next one kills every marked process of
//! every job it knows, whatever the job's phase. (A process that drops the variable from its own
//! environment and then `exec`s escapes the marker; only a cgroup would hold it.)

use super::LocalSettings;
use crate::jobs::{
    JobId, JobPhase, JobReason, JobRecord, JobState, MAX_RESULT_BYTES, agent_env, agent_exit, truncate_result,
};
use nix::{sys::signal::Signal, unistd::Pid};
use std::{path::Path, process::Stdio, time::Duration};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
    sync::{Notify, mpsc},
    task::JoinHandle,
};

/// The agent's combined stdout and stderr, one `<RFC 3339 time> <line>` per line.
pub const OUTPUT_FILE: &str = "output.log";
const RESULT_FILE: &str = "result";

/// Longest output line kept; longer lines are split.
pub const MAX_LINE_BYTES: u64 = 16 * 1024;
/// Longest the output is still written after the agent's processes are gone (a process that
/// escaped the marker may hold the pipes open).
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// Time between SIGTERM and SIGKILL when stopping an agent.
const GRACE: Duration = Duration::from_secs(3);

/// How a run ended.
pub struct Outcome {
    pub status: JobState,
    pub result: Option<String>,
}

impl Outcome {
    fn failed(reason: JobReason, message: impl Into<String>) -> Self {
        Self { status: JobState::with_reason(JobPhase::Failed, reason, message), result: None }
    }
}

/// A started agent whose output is being captured.
pub struct RunningAgent {
    child: Child,
    pgid: i32,
    id: JobId,
    writer: JoinHandle<()>,
    result_file: std::path::PathBuf,
}

/// Start the agent in its own process group with a cleared environment.
pub async fn spawn_agent(settings: &LocalSettings, dir: &Path, record: &JobRecord) -> Result<RunningAgent, Outcome> {
    let workspace = dir.join("workspace");
    let result_file = dir.join(RESULT_FILE);
    let start_failed =
        |e: std::io::Error| Outcome::failed(JobReason::StartFailed, format!("cannot start the agent: {e}"));
    super::private_dir(&workspace).await.map_err(start_failed)?;
    let (program, args) = settings
        .command
        .split_first()
        .ok_or_else(|| Outcome::failed(JobReason::StartFailed, "no agent command is configured"))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(settings.env_allowlist.iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v))))
        .envs(record.spec.agent_env(&record.id, &result_file.to_string_lossy(), &workspace.to_string_lossy()))
        .envs(record.trace.iter().flat_map(|t| {
            std::iter::once(("TRACEPARENT".to_owned(), t.traceparent.clone()))
                .chain(t.tracestate.clone().map(|s| ("TRACESTATE".to_owned(), s)))
        }))
        .envs(settings.gateway.iter().flat_map(|gateway| {
            [
                (agent_env::OPENAI_BASE_URL.to_owned(), gateway.base_url.clone()),
                (agent_env::OPENAI_API_KEY.to_owned(), gateway.credentials.mint(&record.id)),
            ]
        }))
        .env("HOME", &workspace)
        .current_dir(&workspace)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    let output = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(OUTPUT_FILE))
        .await
        .map_err(start_failed)?;
    let mut child = command.spawn().map_err(start_failed)?;
    let pgid = child.id().map_or(0, |pid| pid as i32);
    let (lines, receiver) = mpsc::channel(256);
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    tokio::spawn(pump(stdout, lines.clone()));
    tokio::spawn(pump(stderr, lines));
    let writer = tokio::spawn(write_output(receiver, output, settings.max_log_bytes));
    Ok(RunningAgent { child, pgid, id: record.id.clone(), writer, result_file })
}

impl RunningAgent {
    pub fn pgid(&self) -> i32 {
        self.pgid
    }

    /// Wait for the agent to exit, killing its group on timeout or cancellation.
    pub async fn wait(mut self, timeout_seconds: u32, cancel: &Notify) -> Outcome {
        let timeout = tokio::time::sleep(Duration::from_secs(u64::from(timeout_seconds)));
        let outcome = tokio::select! {
            status = self.child.wait() => match status {
                Ok(status) if status.success() => {
                    let result = read_result(&self.result_file).await;
                    Outcome { status: JobState::new(JobPhase::Succeeded), result }
                }
                Ok(status) => {
                    // A failed agent's result is its partial answer or why it stopped.
                    let result = read_result(&self.result_file).await;
                    let failed = match status.code() {
                        Some(code) => match agent_exit::reason(code) {
                            Some((reason, message)) => Outcome::failed(reason, message),
                            None => Outcome::failed(JobReason::AgentError, format!("the agent exited with code {code}")),
                        },
                        None => Outcome::failed(JobReason::AgentError, "the agent was killed by a signal"),
                    };
                    Outcome { result, ..failed }
                }
                Err(e) => Outcome::failed(JobReason::AgentError, format!("cannot wait for the agent: {e}")),
            },
            () = timeout => {
                self.stop().await;
                let failed = Outcome::failed(JobReason::DeadlineExceeded, format!("the job ran longer than its timeout of {timeout_seconds}s"));
                Outcome { result: read_result(&self.result_file).await, ..failed }
            }
            () = cancel.notified() => {
                self.stop().await;
                let result = read_result(&self.result_file).await;
                Outcome { status: JobState::with_reason(JobPhase::Cancelled, JobReason::Cancelled, "cancelled by request"), result }
            }
        };
        // Make sure nothing the agent started outlives the job (in its group or not), then flush
        // its output.
        signal_group(self.pgid, Signal::SIGKILL);
        kill_marked(std::slice::from_ref(&self.id)).await;
        if tokio::time::timeout(FLUSH_WAIT, &mut self.writer).await.is_err() {
            tracing::warn!(job_id = %self.id, "a process outside the job still holds its output; not waiting for it");
            self.writer.abort();
        }
        outcome
    }

    /// SIGTERM the group and every process of the job, then SIGKILL whatever is left after a
    /// grace period.
    async fn stop(&mut self) {
        signal_group(self.pgid, Signal::SIGTERM);
        signal_marked(&self.id, Signal::SIGTERM).await;
        if tokio::time::timeout(GRACE, self.child.wait()).await.is_err() {
            signal_group(self.pgid, Signal::SIGKILL);
            kill_marked(std::slice::from_ref(&self.id)).await;
            let _ = self.child.wait().await;
        }
    }
}

fn signal_group(pgid: i32, signal: Signal) {
    if pgid > 1 {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pgid), signal);
    }
}

/// The environment variable that marks every process of a job.
fn marker_of(environ: &[u8]) -> Option<&[u8]> {
    environ.split(|b| *b == 0).find_map(|var| var.strip_prefix(b"OATS_JOB_ID="))
}

/// Processes (other than this one) whose marker is one of `ids`.
fn marked_processes(ids: &[JobId]) -> Vec<i32> {
    let own = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != own)
        .filter(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            marker_of(&environ).is_some_and(|marker| ids.iter().any(|id| id.as_str().as_bytes() == marker))
        })
        .collect()
}

/// Send `signal` to every process of a job.
async fn signal_marked(id: &JobId, signal: Signal) {
    let ids = vec![id.clone()];
    let pids = tokio::task::spawn_blocking(move || marked_processes(&ids)).await.unwrap_or_default();
    for pid in pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
    }
}

/// Kill every process of these jobs, wherever it is (see [`kill_marked_now`]).
pub async fn kill_marked(ids: &[JobId]) -> usize {
    if ids.is_empty() {
        return 0;
    }
    let ids = ids.to_vec();
    tokio::task::spawn_blocking(move || kill_marked_now(&ids)).await.unwrap_or(0)
}

/// Kill every process of these jobs, wherever it is: stopped first (a stopped process cannot
/// fork), until a pass finds none it has not stopped, then killed. Blocks; how many were killed.
pub fn kill_marked_now(ids: &[JobId]) -> usize {
    let mut stopped = std::collections::HashSet::new();
    for _ in 0..100 {
        let found: Vec<i32> = marked_processes(ids).into_iter().filter(|pid| !stopped.contains(pid)).collect();
        if found.is_empty() {
            break;
        }
        for pid in found {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGSTOP);
            stopped.insert(pid);
        }
    }
    for pid in &stopped {
        let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    stopped.len()
}

async fn read_result(path: &Path) -> Option<String> {
    let file = tokio::fs::File::open(path).await.ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_RESULT_BYTES as u64 + 4).read_to_end(&mut bytes).await.ok()?;
    let text = truncate_result(String::from_utf8_lossy(&bytes).into_owned());
    let text = text.trim_end().to_owned();
    (!text.is_empty()).then_some(text)
}

/// Forward lines (at most [`MAX_LINE_BYTES`] each) from one pipe.
async fn pump(pipe: impl AsyncRead + Unpin, lines: mpsc::Sender<Vec<u8>>) {
    let mut reader = BufReader::new(pipe);
    loop {
        let mut line = Vec::new();
        match (&mut reader).take(MAX_LINE_BYTES).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if lines.send(line).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Write each line with its arrival time, up to `max_bytes` in all; then one line saying so, and
/// the rest is read and dropped (so the agent never blocks on a full pipe).
async fn write_output(mut lines: mpsc::Receiver<Vec<u8>>, mut file: tokio::fs::File, max_bytes: u64) {
    let stamp = || chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let mut written = file.metadata().await.map_or(0, |m| m.len());
    let mut truncated = false;
    while let Some(mut line) = lines.recv().await {
        if truncated {
            continue;
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        let stamp = stamp();
        let mut entry = Vec::with_capacity(stamp.len() + 1 + line.len());
        entry.extend_from_slice(stamp.as_bytes());
        entry.push(b' ');
        entry.extend_from_slice(&line);
        if written + entry.len() as u64 > max_bytes {
            truncated = true;
            entry =
                format!("{stamp} [oats] output truncated: the agent wrote more than {max_bytes} bytes\n").into_bytes();
        }
        written += entry.len() as u64;
        if file.write_all(&entry).await.is_err() {
            return;
        }
    }
    let _ = file.flush().await;
}
