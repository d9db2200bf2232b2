//! The attempt shim: the process backend starts each attempt through the
//! runner's own binary, run again as `runner __trainmesh-attempt-shim
//! <runner pid> <program> [args…]`, so that nothing an attempt starts can
//! outlive the runner.
//!
//! - The shim is a child subreaper: whatever the job leaves behind (double
//!   forks, daemons, `setsid`) is re-parented to the shim, never to PID 1,
//!   so the shim can always find the whole tree and kill it.
//! - It asks for a signal when its parent dies (`PR_SET_PDEATHSIG`) and
//!   then kills the tree with SIGKILL — a runner killed with SIGKILL
//!   included. The kernel sends that signal when the *thread* that started
//!   the shim exits, which a live runner's threads do; so the shim checks
//!   that its parent really is gone and otherwise ignores it.
//! - The job runs in its own process group, which the shim signals.
//!
//! From the runner, SIGTERM asks the job to stop (forwarded to its process
//! group; the shim then waits for the whole tree to end) and SIGUSR2 kills
//! the tree at once. The shim exits when the job and everything it started
//! are gone, with the job's status (re-raising the signal that killed it),
//! and tells the runner on fd 3 whether the job started: `started <pid>` or
//! `exec-error <errno>`.
//!
//! It is a plain single-threaded program: no runtime, no threads, so
//! forking and the signal mask are simple.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use crate::domain::Termination;
use crate::procfs;

/// The first argument that makes the runner binary a shim.
pub const SHIM_ARG: &str = "__trainmesh-attempt-shim";
/// Where the shim reports whether the job started.
pub const STATUS_FD: i32 = 3;
/// Set by the runner to `UID:GID` when the job runs as another user; the
/// job itself does not see it.
pub const SHIM_USER_ENV: &str = "TRAINMESH_SHIM_JOB_USER";
/// Kill the whole tree now (sent by the runner after the grace period).
pub const KILL_NOW: i32 = libc::SIGUSR2;
/// The shim's parent-death signal.
const PARENT_DIED: i32 = libc::SIGUSR1;
/// Signals that ask the job to stop.
const STOP: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];
/// Exit code when the shim itself could not run the job.
const SHIM_FAILED: i32 = 125;
/// How long killed processes may take to be gone (uninterruptible I/O).
const KILL_PATIENCE: Duration = Duration::from_secs(10);

/// Becomes the shim, and never returns, when this process was started as
/// one; returns at once otherwise. Call first thing in `main`, before any
/// runtime or thread starts.
pub fn run_if_shim() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(SHIM_ARG)) {
        return;
    }
    let code = shim(args.collect());
    std::process::exit(code)
}

fn shim(args: Vec<OsString>) -> i32 {
    let mut args = args.into_iter();
    let runner = args
        .next()
        .and_then(|a| a.to_str()?.parse::<libc::pid_t>().ok());
    let (Some(runner), Some(program)) = (runner, args.next()) else {
        eprintln!("usage: runner {SHIM_ARG} RUNNER_PID PROGRAM [ARG...]");
        return SHIM_FAILED;
    };
    let mut status = StatusPipe::open();
    let mask = block_signals();
    // SAFETY: prctl and getppid have no memory-safety preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, PARENT_DIED);
        // After asking for the signal, so a runner that died before cannot
        // be missed.
        if libc::getppid() != runner {
            return SHIM_FAILED;
        }
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
    }
    let me = std::process::id() as libc::pid_t;
    let mut cmd = std::process::Command::new(&program);
    cmd.args(args).process_group(0).env_remove(SHIM_USER_ENV);
    // The shim stays root (to stop the tree); the job is the job's user,
    // with no supplementary groups (std drops them when root sets a uid).
    match job_user() {
        Ok(Some((uid, gid))) => {
            cmd.uid(uid).gid(gid);
        }
        Ok(None) => {}
        Err(e) => {
            eprintln!("trainmesh shim: {e}");
            return SHIM_FAILED;
        }
    }
    // SAFETY: only async-signal-safe calls, on no memory shared with the
    // parent.
    unsafe {
        cmd.pre_exec(move || {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            // Should the shim itself be killed, the job goes with it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != me {
                return Err(std::io::Error::other("the shim exited during spawn"));
            }
            Ok(())
        });
    }
    // The runner keeps its own files private (umask 077); the job gets
    // the usual default for what it writes.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let job = match cmd.spawn() {
        Ok(child) => child.id() as libc::pid_t,
        Err(e) => {
            status.say(&format!("exec-error {}\n", e.raw_os_error().unwrap_or(0)));
            return 127;
        }
    };
    status.say(&format!("started {job}\n"));
    drop(status);
    let mut tree = Tree {
        me,
        job,
        runner,
        ended: None,
        stopping: false,
        mask,
    };
    let end = tree.supervise();
    exit_as(end)
}

/// `UID:GID` the runner asks the job to run as, from [`SHIM_USER_ENV`].
fn job_user() -> Result<Option<(u32, u32)>, String> {
    let Some(v) = std::env::var_os(SHIM_USER_ENV) else {
        return Ok(None);
    };
    let v = v.to_string_lossy();
    let parsed = v
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
    parsed
        .map(Some)
        .ok_or_else(|| format!("{SHIM_USER_ENV} `{v}` is not UID:GID"))
}

