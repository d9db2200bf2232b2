//! A running process-backend attempt: its shim (a child of the runner),
//! the job the shim started, and the task pumping their output.

use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::task::JoinHandle;

use trainmesh_common::proto::job::v1::JobError;

use super::memory::OverLimit;
use crate::backend::Workload;
use crate::domain::Termination;

/// How long output may keep arriving after the shim ended (a pipe still
/// held open by something that escaped it).
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// How long the shim may take to kill the tree once told to; past it the
/// shim itself is killed (its leftovers are then the next start's).
const KILL_PATIENCE: Duration = Duration::from_secs(15);

pub struct ProcessWorkload {
    shim: Child,
    /// The job's pid, which leads its own process group; 0 when the job
    /// never started.
    job: i32,
    pumps: Vec<JoinHandle<()>>,
    /// The attempt's record for a restarted runner, removed at the end.
    record: Option<PathBuf>,
    ended: Option<Termination>,
    /// The memory limit's watcher ([`super::memory`]), when there is a
    /// limit; stopped when the attempt ends.
    memory: Option<MemoryWatch>,
    /// Set when the watcher had the attempt killed.
    over_limit: Option<OverLimit>,
}

/// What ended a wait on the shim.
enum Woke {
    Ended(std::io::Result<std::process::ExitStatus>),
    /// The memory watcher spoke (`None`: it went away without a word).
    Over(Option<OverLimit>),
}

/// A running memory watcher and where it says the limit was crossed.
pub(super) struct MemoryWatch {
    pub task: JoinHandle<()>,
    /// `None` once it has spoken (or gone).
    pub over: Option<tokio::sync::oneshot::Receiver<OverLimit>>,
}

impl ProcessWorkload {
    pub(super) fn new(
        shim: Child,
        job: i32,
        pumps: Vec<JoinHandle<()>>,
        record: Option<PathBuf>,
    ) -> Self {
        Self {
            shim,
            job,
            pumps,
            record,
            ended: None,
            memory: None,
            over_limit: None,
        }
    }

    /// The shim's pid while it has not been reaped.
    pub(super) fn shim_pid(&self) -> Option<i32> {
        self.shim.id().and_then(|p| i32::try_from(p).ok())
    }

    /// Enforces a memory limit with `watch` (see [`super::memory`]).
    pub(super) fn with_memory_watch(mut self, watch: MemoryWatch) -> Self {
        self.memory = Some(watch);
        self
    }

    /// Waits for the shim to end. Cancel-safe. When the memory watcher says
    /// the attempt is over its limit, the shim is told to kill the whole
    /// tree at once, and the wait goes on until it has.
    async fn wait_shim(&mut self) -> std::io::Result<std::process::ExitStatus> {
        loop {
            let woke = {
                let over = self.memory.as_mut().and_then(|m| m.over.as_mut());
                let shim = &mut self.shim;
                tokio::select! {
                    status = shim.wait() => Woke::Ended(status),
                    over = async {
                        match over {
                            Some(rx) => rx.await.ok(),
                            None => futures::future::pending().await,
                        }
                    } => Woke::Over(over),
                }
            };
            match woke {
                Woke::Ended(status) => return status,
                Woke::Over(over) => {
                    if let Some(m) = self.memory.as_mut() {
                        m.over = None;
                    }
                    if let Some(over) = over {
                        self.over_limit = Some(over);
                        self.signal_shim(Signal::SIGUSR2);
                    }
                }
            }
        }
    }

    /// Signals the shim, unless it has been reaped (its pid could be
    /// another process's by then).
    fn signal_shim(&self, sig: Signal) {
        let Some(pid) = self.shim.id() else {
            return;
        };
        match kill(Pid::from_raw(pid as i32), sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(pid, signal = %sig, error = %e, "cannot signal the attempt shim")
            }
        }
    }

    /// Waits for the shim; if it does not end within `patience` of being
    /// told to kill the tree, kills it and the job's group directly.
    async fn wait_killed(&mut self) -> std::io::Result<std::process::ExitStatus> {
        if let Ok(status) = tokio::time::timeout(KILL_PATIENCE, self.shim.wait()).await {
            return status;
        }
        tracing::warn!(
            pid = self.job,
            "the attempt shim did not end after being told to kill; killing it"
        );
        let _ = self.shim.start_kill();
        self.kill_group();
        self.shim.wait().await
    }

    /// SIGKILL to the job's process group: a shim that ended on its own
    /// has killed the whole tree already, one that was killed (past its
    /// patience, or from outside) has not. The group number stays the
    /// job's while any member lives; with none left this is ESRCH (a reuse
    /// of the number in the moments since would need pid allocation to
    /// wrap around).
    fn kill_group(&self) {
        if self.job > 0 {
            match killpg(Pid::from_raw(self.job), Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => tracing::warn!(pgid = self.job, error = %e,
                    "cannot kill the job's process group"),
            }
        }
    }

    /// After the shim ended: collects the remaining output and forgets the
    /// record (nothing is left for a restart to kill).
    pub(super) async fn finish(&mut self, term: Termination) -> Termination {
        if let Some(m) = self.memory.take() {
            // It holds a copy of the log's sink: the log closes without it.
            m.task.abort();
        }
        if self.ended.is_none() {
            self.kill_group();
            self.ended = Some(term);
        }
        let deadline = tokio::time::Instant::now() + OUTPUT_DRAIN;
        for pump in &mut self.pumps {
            if tokio::time::timeout_at(deadline, &mut *pump).await.is_err() {
                tracing::warn!(
                    pgid = self.job,
                    "output still open after the process ended; dropping the rest"
                );
                pump.abort();
            }
        }
        self.pumps.clear();
        if let Some(path) = self.record.take() {
            super::leftovers::forget(&path);
        }
        term
    }
}

impl Drop for ProcessWorkload {
    /// A workload dropped before it ended (its task was aborted) still must
    /// not leave the job running: the shim kills the tree.
    fn drop(&mut self) {
        if self.ended.is_none() {
            self.signal_shim(Signal::SIGUSR2);
        }
    }
}

impl Workload for ProcessWorkload {
    fn describe(&self) -> String {
        format!("pid {}", self.job)
    }

    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<Termination>> {
        Box::pin(async move {
            if let Some(t) = self.ended {
                return Ok(t);
            }
            let status = self.wait_shim().await?;
            Ok(self.finish(Termination::from(status)).await)
        })
    }

    /// An attempt the memory limit killed is an out-of-memory kill, with
    /// the limit and what it used.
    fn failure(&self) -> Option<JobError> {
        self.over_limit
            .map(|o| crate::job_error::memory_limit_error(o.limit_mib, o.used_mib))
    }

    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, std::io::Result<Termination>> {
        Box::pin(async move {
            if let Some(t) = self.ended {
                return Ok(t);
            }
            // The shim forwards it to the job's group and waits for the
            // whole tree; the rest of the group gets the rest of the grace.
            self.signal_shim(Signal::SIGTERM);
            let status = match tokio::time::timeout(grace, self.shim.wait()).await {
                Ok(status) => status?,
                Err(_) => {
                    tracing::info!(
                        pgid = self.job,
                        grace_s = grace.as_secs_f64(),
                        "still running after the grace period; killing the attempt's processes"
                    );
                    self.signal_shim(Signal::SIGUSR2);
                    self.wait_killed().await?
                }
            };
            Ok(self.finish(Termination::from(status)).await)
        })
    }
}
