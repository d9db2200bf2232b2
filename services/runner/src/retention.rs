//! Removes ended attempts' directories once they have been kept long
//! enough. An attempt's log is shipped to job-service while it runs, and
//! what was left is flushed before its final report (whose tail it
//! carries); the directory is only the node's copy, kept for a while for
//! whoever looks at the node.
//!
//! An attempt's age is the newest modification time in its directory, so
//! a directory left by an earlier run of the runner (which never recorded
//! an end) is aged the same way.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::domain::{AttemptKey, JobId};

/// Bounds of the time between sweeps, which is a quarter of the keep time.
const MIN_INTERVAL: Duration = Duration::from_millis(200);
const MAX_INTERVAL: Duration = Duration::from_secs(600);

/// How often to sweep for a keep time of `keep`.
pub fn interval(keep: Duration) -> Duration {
    (keep / 4).clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// Removes the directories `<work_dir>/<job_id>/<attempt>/` that are not
/// `active` and whose newest change is at least `keep` before `now`, and
/// job directories left empty; returns how many attempt directories went.
/// Blocking.
pub fn sweep(
    work_dir: &Path,
    keep: Duration,
    now: SystemTime,
    active: impl Fn(&AttemptKey) -> bool,
) -> usize {
    let Ok(jobs) = std::fs::read_dir(work_dir) else {
        return 0;
    };
    let mut removed = 0;
    for job in jobs.flatten() {
        // Only what the runner creates: anything else is left alone.
        let Some(job_id) = job
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<JobId>().ok())
        else {
            continue;
        };
        let Ok(attempts) = std::fs::read_dir(job.path()) else {
            continue;
        };
        for attempt in attempts.flatten() {
            let Some(n) = attempt
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let key = AttemptKey { job_id, attempt: n };
            let dir = attempt.path();
            if active(&key) || !old_enough(&dir, keep, now) {
                continue;
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an ended attempt's directory")
                }
            }
        }
        // Fails while other attempts of the job are still there.
        let _ = std::fs::remove_dir(job.path());
    }
    removed
}

/// Whether nothing in `dir` (itself and its direct entries) changed within
/// `keep` before `now`. A time in the future counts as now.
fn old_enough(dir: &Path, keep: Duration, now: SystemTime) -> bool {
    let age = |t: std::io::Result<SystemTime>| {
        t.ok()
            .map(|t| now.duration_since(t).unwrap_or(Duration::ZERO))
    };
    let Some(mut youngest) = age(std::fs::metadata(dir).and_then(|m| m.modified())) else {
        return false;
    };
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Some(a) = age(e.metadata().and_then(|m| m.modified())) {
                youngest = youngest.min(a);
            }
        }
    }
    youngest >= keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt_dir(work: &Path, job: JobId, n: i32) -> std::path::PathBuf {
        let d = work.join(job.to_string()).join(n.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("output.log"), "hello\n").unwrap();
        d
    }

    #[test]
    fn only_ended_attempts_past_the_keep_time_are_removed() {
        let work = tempfile::tempdir().unwrap();
        let (ended, running) = (JobId::new(), JobId::new());
        let old = attempt_dir(work.path(), ended, 1);
        let busy = attempt_dir(work.path(), running, 1);
        std::fs::create_dir_all(work.path().join("not-a-job")).unwrap();
        let keep = Duration::from_secs(3600);
        let now = SystemTime::now();
        let is_running = |k: &AttemptKey| k.job_id == running;

        // Written just now: kept.
        assert_eq!(sweep(work.path(), keep, now, is_running), 0);
        assert!(old.is_dir());
        // An hour on, the ended attempt and its job's directory go; the
        // running one and what the runner did not create stay.
        let later = now + keep + Duration::from_secs(1);
        assert_eq!(sweep(work.path(), keep, later, is_running), 1);
        assert!(!old.exists());
        assert!(!work.path().join(ended.to_string()).exists());
        assert!(busy.is_dir());
        assert!(work.path().join("not-a-job").is_dir());
    }

    #[test]
    fn a_file_written_recently_keeps_the_directory() {
        let work = tempfile::tempdir().unwrap();
        let job = JobId::new();
        let dir = attempt_dir(work.path(), job, 2);
        let keep = Duration::from_secs(60);
        // The clock says the directory is old, but a file in it is newer
        // than the sweep's "now" minus keep: from the future, it counts as
        // now.
        let now = SystemTime::now() - Duration::from_secs(30);
        assert_eq!(sweep(work.path(), keep, now, |_| false), 0);
        assert!(dir.is_dir());
        assert_eq!(sweep(work.path(), Duration::ZERO, now, |_| false), 1);
    }

    #[test]
    fn the_sweep_interval_follows_the_keep_time_within_bounds() {
        assert_eq!(interval(Duration::ZERO), MIN_INTERVAL);
        assert_eq!(interval(Duration::from_secs(40)), Duration::from_secs(10));
        assert_eq!(interval(Duration::MAX), MAX_INTERVAL);
    }
}
