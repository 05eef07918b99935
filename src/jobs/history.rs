//! Job history: what is kept of a finished job after its backend forgets it (a Kubernetes Job
//! removed by its TTL, a local job past `ttl_seconds_after_finished`), so reads keep answering.
//!
//! The domain owns the contract; the store implements it. The archiver (`archive.rs`) fills it,
//! the service reads from it when the backend no longer knows a job.

use super::{JobEvent, JobId, JobRecord, ListQuery, LogOptions, LogStream};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

/// A finished job as the archive keeps it.
#[derive(Debug, Clone)]
pub struct ArchivedJob {
    pub record: JobRecord,
    /// Newest first, as the events endpoint answers.
    pub events: Vec<JobEvent>,
    /// The output, each line prefixed by its RFC 3339 timestamp and a space (so `since_seconds`
    /// and `timestamps` still apply), at most `archive_log_bytes`: the tail when longer.
    pub logs: Vec<u8>,
    /// Whether the head of a longer output was dropped.
    pub logs_truncated: bool,
}

/// Why the history could not answer.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The database cannot be reached now; the call may succeed later.
    #[error("the job history is unavailable: {0}")]
    Unavailable(String),
    /// A stored row cannot be read back (written by an incompatible build, or damaged).
    #[error("archived job {id} cannot be read: {message}")]
    Corrupt { id: String, message: String },
}

/// Where finished jobs are kept. Every write is idempotent: archiving a job twice (two replicas,
/// a retry after a crash) leaves one row.
#[async_trait]
pub trait JobHistory: Send + Sync {
    /// Take the right to archive `id` for `lease`, unless another holder's lease is still running.
    /// The holder that wins archives; a crashed holder's lease runs out and another takes over.
    async fn claim(&self, id: &JobId, holder: &str, lease: Duration) -> Result<bool, HistoryError>;

    /// Keep `job` (once; a second call for the same id changes nothing) and release its claim.
    /// Whether this call stored it (`false`: it was archived already).
    async fn archive(&self, job: &ArchivedJob) -> Result<bool, HistoryError>;

    /// Which of `ids` are archived.
    async fn archived_among(&self, ids: &[JobId]) -> Result<HashSet<JobId>, HistoryError>;

    async fn record(&self, id: &JobId) -> Result<Option<Arc<JobRecord>>, HistoryError>;

    /// Up to `query.limit + 1` archived jobs after the query's page token, newest first, that
    /// match its status and selector, of `tenant` (or of every tenant).
    async fn page(&self, tenant: Option<&str>, query: &ListQuery) -> Result<Vec<Arc<JobRecord>>, HistoryError>;

    async fn events(&self, id: &JobId) -> Result<Option<Vec<JobEvent>>, HistoryError>;

    /// The archived output (timestamped lines), if the job is archived.
    async fn logs(&self, id: &JobId) -> Result<Option<Vec<u8>>, HistoryError>;

    /// The creation time of the newest archived job, if any.
    async fn newest_created(&self) -> Result<Option<DateTime<Utc>>, HistoryError>;

    /// Forget jobs that finished before `finished_before`; how many went.
    async fn purge(&self, finished_before: DateTime<Utc>) -> Result<u64, HistoryError>;
}

/// The creation time of the newest job the history held when this server started (jobs the
/// backend forgets since are the backend's `newest_departed`): a list page of live jobs all newer
/// than both needs nothing from the history.
#[derive(Debug, Default)]
pub struct HistoryHorizon(AtomicI64);

impl HistoryHorizon {
    /// Nanoseconds since the epoch; 0: nothing yet.
    pub fn raise(&self, created_at: DateTime<Utc>) {
        self.0.fetch_max(created_at.timestamp_nanos_opt().unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Unknown (e.g. the history could not be read at start): every list asks the history.
    pub fn raise_to_unknown(&self) {
        self.0.store(i64::MAX, Ordering::Relaxed);
    }

    /// Whether the history may hold a job created at or after `time` that the backend does not.
    pub fn may_hold_newer_than(&self, time: DateTime<Utc>) -> bool {
        self.0.load(Ordering::Relaxed) >= time.timestamp_nanos_opt().unwrap_or(i64::MAX)
    }
}

/// Serve archived output as the live endpoints would: the lines since `since_seconds`, the last
/// `tail_lines` of those, with or without their timestamps. Following ends with the output: the
/// job has finished.
pub fn archived_log_stream(logs: Vec<u8>, options: &LogOptions, now: DateTime<Utc>) -> LogStream {
    let since = options.since_seconds.map(|s| now - chrono::Duration::seconds(s.into()));
    let mut lines: Vec<&[u8]> = logs
        .split_inclusive(|b| *b == b'\n')
        .filter(|line| since.is_none_or(|since| stamp_of(line).is_none_or(|t| t >= since)))
        .collect();
    if let Some(tail) = options.tail_lines {
        let skip = lines.len().saturating_sub(tail as usize);
        lines.drain(..skip);
    }
    let mut out = Vec::with_capacity(logs.len());
    for line in lines {
        out.extend_from_slice(if options.timestamps { line } else { without_stamp(line) });
    }
    futures::stream::iter([Ok(bytes::Bytes::from(out))]).boxed()
}

fn stamp_of(line: &[u8]) -> Option<DateTime<Utc>> {
    let end = line.iter().position(|b| *b == b' ')?;
    let text = std::str::from_utf8(&line[..end]).ok()?;
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc))
}

