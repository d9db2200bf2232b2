//! The `process` backend: the job's argv as a local subprocess in its own
//! process group, GPUs pinned with `CUDA_VISIBLE_DEVICES`.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use trainmesh_common::proto::runner::v1::Gpu;

use super::{Backend, LaunchRequest, Workload};
use crate::domain::Termination;
use crate::error::Error;
use crate::logs::pump_lines;

/// How long output may keep arriving after the process ended (a pipe still
/// held open by something that escaped the process group).
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

pub struct ProcessBackend {
    default_working_dir: PathBuf,
    /// (name, value) taken from the runner's own environment.
    inherited: Vec<(String, String)>,
    gpus: Vec<Gpu>,
}

impl ProcessBackend {
    /// `default_working_dir` `None` means the runner's current directory;
    /// `inherit_env` names the runner's variables that jobs see; `gpus` is
    /// the node's inventory as registered.
    pub fn new(
        default_working_dir: Option<PathBuf>,
        inherit_env: &[String],
        gpus: Vec<Gpu>,
    ) -> std::io::Result<Self> {
        let default_working_dir = match default_working_dir {
            Some(d) => d,
            None => std::env::current_dir()?,
        };
        let inherited = inherit_env
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
            .collect();
        Ok(Self {
            default_working_dir,
            inherited,
            gpus,
        })
    }

    /// The complete environment of the job's process.
    pub fn environment(&self, req: &LaunchRequest) -> Result<BTreeMap<String, String>, Error> {
        let mut env: BTreeMap<String, String> = self.inherited.iter().cloned().collect();
        env.extend(req.env.clone());
        // The platform's variables win over the spec's: a job must not be
        // able to claim GPUs it was not given.
        let devices = req
            .gpu_indexes
            .iter()
            .map(|i| {
                self.gpus
                    .iter()
                    .find(|g| g.index == *i)
                    .map(|g| g.index.to_string())
                    .ok_or(Error::UnknownGpu { index: *i })
            })
            .collect::<Result<Vec<_>, _>>()?;
        env.insert("CUDA_VISIBLE_DEVICES".into(), devices.join(","));
        // nvidia-smi numbers GPUs by PCI bus; CUDA's default order is
        // fastest first. Pin CUDA to nvidia-smi's numbering.
        env.insert("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into());
        env.insert(
            "TRAINMESH_METRICS_FILE".into(),
            req.metrics_file.display().to_string(),
        );
        env.insert(
            "TRAINMESH_OUTPUT_DIR".into(),
            req.attempt_dir.display().to_string(),
        );
        Ok(env)
    }

    fn working_dir(&self, req: &LaunchRequest) -> Result<PathBuf, Error> {
        let dir = match &req.working_dir {
            Some(d) => self.default_working_dir.join(d),
            None => self.default_working_dir.clone(),
        };
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(dir),
            Ok(_) => Err(Error::WorkingDir {
                path: dir.display().to_string(),
                reason: "not a directory".into(),
            }),
            Err(e) => Err(Error::WorkingDir {
                path: dir.display().to_string(),
                reason: e.to_string(),
            }),
        }
    }

    fn spawn(&self, req: LaunchRequest) -> Result<Box<dyn Workload>, Error> {
        let env = self.environment(&req)?;
        let dir = self.working_dir(&req)?;
        let Some((program, args)) = req.command.split_first() else {
            return Err(Error::InvalidAssignment(
                trainmesh_common::error::FieldError::new("spec.command", "is required"),
            ));
        };
        let program = program.clone();
        let exec_error = |source| Error::Exec {
            program: program.clone(),
            source,
        };
        // One pipe for stdout and stderr, as `2>&1`: the log keeps the order
        // the job wrote in (progress on stdout, then the traceback on
        // stderr), which two pipes read by two tasks cannot promise.
        let (output, out_writer) = std::io::pipe().map_err(exec_error)?;
        let err_writer = out_writer.try_clone().map_err(exec_error)?;
        let mut cmd = Command::new(&program);
        cmd.args(args)
            .current_dir(&dir)
            .env_clear()
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_writer))
            .stderr(Stdio::from(err_writer))
            // Its own group: cancel signals reach everything it started,
            // and a Ctrl-C meant for the runner does not reach it.
            .process_group(0)
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl and getppid are async-signal-safe; the closure
        // touches no memory shared with the parent.
        unsafe {
            let parent = libc::getpid();
            cmd.pre_exec(move || {
                // If the runner dies without stopping it (kill -9), the job
                // dies too instead of running on unsupervised while the
                // scheduler requeues it elsewhere.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("runner exited during spawn"));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(exec_error)?;
        // The command keeps its copies of the write end (it could spawn
        // again): without dropping them the output never ends.
        drop(cmd);
        let output = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(output))
            .map_err(exec_error)?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let pumps = vec![tokio::spawn(pump_lines(output, req.output.clone()))];
        tracing::debug!(pid, program, dir = %dir.display(), "process started");
        Ok(Box::new(ProcessWorkload {
            child,
            pgid: pid,
            pumps,
            ended: None,
        }))
    }
}

