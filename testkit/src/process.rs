//! A server process started on port 0: it reports the addresses it bound in a file, and is
//! ready when `GET /readyz` on its `api` address answers.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

/// The variable (and `oats serve --addresses-file`) naming the file a server writes its bound
/// addresses to, one `NAME ADDRESS` line per listener, once all are bound.
pub const ADDRESSES_FILE_ENV: &str = "OATS_ADDRESSES_FILE";

/// How often the start polls for the addresses file and for readiness.
const POLL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("the server exited ({status}) before it was ready; its log ends:\n{log}")]
    Exited { status: ExitStatus, log: String },
    #[error("the server was not ready within {within:?}; its log ends:\n{log}")]
    NotReady { within: Duration, log: String },
    #[error("the server's addresses file has no `api` line: {text:?}")]
    NoApiAddress { text: String },
}

/// A server process, killed when dropped.
pub struct Process {
    child: Child,
    addresses: Vec<(String, SocketAddr)>,
    log: PathBuf,
    ready_after: Duration,
}

impl Process {
    /// Start `command` (stderr to `log`), telling it to write its addresses to `<log>.addresses`;
    /// wait until it has, then until its `api` address answers `GET /readyz` with a 2xx.
    pub async fn start(
        mut command: Command,
        log: &Path,
        http: &reqwest::Client,
        within: Duration,
    ) -> Result<Self, StartError> {
        let addresses_file = log.with_extension("addresses");
        let _ = std::fs::remove_file(&addresses_file);
        let program = command.get_program().to_string_lossy().into_owned();
        let spawn_error = |source| StartError::Spawn { program: program.clone(), source };
        let log_file = std::fs::File::create(log).map_err(spawn_error)?;
        let started = Instant::now();
        let child = command
            .env(ADDRESSES_FILE_ENV, &addresses_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(spawn_error)?;
        let mut process = Self { child, addresses: Vec::new(), log: log.to_owned(), ready_after: Duration::ZERO };
        let deadline = started + within;
        loop {
            if process.addresses.is_empty()
                && let Ok(text) = std::fs::read_to_string(&addresses_file)
            {
                process.addresses = read_addresses(&text);
                if process.address("api").is_none() {
                    return Err(StartError::NoApiAddress { text });
                }
            }
            if !process.addresses.is_empty() {
                let answer = http.get(process.url("/readyz")).timeout(Duration::from_secs(2)).send().await;
                if answer.is_ok_and(|r| r.status().is_success()) {
                    process.ready_after = started.elapsed();
                    return Ok(process);
                }
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                return Err(StartError::Exited { status, log: process.log_tail(20) });
            }
            if Instant::now() > deadline {
                return Err(StartError::NotReady { within, log: process.log_tail(20) });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Where the listener `name` (`api`, `metrics`, `llm`) is bound, if the server has it.
    pub fn address(&self, name: &str) -> Option<SocketAddr> {
        self.addresses.iter().find(|(n, _)| n == name).map(|(_, address)| *address)
    }

    /// The API's address.
    pub fn api(&self) -> SocketAddr {
        self.address("api").expect("checked at start")
    }

    /// `http://<api address><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How long after its spawn the server first answered ready.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Send SIGTERM, as an orchestrator stops a server.
    pub fn terminate(&self) {
        let _ = Command::new("kill").arg(self.pid().to_string()).status();
    }

    /// Wait (up to `within`) for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Wait for the process to exit, however long it takes.
    pub fn wait(&mut self) {
        let _ = self.child.wait();
    }

    /// Kill the process (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `NAME ADDRESS` lines of an addresses file.
fn read_addresses(text: &str) -> Vec<(String, SocketAddr)> {
    text.lines()
        .filter_map(|line| {
            let (name, address) = line.split_once(' ')?;
            Some((name.to_owned(), address.trim().parse().ok()?))
        })
        .collect()
}