fn without_stamp(line: &[u8]) -> &[u8] {
    match line.iter().position(|b| *b == b' ') {
        Some(i) if stamp_of(line).is_some() => &line[i + 1..],
        _ => line,
    }
}

/// The last `limit` bytes of a stream of output, cut at a line start when the head was dropped.
/// Memory stays within twice the limit however long the output is.
#[derive(Debug)]
pub struct OutputTail {
    limit: usize,
    bytes: Vec<u8>,
    dropped: bool,
}

impl OutputTail {
    pub fn new(limit: usize) -> Self {
        Self { limit, bytes: Vec::new(), dropped: false }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > 2 * self.limit.max(4096) {
            self.keep_tail();
        }
    }

    /// The kept bytes, and whether anything was dropped.
    pub fn finish(mut self) -> (Vec<u8>, bool) {
        self.keep_tail();
        (self.bytes, self.dropped)
    }

    fn keep_tail(&mut self) {
        if self.bytes.len() <= self.limit {
            return;
        }
        let cut = self.bytes.len() - self.limit;
        // Start at the first whole line inside the kept part (a line longer than the limit is
        // kept as its last bytes).
        let at_line_start = self.bytes[cut - 1] == b'\n';
        let start = match self.bytes[cut..].iter().position(|b| *b == b'\n') {
            _ if at_line_start => cut,
            Some(i) if cut + i + 1 < self.bytes.len() => cut + i + 1,
            _ => cut,
        };
        self.bytes.drain(..start);
        self.dropped = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(stream: LogStream) -> String {
        let chunks: Vec<_> = futures::executor::block_on(stream.collect::<Vec<_>>());
        chunks.into_iter().map(|c| String::from_utf8(c.unwrap().to_vec()).unwrap()).collect()
    }

    const LOGS: &str = "2026-12-01T10:00:00Z first\n2026-12-01T10:00:30Z second\n2026-12-01T10:01:00Z third\n";

    fn options(tail_lines: Option<u32>, since_seconds: Option<u32>, timestamps: bool) -> LogOptions {
        LogOptions { tail_lines, since_seconds, timestamps, follow: false }
    }

    #[test]
    fn archived_logs_answer_like_live_ones() {
        let now: DateTime<Utc> = "2026-12-01T10:01:10Z".parse().unwrap();
        let all = |o| text(archived_log_stream(LOGS.as_bytes().to_vec(), &o, now));
        assert_eq!(all(options(None, None, true)), LOGS);
        assert_eq!(all(options(None, None, false)), "first\nsecond\nthird\n");
        assert_eq!(all(options(Some(2), None, false)), "second\nthird\n");
        assert_eq!(all(options(None, Some(45), false)), "second\nthird\n");
        assert_eq!(all(options(Some(1), Some(45), true)), "2026-12-01T10:01:00Z third\n");
    }

    #[test]
    fn the_tail_of_a_long_output_starts_at_a_line() {
        for (limit, kept) in [(10, &b"cccc\ndddd\n"[..]), (8, b"dddd\n"), (3, b"dd\n")] {
            let mut tail = OutputTail::new(limit);
            for line in ["aaaa\n", "bbbb\n", "cccc\n", "dddd\n"] {
                tail.push(line.as_bytes());
            }
            assert_eq!(tail.finish(), (kept.to_vec(), true), "limit {limit}");
        }

        let mut short = OutputTail::new(100);
        short.push(b"one\ntwo\n");
        assert_eq!(short.finish(), (b"one\ntwo\n".to_vec(), false));
    }

    #[test]
    fn a_huge_output_keeps_bounded_memory_and_its_last_bytes() {
        let limit = 64 * 1024;
        let mut tail = OutputTail::new(limit);
        let line = [b'x'; 99].iter().copied().chain([b'\n']).collect::<Vec<u8>>();
        for i in 0..500_000 {
            tail.push(&line);
            assert!(tail.bytes.len() <= 2 * limit + line.len(), "grew to {} at line {i}", tail.bytes.len());
        }
        let (kept, dropped) = tail.finish();
        assert!(dropped);
        assert!(kept.len() <= limit && kept.len() > limit - 100);
        assert!(kept.ends_with(b"x\n") && kept.starts_with(b"x"));
    }
}
