//! The service log file (`TRAINMESH_LOG_FILE`), rotated by size so that a
//! long-running service cannot fill its disk.
//!
//! `PATH` is written until the next line would take it past
//! `TRAINMESH_LOG_MAX_BYTES`; then `PATH.<n>` becomes `PATH.<n+1>` (the one
//! past `TRAINMESH_LOG_KEEP` is deleted), `PATH` becomes `PATH.1`, and a new
//! `PATH` is started. At most (keep + 1) × max bytes stay on disk, give or
//! take one line. Lines are never split across files: the formatter hands
//! over one whole event per write.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Default size at which the file is rotated: 100 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;
/// Default number of rotated files kept next to the live one.
pub const DEFAULT_KEEP: u32 = 5;
/// More rotated files than this is a typo, not a plan.
const MAX_KEEP: u32 = 1000;

pub const MAX_BYTES_ENV: &str = "TRAINMESH_LOG_MAX_BYTES";
pub const KEEP_ENV: &str = "TRAINMESH_LOG_KEEP";

/// When to rotate and how much to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Size of one file, in bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`PATH.1` … `PATH.<keep>`); 0 keeps none.
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
        }
    }
}

impl Rotation {
    /// From [`MAX_BYTES_ENV`] (bytes, or with a `K`/`M`/`G` suffix, binary
    /// units, `KiB` etc. accepted) and [`KEEP_ENV`], as `var` reads them.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let mut r = Self::default();
        if let Some(v) = var(MAX_BYTES_ENV).filter(|v| !v.trim().is_empty()) {
            r.max_bytes = parse_size(&v).filter(|n| *n > 0).ok_or_else(|| {
                anyhow::anyhow!(
                    "invalid {MAX_BYTES_ENV} `{v}`: expected a size above 0 such as \
                         104857600 or 100M"
                )
            })?;
        }
        if let Some(v) = var(KEEP_ENV).filter(|v| !v.trim().is_empty()) {
            r.keep = v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|k| *k <= MAX_KEEP)
                .ok_or_else(|| {
                    anyhow::anyhow!("invalid {KEEP_ENV} `{v}`: expected 0 to {MAX_KEEP}")
                })?;
        }
        Ok(r)
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// A log file that rotates itself; give it to the log writer thread.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    rotation: Rotation,
    file: File,
    written: u64,
    /// A failed rotation is reported once, not once per line.
    reported: bool,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl RotatingFile {
    /// Opens `path` for appending; what it holds already counts.
    pub fn open(path: impl Into<PathBuf>, rotation: Rotation) -> io::Result<Self> {
        let path = path.into();
        let file = open_append(&path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path,
            rotation,
            file,
            written,
            reported: false,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.rotation.keep;
        if keep == 0 {
            self.file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&self.path)?;
        } else {
            ignore_missing(std::fs::remove_file(numbered(&self.path, keep)))?;
            for n in (1..keep).rev() {
                ignore_missing(std::fs::rename(
                    numbered(&self.path, n),
                    numbered(&self.path, n + 1),
                ))?;
            }
            std::fs::rename(&self.path, numbered(&self.path, 1))?;
            self.file = open_append(&self.path)?;
        }
        self.written = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if self.written > 0 && self.written.saturating_add(len) > self.rotation.max_bytes {
            if let Err(e) = self.rotate() {
                // Logging goes on in the file we have rather than stopping;
                // this writer is the log, so stderr is where to say so.
                if !self.reported {
                    self.reported = true;
                    eprintln!(
                        "cannot rotate log file {}: {e}; writing on past {} bytes",
                        self.path.display(),
                        self.rotation.max_bytes
                    );
                }
            }
        }
        // Whole, so that a line never straddles a rotation.
        self.file.write_all(buf)?;
        self.written = self.written.saturating_add(len);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> String {
        format!("{{\"message\":\"line {n:03}\"}}\n")
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn writing_past_the_limit_rotates_and_keeps_that_many_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let rotation = Rotation {
            max_bytes: 100,
            keep: 2,
        };
        let mut f = RotatingFile::open(&path, rotation).unwrap();
        let each = line(0).len(); // 23 bytes: four lines fit in 100
        for n in 0..40 {
            f.write_all(line(n).as_bytes()).unwrap();
        }
        f.flush().unwrap();
        assert!(numbered(&path, 1).exists() && numbered(&path, 2).exists());
        assert!(!numbered(&path, 3).exists(), "only two rotated files kept");
        let files = [numbered(&path, 2), numbered(&path, 1), path.clone()];
        for p in &files {
            let len = std::fs::metadata(p).unwrap().len();
            assert!(len <= 100, "{} is {len} bytes", p.display());
            assert_eq!(len as usize % each, 0, "{} holds whole lines", p.display());
        }
        // Oldest to newest, the files hold the last lines, in order.
        let kept: String = files.iter().map(|p| read(p)).collect();
        let n = kept.lines().count();
        let want: String = (40 - n..40).map(line).collect();
        assert_eq!(kept, want);
        assert_eq!(n, 12, "three files of four lines");
    }

    #[test]
    fn keep_zero_starts_the_file_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let rotation = Rotation {
            max_bytes: 50,
            keep: 0,
        };
        let mut f = RotatingFile::open(&path, rotation).unwrap();
        for n in 0..5 {
            f.write_all(line(n).as_bytes()).unwrap();
        }
        assert_eq!(read(&path), line(4));
        assert!(!numbered(&path, 1).exists());
    }

    #[test]
    fn what_the_file_holds_at_start_counts_and_a_long_line_is_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        std::fs::write(&path, "x".repeat(90) + "\n").unwrap();
        let rotation = Rotation {
            max_bytes: 100,
            keep: 1,
        };
        let mut f = RotatingFile::open(&path, rotation).unwrap();
        let long = "y".repeat(300) + "\n";
        f.write_all(long.as_bytes()).unwrap();
        assert_eq!(read(&numbered(&path, 1)).len(), 91);
        assert_eq!(read(&path), long);
    }

    #[test]
    fn settings_come_from_the_environment_with_defaults() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(Rotation::from_env(env(&[])).unwrap(), Rotation::default());
        let r = Rotation::from_env(env(&[(MAX_BYTES_ENV, "10M"), (KEEP_ENV, "0")])).unwrap();
        assert_eq!((r.max_bytes, r.keep), (10 << 20, 0));
        let r = Rotation::from_env(env(&[(MAX_BYTES_ENV, "4096")])).unwrap();
        assert_eq!((r.max_bytes, r.keep), (4096, DEFAULT_KEEP));
        assert_eq!(parse_size("2KiB"), Some(2048));
        for bad in [
            "0",
            "-1",
            "ten",
            "1T",
            "99999999999999999999G",
            "18014398509481984G",
        ] {
            assert!(
                Rotation::from_env(move |k: &str| (k == MAX_BYTES_ENV).then(|| bad.to_string()))
                    .is_err(),
                "{bad}"
            );
        }
        assert!(Rotation::from_env(env(&[(KEEP_ENV, "1001")])).is_err());
        assert!(Rotation::from_env(env(&[(KEEP_ENV, "-1")])).is_err());
    }
}
