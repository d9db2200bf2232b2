//! The files an attempt's log is kept in: `output.log`, being written, and
//! at most `files - 1` older segments `output.log.<n>` (n = 1, 2, …), so a
//! chatty job cannot fill the node's disk.
//!
//! Offsets and line numbers stay global: they count the whole log since the
//! attempt started, whichever segments are still on disk. The writer
//! rotates and the readers (shipper, failure classifier) resolve offsets
//! through one shared segment list instead of guessing from the file
//! system, which a rename can change under them.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// How much of an attempt's log is kept on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLimits {
    /// All files together, `output.log` included.
    pub max_bytes: u64,
    /// Files at most, `output.log` included; each holds up to
    /// `max_bytes / files`.
    pub files: u32,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            max_bytes: 256 * 1024 * 1024,
            files: 4,
        }
    }
}

impl LogLimits {
    /// Size at which `output.log` is rotated.
    pub fn segment_bytes(&self) -> u64 {
        (self.max_bytes / u64::from(self.files.max(1))).max(1)
    }
}

/// One file of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    /// Number of its first line in the whole log (from 1).
    pub first_line: u64,
    /// Offset of its first byte in the whole log.
    pub first_byte: u64,
    /// Complete lines on disk.
    pub lines: u64,
    pub bytes: u64,
}

impl Segment {
    fn end_byte(&self) -> u64 {
        self.first_byte + self.bytes
    }
}

/// Where a reader is: the next byte of the log and the number of the line
/// that starts there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub byte: u64,
    pub line: u64,
}

impl Default for Cursor {
    fn default() -> Self {
        Cursor { byte: 0, line: 1 }
    }
}

/// Lines read from one segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub lines: Vec<String>,
    /// Number of `lines[0]`.
    pub first_line: u64,
    /// Where the next read starts.
    pub next: Cursor,
    /// Lines between the reader's cursor and `first_line` that were
    /// deleted before they were read.
    pub skipped: u64,
}

#[derive(Debug)]
struct State {
    base: PathBuf,
    limits: LogLimits,
    /// Oldest first; the last one is `base`, being written.
    segments: VecDeque<Segment>,
    next_suffix: u64,
}

/// The segment list the writer and the readers share. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LogFiles(Arc<Mutex<State>>);

impl LogFiles {
    /// Creates (truncates) `path` as the only segment and returns it open
    /// for writing. Segments an earlier run of the same attempt left are
    /// removed first: their lines are not this run's.
    pub fn create(path: &Path, limits: LogLimits) -> std::io::Result<(LogFiles, File)> {
        remove_rotated(path);
        let file = File::create(path)?;
        let state = State {
            base: path.to_owned(),
            limits,
            segments: VecDeque::from([Segment {
                path: path.to_owned(),
                first_line: 1,
                first_byte: 0,
                lines: 0,
                bytes: 0,
            }]),
            next_suffix: 1,
        };
        Ok((LogFiles(Arc::new(Mutex::new(state))), file))
    }

    // A panic elsewhere while holding the lock leaves the list consistent
    // (every change is a single push, pop or field update), so carry on.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The segments on disk, oldest first.
    pub fn segments(&self) -> Vec<Segment> {
        self.lock().segments.iter().cloned().collect()
    }

    /// Records lines the writer has flushed to the current segment.
    pub fn record(&self, lines: u64, bytes: u64) {
        if let Some(s) = self.lock().segments.back_mut() {
            s.lines += lines;
            s.bytes += bytes;
        }
    }

    /// Renames `output.log` to `output.log.<n>`, creates an empty one and
    /// deletes the oldest segments beyond the limit. Blocking.
    pub fn rotate(&self) -> std::io::Result<File> {
        let mut removed = Vec::new();
        let file = {
            let mut s = self.lock();
            let rotated = suffixed(&s.base, s.next_suffix);
            // Under the lock: readers open segments by path under it too,
            // so none opens the new, empty file for the old one's offsets.
            std::fs::rename(&s.base, &rotated)?;
            s.next_suffix += 1;
            let base = s.base.clone();
            let Some(last) = s.segments.back_mut() else {
                return Err(std::io::Error::other("the log has no current segment"));
            };
            last.path = rotated;
            let next = Segment {
                path: base.clone(),
                first_line: last.first_line + last.lines,
                first_byte: last.end_byte(),
                lines: 0,
                bytes: 0,
            };
            // When this fails the list still names every file correctly;
            // the writer stops and readers finish what was written.
            let file = File::create(&base)?;
            s.segments.push_back(next);
            let keep = s.limits.files.max(1) as usize;
            while s.segments.len() > keep {
                removed.extend(s.segments.pop_front());
            }
            file
        };
        // Outside the lock; a reader with one open keeps reading it.
        for old in removed {
            if let Err(e) = std::fs::remove_file(&old.path) {
                tracing::warn!(path = %old.path.display(), error = %e,
                    "cannot delete a rotated attempt log segment");
            }
        }
        Ok(file)
    }

