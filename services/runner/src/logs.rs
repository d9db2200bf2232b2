//! An attempt's log: workload output is split into lines, appended to
//! `output.log` (rotated into `output.log.<n>`, see [`segments`]) as it
//! arrives, and shipped from those files to job-service ([`shipper`]).
//!
//! Shipping reads the files by byte offset instead of keeping lines in
//! memory, so an unreachable job-service costs disk, not memory. Line
//! numbers are positions in the whole log (from 1), so a retried batch
//! carries the same numbers and job-service ignores what it already has.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

mod segments;
mod shipper;

pub use segments::{Batch, Cursor, LogFiles, LogLimits, Segment};
pub use shipper::{LogShipper, Shipped, SHIP_BATCH_LINES};

/// Longer output without a newline is split into lines of this size.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Lines attached to the final report.
pub const TAIL_LINES: usize = 50;
/// Each tail line is cut to this many characters in the report.
const TAIL_LINE_CHARS: usize = 2000;

/// Where a workload's output lines go. Cheap to clone; the log is complete
/// when every clone is dropped.
#[derive(Clone, Debug)]
pub struct OutputSink {
    tx: mpsc::Sender<String>,
    /// (a secret's value, what is written instead).
    redact: Arc<[(String, String)]>,
}

/// Secret values shorter than this are not redacted: they would match
/// ordinary words and numbers in the log.
pub const MIN_REDACTED_BYTES: usize = 6;

impl OutputSink {
    fn new(tx: mpsc::Sender<String>) -> Self {
        Self {
            tx,
            redact: Arc::new([]),
        }
    }

    /// A sink whose lines go nowhere.
    pub fn closed() -> Self {
        Self::new(mpsc::channel(1).0)
    }

    /// This sink, writing `[secret NAME]` wherever a line holds one of the
    /// `(name, value)` secrets: what a job prints of its secrets stays out
    /// of its log, on disk and in job-service.
    pub fn redacting(self, secrets: &[(String, String)]) -> Self {
        let mut redact: Vec<(String, String)> = secrets
            .iter()
            .filter(|(_, value)| value.len() >= MIN_REDACTED_BYTES)
            .map(|(name, value)| (value.clone(), format!("[secret {name}]")))
            .collect();
        // A secret that contains another is replaced first, whole.
        redact.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
        Self {
            tx: self.tx,
            redact: redact.into(),
        }
    }

