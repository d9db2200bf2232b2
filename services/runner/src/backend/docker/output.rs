//! A container's output, from the engine's log stream into the attempt's
//! sink, line by line.
//!
//! The engine sends stdout and stderr as frames that need not end at a
//! line: its json-file driver splits long lines into 16 KiB pieces. Each
//! stream keeps its partial line until the rest arrives. Frames are read
//! with their timestamps, so that what a follow missed at the end can be
//! read again without reading the whole log twice.

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptions;
use bollard::Docker;
use futures::StreamExt;

use crate::logs::{clean_line, OutputSink, MAX_LINE_BYTES};

/// Splits one stream's bytes into lines.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// The complete lines in `bytes` (with what came before), without
    /// their endings; longer lines are cut every [`MAX_LINE_BYTES`], as the
    /// process backend cuts them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(bytes);
        let mut lines = Vec::new();
        let mut start = 0;
        loop {
            let rest = &self.partial[start..];
            let window = &rest[..rest.len().min(MAX_LINE_BYTES)];
            if let Some(i) = window.iter().position(|b| *b == b'\n') {
                lines.push(clean_line(&rest[..=i]));
                start += i + 1;
            } else if window.len() == MAX_LINE_BYTES {
                lines.push(clean_line(window));
                start += MAX_LINE_BYTES;
            } else {
                break;
            }
        }
        self.partial.drain(..start);
        lines
    }

    /// What is left at the end of the stream: a last line without a
    /// newline.
    pub fn finish(&mut self) -> Option<String> {
        if self.partial.is_empty() {
            return None;
        }
        let line = clean_line(&self.partial);
        self.partial.clear();
        Some(line)
    }
}

/// Where the followed log got to: the timestamp second of its last frame,
/// and per stream how many bytes of frames stamped in that second arrived.
#[derive(Debug, Default)]
struct Seen {
    second: i64,
    bytes: [usize; 2],
}

impl Seen {
    fn record(&mut self, second: i64, stream: usize, len: usize) {
        if second > self.second {
            *self = Seen {
                second,
                ..Seen::default()
            };
        }
        if second == self.second {
            self.bytes[stream] += len;
        }
    }
}

/// A container's output so far: what [`follow`] read, to be completed by
/// [`Followed::catch_up`] once the container has ended.
pub struct Followed {
    sink: OutputSink,
    streams: [LineSplitter; 2],
    seen: Seen,
}

const STDOUT: usize = 0;
const STDERR: usize = 1;

/// Splits a frame read with timestamps into (unix second, payload).
fn split_timestamp(frame: &[u8]) -> (i64, &[u8]) {
    let Some(space) = frame.iter().position(|b| *b == b' ') else {
        return (0, frame);
    };
    let second = std::str::from_utf8(&frame[..space])
        .ok()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp())
        .unwrap_or(0);
    (second, &frame[space + 1..])
}

fn frame_of(item: &LogOutput) -> Option<(usize, &[u8])> {
    match item {
        LogOutput::StdOut { message } | LogOutput::Console { message } => Some((STDOUT, message)),
        LogOutput::StdErr { message } => Some((STDERR, message)),
        LogOutput::StdIn { .. } => None,
    }
}

/// Follows the container's stdout and stderr from its first line until
/// the engine closes the stream (the container ended), into `sink`. From
/// the first line, so an adopted container's log is whole too.
pub async fn follow(docker: Docker, container: String, sink: OutputSink) -> Followed {
    let mut f = Followed {
        sink,
        streams: Default::default(),
        seen: Seen::default(),
    };
    let options = LogsOptions {
        follow: true,
        stdout: true,
        stderr: true,
        timestamps: true,
        ..LogsOptions::default()
    };
    let mut stream = docker.logs(&container, Some(options));
    while let Some(item) = stream.next().await {
        match item {
            Ok(item) => {
                if let Some((stream, frame)) = frame_of(&item) {
                    let (second, payload) = split_timestamp(frame);
                    f.seen.record(second, stream, payload.len());
                    f.emit(stream, payload).await;
                }
            }
            Err(e) => {
                // A log driver that cannot be read back (syslog, none):
                // the job runs on, but the user must learn why its log is
                // empty.
                tracing::warn!(container, error = %e, "cannot read the container's logs");
                f.sink
                    .line(format!("[trainmesh] cannot read the container's logs: {e}"))
                    .await;
                break;
            }
        }
    }
    f
}

impl Followed {
    async fn emit(&mut self, stream: usize, payload: &[u8]) {
        for line in self.streams[stream].push(payload) {
            self.sink.line(line).await;
        }
    }

    /// Call once the container has ended. The engine may close a follow
    /// before it wrote the container's last output (a final line without
    /// a newline, typically): read the log's last second again and pass
    /// on what the follow did not deliver. Then the partial last lines.
    pub async fn catch_up(mut self, docker: &Docker, container: &str) {
        let options = LogsOptions {
            follow: false,
            stdout: true,
            stderr: true,
            timestamps: true,
            since: i32::try_from(self.seen.second).unwrap_or(0),
            ..LogsOptions::default()
        };
        let mut skip = self.seen.bytes;
        let mut stream = docker.logs(container, Some(options));
        while let Some(item) = stream.next().await {
            let item = match item {
                Ok(item) => item,
                Err(e) => {
                    tracing::debug!(container, error = %e, "cannot re-read the container's log");
                    break;
                }
            };
            let Some((stream, frame)) = frame_of(&item) else {
                continue;
            };
            let (_, payload) = split_timestamp(frame);
            let skipped = skip[stream].min(payload.len());
            skip[stream] -= skipped;
            self.emit(stream, &payload[skipped..]).await;
        }
        let [out, err] = &mut self.streams;
        for line in [out.finish(), err.finish()].into_iter().flatten() {
            self.sink.line(line).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_joined_and_split_into_lines() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"hel"), Vec::<String>::new());
        assert_eq!(s.push(b"lo\nwor"), ["hello"]);
        assert_eq!(s.push(b"ld\r\n\nnext"), ["world", ""]);
        assert_eq!(s.finish(), Some("next".to_owned()));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn long_lines_are_cut() {
        let mut s = LineSplitter::default();
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        let lines = s.push(&long);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES);
        assert_eq!(s.push(b"\n"), ["x".repeat(10)]);
    }

    #[test]
    fn timestamps_are_split_off_and_seen_bytes_counted_per_second() {
        let (second, payload) = split_timestamp(b"2024-01-02T03:04:05.123456789Z hello\n");
        assert_eq!(second, 1_704_164_645);
        assert_eq!(payload, b"hello\n");
        assert_eq!(split_timestamp(b"garbage"), (0, &b"garbage"[..]));

        let mut seen = Seen::default();
        seen.record(10, STDOUT, 5);
        seen.record(11, STDOUT, 3);
        seen.record(11, STDERR, 2);
        seen.record(11, STDOUT, 1);
        assert_eq!((seen.second, seen.bytes), (11, [4, 2]));
    }

    #[test]
    fn progress_bars_keep_what_a_terminal_shows() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"10%\r50%\r100%\n"), ["100%"]);
    }
}
