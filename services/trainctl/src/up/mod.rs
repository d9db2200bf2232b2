//! `trainctl up`: the whole mesh on this machine, as child processes of the
//! sibling binaries, until Ctrl-C or SIGTERM.

pub mod plan;
pub mod supervisor;
pub mod tls;
pub mod tokens;

use std::io::{Read, Seek, SeekFrom, Write as _};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use trainmesh_common::client;
use trainmesh_common::proto::scheduler::v1 as sched;
use trainmesh_common::tls::ClientTls;

use crate::cli::{GlobalArgs, UpArgs};
use plan::{Layout, RUNNER, RUNNER_NAME, SERVICES};
use supervisor::{Exit, Supervisor};

/// Lines of a child's log shown when it fails.
const LOG_TAIL: usize = 20;

/// How long `up` waits for the runner to show up in the scheduler before
/// going on with a warning (a runner that exits is reported at once).
const RUNNER_REGISTRATION: Duration = Duration::from_secs(15);

pub async fn run(global: &GlobalArgs, args: &UpArgs) -> anyhow::Result<u8> {
    let exe = std::env::current_exe()?;
    let bin_dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("cannot tell which directory trainctl is in"))?;
    let bin_dir = plan::find_binaries(bin_dir)?;
    plan::check_bind_host(args)?;
    let layout = Layout::new(&global.data_dir)?;
    layout.create()?;
    let _lock = lock_data_dir(&layout.data_dir)?;
    if args.ports_from_zero {
        for s in SERVICES {
            let _ = std::fs::remove_file(layout.addr_file(s.binary()));
        }
    } else {
        check_ports_free(args)?;
    }
    let client_tls = tls::prepare(args, &layout)?;
    let tokens = tokens::ensure(&layout.data_dir, &[RUNNER_NAME])?;
    if tokens.created {
        eprintln!("created tokens in {}", layout.data_dir.display());
    } else {
        for path in tokens.written() {
            eprintln!("added {}", path.display());
        }
    }
    tokens::warn(&tokens);

    let mut signals = Signals::new()?;
    let (mut sup, mut exits) = Supervisor::new();
    let grace = Duration::from_secs(args.stop_timeout_secs);

    eprintln!(
        "starting trainmesh (data dir {})",
        layout.data_dir.display()
    );
    let mut endpoints = Vec::new();
    for s in SERVICES {
        let spec = plan::service_child(args, &layout, &bin_dir, s);
        if let Err(e) = sup.spawn(&spec) {
            shutdown(&sup, &mut signals, grace).await;
            return Err(e);
        }
        endpoints.push((s.binary(), plan::endpoint(args, &layout, s)));
    }

    let startup = Duration::from_secs(args.startup_timeout_secs);
    let healthy = tokio::select! {
        r = wait_healthy(&endpoints, &client_tls, startup) => r,
        Some(exit) = exits.recv() => return died(&sup, &mut signals, grace, &layout, &exit, "while starting").await,
        _ = signals.recv() => {
            shutdown(&sup, &mut signals, grace).await;
            return Ok(0);
        }
    };
    if let Err(unhealthy) = healthy {
        eprintln!(
            "error: not healthy after {}s: {}",
            args.startup_timeout_secs,
            unhealthy.join(", ")
        );
        for name in &unhealthy {
            print_log_tail(&layout, name);
        }
        shutdown(&sup, &mut signals, grace).await;
        return Ok(1);
    }

    let runner = plan::runner_child(args, &layout, &bin_dir);
    if let Err(e) = sup.spawn(&runner) {
        shutdown(&sup, &mut signals, grace).await;
        return Err(e);
    }
    let scheduler = plan::endpoint(args, &layout, crate::context::Service::Scheduler);
    let admin = std::fs::read_to_string(&tokens.admin)?.trim().to_owned();
    tokio::select! {
        registered = wait_runner_registered(&scheduler, &admin, &client_tls, startup.min(RUNNER_REGISTRATION)) => {
            if registered == Some(false) {
                eprintln!(
                    "warning: the runner has not registered with the scheduler yet; see {}",
                    layout.log_file(RUNNER).display()
                );
            }
        }
        Some(exit) = exits.recv() => return died(&sup, &mut signals, grace, &layout, &exit, "while starting").await,
        _ = signals.recv() => {
            shutdown(&sup, &mut signals, grace).await;
            return Ok(0);
        }
    }

    print_summary(args, &layout, &tokens.admin, &endpoints, &sup)?;

    tokio::select! {
        Some(exit) = exits.recv() => died(&sup, &mut signals, grace, &layout, &exit, "").await,
        sig = signals.recv() => {
            eprintln!("{sig} received: stopping the mesh");
            shutdown(&sup, &mut signals, grace).await;
            Ok(0)
        }
    }
}

/// One child died: say which, how, and what its log said; stop the rest.
async fn died(
    sup: &Supervisor,
    signals: &mut Signals,
    grace: Duration,
    layout: &Layout,
    exit: &Exit,
    when: &str,
) -> anyhow::Result<u8> {
    let when = if when.is_empty() {
        String::new()
    } else {
        format!(" {when}")
    };
    eprintln!(
        "error: {} exited unexpectedly{when} ({}); stopping the others",
        exit.name,
        exit.describe()
    );
    print_log_tail(layout, &exit.name);
    shutdown(sup, signals, grace).await;
    Ok(1)
}

