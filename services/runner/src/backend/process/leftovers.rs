//! What a runner that starts again kills of its earlier run.
//!
//! The shim kills an attempt's processes when the runner dies, but the
//! shim itself can be killed with it (a whole cgroup killed, the OOM
//! killer). So each running attempt leaves a record in its directory — the
//! shim's and the job's pids with their start times — removed when the
//! attempt ends. A record found at start belongs to a run that did not end
//! cleanly: the scheduler has declared its attempts lost (or taken them
//! back) and may be running them elsewhere, so whatever is left of them is
//! killed.
//!
//! A process is the attempt's when it is the recorded shim (same pid, same
//! start time), when it is in the job's process group and that group is
//! the job's (its leader is the recorded job, or a member carries the
//! attempt's environment — a group number is not reused while any member
//! lives), or when its environment names the attempt (which also finds
//! processes that left the group).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::domain::AttemptKey;
use crate::procfs::{self, Stat};

/// The record's file name in the attempt directory.
pub const RECORD: &str = ".trainmesh-processes.json";
/// How long killed leftovers may take to be gone.
const KILL_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub job_id: String,
    pub attempt: i32,
    pub shim_pid: i32,
    pub shim_start: u64,
    pub job_pid: i32,
    pub job_start: u64,
}

impl Record {
    pub fn new(key: AttemptKey, shim: &tokio::process::Child, job_pid: i32) -> Self {
        let shim_pid = shim.id().map(|p| p as i32).unwrap_or(0);
        let start = |pid| procfs::stat(pid).map(|s| s.start).unwrap_or(0);
        Record {
            job_id: key.job_id.to_string(),
            attempt: key.attempt,
            shim_pid,
            shim_start: start(shim_pid),
            job_pid,
            job_start: start(job_pid),
        }
    }

    /// Writes the record into `dir` (atomically); returns its path.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join(RECORD);
        let tmp = dir.join(format!("{RECORD}.tmp"));
        let text = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// The variables the runner gives every process of the attempt.
    fn environment(&self) -> [String; 2] {
        [
            format!("TRAINMESH_JOB_ID={}", self.job_id),
            format!("TRAINMESH_ATTEMPT={}", self.attempt),
        ]
    }

    /// The attempt's processes among `procs`.
    fn processes(&self, procs: &[Stat]) -> Vec<i32> {
        let env = self.environment();
        let marked = |p: &Stat| procfs::environ_has(p.pid, &env);
        let group_is_ours = self.job_pid > 0
            && procs.iter().any(|p| {
                p.pgrp == self.job_pid
                    && ((p.pid == self.job_pid && p.start == self.job_start) || marked(p))
            });
        procs
            .iter()
            .filter(|p| p.is_live())
            .filter(|p| {
                (p.pid == self.shim_pid && p.start == self.shim_start)
                    || (group_is_ours && p.pgrp == self.job_pid)
                    || marked(p)
            })
            .map(|p| p.pid)
            .collect()
    }
}

/// Removes a record once its attempt's processes are gone.
pub fn forget(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a process record")
        }
    }
}

/// Records under `<work_dir>/<job>/<attempt>/`.
fn records(work_dir: &Path) -> Vec<(PathBuf, Record)> {
    let mut out = Vec::new();
    let Ok(jobs) = std::fs::read_dir(work_dir) else {
        return out;
    };
    for job in jobs.flatten() {
        let Ok(attempts) = std::fs::read_dir(job.path()) else {
            continue;
        };
        for attempt in attempts.flatten() {
            let path = attempt.path().join(RECORD);
            let Ok(text) = std::fs::read(&path) else {
                continue;
            };
            match serde_json::from_slice::<Record>(&text) {
                Ok(r) => out.push((path, r)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable process record");
                    forget(&path);
                }
            }
        }
    }
    out
}

/// Kills what earlier runs left under `work_dir` and removes their
/// records; returns how many processes were killed. Blocking: call it
/// before the runner takes work (on a blocking thread).
pub fn kill_all(work_dir: &Path) -> usize {
    let found = records(work_dir);
    if found.is_empty() {
        return 0;
    }
    let me = std::process::id() as i32;
    let deadline = Instant::now() + KILL_PATIENCE;
    let mut killed = std::collections::BTreeSet::new();
    loop {
        let procs = procfs::all();
        let targets: Vec<i32> = found
            .iter()
            .flat_map(|(_, r)| r.processes(&procs))
            .filter(|pid| *pid != me)
            .collect();
        if targets.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(pids = ?targets, "processes left by an earlier run survived SIGKILL");
            break;
        }
        for pid in targets {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid
            // was identified as the attempt's in this scan.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (path, r) in &found {
        tracing::info!(job_id = %r.job_id, attempt = r.attempt,
            "cleaned up after an attempt an earlier run of this runner left");
        forget(path);
    }
    killed.len()
}
