//! The test clock of `--clock-offset-file`: wall clock plus an offset in
//! whole seconds read from a file, so cross-process tests can move the
//! scheduler's time (approval expiry, leases, backoff) by writing a number.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use trainmesh_common::time::{now_micros, Clock};

/// How stale the cached offset may get; bounds the file reads to 20/s.
const REREAD: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct OffsetFileClock {
    path: PathBuf,
    /// (offset in microseconds, when it was read).
    cached: Mutex<Option<(i64, Instant)>>,
}

impl OffsetFileClock {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        OffsetFileClock {
            path: path.into(),
            cached: Mutex::new(None),
        }
    }

    /// A missing, empty or unreadable file means no offset: the clock must
    /// keep working while a test rewrites the file.
    fn read_offset(&self) -> i64 {
        std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .map(|secs| secs.saturating_mul(1_000_000))
            .unwrap_or(0)
    }

    fn offset(&self) -> i64 {
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match *cached {
            Some((offset, at)) if at.elapsed() < REREAD => offset,
            _ => {
                let offset = self.read_offset();
                *cached = Some((offset, Instant::now()));
                offset
            }
        }
    }
}

impl Clock for OffsetFileClock {
    fn now_micros(&self) -> i64 {
        now_micros().saturating_add(self.offset())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_comes_from_the_file_and_missing_means_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offset");
        let clock = OffsetFileClock::new(&path);
        let before = now_micros();
        assert!((clock.now_micros() - before).abs() < 5_000_000);
        std::fs::write(&path, "3600\n").unwrap();
        // Force a re-read instead of waiting out the cache.
        *clock.cached.lock().unwrap() = None;
        let ahead = clock.now_micros() - now_micros();
        assert!((3_595_000_000..=3_605_000_000).contains(&ahead), "{ahead}");
        std::fs::write(&path, "").unwrap();
        *clock.cached.lock().unwrap() = None;
        assert!((clock.now_micros() - now_micros()).abs() < 5_000_000);
    }
}
