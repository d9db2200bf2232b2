//! Child processes of `trainctl up`: start them, notice when one exits,
//! stop them with SIGTERM and a grace period, then SIGKILL.
//!
//! Each child is owned by one task, which both waits for it and delivers
//! signals to it, so a signal can never reach a reused pid: once the task
//! has reaped the child, `Child::id()` is `None` and nothing is sent.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildSpec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, OsString)>,
    pub env_remove: Vec<String>,
    /// The child's stdout and stderr are appended here (panics and flag
    /// errors happen before its own logging starts).
    pub output: PathBuf,
}

/// A child that ended, on its own or because it was stopped.
#[derive(Debug, Clone)]
pub struct Exit {
    pub name: String,
    pub status: Option<ExitStatus>,
}

impl Exit {
    pub fn describe(&self) -> String {
        match self.status {
            None => "ended (its status could not be read)".into(),
            Some(s) => describe(s),
        }
    }
}

pub fn describe(s: ExitStatus) -> String {
    if let Some(code) = s.code() {
        format!("exit code {code}")
    } else if let Some(sig) = s.signal() {
        format!("killed by signal {sig} ({})", signal_name(sig))
    } else {
        s.to_string()
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

struct Handle {
    name: String,
    pid: u32,
    signals: mpsc::UnboundedSender<i32>,
    done: watch::Receiver<bool>,
}

impl Handle {
    fn is_done(&self) -> bool {
        *self.done.borrow()
    }
}

pub struct Supervisor {
    handles: Vec<Handle>,
    exits: mpsc::UnboundedSender<Exit>,
}

impl Supervisor {
    /// The receiver yields every child's exit, in the order they happen.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Exit>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                handles: Vec::new(),
                exits: tx,
            },
            rx,
        )
    }

    /// Starts `spec` and returns its pid.
    pub fn spawn(&mut self, spec: &ChildSpec) -> anyhow::Result<u32> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.output)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", spec.output.display()))?;
        let err = out.try_clone()?;
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // Its own process group: Ctrl-C in the terminal reaches only
            // trainctl, which then stops the children in order.
            .process_group(0)
            // Last resort if this task is gone without stopping it.
            .kill_on_drop(true);
        for key in &spec.env_remove {
            cmd.env_remove(key);
        }
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches no memory of the
        // parent. With it a child is told to stop (SIGTERM) if trainctl dies
        // without stopping it, e.g. on SIGKILL, instead of running orphaned.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", spec.program.display()))?;
        let pid = child.id().unwrap_or_default();
        let (sig_tx, mut sig_rx) = mpsc::unbounded_channel::<i32>();
        let (done_tx, done_rx) = watch::channel(false);
        let exits = self.exits.clone();
        let name = spec.name.clone();
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status.ok(),
                    Some(sig) = sig_rx.recv() => {
                        if let Some(pid) = child.id() {
                            send_signal(pid, sig);
                        }
                    }
                }
            };
            let _ = done_tx.send(true);
            let _ = exits.send(Exit { name, status });
        });
        self.handles.push(Handle {
            name: spec.name.clone(),
            pid,
            signals: sig_tx,
            done: done_rx,
        });
        Ok(pid)
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.handles.iter().find(|h| h.name == name).map(|h| h.pid)
    }

    pub fn running(&self) -> Vec<String> {
        self.handles
            .iter()
            .filter(|h| !h.is_done())
            .map(|h| h.name.clone())
            .collect()
    }

    /// SIGTERM to each named child still running, up to `grace` for all of
    /// them to exit, then SIGKILL. Returns the names that had to be killed.
    pub async fn stop(&self, names: &[&str], grace: Duration) -> Vec<String> {
        let targets: Vec<&Handle> = self
            .handles
            .iter()
            .filter(|h| names.contains(&h.name.as_str()) && !h.is_done())
            .collect();
        for h in &targets {
            let _ = h.signals.send(libc::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut killed = Vec::new();
        for h in &targets {
            let mut done = h.done.clone();
            if tokio::time::timeout_at(deadline, done.wait_for(|d| *d))
                .await
                .is_err()
            {
                let _ = h.signals.send(libc::SIGKILL);
                killed.push(h.name.clone());
            }
        }
        for h in targets.iter().filter(|h| killed.contains(&h.name)) {
            let mut done = h.done.clone();
            let _ = tokio::time::timeout(Duration::from_secs(5), done.wait_for(|d| *d)).await;
        }
        killed
    }

    /// SIGKILL to every child still running, and wait (briefly) for them.
    pub async fn kill_all(&self) {
        for h in self.handles.iter().filter(|h| !h.is_done()) {
            let _ = h.signals.send(libc::SIGKILL);
        }
        for h in &self.handles {
            let mut done = h.done.clone();
            let _ = tokio::time::timeout(Duration::from_secs(5), done.wait_for(|d| *d)).await;
        }
    }
}

fn send_signal(pid: u32, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a child
    // this process has not reaped yet, so it cannot name another process.
    unsafe {
        libc::kill(pid, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(name: &str, script: &str, dir: &std::path::Path) -> ChildSpec {
        ChildSpec {
            name: name.into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("GREETING".into(), "hello".into())],
            env_remove: vec![],
            output: dir.join(format!("{name}.out")),
        }
    }

    #[tokio::test]
    async fn an_early_exit_is_reported_with_its_status_and_output_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sup, mut exits) = Supervisor::new();
        sup.spawn(&sh("quitter", "echo $GREETING; exit 3", dir.path()))
            .unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(10), exits.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.name, "quitter");
        assert_eq!(exit.describe(), "exit code 3");
        let out = std::fs::read_to_string(dir.path().join("quitter.out")).unwrap();
        assert_eq!(out, "hello\n");
        assert!(sup.running().is_empty());
    }

    #[tokio::test]
    async fn stop_terminates_children_gracefully() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sup, mut exits) = Supervisor::new();
        sup.spawn(&sh("sleeper", "exec sleep 60", dir.path()))
            .unwrap();
        assert_eq!(sup.running(), ["sleeper"]);
        let killed = sup.stop(&["sleeper"], Duration::from_secs(10)).await;
        assert!(killed.is_empty());
        let exit = exits.recv().await.unwrap();
        assert_eq!(exit.describe(), "killed by signal 15 (SIGTERM)");
    }

    #[tokio::test]
    async fn a_child_ignoring_sigterm_is_killed_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sup, mut exits) = Supervisor::new();
        // The shell ignores TERM and says so once the trap is installed.
        let spec = sh(
            "stubborn",
            "trap '' TERM; echo ready; while :; do sleep 0.1; done",
            dir.path(),
        );
        sup.spawn(&spec).unwrap();
        let out = dir.path().join("stubborn.out");
        trainmesh_common::testing::wait_for("the trap", Duration::from_secs(10), || {
            let out = out.clone();
            async move {
                std::fs::read_to_string(out)
                    .unwrap_or_default()
                    .contains("ready")
                    .then_some(())
            }
        })
        .await;
        let killed = sup.stop(&["stubborn"], Duration::from_millis(300)).await;
        assert_eq!(killed, ["stubborn"]);
        let exit = exits.recv().await.unwrap();
        assert_eq!(exit.describe(), "killed by signal 9 (SIGKILL)");
    }

    #[tokio::test]
    async fn stop_leaves_other_children_running() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sup, _exits) = Supervisor::new();
        sup.spawn(&sh("a", "exec sleep 60", dir.path())).unwrap();
        sup.spawn(&sh("b", "exec sleep 60", dir.path())).unwrap();
        sup.stop(&["a"], Duration::from_secs(10)).await;
        assert_eq!(sup.running(), ["b"]);
        sup.kill_all().await;
        assert!(sup.running().is_empty());
    }

    #[test]
    fn a_missing_program_is_a_clear_error() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut sup, _exits) = Supervisor::new();
        let mut spec = sh("ghost", "", dir.path());
        spec.program = dir.path().join("no-such-binary");
        let err = rt.block_on(async { sup.spawn(&spec).unwrap_err().to_string() });
        assert!(
            err.contains("cannot start") && err.contains("no-such-binary"),
            "{err}"
        );
    }
}