/// The status pipe from the runner, if there is one (not when the shim is
/// run by hand). The job does not inherit it.
struct StatusPipe(Option<std::fs::File>);

impl StatusPipe {
    fn open() -> Self {
        // SAFETY: fcntl on a descriptor number; taking ownership of fd 3
        // only once it is known to be open, and nothing else owns it here.
        unsafe {
            if libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC) == -1 {
                return StatusPipe(None);
            }
            StatusPipe(Some(std::fs::File::from_raw_fd(STATUS_FD)))
        }
    }

    fn say(&mut self, line: &str) {
        if let Some(f) = &mut self.0 {
            // The runner may be gone; nothing to do about it here.
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// Blocks the signals the shim waits for, so they queue until it asks.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain signal-set manipulation on a local set.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGCHLD, PARENT_DIED, KILL_NOW]
            .into_iter()
            .chain(STOP)
        {
            libc::sigaddset(&mut set, sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// The next of the blocked signals, waiting up to `timeout` (`None`:
/// forever); `None` on timeout or interruption.
fn next_signal(mask: &libc::sigset_t, timeout: Option<Duration>) -> Option<i32> {
    // SAFETY: `mask` is initialised; `info` is only written by the call.
    let sig = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        match timeout {
            None => libc::sigwaitinfo(mask, &mut info),
            Some(t) => {
                let ts = libc::timespec {
                    tv_sec: t.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                    tv_nsec: t.subsec_nanos().into(),
                };
                libc::sigtimedwait(mask, &mut info, &ts)
            }
        }
    };
    (sig > 0).then_some(sig)
}

/// The job and everything it started.
struct Tree {
    me: libc::pid_t,
    job: libc::pid_t,
    runner: libc::pid_t,
    /// How the job itself ended, once reaped.
    ended: Option<Termination>,
    /// The runner asked the job to stop: the rest of the tree may take
    /// until it ends, or until the runner says kill.
    stopping: bool,
    mask: libc::sigset_t,
}

impl Tree {
    /// Runs until the tree is gone; returns how the job ended.
    fn supervise(&mut self) -> Termination {
        loop {
            let left = self.reap();
            if self.ended.is_some() && (!self.stopping || !left) {
                break;
            }
            // SAFETY: getppid has no preconditions.
            if unsafe { libc::getppid() } != self.runner {
                break;
            }
            match next_signal(&self.mask, None) {
                Some(KILL_NOW) => break,
                Some(sig) if STOP.contains(&sig) => {
                    self.stopping = true;
                    if self.ended.is_none() {
                        // SAFETY: the job is not reaped yet, so its pid
                        // (and group) cannot name another process.
                        unsafe { libc::killpg(self.job, libc::SIGTERM) };
                    }
                }
                // A child ended, the parent may have died, or a wait was
                // interrupted: look again.
                _ => {}
            }
        }
        self.kill_all();
        self.ended.unwrap_or(Termination::Signaled(libc::SIGKILL))
    }

    /// Reaps every ended child; returns whether any child is left.
    fn reap(&mut self) -> bool {
        loop {
            let mut st = 0;
            // SAFETY: `st` is a valid out-pointer.
            let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
            if pid > 0 {
                if pid == self.job {
                    self.ended = Some(termination(st));
                }
                continue;
            }
            if pid == 0 {
                return true;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return false;
            }
        }
    }

    /// SIGKILL to the whole tree, until no child is left. A process forked
    /// just before its parent was killed is re-parented here and found in
    /// the next round.
    fn kill_all(&mut self) {
        let deadline = Instant::now() + KILL_PATIENCE;
        loop {
            if self.ended.is_none() {
                // SAFETY: not reaped yet, so the group is still the job's.
                unsafe { libc::killpg(self.job, libc::SIGKILL) };
            }
            for pid in procfs::descendants(self.me, &procfs::all()) {
                // SAFETY: a live descendant of this process; kill(2) has no
                // memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if !self.reap() {
                return;
            }
            if Instant::now() >= deadline {
                eprintln!("[trainmesh] processes of the attempt survived SIGKILL; leaving them");
                return;
            }
            next_signal(&self.mask, Some(Duration::from_millis(20)));
        }
    }
}

fn termination(status: libc::c_int) -> Termination {
    if libc::WIFSIGNALED(status) {
        Termination::Signaled(libc::WTERMSIG(status))
    } else {
        Termination::Exited(libc::WEXITSTATUS(status))
    }
}

/// Ends the shim the way the job ended, so the runner reads the job's
/// status from the shim's.
fn exit_as(end: Termination) -> i32 {
    let sig = match end {
        Termination::Exited(code) => return code,
        Termination::Signaled(sig) => sig,
    };
    // SAFETY: resetting this process's own signal state before dying.
    unsafe {
        // The job may have dumped core; the shim need not.
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
    // A signal whose default is not to terminate.
    128 + sig
}
