//! An attempt's log: workload output is split into lines, appended to
//! `output.log` as it arrives, and shipped from that file to job-service.
//!
//! Shipping reads the file by byte offset instead of keeping lines in
//! memory, so an unreachable job-service costs disk, not memory. Line
//! numbers are positions in the file (from 1), so a retried batch carries
//! the same numbers and job-service ignores what it already has.

use std::collections::VecDeque;
use std::io::{BufRead, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use trainmesh_common::client::Channel;
use trainmesh_common::proto::job::v1::job_internal_service_client::JobInternalServiceClient;
use trainmesh_common::proto::job::v1::{AppendJobLogsRequest, LogLine};

use crate::domain::AttemptKey;
use crate::rpc::{is_permanent, request, Backoff, CALL_TIMEOUT};

/// Longer output without a newline is split into lines of this size.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Lines attached to the final report.
pub const TAIL_LINES: usize = 50;
/// Each tail line is cut to this many characters in the report.
const TAIL_LINE_CHARS: usize = 2000;
pub const SHIP_BATCH_LINES: usize = 500;
const SHIP_BATCH_BYTES: usize = 1024 * 1024;

/// Where a workload's output lines go. Cheap to clone; the log is complete
/// when every clone is dropped.
#[derive(Clone, Debug)]
pub struct OutputSink(mpsc::Sender<String>);

impl OutputSink {
    /// A sink whose lines go nowhere.
    pub fn closed() -> Self {
        OutputSink(mpsc::channel(1).0)
    }

    pub async fn line(&self, text: impl Into<String>) {
        // Fails only when the writer is gone, i.e. the attempt is over.
        let _ = self.0.send(text.into()).await;
    }
}

/// Turns one raw line into text: no line ending, and for a line redrawn
/// with carriage returns (progress bars) only what a terminal would show
/// last.
pub fn clean_line(raw: &[u8]) -> String {
    let mut raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    while let Some(r) = raw.strip_suffix(b"\r") {
        raw = r;
    }
    if let Some(i) = raw.iter().rposition(|b| *b == b'\r') {
        raw = &raw[i + 1..];
    }
    String::from_utf8_lossy(raw).into_owned()
}

/// Copies `reader` into `sink` line by line until end of file.
pub async fn pump_lines<R: AsyncRead + Unpin>(reader: R, sink: OutputSink) {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut reader)
            .take(MAX_LINE_BYTES as u64)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) => return,
            Ok(_) => sink.line(clean_line(&buf)).await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the workload's output");
                return;
            }
        }
    }
}

/// How much of the log is on disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub lines: u64,
    pub bytes: u64,
}

/// The task that appends output lines to `output.log`.
pub struct LogWriter {
    pub progress: watch::Receiver<Progress>,
    tail: Arc<Mutex<VecDeque<String>>>,
    join: Option<JoinHandle<()>>,
}

