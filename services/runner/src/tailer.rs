//! Tails a JSON-lines metrics file by byte offset.
//!
//! Only new bytes are read, and only complete lines are returned: a line
//! the job is still writing waits for its newline. The position is a
//! [`Cursor`] — the offset plus the file's identity (device, inode) and the
//! size seen — which the caller commits after the batch was acknowledged;
//! committing persists it (temp file + rename), so a restarted tailer picks
//! up exactly where the last acknowledged batch ended and every line is
//! shipped once. A file that shrank below the offset (truncated) or whose
//! inode changed (replaced, rotated) is read again from the start.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the next unread line starts, in which file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub offset: u64,
    pub dev: u64,
    pub ino: u64,
    /// The file's size when the cursor was taken.
    pub size: u64,
}

/// Complete lines read from the file, not yet committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Valid JSON objects, one per line, in file order.
    pub records: Vec<String>,
    /// Lines skipped as invalid (not a JSON object, or too long).
    pub skipped: usize,
    /// The cursor after the last line of this batch.
    pub next: Cursor,
    /// True when this batch started over at offset 0 because the file was
    /// truncated or replaced.
    pub restarted: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most records per batch.
    pub max_lines: usize,
    /// Most bytes of records per batch (a single longer record still goes
    /// alone).
    pub max_bytes: usize,
    /// Longer lines are skipped as invalid.
    pub max_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_lines: 1000,
            max_bytes: 900 * 1024,
            max_line_bytes: 256 * 1024,
        }
    }
}

pub struct Tailer {
    path: PathBuf,
    cursor_path: PathBuf,
    committed: Cursor,
}

impl Tailer {
    /// A tailer of `path` that keeps its cursor in `cursor_path`, resuming
    /// from the cursor stored there, if any.
    pub fn open(path: impl Into<PathBuf>, cursor_path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let cursor_path = cursor_path.into();
        let committed = match std::fs::read(&cursor_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %cursor_path.display(), error = %e,
                    "unreadable metrics cursor; reading the metrics file from the start");
                Cursor::default()
            }),
            Err(_) => Cursor::default(),
        };
        Self {
            path,
            cursor_path,
            committed,
        }
    }

    pub fn cursor(&self) -> Cursor {
        self.committed
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the complete lines after the committed cursor, up to `limits`.
    /// With `eof_is_end` (the writer has exited) a last line without a
    /// newline counts as complete. `None` when there is nothing new.
    pub fn poll(&self, limits: Limits, eof_is_end: bool) -> std::io::Result<Option<Batch>> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let (dev, ino, size) = (meta.dev(), meta.ino(), meta.len());
        let c = self.committed;
        let same_file = c.ino == 0 || (c.dev == dev && c.ino == ino);
        let restarted = !same_file || size < c.offset;
        let start = if restarted { 0 } else { c.offset };
        if start >= size {
            return Ok(None);
        }

        let mut reader = BufReader::new(file);
        reader.seek(SeekFrom::Start(start))?;
        let mut pos = start;
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut skipped = 0usize;
        let mut line = Vec::new();
        while records.len() < limits.max_lines && (bytes < limits.max_bytes || records.is_empty()) {
            line.clear();
            let cap = limits.max_line_bytes as u64 + 1;
            let n = (&mut reader).take(cap).read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            let complete = line.last() == Some(&b'\n');
            if !complete && line.len() > limits.max_line_bytes {
                // Too long to be a record: skip through its newline, if it
                // has one yet.
                match skip_line(&mut reader)? {
                    Some(rest) => {
                        pos += n as u64 + rest;
                        skipped += 1;
                        tracing::warn!(path = %self.path.display(), "skipping an over-long metrics line");
                        continue;
                    }
                    None => break,
                }
            }
            if !complete && !eof_is_end {
                // The job is still writing this line.
                break;
            }
            pos += n as u64;
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            if is_json_object(text) {
                bytes += text.len();
                records.push(text.to_owned());
            } else {
                skipped += 1;
                let shown: String = text.chars().take(120).collect();
                tracing::warn!(path = %self.path.display(), line = %shown,
                    "skipping a metrics line that is not a JSON object");
            }
        }
        if pos == start {
            return Ok(None);
        }
        if restarted {
            tracing::info!(path = %self.path.display(), old_inode = c.ino, inode = ino,
                old_offset = c.offset, size, "metrics file truncated or replaced; reading it from the start");
        }
        Ok(Some(Batch {
            records,
            skipped,
            next: Cursor {
                offset: pos,
                dev,
                ino,
                size: size.max(pos),
            },
            restarted,
        }))
    }

    /// Marks `batch` as shipped and persists the cursor after it.
    pub fn commit(&mut self, batch: &Batch) -> std::io::Result<()> {
        self.commit_cursor(batch.next)
    }

    /// Moves to `cursor`, then persists it; when persisting fails the
    /// tailer still moves on (the error is for the caller to log).
    pub fn commit_cursor(&mut self, cursor: Cursor) -> std::io::Result<()> {
        self.committed = cursor;
        let tmp = self.cursor_path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&cursor)?)?;
        std::fs::rename(&tmp, &self.cursor_path)
    }
}

/// Whether `text` is one JSON object. The non-standard `NaN`, `Infinity`
/// and `-Infinity` that Python's `json.dumps` writes are accepted: a NaN
/// loss is exactly what must reach metrics-service.
pub fn is_json_object(text: &str) -> bool {
    type Object = serde_json::Map<String, serde_json::Value>;
    if serde_json::from_str::<Object>(text).is_ok() {
        return true;
    }
    if !(text.contains("NaN") || text.contains("Infinity")) {
        return false;
    }
    // Replace the bare tokens (outside strings) with `null` and try again.
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        match token {
            Some(t) => {
                out.push_str("null");
                rest = &rest[t.len()..];
            }
            None => {
                if c == '"' {
                    in_string = true;
                }
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    serde_json::from_str::<Object>(&out).is_ok()
}

/// Reads through the next newline; the bytes consumed, or `None` when the
/// file ends first.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<Option<u64>> {
    let mut consumed = 0u64;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            reader.consume(i + 1);
            return Ok(Some(consumed + i as u64 + 1));
        }
        let n = buf.len();
        reader.consume(n);
        consumed += n as u64;
    }
}

#[cfg(test)]
#[path = "tailer_tests.rs"]
mod tests;
