//! Process control: the servers under test and the references, started through the test kit
//! (each binds port 0 and reports its address), pinned to a core when the run pins; and what
//! `/proc` says about a process.

use crate::Bench;
use anyhow::Result;
use oats_testkit::Process;
use std::{
    path::Path,
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// How long a server may take to become ready (10,000 Jobs in a watch cache, under valgrind).
const READY_WITHIN: Duration = Duration::from_secs(120);

impl Bench {
    /// `oats serve` with `env` and nothing of this program's environment that would configure it.
    pub(crate) async fn start_oats(&self, name: &str, env: &[(String, String)], pin: bool) -> Result<Process> {
        let mut command = self.command(&self.oats, pin.then_some(1));
        command.args(["serve", "--listen", "127.0.0.1:0"]);
        for (key, _) in std::env::vars() {
            if key.starts_with("OATS_") || key.starts_with("OTEL_") || key == "KUBECONFIG" || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command.env("OATS_SHUTDOWN_DELAY_SECONDS", "0").envs(env.iter().cloned());
        self.start(name, command).await
    }

    /// The bare poem reference with the bodies of OATS's answers.
    pub(crate) async fn start_bare(&self, job_body: &Path, list_body: &Path) -> Result<Process> {
        let mut command = self.command(&std::env::current_exe()?, self.pin.then_some(1));
        command.args(["bare-server", "--listen", "127.0.0.1:0"]);
        command.arg("--job-body").arg(job_body).arg("--list-body").arg(list_body);
        self.start("bare", command).await
    }

    /// The fake OpenAI-compatible upstream, on `cpu` when pinning.
    pub(crate) async fn start_fake(&self, name: &str, cpu: usize) -> Result<Process> {
        let mut command = self.command(&std::env::current_exe()?, self.pin.then_some(cpu));
        command.args(["fake-llm", "--listen", "127.0.0.1:0"]);
        self.start(name, command).await
    }

    /// `program`, under `taskset -c <cpu>` when given a CPU.
    fn command(&self, program: &Path, cpu: Option<usize>) -> Command {
        match cpu {
            Some(cpu) => {
                let mut command = Command::new("taskset");
                command.args(["-c", &cpu.to_string()]).arg(program);
                command
            }
            None => Command::new(program),
        }
    }

    async fn start(&self, name: &str, command: Command) -> Result<Process> {
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let log = self.work.join(format!("{name}-{}.log", STARTED.fetch_add(1, Ordering::Relaxed)));
        Ok(Process::start(command, &log, &self.http, READY_WITHIN).await?)
    }
}

pub(crate) fn local_env(dir: &Path) -> Vec<(String, String)> {
    vec![
        ("OATS_BACKEND".into(), "local".into()),
        ("OATS_STATE_DIR".into(), dir.display().to_string()),
        ("OATS_LOG_FORMAT".into(), "json".into()),
    ]
}

/// [`local_env`] for a state directory of preloaded jobs: finished long ago, they stay (no TTL
/// removal during the run) and are not archived (the history is off, so a server does not spend
/// the measured window archiving the whole preload; scenario 8 measures the history).
pub(crate) fn seeded_env(dir: &Path) -> Vec<(String, String)> {
    let mut env = local_env(dir);
    env.push(("OATS_TTL_SECONDS_AFTER_FINISHED".into(), "315360000".into()));
    env.push(("OATS_RETENTION_DAYS".into(), "0".into()));
    env
}

/// Resident memory a second after now.
pub(crate) async fn settled_rss(process: &Process) -> u64 {
    tokio::time::sleep(Duration::from_secs(1)).await;
    proc_status(process.pid() as i32, "VmRSS")
}

/// A field of `/proc/<pid>/status`, in KiB.
pub(crate) fn proc_status(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU seconds of a process (all its threads).
pub(crate) fn proc_cpu(pid: i32, clk_tck: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| rest.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clk_tck
}

/// Reset the peak resident set (`VmHWM`) so it covers only what follows.
pub(crate) fn reset_peak(pid: i32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}