impl LogWriter {
    /// Creates (truncates) `path` and starts the writer.
    pub async fn start(path: &Path) -> std::io::Result<(OutputSink, LogWriter)> {
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .await?;
        let (tx, mut rx) = mpsc::channel::<String>(1024);
        let (progress_tx, progress) = watch::channel(Progress::default());
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let tail_w = tail.clone();
        let path = path.to_owned();
        let join = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut broken = false;
            while let Some(first) = rx.recv().await {
                buf.clear();
                let mut batch = vec![first];
                while batch.len() < 1024 {
                    match rx.try_recv() {
                        Ok(l) => batch.push(l),
                        Err(_) => break,
                    }
                }
                for l in &batch {
                    buf.extend_from_slice(l.as_bytes());
                    buf.push(b'\n');
                }
                if broken {
                    continue;
                }
                // Flushed before the progress moves, so a reader never
                // sees a partial line within `progress.bytes`.
                let written = async {
                    file.write_all(&buf).await?;
                    file.flush().await
                }
                .await;
                if let Err(e) = written {
                    tracing::error!(path = %path.display(), error = %e,
                        "cannot write the attempt log; further output is dropped");
                    broken = true;
                    continue;
                }
                if let Ok(mut t) = tail_w.lock() {
                    for l in batch.iter().rev().take(TAIL_LINES).rev() {
                        if t.len() == TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(l.clone());
                    }
                }
                progress_tx.send_modify(|p| {
                    p.lines += batch.len() as u64;
                    p.bytes += buf.len() as u64;
                });
            }
        });
        Ok((
            OutputSink(tx),
            LogWriter {
                progress,
                tail,
                join: Some(join),
            },
        ))
    }

    /// Resolves when every sink is dropped and everything is on disk.
    pub async fn finished(&mut self) {
        if let Some(j) = self.join.take() {
            let _ = j.await;
        }
    }

    /// The last lines written, each cut to a reportable length.
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .map(|t| {
                t.iter()
                    .map(|l| match l.char_indices().nth(TAIL_LINE_CHARS) {
                        Some((i, _)) => format!("{}…", &l[..i]),
                        None => l.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Reads the complete lines of `path` in `[offset, end)`, at most
/// `max_lines`/`max_bytes`; returns them and the offset after the last.
pub fn read_lines(
    path: &Path,
    offset: u64,
    end: u64,
    max_lines: usize,
    max_bytes: usize,
) -> std::io::Result<(Vec<String>, u64)> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = std::io::BufReader::new(std::io::Read::take(file, end - offset));
    let mut lines = Vec::new();
    let mut pos = offset;
    let mut bytes = 0;
    let mut buf = Vec::new();
    while lines.len() < max_lines && bytes < max_bytes {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            break;
        }
        pos += n as u64;
        bytes += n;
        lines.push(String::from_utf8_lossy(&buf[..n - 1]).into_owned());
    }
    Ok((lines, pos))
}

/// The last `max_bytes` of the log as text, starting at a line boundary.
pub fn read_tail_text(path: &Path, max_bytes: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let start = len.saturating_sub(max_bytes);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes)?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(match (start, text.find('\n')) {
            (0, _) | (_, None) => text,
            (_, Some(i)) => text[i + 1..].to_owned(),
        })
    };
    read().unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "cannot read the attempt log");
        String::new()
    })
}

/// What a shipper got done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shipped {
    /// Lines (or records) acknowledged.
    pub count: u64,
    /// False when it gave up before everything was acknowledged.
    pub complete: bool,
}

/// Ships `output.log` to job-service while the attempt runs, and all of it
/// once `finish` names a deadline.
pub struct LogShipper {
    pub client: JobInternalServiceClient<Channel>,
    pub key: AttemptKey,
    pub path: PathBuf,
    pub interval: Duration,
    pub max_backoff: Duration,
}

impl LogShipper {
    /// `finish` turns `Some(deadline)` when the log is complete: ship the
    /// rest, giving up at the deadline.
    pub async fn run(
        self,
        mut progress: watch::Receiver<Progress>,
        mut finish: watch::Receiver<Option<Instant>>,
    ) -> Shipped {
        let mut offset = 0u64;
        let mut shipped = 0u64;
        let mut pending: Option<(Vec<LogLine>, u64)> = None;
        let mut backoff = Backoff::new(Duration::from_millis(100), self.max_backoff);
        let mut writer_alive = true;
        loop {
            let deadline = *finish.borrow();
            let available = progress.borrow().bytes;
            if pending.is_none() && available > offset {
                let path = self.path.clone();
                let start = offset;
                let read = tokio::task::spawn_blocking(move || {
                    read_lines(&path, start, available, SHIP_BATCH_LINES, SHIP_BATCH_BYTES)
                })
                .await;
                match read {
                    Ok(Ok((lines, end))) if !lines.is_empty() => {
                        let first = shipped as i64 + 1;
                        let lines = lines
                            .into_iter()
                            .enumerate()
                            .map(|(i, text)| LogLine {
                                attempt: self.key.attempt,
                                number: first + i as i64,
                                text,
                            })
                            .collect();
                        pending = Some((lines, end));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot read the attempt log; log shipping stops");
                        return Shipped {
                            count: shipped,
                            complete: false,
                        };
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "log reader failed; log shipping stops");
                        return Shipped {
                            count: shipped,
                            complete: false,
                        };
                    }
                }
            }

            if let Some((lines, end)) = &pending {
                let n = lines.len();
                let req = AppendJobLogsRequest {
                    job_id: self.key.job_id.to_string(),
                    attempt: self.key.attempt,
                    lines: lines.clone(),
                };
                match self
                    .client
                    .clone()
                    .append_job_logs(request(req, CALL_TIMEOUT))
                    .await
                {
                    Ok(_) => {
                        offset = *end;
                        shipped += n as u64;
                        pending = None;
                        backoff.reset();
                        if n == SHIP_BATCH_LINES || deadline.is_some() {
                            continue;
                        }
                    }
                    Err(s) if is_permanent(s.code()) => {
                        tracing::warn!(code = ?s.code(), detail = s.message(),
                            "job-service refused the attempt's log lines; log shipping stops");
                        return Shipped {
                            count: shipped,
                            complete: false,
                        };
                    }
                    Err(s) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(code = ?s.code(), detail = s.message(),
                            retry_in_ms = delay.as_millis() as u64, "cannot ship log lines; will retry");
                        if deadline.is_some_and(|d| Instant::now() + delay > d) {
                            tracing::warn!(
                                "flush deadline reached; the rest of the log stays on the runner"
                            );
                            return Shipped {
                                count: shipped,
                                complete: false,
                            };
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = finish.changed(), if deadline.is_none() => {}
                        }
                        continue;
                    }
                }
            }