    /// Reads complete lines from `at` on, from one segment only, at most
    /// `max_lines`/`max_bytes`. When the segment that held `at` is already
    /// deleted, reads from the oldest one kept and says how many lines were
    /// skipped; line numbers stay the log's own.
    pub fn read(&self, at: Cursor, max_lines: usize, max_bytes: usize) -> std::io::Result<Batch> {
        let (file, seg_start, from, end, skipped) = {
            let s = self.lock();
            let Some(seg) = s.segments.iter().find(|g| at.byte < g.end_byte()) else {
                return Ok(Batch {
                    lines: Vec::new(),
                    first_line: at.line,
                    next: at,
                    skipped: 0,
                });
            };
            let (from, skipped) = if at.byte < seg.first_byte {
                let from = Cursor {
                    byte: seg.first_byte,
                    line: seg.first_line,
                };
                (from, seg.first_line.saturating_sub(at.line))
            } else {
                (at, 0)
            };
            // Opened under the lock so a rotation cannot swap the file.
            let file = File::open(&seg.path)?;
            (file, seg.first_byte, from, seg.end_byte(), skipped)
        };
        let (lines, pos) = read_lines(
            file,
            from.byte - seg_start,
            end - seg_start,
            max_lines,
            max_bytes,
        )?;
        let next = Cursor {
            byte: seg_start + pos,
            line: from.line + lines.len() as u64,
        };
        Ok(Batch {
            lines,
            first_line: from.line,
            next,
            skipped,
        })
    }

    /// The last `max_bytes` of the log as text, starting at a line
    /// boundary. Reads across as many segments as it takes, so a rotation
    /// just before a failure does not hide the traceback.
    pub fn tail_text(&self, max_bytes: u64) -> String {
        let read = || -> std::io::Result<String> {
            let mut parts = Vec::new();
            {
                let s = self.lock();
                let mut want = max_bytes;
                for seg in s.segments.iter().rev() {
                    if want == 0 {
                        break;
                    }
                    let take = seg.bytes.min(want);
                    parts.push((File::open(&seg.path)?, seg.bytes - take, take));
                    want -= take;
                }
            }
            parts.reverse();
            let cut = parts.first().is_some_and(|(_, start, _)| *start > 0);
            let mut bytes = Vec::new();
            for (mut file, start, len) in parts {
                file.seek(SeekFrom::Start(start))?;
                file.take(len).read_to_end(&mut bytes)?;
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            Ok(match (cut, text.find('\n')) {
                (true, Some(i)) => text[i + 1..].to_owned(),
                _ => text,
            })
        };
        read().unwrap_or_else(|e| {
            tracing::warn!(path = %self.lock().base.display(), error = %e,
                "cannot read the attempt log");
            String::new()
        })
    }
}

/// Reads the complete lines of `file` in `[offset, end)`, at most
/// `max_lines`/`max_bytes`; returns them and the offset after the last.
pub(super) fn read_lines(
    mut file: File,
    offset: u64,
    end: u64,
    max_lines: usize,
    max_bytes: usize,
) -> std::io::Result<(Vec<String>, u64)> {
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = std::io::BufReader::new(file.take(end.saturating_sub(offset)));
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

fn suffixed(base: &Path, n: u64) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Deletes `<base>.<n>` files next to `base`.
fn remove_rotated(base: &Path) {
    let (Some(dir), Some(name)) = (base.parent(), base.file_name()) else {
        return;
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // The directory is new or unreadable; creating the log says which.
        Err(_) => return,
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        let is_segment = file_name
            .strip_prefix(&prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if is_segment {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e,
                    "cannot delete an earlier run's attempt log segment");
            }
        }
    }
}

#[cfg(test)]
#[path = "segments_tests.rs"]
mod tests;