    pub async fn line(&self, text: impl Into<String>) {
        let mut text = text.into();
        for (value, instead) in self.redact.iter() {
            if text.contains(value.as_str()) {
                text = text.replace(value.as_str(), instead);
            }
        }
        // Fails only when the writer is gone, i.e. the attempt is over.
        let _ = self.tx.send(text).await;
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

/// The task that appends output lines to the log's files.
pub struct LogWriter {
    /// Counts the whole log, rotated-away segments included.
    pub progress: watch::Receiver<Progress>,
    /// Where each part of the log is, for readers.
    pub files: LogFiles,
    tail: Arc<Mutex<VecDeque<String>>>,
    join: Option<JoinHandle<()>>,
}

impl LogWriter {
    /// Creates (truncates) `path` and starts the writer, which keeps the
    /// log within `limits`.
    pub async fn start(path: &Path, limits: LogLimits) -> std::io::Result<(OutputSink, LogWriter)> {
        let base = path.to_owned();
        let (files, file) = tokio::task::spawn_blocking(move || LogFiles::create(&base, limits))
            .await
            .map_err(std::io::Error::other)??;
        let (tx, mut rx) = mpsc::channel::<String>(1024);
        let (progress_tx, progress) = watch::channel(Progress::default());
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let tail_w = tail.clone();
        let mut appender = Appender {
            files: files.clone(),
            file: Some(tokio::fs::File::from_std(file)),
            in_segment: 0,
            segment_bytes: limits.segment_bytes(),
            path: path.to_owned(),
        };
        let join = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < 1024 {
                    match rx.try_recv() {
                        Ok(l) => batch.push(l),
                        Err(_) => break,
                    }
                }
                let (lines, bytes) = appender.append(&batch).await;
                if lines == 0 {
                    continue;
                }
                if let Ok(mut t) = tail_w.lock() {
                    for l in batch[..lines].iter().rev().take(TAIL_LINES).rev() {
                        if t.len() == TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(l.clone());
                    }
                }
                progress_tx.send_modify(|p| {
                    p.lines += lines as u64;
                    p.bytes += bytes;
                });
            }
        });
        Ok((
            OutputSink::new(tx),
            LogWriter {
                progress,
                files,
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

/// The writer task's file handling: appends and rotates.
struct Appender {
    files: LogFiles,
    /// `None` once writing or rotating failed: further output is dropped
    /// rather than failing the attempt.
    file: Option<tokio::fs::File>,
    /// Bytes in the current segment.
    in_segment: u64,
    segment_bytes: u64,
    path: std::path::PathBuf,
}

impl Appender {
    /// Appends `lines`, rotating wherever the next line would overflow the
    /// segment; returns how many of them (from the first) and how many bytes
    /// are on disk.
    async fn append(&mut self, lines: &[String]) -> (usize, u64) {
        let (mut done, mut bytes) = (0, 0u64);
        let mut buf = Vec::new();
        while done < lines.len() {
            let Some(file) = self.file.as_mut() else {
                break;
            };
            // A line longer than a whole segment still goes alone into one:
            // rotation must never lose output.
            let mut n = 0;
            buf.clear();
            for l in &lines[done..] {
                let len = (l.len() + 1) as u64;
                let used = self.in_segment + buf.len() as u64;
                if used > 0 && used + len > self.segment_bytes {
                    break;
                }
                buf.extend_from_slice(l.as_bytes());
                buf.push(b'\n');
                n += 1;
            }
            if n == 0 {
                self.rotate().await;
                continue;
            }
            // Flushed before the progress moves, so a reader never sees a
            // partial line within what the segment list counts.
            let written = async {
                file.write_all(&buf).await?;
                file.flush().await
            }
            .await;
            if let Err(e) = written {
                tracing::error!(path = %self.path.display(), error = %e,
                    "cannot write the attempt log; further output is dropped");
                self.file = None;
                break;
            }
            self.in_segment += buf.len() as u64;
            self.files.record(n as u64, buf.len() as u64);
            done += n;
            bytes += buf.len() as u64;
        }
        (done, bytes)
    }

    async fn rotate(&mut self) {
        self.file = None;
        let files = self.files.clone();
        match tokio::task::spawn_blocking(move || files.rotate()).await {
            Ok(Ok(file)) => {
                self.file = Some(tokio::fs::File::from_std(file));
                self.in_segment = 0;
            }
            Ok(Err(e)) => tracing::error!(path = %self.path.display(), error = %e,
                "cannot rotate the attempt log; further output is dropped"),
            Err(e) => tracing::error!(path = %self.path.display(), error = %e,
                "attempt log rotation failed; further output is dropped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn secrets_are_redacted_longest_first_and_short_ones_left() {
        let (tx, mut rx) = mpsc::channel(8);
        let sink = OutputSink::new(tx).redacting(&[
            ("short".into(), "abc".into()),
            ("key".into(), "tm-secret-1".into()),
            ("longer".into(), "tm-secret-123".into()),
        ]);
        sink.line("a=tm-secret-123 b=tm-secret-1 c=abc").await;
        assert_eq!(
            rx.recv().await.unwrap(),
            "a=[secret longer] b=[secret key] c=abc"
        );
    }

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
        let (sink, mut writer) = LogWriter::start(&path, LogLimits::default()).await.unwrap();
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
        let (sink, mut writer) = LogWriter::start(&path, LogLimits::default()).await.unwrap();
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
}