            if deadline.is_some() && pending.is_none() && offset >= progress.borrow().bytes {
                return Shipped {
                    count: shipped,
                    complete: true,
                };
            }
            let target = shipped + SHIP_BATCH_LINES as u64;
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                r = progress.wait_for(|p| p.lines >= target), if writer_alive => {
                    if r.is_err() {
                        writer_alive = false;
                    }
                }
                _ = finish.changed(), if deadline.is_none() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_line_strips_endings_and_keeps_the_last_redraw() {
        assert_eq!(clean_line(b"hello\n"), "hello");
        assert_eq!(clean_line(b"hello\r\n"), "hello");
        assert_eq!(clean_line(b" 10%|#\r 50%|##\r100%|###\r\n"), "100%|###");
        assert_eq!(clean_line(b"no newline"), "no newline");
        assert_eq!(clean_line(b"bad \xff byte\n"), "bad \u{fffd} byte");
    }

    #[tokio::test]
    async fn writer_appends_lines_and_keeps_a_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let (sink, mut writer) = LogWriter::start(&path).await.unwrap();
        for i in 0..60 {
            sink.line(format!("line {i}")).await;
        }
        drop(sink);
        writer.finished().await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 60);
        assert!(text.ends_with("line 59\n"));
        let tail = writer.tail();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[0], "line 10");
        assert_eq!(writer.progress.borrow().lines, 60);
        assert_eq!(writer.progress.borrow().bytes, text.len() as u64);
    }

    #[tokio::test]
    async fn pump_splits_lines_and_over_long_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let (sink, mut writer) = LogWriter::start(&path).await.unwrap();
        let long = "x".repeat(MAX_LINE_BYTES + 10);
        let input = format!("a\nb\r\n{long}\nlast");
        pump_lines(input.as_bytes(), sink).await;
        writer.finished().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[..2], ["a", "b"]);
        assert_eq!(lines[2].len(), MAX_LINE_BYTES);
        assert_eq!(lines[3].len(), 10);
        assert_eq!(lines[4], "last");
    }

    #[test]
    fn read_lines_stops_at_limits_and_partial_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        std::fs::write(&path, "one\ntwo\nthree\nfour").unwrap();
        let (lines, end) = read_lines(&path, 0, 18, 2, 1024).unwrap();
        assert_eq!(lines, ["one", "two"]);
        assert_eq!(end, 8);
        let (lines, end) = read_lines(&path, end, 18, 10, 1024).unwrap();
        assert_eq!(lines, ["three"]);
        assert_eq!(end, 14);
    }

    #[test]
    fn tail_text_starts_at_a_line_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        std::fs::write(&path, "first line\nsecond\nthird\n").unwrap();
        assert_eq!(read_tail_text(&path, 10), "third\n");
        assert_eq!(read_tail_text(&path, 1000), "first line\nsecond\nthird\n");
        assert_eq!(read_tail_text(&dir.path().join("missing"), 10), "");
    }
}