/// Runner first (so it reports its jobs' ends while the services still
/// listen), then the services. A second Ctrl-C kills what is left at once.
async fn shutdown(sup: &Supervisor, signals: &mut Signals, grace: Duration) {
    let services: Vec<&str> = SERVICES.iter().map(|s| s.binary()).collect();
    let graceful = async {
        let mut killed = sup.stop(&[RUNNER], grace).await;
        killed.extend(sup.stop(&services, grace).await);
        killed
    };
    tokio::select! {
        killed = graceful => {
            if !killed.is_empty() {
                eprintln!(
                    "killed after {}s without exiting: {}",
                    grace.as_secs(),
                    killed.join(", ")
                );
            }
        }
        _ = signals.recv() => {
            eprintln!("second signal: killing every child now");
            sup.kill_all().await;
        }
    }
    eprintln!("trainmesh stopped");
}

/// Polls every endpoint's `grpc.health.v1.Health/Check` until all answer
/// SERVING; on timeout returns the names that did not.
async fn wait_healthy(
    endpoints: &[(&'static str, String)],
    tls: &ClientTls,
    timeout: Duration,
) -> Result<(), Vec<String>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pending: Vec<(&str, HealthClient<client::Channel>)> = Vec::new();
    for (name, ep) in endpoints {
        match client::channel_with(ep, None, tls) {
            Ok(ch) => pending.push((name, HealthClient::new(ch))),
            Err(_) => return Err(vec![format!("{name} (bad endpoint `{ep}`)")]),
        }
    }
    while !pending.is_empty() {
        let mut still = Vec::new();
        for (name, mut c) in pending {
            let mut req = tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            });
            req.set_timeout(Duration::from_secs(2));
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(3), c.check(req)).await,
                Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32
            );
            if !ok {
                still.push((name, c));
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(pending.iter().map(|(n, _)| n.to_string()).collect());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `Some(true)` once the scheduler counts a runner, `Some(false)` on
/// timeout, `None` when the scheduler cannot say (GetQueueStats not served).
async fn wait_runner_registered(
    endpoint: &str,
    token: &str,
    tls: &ClientTls,
    timeout: Duration,
) -> Option<bool> {
    let ch = client::channel_with(endpoint, Some(token), tls).ok()?;
    let mut c = sched::scheduler_service_client::SchedulerServiceClient::new(ch);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match c.get_queue_stats(sched::GetQueueStatsRequest {}).await {
            Ok(r) if r.get_ref().runners > 0 => return Some(true),
            Err(s) if s.code() == tonic::Code::Unimplemented => return None,
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Some(false);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn print_summary(
    args: &UpArgs,
    layout: &Layout,
    admin_token: &Path,
    endpoints: &[(&'static str, String)],
    sup: &Supervisor,
) -> anyhow::Result<()> {
    let mut out = String::from("trainmesh is up\n");
    let mut exports = Vec::new();
    let mut job_addr = String::new();
    for (s, (name, ep)) in SERVICES.iter().zip(endpoints) {
        // With --ports-from-zero the endpoint is a file; show the address.
        let shown = match ep.strip_prefix("file:") {
            Some(path) => std::fs::read_to_string(path)
                .map(|a| a.trim().to_owned())
                .unwrap_or_else(|_| ep.clone()),
            None => ep.clone(),
        };
        if *s == crate::context::Service::Job {
            job_addr = shown.clone();
        }
        let pid = sup.pid(name).unwrap_or_default();
        out.push_str(&format!("  {name:<18} {shown:<22} pid {pid}\n"));
        if args.ports_from_zero || !is_default(*s, &shown) {
            exports.push(format!(
                "export TRAINMESH_{}_ENDPOINT={}",
                s.short().to_ascii_uppercase(),
                shell_quote(&shown)
            ));
        }
    }
    out.push_str(&format!(
        "  {RUNNER:<18} {:<22} pid {}\n",
        format!("backend {}", args.backend),
        sup.pid(RUNNER).unwrap_or_default()
    ));
    out.push_str(&format!("admin token: {}\n", admin_token.display()));
    out.push_str(&format!("logs:        {}\n", layout.logs.display()));
    out.push_str("to use it from another shell:\n");
    out.push_str(&format!(
        "  export TRAINMESH_TOKEN=$(cat {})\n",
        shell_quote(&admin_token.display().to_string())
    ));
    if args.tls {
        exports.push(format!(
            "export TRAINMESH_TLS_CA={}",
            shell_quote(&layout.tls_ca().display().to_string())
        ));
    }
    for e in exports {
        out.push_str(&format!("  {e}\n"));
    }
    out.push_str("  trainctl submit examples/jobs/ok.yaml --wait\n");
    out.push_str(&format!("  {}\n", grpcurl_line(args, layout, &job_addr)));
    out.push_str("  trainctl tokens create --user alice --org ml --role user --ttl 30d\n");
    out.push_str("press Ctrl-C to stop\n");
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// A grpcurl command that lists job-service's services: with the local CA
/// when the mesh serves TLS.
fn grpcurl_line(args: &UpArgs, layout: &Layout, job_addr: &str) -> String {
    let transport = if args.tls {
        format!(
            "-cacert {}",
            shell_quote(&layout.tls_ca().display().to_string())
        )
    } else {
        "-plaintext".to_owned()
    };
    format!("grpcurl {transport} {} list", shell_quote(job_addr))
}

fn is_default(s: crate::context::Service, endpoint: &str) -> bool {
    let port = match s {
        crate::context::Service::Job => 50051,
        crate::context::Service::Scheduler => 50052,
        crate::context::Service::Metrics => 50053,
        crate::context::Service::Diagnosis => 50054,
    };
    endpoint == format!("127.0.0.1:{port}")
}

/// Single-quotes `s` for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:+@%=".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Fails early, with the flag to change, when a port is taken: otherwise
/// the health check could be answered by whatever already listens there.
fn check_ports_free(args: &UpArgs) -> anyhow::Result<()> {
    for s in SERVICES {
        let addr = plan::listen_addr(args, s);
        if let Err(e) = std::net::TcpListener::bind(&addr) {
            anyhow::bail!(
                "cannot listen on {addr} for {}: {e}; is another mesh running? pick another \
                 port with --{}-port, or use --ports-from-zero",
                s.binary(),
                s.short()
            );
        }
    }
    Ok(())
}

/// Two `up`s on one data dir would share SQLite files and tokens: refuse.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("up.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock(2) on a descriptor this function owns; no memory involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        anyhow::bail!(
            "another `trainctl up` (pid {}) is using {}; stop it first or use another --data-dir",
            holder.trim(),
            dir.display()
        );
    }
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    write!(f, "{}", std::process::id())?;
    f.flush()?;
    Ok(f)
}

fn print_log_tail(layout: &Layout, name: &str) {
    for path in [layout.log_file(name), layout.output_file(name)] {
        let lines = tail_file(&path, LOG_TAIL);
        if lines.is_empty() {
            continue;
        }
        eprintln!("--- last lines of {} ---", path.display());
        for l in lines {
            eprintln!("  {}", render_log_line(&l));
        }
    }
}

/// The last `n` lines of a file, reading at most its last 64 KiB.
pub fn tail_file(path: &Path, n: usize) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    tail_lines(&text, n, start > 0)
}

/// The last `n` non-empty lines; when `partial_start`, the first line is
/// dropped because it may be cut.
pub fn tail_lines(text: &str, n: usize, partial_start: bool) -> Vec<String> {
    let lines: Vec<&str> = text
        .lines()
        .skip(usize::from(partial_start))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// A JSON log line as `LEVEL message key=value…`; other lines unchanged.
pub fn render_log_line(line: &str) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_owned();
    };
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = String::new();
    if let Some(level) = map.get("level") {
        out.push_str(&text(level));
        out.push(' ');
    }
    if let Some(msg) = map.get("message") {
        out.push_str(&text(msg));
    }
    for (k, v) in &map {
        // Span bookkeeping repeats what the message already says.
        if !matches!(
            k.as_str(),
            "level" | "message" | "timestamp" | "target" | "service" | "spans"
        ) && !k.starts_with("otel.")
        {
            out.push_str(&format!(" {k}={}", text(v)));
        }
    }
    out
}

struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_non_empty_lines() {
        assert_eq!(tail_lines("a\nb\n\nc\n", 2, false), ["b", "c"]);
        assert_eq!(tail_lines("cut\nb\nc", 5, true), ["b", "c"]);
        assert!(tail_lines("", 3, false).is_empty());
    }

    #[test]
    fn tail_of_a_missing_file_is_empty() {
        assert!(tail_file(Path::new("/nonexistent/x.log"), 3).is_empty());
    }

    #[test]
    fn tail_file_reads_only_the_end_of_big_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.log");
        let body: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, body).unwrap();
        assert_eq!(tail_file(&p, 2), ["line 19998", "line 19999"]);
    }

    #[test]
    fn json_log_lines_are_made_readable() {
        let line = r#"{"timestamp":"t","level":"ERROR","target":"x","message":"cannot listen","error":"address in use"}"#;
        assert_eq!(
            render_log_line(line),
            "ERROR cannot listen error=address in use"
        );
        assert_eq!(render_log_line("panicked at x"), "panicked at x");
    }

    #[test]
    fn shell_quote_only_when_needed() {
        assert_eq!(shell_quote("/tmp/tm/admin.token"), "/tmp/tm/admin.token");
        assert_eq!(shell_quote("/tmp/my dir/a"), "'/tmp/my dir/a'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn a_second_up_on_the_same_data_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = lock_data_dir(dir.path()).unwrap();
        let err = lock_data_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("another `trainctl up`"), "{err}");
        assert!(err.contains(&std::process::id().to_string()), "{err}");
    }
}
