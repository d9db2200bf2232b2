//! What `trainctl up` runs: the data dir's layout, where the binaries are,
//! and each child's flags and environment. Pure, so it can be tested.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::cli::UpArgs;
use crate::context::Service;

use super::supervisor::ChildSpec;

pub const SERVICES: [Service; 4] = [
    Service::Job,
    Service::Scheduler,
    Service::Metrics,
    Service::Diagnosis,
];
pub const RUNNER: &str = "runner";
/// The name `up`'s runner registers under. Fixed rather than the hostname,
/// so its credential (`DATA_DIR/runner-local.token`) and what the scheduler
/// knows of it stay the same when the machine is renamed or the data dir
/// moves to another machine.
pub const RUNNER_NAME: &str = "local";

/// Every binary `up` starts, in start order.
pub fn binary_names() -> Vec<&'static str> {
    SERVICES
        .iter()
        .map(|s| s.binary())
        .chain([RUNNER])
        .collect()
}

/// Who each child calls. These are
/// passed as flags; every child also gets all four endpoints in its
/// environment, which a service that needs none of them ignores.
fn peers(service: Service) -> &'static [Service] {
    match service {
        Service::Job => &[Service::Scheduler, Service::Diagnosis],
        Service::Scheduler => &[Service::Job],
        Service::Metrics => &[Service::Job],
        Service::Diagnosis => &[Service::Job],
    }
}
const RUNNER_PEERS: [Service; 3] = [Service::Scheduler, Service::Job, Service::Metrics];

/// Settings inherited from the user's shell that would point a child at
/// something other than this mesh, or make it speak other TLS than `up`
/// chose.
const ENV_REMOVE: [&str; 15] = [
    "TRAINMESH_TLS_CERT",
    "TRAINMESH_TLS_KEY",
    "TRAINMESH_TLS_CLIENT_CA",
    "TRAINMESH_TLS_CA",
    "TRAINMESH_TLS_CLIENT_CERT",
    "TRAINMESH_TLS_CLIENT_KEY",
    "TRAINMESH_INSECURE",
    "TRAINMESH_ADDR_FILE",
    "TRAINMESH_TOKENS",
    "TRAINMESH_SERVICE_TOKEN_FILE",
    "TRAINMESH_TOKEN",
    "TRAINMESH_JOB_LISTEN",
    "TRAINMESH_SCHEDULER_LISTEN",
    "TRAINMESH_METRICS_LISTEN",
    "TRAINMESH_DIAGNOSIS_LISTEN",
];

#[derive(Debug, Clone)]
pub struct Layout {
    pub data_dir: PathBuf,
    pub logs: PathBuf,
    pub run: PathBuf,
    pub runner_work: PathBuf,
    /// `up --tls`: the CA and the one certificate every service serves.
    pub tls: PathBuf,
}

impl Layout {
    /// Absolute paths, so what is printed and passed on does not depend on
    /// any process's working directory.
    pub fn new(data_dir: &Path) -> anyhow::Result<Self> {
        let data_dir = std::path::absolute(data_dir)
            .map_err(|e| anyhow::anyhow!("bad data dir {}: {e}", data_dir.display()))?;
        Ok(Self {
            logs: data_dir.join("logs"),
            run: data_dir.join("run"),
            runner_work: data_dir.join("runner"),
            tls: crate::certs::local_dir(&data_dir),
            data_dir,
        })
    }

    /// The data dir and the runner's work dir are enter-only for others
    /// (0711), so jobs running as another user reach their own attempt
    /// directories and list nothing; the rest is private (0700), as is
    /// every file the services write (their umask is 077).
    pub fn create(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for (d, mode) in [
            (&self.data_dir, 0o711),
            (&self.logs, 0o700),
            (&self.run, 0o700),
            (&self.runner_work, 0o711),
        ] {
            std::fs::create_dir_all(d)
                .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)))
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", d.display()))?;
        }
        Ok(())
    }

    pub fn log_file(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    pub fn output_file(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.out"))
    }

    pub fn addr_file(&self, name: &str) -> PathBuf {
        self.run.join(format!("{name}.addr"))
    }

    pub fn tls_ca(&self) -> PathBuf {
        self.tls.join("ca.crt")
    }

    /// The services' certificate and key (`server.crt`, `server.key`).
    pub fn tls_identity(&self) -> (PathBuf, PathBuf) {
        (self.tls.join("server.crt"), self.tls.join("server.key"))
    }
}

