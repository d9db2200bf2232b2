//! The `process` backend: the job's argv as a local subprocess, GPUs
//! pinned with `CUDA_VISIBLE_DEVICES`, `spec.resources.memory_mib` enforced
//! by sampling ([`memory`]). Each attempt runs under a shim
//! ([`crate::shim`], the runner's own binary) that keeps the attempt's
//! whole process tree from outliving the runner; what a killed runner's
//! shims could not stop, the next start of the runner does
//! ([`leftovers`]).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use trainmesh_common::proto::runner::v1::Gpu;

use super::{Backend, LaunchRequest, Workload};
use crate::config::JobUser;
use crate::domain::Termination;
use crate::error::Error;
use crate::logs::pump_lines;
use crate::shim::{SHIM_ARG, SHIM_USER_ENV, STATUS_FD};

pub mod leftovers;
pub mod memory;
mod workload;

pub use workload::ProcessWorkload;

/// How long the shim may take to say whether the job started.
const SHIM_REPORT: Duration = Duration::from_secs(30);

pub struct ProcessBackend {
    default_working_dir: PathBuf,
    /// (name, value) taken from the runner's own environment.
    inherited: Vec<(String, String)>,
    gpus: Vec<Gpu>,
    /// The runner's binary, run as the attempt shim.
    shim: PathBuf,
    /// Who jobs run as; `None`: the runner's own user.
    job_user: Option<JobUser>,
}

