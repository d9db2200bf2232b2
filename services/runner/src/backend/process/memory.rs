//! The process backend's memory limit: `spec.resources.memory_mib`
//! enforced the way a container's cgroup would, without one.
//!
//! Every [`SAMPLE_EVERY`] the runner adds up the resident memory of the
//! attempt's processes (everything below its shim: the job's process group
//! and whatever escaped it). Past the limit it confirms with the
//! proportional set size (PSS: a page shared by several processes, such as
//! forked data-loader workers, counts once in total rather than once per
//! process), and if that is over too, it writes a `[trainmesh]` line to the
//! attempt's log and has the whole tree killed with SIGKILL: the attempt
//! ends with exit 137 and the error category `oom-killed`, like a
//! container's out-of-memory kill.
//!
//! Granularity: memory is sampled, not accounted page by page as in a
//! cgroup, so a job may go over its limit by what it allocates between two
//! samples before it is stopped, and the page cache of files it reads does
//! not count. The kernel's own out-of-memory killer still guards the host.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::logs::OutputSink;
use crate::procfs;

/// How often the attempt's memory is measured.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

const MIB: u64 = 1024 * 1024;

/// What was measured when the limit was crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverLimit {
    pub limit_mib: i64,
    pub used_mib: u64,
}

impl OverLimit {
    /// The line the attempt's log gets.
    pub fn notice(&self) -> String {
        format!(
            "[trainmesh] out of memory: the attempt's processes use {} MiB, more than its limit \
             of {} MiB (spec.resources.memory_mib); killing them with SIGKILL",
            self.used_mib, self.limit_mib
        )
    }
}

/// Resident memory of every process below `root`, in bytes: the sum of
/// their RSS from one scan of `/proc`, and, when that is over `limit`, the
/// sum of their PSS (shared pages split among their sharers), which is
/// slower to read but does not count a shared page twice.
pub fn resident_below(root: i32, limit: u64) -> u64 {
    let procs = procfs::all();
    let tree = procfs::descendants(root, &procs);
    let page = procfs::page_size();
    let rss: u64 = procs
        .iter()
        .filter(|p| tree.contains(&p.pid))
        .map(|p| p.rss_pages.saturating_mul(page))
        .fold(0, u64::saturating_add);
    if rss <= limit {
        return rss;
    }
    tree.iter()
        .map(|pid| {
            procfs::pss_kib(*pid).map_or_else(
                || {
                    procs
                        .iter()
                        .find(|p| p.pid == *pid)
                        .map_or(0, |p| p.rss_pages.saturating_mul(page))
                },
                |kib| kib.saturating_mul(1024),
            )
        })
        .fold(0, u64::saturating_add)
}

/// Watches the processes below the shim `shim_pid` and, the first time
/// they hold more than `limit_mib`, writes the notice to `output` and
/// sends what it measured. Runs until then; the workload aborts it when
/// the attempt ends (dropping its copy of the log's sink).
pub fn watch(
    shim_pid: i32,
    limit_mib: i64,
    output: OutputSink,
) -> (JoinHandle<()>, oneshot::Receiver<OverLimit>) {
    let (tx, rx) = oneshot::channel();
    let limit = u64::try_from(limit_mib).unwrap_or(0).saturating_mul(MIB);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let used = tokio::task::spawn_blocking(move || resident_below(shim_pid, limit))
                .await
                .unwrap_or(0);
            if used > limit {
                let over = OverLimit {
                    limit_mib,
                    used_mib: used.div_ceil(MIB),
                };
                tracing::warn!(
                    limit_mib,
                    used_mib = over.used_mib,
                    "attempt over its memory limit; killing it"
                );
                output.line(over.notice()).await;
                let _ = tx.send(over);
                return;
            }
        }
    });
    (task, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notice_says_the_limit_and_the_usage() {
        let n = OverLimit {
            limit_mib: 220,
            used_mib: 301,
        }
        .notice();
        assert!(n.starts_with("[trainmesh] out of memory"), "{n}");
        assert!(n.contains("use 301 MiB"), "{n}");
        assert!(n.contains("limit of 220 MiB"), "{n}");
    }

    #[test]
    fn a_tree_without_processes_holds_nothing() {
        assert_eq!(resident_below(i32::MAX, 0), 0);
    }
}