/// The sibling binaries, or an error naming every missing one.
pub fn find_binaries(dir: &Path) -> anyhow::Result<PathBuf> {
    let missing: Vec<&str> = binary_names()
        .into_iter()
        .filter(|name| !dir.join(name).is_file())
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "cannot start the mesh: {} not found next to trainctl in {}; build every binary \
             first with `cargo build --release` (or `cargo build`) and run trainctl from the \
             same target directory",
            missing
                .iter()
                .map(|m| format!("`{m}`"))
                .collect::<Vec<_>>()
                .join(", "),
            dir.display()
        );
    }
    Ok(dir.to_path_buf())
}

fn port(args: &UpArgs, s: Service) -> u16 {
    match s {
        Service::Job => args.job_port,
        Service::Scheduler => args.scheduler_port,
        Service::Metrics => args.metrics_port,
        Service::Diagnosis => args.diagnosis_port,
    }
}

/// `host:port`, bracketing IPv6 literals.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Where to connect when the services listen on `bind_host`: a wildcard
/// address is reached through loopback.
fn connect_host(bind_host: &str) -> &str {
    match bind_host {
        "" | "0.0.0.0" => "127.0.0.1",
        "::" | "[::]" => "::1",
        h => h,
    }
}

pub fn listen_addr(args: &UpArgs, s: Service) -> String {
    let p = if args.ports_from_zero {
        0
    } else {
        port(args, s)
    };
    host_port(&args.bind_host, p)
}

/// Without TLS the services refuse a non-loopback address: say so before
/// starting them, in `up`'s own terms.
pub fn check_bind_host(args: &UpArgs) -> anyhow::Result<()> {
    let host = args.bind_host.trim_start_matches('[').trim_end_matches(']');
    let loopback = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => host == "localhost",
    };
    if !loopback && !args.tls && !args.insecure {
        anyhow::bail!(
            "--bind-host {} is not a loopback address: add --tls to serve TLS, or --insecure \
             to serve plaintext to other machines",
            args.bind_host
        );
    }
    Ok(())
}

/// The endpoint peers (and the health check) use for `s`.
pub fn endpoint(args: &UpArgs, layout: &Layout, s: Service) -> String {
    if args.ports_from_zero {
        format!("file:{}", layout.addr_file(s.binary()).display())
    } else {
        host_port(connect_host(&args.bind_host), port(args, s))
    }
}

fn env_for(args: &UpArgs, layout: &Layout, name: &str) -> Vec<(String, OsString)> {
    let mut env = vec![
        ("TRAINMESH_DATA_DIR".into(), layout.data_dir.clone().into()),
        ("TRAINMESH_LOG_FORMAT".into(), "json".into()),
        ("TRAINMESH_LOG_FILE".into(), layout.log_file(name).into()),
    ];
    if args.tls {
        let (cert, key) = layout.tls_identity();
        env.push(("TRAINMESH_TLS_CERT".into(), cert.into()));
        env.push(("TRAINMESH_TLS_KEY".into(), key.into()));
        env.push(("TRAINMESH_TLS_CA".into(), layout.tls_ca().into()));
    } else if args.insecure {
        env.push(("TRAINMESH_INSECURE".into(), "1".into()));
    }
    for s in SERVICES {
        env.push((
            format!("TRAINMESH_{}_ENDPOINT", s.short().to_ascii_uppercase()),
            endpoint(args, layout, s).into(),
        ));
    }
    env
}

fn peer_flags(args: &UpArgs, layout: &Layout, peers: &[Service]) -> Vec<OsString> {
    peers
        .iter()
        .flat_map(|p| {
            [
                OsString::from(format!("--{}-endpoint", p.short())),
                endpoint(args, layout, *p).into(),
            ]
        })
        .collect()
}

