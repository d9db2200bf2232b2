//! The container watchdog: the docker backend's counterpart of the
//! attempt shim. Containers are the engine's children, not the runner's,
//! so nothing the kernel does ends them when the runner dies; left running
//! after a `kill -9`, they would run next to the attempts the scheduler
//! retries elsewhere.
//!
//! The runner starts its own binary once more as `runner
//! __trainmesh-container-watchdog SOCKET`, in a process group of its own
//! (a Ctrl-C meant for the runner does not reach it), and tells it on a
//! pipe which containers run: `+NAME` when one starts, `-NAME` when it has
//! ended. When the runner dies, however it dies, the kernel closes the
//! pipe; the watchdog reads its end and kills every container still on its
//! list through the engine's API on the unix socket SOCKET, then exits. A
//! runner that stops gracefully has ended or handed back its containers
//! first, so the list is empty by then.
//!
//! It is a plain single-threaded program with blocking I/O: no runtime.

use std::collections::BTreeSet;
use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// The first argument that makes the runner binary the watchdog.
pub const WATCHDOG_ARG: &str = "__trainmesh-container-watchdog";
/// How often a kill is tried while the engine does not answer.
const KILL_TRIES: u32 = 20;
const KILL_PAUSE: Duration = Duration::from_millis(250);
const ENGINE_TIMEOUT: Duration = Duration::from_secs(10);

/// Becomes the watchdog, and never returns, when this process was started
/// as one; returns at once otherwise. Call first thing in `main`.
pub fn run_if_watchdog() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new(WATCHDOG_ARG)) {
        return;
    }
    let Some(socket) = args.next().map(PathBuf::from) else {
        eprintln!("usage: runner {WATCHDOG_ARG} DOCKER_SOCKET");
        std::process::exit(2);
    };
    // SAFETY: setting dispositions of this process's own signals.
    unsafe {
        // Only the pipe's end ends the watchdog.
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    let running = follow(std::io::stdin().lock());
    for name in &running {
        kill(&socket, name);
    }
    std::process::exit(0)
}

/// Reads `+NAME` / `-NAME` lines until the pipe ends (the runner is gone);
/// returns the containers still running then.
fn follow(input: impl BufRead) -> BTreeSet<String> {
    let mut running = BTreeSet::new();
    for line in input.lines() {
        let Ok(line) = line else { break };
        if let Some(name) = line.strip_prefix('+').filter(|n| valid_name(n)) {
            running.insert(name.to_owned());
        } else if let Some(name) = line.strip_prefix('-') {
            running.remove(name);
        }
    }
    running
}

/// Container names as the backend makes them; anything else could not be
/// put in a request path safely.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Kills `name` through the engine; retries while the engine does not
/// answer, gives up on any answer (gone, already stopped, killed).
fn kill(socket: &Path, name: &str) {
    for _ in 0..KILL_TRIES {
        match post_kill(socket, name) {
            Ok(status) => {
                eprintln!("[trainmesh] the runner died; killed container {name} (engine answered {status})");
                return;
            }
            Err(e) => {
                eprintln!("[trainmesh] cannot reach the Docker engine to kill {name}: {e}");
                std::thread::sleep(KILL_PAUSE);
            }
        }
    }
}

/// `POST /containers/NAME/kill`; returns the HTTP status.
fn post_kill(socket: &Path, name: &str) -> std::io::Result<u16> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(ENGINE_TIMEOUT))?;
    stream.set_write_timeout(Some(ENGINE_TIMEOUT))?;
    write!(
        stream,
        "POST /containers/{name}/kill?signal=SIGKILL HTTP/1.1\r\nHost: docker\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    // "HTTP/1.1 204 No Content"
    std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|s| s.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}

/// The unix socket of a Docker host setting (`unix:///path`), or of
/// `DOCKER_HOST`, or the engine's default; `None` for an engine reached
/// over TCP, which the watchdog cannot serve.
pub fn socket_of(host: Option<&str>) -> Option<PathBuf> {
    let from_env = std::env::var("DOCKER_HOST").ok();
    match host.or(from_env.as_deref()) {
        None => Some(PathBuf::from("/var/run/docker.sock")),
        Some(h) => h.strip_prefix("unix://").map(PathBuf::from),
    }
}

/// The runner's side: the watchdog process and the pipe to it.
pub struct Watchdog {
    pid: u32,
    pipe: Mutex<ChildStdin>,
}

impl Watchdog {
    /// Starts `exe` (the runner's own binary) as the watchdog of the
    /// engine on `socket`.
    pub fn start(exe: &Path, socket: &Path) -> std::io::Result<Watchdog> {
        let mut child = Command::new(exe)
            .arg(WATCHDOG_ARG)
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()?;
        let pipe = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("no pipe to the watchdog"))?;
        Ok(Watchdog {
            pid: child.id(),
            pipe: Mutex::new(pipe),
        })
    }

    /// `name` runs: kill it should the runner die.
    pub fn watch(&self, name: &str) {
        self.say('+', name);
    }

    /// `name` has ended.
    pub fn unwatch(&self, name: &str) {
        self.say('-', name);
    }

    fn say(&self, op: char, name: &str) {
        let mut pipe = self.pipe.lock().unwrap_or_else(|p| p.into_inner());
        // A few bytes into a pipe the watchdog drains: this does not block.
        if let Err(e) = writeln!(pipe, "{op}{name}") {
            tracing::error!(error = %e, container = name,
                "the container watchdog is gone; this runner's containers would outlive it");
        }
    }

    /// The watchdog's pid (tests).
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_keeps_what_started_and_did_not_end() {
        let input = "+trainmesh-a-1\n+trainmesh-b-1\n-trainmesh-a-1\n+bad/name\n+../x\n*junk\n\n+trainmesh-c-2\n";
        let left = follow(std::io::Cursor::new(input));
        assert_eq!(
            left.into_iter().collect::<Vec<_>>(),
            ["trainmesh-b-1", "trainmesh-c-2"]
        );
    }

    #[test]
    fn only_unix_sockets_can_be_watched() {
        assert_eq!(
            socket_of(Some("unix:///run/user/1000/docker.sock")),
            Some(PathBuf::from("/run/user/1000/docker.sock"))
        );
        assert_eq!(socket_of(Some("tcp://10.0.0.1:2376")), None);
    }
}
