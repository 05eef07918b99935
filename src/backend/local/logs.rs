//! Reading (and following) a local job's output file.

use crate::jobs::{LogOptions, LogStream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use std::{io::SeekFrom, path::PathBuf, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncSeekExt},
    sync::mpsc,
};

/// How often a followed file is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// Stream the selected lines; with `follow`, keep streaming new lines until `finished()` is true
/// and everything written before that has been sent.
pub fn read(path: PathBuf, options: LogOptions, finished: impl Fn() -> bool + Send + 'static) -> LogStream {
    let (sender, receiver) = mpsc::channel::<std::io::Result<Bytes>>(16);
    tokio::spawn(async move {
        let since = options.since_seconds.map(|s| Utc::now() - chrono::Duration::seconds(i64::from(s)));
        let mut offset = 0u64;
        let mut first = true;
        loop {
            let done = !options.follow || finished();
            let (chunk, consumed) = match read_complete_lines(&path, offset).await {
                Ok(read) => read,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
                Err(e) => {
                    let _ = sender.send(Err(e)).await;
                    return;
                }
            };
            offset += consumed;
            let mut lines: Vec<&[u8]> = chunk.split_inclusive(|b| *b == b'\n').collect();
            if first {
                if let Some(since) = since {
                    lines.retain(|line| stamp_of(line).is_some_and(|t| t >= since));
                }
                if let Some(tail) = options.tail_lines {
                    lines.drain(..lines.len().saturating_sub(tail as usize));
                }
                first = false;
            }
            let text: Vec<u8> = lines.iter().flat_map(|line| render(line, options.timestamps)).copied().collect();
            if !text.is_empty() && sender.send(Ok(Bytes::from(text))).await.is_err() {
                return; // the client went away
            }
            if done {
                return;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    });
    futures::stream::unfold(receiver, |mut r| async move { r.recv().await.map(|item| (item, r)) }).boxed()
}

/// Bytes from `offset` up to the last newline, and how many bytes that is.
async fn read_complete_lines(path: &PathBuf, offset: u64) -> std::io::Result<(Vec<u8>, u64)> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(SeekFrom::Start(offset)).await?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).await?;
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    bytes.truncate(complete);
    Ok((bytes, complete as u64))
}

fn stamp_of(line: &[u8]) -> Option<DateTime<Utc>> {
    let end = line.iter().position(|b| *b == b' ')?;
    let text = std::str::from_utf8(&line[..end]).ok()?;
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc))
}

fn render(line: &[u8], timestamps: bool) -> &[u8] {
    if timestamps {
        return line;
    }
    match line.iter().position(|b| *b == b' ') {
        Some(i) => &line[i + 1..],
        None => line,
    }
}