pub fn service_child(args: &UpArgs, layout: &Layout, bin_dir: &Path, s: Service) -> ChildSpec {
    let name = s.binary();
    let mut flags: Vec<OsString> = vec!["--listen".into(), listen_addr(args, s).into()];
    if args.ports_from_zero {
        flags.push("--addr-file".into());
        flags.push(layout.addr_file(name).into());
    }
    flags.extend(peer_flags(args, layout, peers(s)));
    ChildSpec {
        name: name.into(),
        program: bin_dir.join(name),
        args: flags,
        env: env_for(args, layout, name),
        env_remove: ENV_REMOVE.iter().map(|s| s.to_string()).collect(),
        output: layout.output_file(name),
    }
}

pub fn runner_child(args: &UpArgs, layout: &Layout, bin_dir: &Path) -> ChildSpec {
    let mut flags: Vec<OsString> = vec![
        "--backend".into(),
        args.backend.clone().into(),
        "--work-dir".into(),
        layout.runner_work.clone().into(),
        // Ctrl-C should stop the mesh within its stop timeout: running jobs
        // are handed back at once (they run again on the next `up`, without
        // using an attempt) while the scheduler still listens.
        "--on-stop".into(),
        "handback".into(),
        // A root runner's jobs run as `nobody` where it can reach its
        // attempt directories, so they cannot read the data dir's tokens
        // and databases (see the runner's --job-user).
        "--job-user".into(),
        "auto".into(),
        "--name".into(),
        RUNNER_NAME.into(),
    ];
    flags.extend(peer_flags(args, layout, &RUNNER_PEERS));
    let mut env = env_for(args, layout, RUNNER);
    // The services find their credentials at the default path in the data
    // dir (DATA_DIR/<service>.token); the runner's is named after it.
    env.push((
        "TRAINMESH_SERVICE_TOKEN_FILE".into(),
        super::tokens::runner_token_file(&layout.data_dir, RUNNER_NAME).into(),
    ));
    ChildSpec {
        name: RUNNER.into(),
        program: bin_dir.join(RUNNER),
        args: flags,
        env,
        env_remove: ENV_REMOVE.iter().map(|s| s.to_string()).collect(),
        output: layout.output_file(RUNNER),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn up_args(extra: &[&str]) -> UpArgs {
        let mut argv = vec!["trainctl", "up"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Up(a) => a,
            _ => unreachable!(),
        }
    }

    fn layout() -> Layout {
        Layout::new(Path::new("/data/tm")).unwrap()
    }

    fn args_of(spec: &ChildSpec) -> Vec<String> {
        spec.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn env_of(spec: &ChildSpec, key: &str) -> Option<String> {
        spec.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.to_string_lossy().into_owned())
    }

    #[test]
    fn default_ports_and_peers() {
        let a = up_args(&[]);
        let job = service_child(&a, &layout(), Path::new("/bin/tm"), Service::Job);
        assert_eq!(job.program, Path::new("/bin/tm/job-service"));
        assert_eq!(
            args_of(&job),
            [
                "--listen",
                "127.0.0.1:50051",
                "--scheduler-endpoint",
                "127.0.0.1:50052",
                "--diagnosis-endpoint",
                "127.0.0.1:50054"
            ]
        );
        assert_eq!(env_of(&job, "TRAINMESH_DATA_DIR").unwrap(), "/data/tm");
        assert_eq!(env_of(&job, "TRAINMESH_LOG_FORMAT").unwrap(), "json");
        assert_eq!(
            env_of(&job, "TRAINMESH_LOG_FILE").unwrap(),
            "/data/tm/logs/job-service.log"
        );
        assert_eq!(
            env_of(&job, "TRAINMESH_METRICS_ENDPOINT").unwrap(),
            "127.0.0.1:50053"
        );
        assert!(job.env_remove.contains(&"TRAINMESH_TOKENS".to_string()));
        assert_eq!(job.output, Path::new("/data/tm/logs/job-service.out"));
    }

    #[test]
    fn runner_gets_its_work_dir_backend_and_peers() {
        let a = up_args(&["--backend", "docker"]);
        let r = runner_child(&a, &layout(), Path::new("/bin/tm"));
        assert_eq!(
            args_of(&r),
            [
                "--backend",
                "docker",
                "--work-dir",
                "/data/tm/runner",
                "--on-stop",
                "handback",
                "--job-user",
                "auto",
                "--name",
                "local",
                "--scheduler-endpoint",
                "127.0.0.1:50052",
                "--job-endpoint",
                "127.0.0.1:50051",
                "--metrics-endpoint",
                "127.0.0.1:50053"
            ]
        );
        assert_eq!(
            env_of(&r, "TRAINMESH_SERVICE_TOKEN_FILE").unwrap(),
            "/data/tm/runner-local.token"
        );
        assert!(r
            .env_remove
            .contains(&"TRAINMESH_SERVICE_TOKEN_FILE".to_string()));
    }

    #[test]
    fn services_use_their_own_default_token_in_the_data_dir() {
        let a = up_args(&[]);
        let tokens = super::super::tokens::identities(Path::new("/data/tm"), &[RUNNER_NAME]);
        for s in SERVICES {
            let spec = service_child(&a, &layout(), Path::new("/b"), s);
            // No override: the service reads DATA_DIR/<name>.token, which
            // `ensure` writes for it.
            assert_eq!(env_of(&spec, "TRAINMESH_SERVICE_TOKEN_FILE"), None);
            assert_eq!(env_of(&spec, "TRAINMESH_DATA_DIR").unwrap(), "/data/tm");
            let default = Path::new("/data/tm").join(format!("{}.token", s.binary()));
            assert!(
                tokens
                    .iter()
                    .any(|id| id.file == default && id.user == s.binary()),
                "{}",
                default.display()
            );
        }
        let runner = runner_child(&a, &layout(), Path::new("/b"));
        let file = env_of(&runner, "TRAINMESH_SERVICE_TOKEN_FILE").unwrap();
        assert!(tokens
            .iter()
            .any(|id| id.file == Path::new(&file) && id.user == RUNNER_NAME));
    }

    #[test]
    fn ports_from_zero_use_addr_files() {
        let a = up_args(&["--ports-from-zero"]);
        let s = service_child(&a, &layout(), Path::new("/b"), Service::Scheduler);
        assert_eq!(
            args_of(&s),
            [
                "--listen",
                "127.0.0.1:0",
                "--addr-file",
                "/data/tm/run/scheduler-service.addr",
                "--job-endpoint",
                "file:/data/tm/run/job-service.addr"
            ]
        );
    }

    #[test]
    fn wildcard_bind_is_reached_through_loopback() {
        let a = up_args(&["--bind-host", "0.0.0.0", "--metrics-port", "7000"]);
        assert_eq!(listen_addr(&a, Service::Metrics), "0.0.0.0:7000");
        assert_eq!(endpoint(&a, &layout(), Service::Metrics), "127.0.0.1:7000");
        let a = up_args(&["--bind-host", "::"]);
        assert_eq!(listen_addr(&a, Service::Job), "[::]:50051");
        assert_eq!(endpoint(&a, &layout(), Service::Job), "[::1]:50051");
    }

    #[test]
    fn missing_binaries_are_all_named_with_the_build_hint() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("job-service"), "").unwrap();
        let err = find_binaries(dir.path()).unwrap_err().to_string();
        assert!(!err.contains("`job-service`"), "{err}");
        for name in [
            "scheduler-service",
            "metrics-service",
            "diagnosis-service",
            "runner",
        ] {
            assert!(err.contains(&format!("`{name}`")), "{err}");
        }
        assert!(err.contains("cargo build --release"), "{err}");
        for name in binary_names() {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        assert!(find_binaries(dir.path()).is_ok());
    }

    #[test]
    fn relative_data_dir_becomes_absolute() {
        let l = Layout::new(Path::new(".trainmesh")).unwrap();
        assert!(l.data_dir.is_absolute());
        assert!(l.logs.ends_with(".trainmesh/logs"));
    }
}