impl Backend for ProcessBackend {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<Box<dyn Workload>, Error>> {
        Box::pin(async move { self.spawn(req) })
    }
}

pub struct ProcessWorkload {
    child: Child,
    /// The process group (the child's pid, as it leads its own group).
    pgid: i32,
    pumps: Vec<JoinHandle<()>>,
    ended: Option<Termination>,
}

impl ProcessWorkload {
    fn signal_group(&self, sig: Signal) {
        if self.pgid <= 0 {
            return;
        }
        match killpg(Pid::from_raw(self.pgid), sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pgid = self.pgid, signal = %sig, error = %e,
                "cannot signal the process group"),
        }
    }

    /// Waits until no process of the group is left, or `deadline`.
    async fn wait_group_gone(&self, deadline: tokio::time::Instant) {
        while self.pgid > 0 && tokio::time::Instant::now() < deadline {
            if !group_alive(self.pgid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// After the leader ended: nothing of the job may outlive it (as when a
    /// container ends), then the remaining output is collected.
    async fn finish(&mut self, term: Termination) -> Termination {
        if self.ended.is_none() {
            self.signal_group(Signal::SIGKILL);
            self.ended = Some(term);
        }
        let deadline = tokio::time::Instant::now() + OUTPUT_DRAIN;
        for pump in &mut self.pumps {
            if tokio::time::timeout_at(deadline, &mut *pump).await.is_err() {
                tracing::warn!(
                    pgid = self.pgid,
                    "output still open after the process ended; dropping the rest"
                );
                pump.abort();
            }
        }
        self.pumps.clear();
        term
    }
}

/// State letter and process group of `pid`, from `/proc/<pid>/stat`.
pub fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start
    // after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Whether a live (not zombie) process is left in group `pgid`. Zombies
/// count as gone: an init that does not reap orphans would otherwise keep
/// a finished group "alive" forever.
pub fn group_alive(pgid: i32) -> bool {
    match killpg(Pid::from_raw(pgid), None) {
        Err(Errno::ESRCH) => return false,
        Err(_) => return true,
        Ok(()) => {}
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_state)
        .any(|(state, pgrp)| pgrp == pgid && !matches!(state, 'Z' | 'X'))
}

impl Workload for ProcessWorkload {
    fn describe(&self) -> String {
        format!("pid {}", self.pgid)
    }

    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<Termination>> {
        Box::pin(async move {
            if let Some(t) = self.ended {
                return Ok(t);
            }
            let status = self.child.wait().await?;
            Ok(self.finish(Termination::from(status)).await)
        })
    }

    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, std::io::Result<Termination>> {
        Box::pin(async move {
            if let Some(t) = self.ended {
                return Ok(t);
            }
            self.signal_group(Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + grace;
            let status = match tokio::time::timeout_at(deadline, self.child.wait()).await {
                Ok(status) => {
                    // The rest of the group (workers, data loaders) gets the
                    // rest of the grace period too.
                    self.wait_group_gone(deadline).await;
                    status?
                }
                Err(_) => {
                    tracing::info!(
                        pgid = self.pgid,
                        grace_s = grace.as_secs_f64(),
                        "still running after the grace period; killing the process group"
                    );
                    self.signal_group(Signal::SIGKILL);
                    self.child.wait().await?
                }
            };
            Ok(self.finish(Termination::from(status)).await)
        })
    }
}

#[cfg(test)]
#[path = "process_tests.rs"]
mod tests;