impl ProcessBackend {
    /// `default_working_dir` `None` means the runner's current directory;
    /// `inherit_env` names the runner's variables that jobs see; `gpus` is
    /// the node's inventory as registered; `shim` is the runner's binary.
    pub fn new(
        default_working_dir: Option<PathBuf>,
        inherit_env: &[String],
        gpus: Vec<Gpu>,
        shim: PathBuf,
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
            shim,
            job_user: None,
        })
    }

    /// Runs jobs as `user` (the runner must run as root): each attempt
    /// directory is handed to the user, the directories above it up to
    /// the work dir let it through, and a job without a working directory
    /// of its own starts in its attempt directory.
    pub fn run_as(mut self, user: Option<JobUser>, explicit_working_dir: bool) -> Self {
        if user.is_some() && !explicit_working_dir {
            self.default_working_dir = PathBuf::new();
        }
        self.job_user = user;
        self
    }

    /// Gives the attempt directory to the job's user.
    fn open_attempt_dir(&self, dir: &std::path::Path) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        let Some(user) = &self.job_user else {
            return Ok(());
        };
        let failed = |what: &str, e| Error::io(format!("cannot {what} `{}`", dir.display()), e);
        std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid))
            .map_err(|e| failed("hand to the job's user", e))?;
        // `<work dir>/<job>/<attempt>`: the two above it are the runner's,
        // private; enter-only lets the job reach its own and list none.
        for up in dir.ancestors().skip(1).take(2) {
            let mode = std::fs::metadata(up)
                .map_err(|e| failed("read", e))?
                .permissions()
                .mode();
            std::fs::set_permissions(up, std::fs::Permissions::from_mode(mode | 0o111))
                .map_err(|e| failed("open", e))?;
        }
        Ok(())
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
        // An empty default: the attempt's own directory (see `run_as`).
        let base = if self.default_working_dir.as_os_str().is_empty() {
            &req.attempt_dir
        } else {
            &self.default_working_dir
        };
        let dir = match &req.working_dir {
            Some(d) => base.join(d),
            None => base.clone(),
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

    async fn spawn(&self, req: LaunchRequest) -> Result<Box<dyn Workload>, Error> {
        let env = self.environment(&req)?;
        self.open_attempt_dir(&req.attempt_dir)?;
        let dir = self.working_dir(&req)?;
        let Some((program, args)) = req.command.split_first() else {
            return Err(Error::InvalidAssignment(
                trainmesh_common::error::FieldError::new("spec.command", "is required"),
            ));
        };
        let program = program.clone();
        let io_error = |what: &str, e| Error::io(format!("{what} for `{program}`"), e);
        // One pipe for stdout and stderr, as `2>&1`: the log keeps the order
        // the job wrote in (progress on stdout, then the traceback on
        // stderr), which two pipes read by two tasks cannot promise.
        let (output, out_writer) = std::io::pipe().map_err(|e| io_error("output pipe", e))?;
        let err_writer = out_writer
            .try_clone()
            .map_err(|e| io_error("output pipe", e))?;
        // Where the shim says whether the job started.
        let (status, status_writer) = std::io::pipe().map_err(|e| io_error("status pipe", e))?;
        let status_fd = status_writer.as_raw_fd();
        let mut cmd = Command::new(&self.shim);
        cmd.arg(SHIM_ARG)
            .arg(std::process::id().to_string())
            .arg(&program)
            .args(args)
            .current_dir(&dir)
            .env_clear()
            .envs(&env)
            .envs(
                self.job_user
                    .as_ref()
                    .map(|u| (SHIM_USER_ENV, format!("{}:{}", u.uid, u.gid))),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_writer))
            .stderr(Stdio::from(err_writer))
            // Its own group: a Ctrl-C meant for the runner does not reach
            // it (the shim puts the job in a group of its own in turn).
            .process_group(0);
        // SAFETY: dup2 and fcntl are async-signal-safe; the closure touches
        // no memory shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                // The pipe is close-on-exec everywhere else, so no other
                // child holds it open; here it becomes the shim's fd 3.
                let r = if status_fd == STATUS_FD {
                    libc::fcntl(STATUS_FD, libc::F_SETFD, 0)
                } else {
                    libc::dup2(status_fd, STATUS_FD)
                };
                if r == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut shim = cmd.spawn().map_err(|e| {
            Error::io(
                format!("cannot start the attempt shim `{}`", self.shim.display()),
                e,
            )
        })?;
        // The command keeps its copies of the write ends (it could spawn
        // again): without dropping them neither pipe ever ends.
        drop(cmd);
        drop(status_writer);
        let output = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(output))
            .map_err(|e| io_error("output pipe", e))?;
        let pumps = vec![tokio::spawn(pump_lines(output, req.output.clone()))];
        let memory_limit = req.resources.memory_mib;
        let started = match shim_status(status).await {
            Ok(started) => started,
            Err(failure) => {
                // The shim exits at once after a failed start; what it and
                // the job printed stays in the log.
                let _ = shim.wait().await;
                let mut gone = ProcessWorkload::new(shim, 0, pumps, None);
                gone.finish(Termination::Exited(-1)).await;
                return Err(match failure {
                    ShimFailure::Exec(source) => Error::Exec { program, source },
                    ShimFailure::Other(e) => Error::io(
                        format!(
                            "the attempt shim `{}` did not start `{program}`",
                            self.shim.display()
                        ),
                        e,
                    ),
                });
            }
        };
        let record = leftovers::Record::new(req.key, &shim, started);
        let record = match record.write(&req.attempt_dir) {
            Ok(path) => Some(path),
            Err(e) => {
                // Only a restart's clean-up misses it: not worth failing
                // the attempt over.
                tracing::warn!(error = %e, "cannot record the attempt's processes");
                None
            }
        };
        tracing::debug!(pid = started, program, dir = %dir.display(), "process started");
        let mut workload = ProcessWorkload::new(shim, started, pumps, record);
        if let (true, Some(shim_pid)) = (memory_limit > 0, workload.shim_pid()) {
            let (task, over) = memory::watch(shim_pid, memory_limit, req.output.clone());
            workload = workload.with_memory_watch(workload::MemoryWatch {
                task,
                over: Some(over),
            });
        }
        Ok(Box::new(workload))
    }
}

/// Why the shim did not start the job.
enum ShimFailure {
    /// The job's program could not be executed.
    Exec(std::io::Error),
    /// The shim failed or said something else.
    Other(std::io::Error),
}

/// Reads the shim's report from the status pipe: the job's pid.
async fn shim_status(status: std::io::PipeReader) -> Result<i32, ShimFailure> {
    let other = |m: String| ShimFailure::Other(std::io::Error::other(m));
    let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(status))
        .map_err(ShimFailure::Other)?;
    let mut text = String::new();
    match tokio::time::timeout(SHIM_REPORT, rx.read_to_string(&mut text)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(ShimFailure::Other(e)),
        Err(_) => return Err(other(format!("no word after {}s", SHIM_REPORT.as_secs()))),
    }
    let (word, value) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
    match (word, value.parse::<i32>()) {
        ("started", Ok(pid)) if pid > 0 => Ok(pid),
        ("exec-error", Ok(errno)) => {
            Err(ShimFailure::Exec(std::io::Error::from_raw_os_error(errno)))
        }
        ("", _) => Err(other(
            "it exited without a word (is it this runner's binary?)".into(),
        )),
        _ => Err(other(format!("it said `{}`", text.trim()))),
    }
}

impl Backend for ProcessBackend {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<Box<dyn Workload>, Error>> {
        Box::pin(self.spawn(req))
    }
}
