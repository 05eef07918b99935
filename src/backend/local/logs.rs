//! Reading (and following) a local job's output file.
//!
//! Memory is bounded by what is sent, never by the size of the log: `tail_lines` finds where the
//! last lines start by reading the file backwards, and the file is streamed in chunks.

use crate::jobs::{LogOptions, LogStream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use std::{io::SeekFrom, path::PathBuf, time::Duration};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt},
    sync::mpsc,
};

/// How often a followed file is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// Bytes read at a time, backwards (the tail) and forwards (what is sent). A chunk always holds a
/// whole line: lines are at most [`super::process::MAX_LINE_BYTES`] plus their timestamp.
const CHUNK: usize = 64 * 1024;

/// Stream the selected lines; with `follow`, keep streaming new lines until `finished()` is true
/// and everything written before that has been sent.
pub fn read(path: PathBuf, options: LogOptions, finished: impl Fn() -> bool + Send + 'static) -> LogStream {
    let (sender, receiver) = mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::spawn(async move {
        let since = options.since_seconds.map(|s| Utc::now() - chrono::Duration::seconds(i64::from(s)));
        let mut offset: Option<u64> = None;
        loop {
            let done = !options.follow || finished();
            let mut file = match tokio::fs::File::open(&path).await {
                Ok(file) => Some(file),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    let _ = sender.send(Err(e)).await;
                    return;
                }
            };
            if let Some(file) = &mut file {
                let start = match offset {
                    Some(offset) => offset,
                    None => match options.tail_lines {
                        Some(lines) => tail_start(file, lines as usize).await,
                        None => Ok(0),
                    }
                    .unwrap_or(0),
                };
                // Send every complete line from `start`, a chunk at a time.
                let mut position = start;
                loop {
                    let chunk = match read_complete_lines(file, position).await {
                        Ok(chunk) => chunk,
                        Err(e) => {
                            let _ = sender.send(Err(e)).await;
                            return;
                        }
                    };
                    if chunk.is_empty() {
                        break;
                    }
                    position += chunk.len() as u64;
                    let text: Vec<u8> = chunk
                        .split_inclusive(|b| *b == b'\n')
                        .filter(|line| since.is_none_or(|since| stamp_of(line).is_some_and(|t| t >= since)))
                        .flat_map(|line| render(line, options.timestamps))
                        .copied()
                        .collect();
                    if !text.is_empty() && sender.send(Ok(Bytes::from(text))).await.is_err() {
                        return; // the client went away
                    }
                }
                offset = Some(position);
            }
            if done {
                return;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    });
    futures::stream::unfold(receiver, |mut r| async move { r.recv().await.map(|item| (item, r)) }).boxed()
}

/// Where the last `lines` complete lines of the file start, found by reading it backwards from
/// its end: it reads about as many bytes as those lines hold (plus at most a chunk, and a line
/// still being written).
async fn tail_start<F: AsyncRead + AsyncSeek + Unpin>(file: &mut F, lines: usize) -> std::io::Result<u64> {
    let end = file.seek(SeekFrom::End(0)).await?;
    let mut block = vec![0u8; CHUNK];
    let mut position = end;
    // Newlines seen from the end: the first ends the last complete line, the one after the
    // `lines`-th ends the line before the tail.
    let mut newlines = 0usize;
    while position > 0 {
        let size = CHUNK.min(position as usize);
        position -= size as u64;
        file.seek(SeekFrom::Start(position)).await?;
        file.read_exact(&mut block[..size]).await?;
        for (i, byte) in block[..size].iter().enumerate().rev() {
            if *byte == b'\n' {
                newlines += 1;
                if newlines == lines + 1 {
                    return Ok(position + i as u64 + 1);
                }
            }
        }
    }
    Ok(0)
}

/// The complete lines from `offset`, at most about a chunk of them (empty at the end of the file
/// or when only an unfinished line is left).
async fn read_complete_lines<F: AsyncRead + AsyncSeek + Unpin>(file: &mut F, offset: u64) -> std::io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(offset)).await?;
    let mut bytes = vec![0u8; CHUNK];
    let mut filled = 0;
    while filled < CHUNK {
        match file.read(&mut bytes[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    let complete = bytes[..filled].iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    bytes.truncate(complete);
    Ok(bytes)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::Cursor,
        pin::Pin,
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
        task::{Context, Poll},
    };

    /// A file that counts the bytes read from it.
    struct Counted {
        inner: Cursor<Vec<u8>>,
        read: Arc<AtomicU64>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let result = Pin::new(&mut self.inner).poll_read(cx, buf);
            self.read.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
            result
        }
    }

    impl AsyncSeek for Counted {
        fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
            Pin::new(&mut self.inner).start_seek(position)
        }
        fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
            Pin::new(&mut self.inner).poll_complete(cx)
        }
    }

    fn log(lines: usize) -> Vec<u8> {
        (0..lines)
            .flat_map(|i| format!("2026-12-01T00:00:00.000000000Z line {i} {}\n", "x".repeat(i % 300)).into_bytes())
            .collect()
    }

    #[tokio::test]
    async fn the_tail_is_found_from_the_end_reading_little_more_than_it() {
        let text = log(200_000); // ~37 MB
        let read = Arc::new(AtomicU64::new(0));
        let mut file = Counted { inner: Cursor::new(text.clone()), read: read.clone() };
        let start = tail_start(&mut file, 3).await.unwrap() as usize;
        let expected: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').rev().take(3).collect();
        let tail: usize = expected.iter().map(|l| l.len()).sum();
        assert_eq!(start, text.len() - tail);
        assert!(read.load(Ordering::Relaxed) <= (tail + CHUNK) as u64, "read {} bytes", read.load(Ordering::Relaxed));

        // Edge cases: more lines than the file has, none, and an unfinished last line.
        assert_eq!(tail_start(&mut Cursor::new(log(5)), 10).await.unwrap(), 0);
        assert_eq!(tail_start(&mut Cursor::new(Vec::new()), 3).await.unwrap(), 0);
        let mut unfinished = log(3);
        let whole = unfinished.len() as u64;
        unfinished.extend_from_slice(b"2026-12-01T00:00:00Z half a li");
        let last = log(3).split_inclusive(|b| *b == b'\n').next_back().unwrap().len() as u64;
        assert_eq!(tail_start(&mut Cursor::new(unfinished), 1).await.unwrap(), whole - last);
        // Lines across chunk boundaries.
        let text = log(5_000);
        for lines in [1, 2, 77, 1_000, 4_999, 5_000] {
            let start = tail_start(&mut Cursor::new(text.clone()), lines).await.unwrap() as usize;
            let tail = text.split_inclusive(|b| *b == b'\n').rev().take(lines).map(<[u8]>::len).sum::<usize>();
            assert_eq!(start, text.len() - tail, "{lines} lines");
        }
    }

    #[tokio::test]
    async fn a_large_log_is_streamed_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let text = log(50_000);
        std::fs::write(&path, &text).unwrap();
        let options = LogOptions { tail_lines: None, since_seconds: None, timestamps: true, follow: false };
        let chunks: Vec<Bytes> = read(path.clone(), options, || true).map(|c| c.unwrap()).collect().await;
        assert!(chunks.len() > 10 && chunks.iter().all(|c| c.len() <= CHUNK), "{} chunks", chunks.len());
        assert_eq!(chunks.concat(), text);
        let options = LogOptions { tail_lines: Some(2), since_seconds: None, timestamps: false, follow: false };
        let tail: Vec<Bytes> = read(path, options, || true).map(|c| c.unwrap()).collect().await;
        let expected = format!("line 49998 {}\nline 49999 {}\n", "x".repeat(49_998 % 300), "x".repeat(49_999 % 300));
        assert_eq!(tail.concat(), expected.as_bytes());
    }
}
