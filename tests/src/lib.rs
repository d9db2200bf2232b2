//! Harness for cross-service tests: starts the real binaries (built from
//! this workspace) as child processes on port 0, with JSON logs in a temp
//! dir, and hands out authenticated clients.
//!
//! Services find each other through `--addr-file` / `file:` endpoints, so no
//! port is ever fixed.
//!
//! Beyond one plain mesh it can: move the scheduler's clock
//! ([`MeshOptions::controllable_clock`], [`Mesh::advance_clock`]), put
//! job-service and the scheduler on PostgreSQL ([`MeshOptions::postgres`]),
//! with the token database on PostgreSQL too (every service reads it; by
//! default it is the SQLite file `auth.db` in the mesh's data dir), start
//! a second scheduler replica on the same database
//! ([`MeshOptions::scheduler_replicas`]), give the scheduler approval rules,
//! start more runners, stop one gracefully or SIGKILL it
//! ([`Mesh::start_runner`], [`Mesh::terminate`], [`Mesh::kill`]), stop an
//! instance with SIGTERM and start it again, on a new port or in place
//! ([`Mesh::stop_instance`], [`Mesh::start_instance`],
//! [`Mesh::start_instance_in_place`]), and run everything over mutual TLS
//! ([`MeshOptions::tls`], or `TRAINMESH_TEST_TLS=1` for every mesh).
//! [`fake_runner`] speaks RunnerService from the test itself; [`jobs`] has
//! helpers to submit jobs and wait on their state.

pub mod compose;
/// The real Docker Engine and the busybox test image: the runner's own
/// docker tests use the same file.
#[path = "../../services/runner/tests/support/docker.rs"]
pub mod docker;
pub mod fake_runner;
pub mod faults;
pub mod jobs;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::process::{Child, Command};
use trainmesh_common::auth::{Role, TokensFile};
use trainmesh_common::client::{channel_with, Channel};
use trainmesh_common::testing::{wait_for, TestDb, POSTGRES_ENV};
use trainmesh_common::tls::ClientTls;
use trainmesh_proto::audit::v1::audit_service_client::AuditServiceClient;
use trainmesh_proto::auth::v1::token_service_client::TokenServiceClient;
use trainmesh_proto::diagnosis::v1::diagnosis_service_client::DiagnosisServiceClient;
use trainmesh_proto::job::v1::job_service_client::JobServiceClient;
use trainmesh_proto::metrics::v1::metrics_service_client::MetricsServiceClient;
use trainmesh_proto::runner::v1::runner_service_client::RunnerServiceClient;
use trainmesh_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;

pub const SERVICES: [&str; 4] = [
    "job-service",
    "scheduler-service",
    "metrics-service",
    "diagnosis-service",
];

/// Set to keep each mesh's directory (logs, databases, addresses) after
/// the test, for debugging; its path is printed to stderr.
pub const KEEP_ENV: &str = "TRAINMESH_TEST_KEEP_DIR";

/// Instance name of the second scheduler replica.
pub const SCHEDULER_2: &str = "scheduler-service-2";

pub const ADMIN_TOKEN: &str = "tm_test_admin";
/// Each service's own credential (user = the service's name).
pub const JOB_SERVICE_TOKEN: &str = "tm_test_job-service";
pub const SCHEDULER_TOKEN: &str = "tm_test_scheduler-service";
pub const METRICS_TOKEN: &str = "tm_test_metrics-service";
pub const DIAGNOSIS_TOKEN: &str = "tm_test_diagnosis-service";
/// The credential of the mesh's own runner, `test-runner`.
pub const RUNNER_TOKEN: &str = "tm_test_runner_test-runner";

/// The runner names a mesh has credentials for (tokens are read when the
/// services start): [`runner_token`]`(name)` each.
pub const RUNNER_NAMES: [&str; 11] = [
    "test-runner",
    "runner-a",
    "runner-b",
    "docker-runner",
    "goes-silent",
    "fake-r1-0",
    "fake-r1-1",
    "fake-r1-2",
    "fake-r2-0",
    "fake-r2-1",
    "fake-r2-2",
];

/// The credential of runner `name` (one of [`RUNNER_NAMES`]).
pub fn runner_token(name: &str) -> String {
    assert!(
        RUNNER_NAMES.contains(&name),
        "runner `{name}` has no credential in test meshes: add it to RUNNER_NAMES"
    );
    format!("tm_test_runner_{name}")
}
pub const ALICE_TOKEN: &str = "tm_test_alice";
pub const BOB_TOKEN: &str = "tm_test_bob";
/// carol: a user with the `approver` role.
pub const APPROVER_TOKEN: &str = "tm_test_carol";

/// Plain users (role `user`, org `ml`), each with the token
/// [`user_token`]`(name)`.
pub const USERS: [&str; 5] = ["alice", "bob", "dave", "erin", "frank"];

/// The token of one of [`USERS`] (or `carol`).
pub fn user_token(user: &str) -> String {
    format!("tm_test_{user}")
}

/// The workspace root (where `examples/` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Variables cargo sets for the crate under test, not for a build.
const PACKAGE_ENV: [&str; 7] = [
    "CARGO_MANIFEST_",
    "CARGO_PKG_",
    "CARGO_CRATE_",
    "CARGO_BIN_",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
];

/// Directory holding the workspace's binaries, built once per test process.
/// `cargo nextest run` builds test targets only, so the harness asks cargo
/// for the binaries. It asks for exactly what `.ci/run` builds (the whole
/// workspace, all targets): any narrower selection unifies dependency
/// features differently, and cargo would then compile a second variant of
/// the service binaries under the build lock while every other mesh test
/// waits (about a minute on the CI machine).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current exe");
        // target/<profile>/deps/<test-binary>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let args = ["build", "--workspace", "--all-targets", "--quiet"];
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo.args(args).current_dir(workspace_root());
        // The test runner describes this test's package in the environment
        // (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...); build scripts that watch
        // those variables (ring's) would see a change and rebuild half the
        // TLS stack. Cargo's own settings (CARGO_HOME, CARGO_TARGET_DIR,
        // CARGO_BUILD_*, ...) stay.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if PACKAGE_ENV.iter().any(|p| k.starts_with(p)) {
                cargo.env_remove(&key);
            }
        }
        let status = cargo
            .status()
            .expect("run cargo build for the service binaries");
        assert!(status.success(), "cargo {} failed", args.join(" "));
        dir
    })
}

/// One running mesh: four services (optionally two schedulers) and runners.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    /// (instance name, process); the instance name is the binary's name
    /// except for extra runners and the second scheduler.
    children: Vec<(String, Child)>,
    /// How each instance was started: (instance, binary, arguments), so
    /// that [`Mesh::start_instance`] can start it again the same way.
    specs: Vec<(String, String, Vec<String>)>,
    /// A dataset root with a symlink that escapes it, for validation tests.
    pub data_root: PathBuf,
    opts: MeshOptions,
    /// With TLS: the certificates every process uses.
    tls: Option<tls::MeshTls>,
    /// Kept so that PostgreSQL databases outlive the processes using them.
    _dbs: Vec<TestDb>,
    /// `TRAINMESH_TOKENS` for every process, when not the default.
    tokens_env: Option<String>,
}

#[derive(Default, Clone)]
pub struct MeshOptions {
    /// Start no runner (jobs stay queued until [`Mesh::start_runner`]).
    pub no_runner: bool,
    /// Extra arguments per binary (every instance of it).
    pub extra_args: Vec<(String, Vec<String>)>,
    /// Extra environment per binary (every instance of it); wins over the
    /// harness's own settings.
    pub extra_env: Vec<(String, Vec<(String, String)>)>,
    /// Start the scheduler(s) with `--clock-offset-file`, so that
    /// [`Mesh::advance_clock`] moves their "now".
    pub controllable_clock: bool,
    /// Approval rules (YAML) written to a file and passed to the scheduler
    /// with `--approval-rules`.
    pub approval_rules: Option<String>,
    /// job-service, the scheduler(s) and the token database on fresh
    /// PostgreSQL databases from `TRAINMESH_TEST_POSTGRES_URL` (panics
    /// when it is unset).
    pub postgres: bool,
    /// Scheduler processes on the same database: 0 or 1 → one; 2 → also
    /// [`SCHEDULER_2`] (needs `postgres`). job-service and the default
    /// runner talk to the first.
    pub scheduler_replicas: usize,
    /// Every service and runner serves TLS only, requires a client
    /// certificate from the mesh's CA, and shows one to its peers (mutual
    /// TLS); so do the mesh's clients. On for every mesh with
    /// `TRAINMESH_TEST_TLS=1` ([`tls::TLS_ENV`]).
    pub tls: bool,
}

impl MeshOptions {
    /// Adds arguments for every instance of `binary`.
    pub fn arg(mut self, binary: &str, args: &[&str]) -> Self {
        self.extra_args.push((
            binary.to_string(),
            args.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }
}

impl Mesh {
    pub async fn start() -> Mesh {
        Self::start_with(MeshOptions::default()).await
    }

    pub async fn start_with(opts: MeshOptions) -> Mesh {
        let bins = bin_dir().to_path_buf();
        let mut dir = tempfile::Builder::new()
            .prefix("trainmesh-mesh-")
            .tempdir()
            .expect("tempdir");
        if std::env::var_os(KEEP_ENV).is_some() {
            dir.disable_cleanup(true);
            eprintln!(
                "{KEEP_ENV}: mesh files are kept in {}",
                dir.path().display()
            );
        }
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("logs")).expect("logs dir");
        std::fs::create_dir_all(root.join("run")).expect("run dir");
        let data_root = root.join("datasets");
        std::fs::create_dir_all(data_root.join("ok")).expect("data root");
        std::os::unix::fs::symlink("/etc", data_root.join("escape")).expect("symlink");

        let mut tokens = TokensFile::default()
            .with(ADMIN_TOKEN, "admin", "ops", &[Role::Admin])
            .with(APPROVER_TOKEN, "carol", "ml", &[Role::User, Role::Approver]);
        for user in USERS {
            tokens = tokens.with(&user_token(user), user, "ml", &[Role::User]);
        }
        for name in trainmesh_common::auth::service::ALL {
            let token = format!("tm_test_{name}");
            tokens = tokens.with(&token, name, "system", &[Role::Service]);
            std::fs::write(root.join(format!("{name}.token")), &token).expect("service token");
        }
        for name in RUNNER_NAMES {
            let token = runner_token(name);
            tokens = tokens.with(&token, name, "system", &[Role::Runner]);
            std::fs::write(root.join(format!("runner-{name}.token")), &token)
                .expect("runner token");
        }
        assert_eq!(user_token("job-service"), JOB_SERVICE_TOKEN);
        // job-service seals the env values a job marks secret with it, the
        // runners open them (both read DATA_DIR/secrets.key).
        std::fs::write(
            root.join("secrets.key"),
            trainmesh_common::sealed::SecretsKey::generate_hex(),
        )
        .expect("secrets key");
        assert_eq!(user_token("alice"), ALICE_TOKEN);
        assert_eq!(user_token("bob"), BOB_TOKEN);
        tokens
            .write(&root.join("tokens.yaml"))
            .expect("tokens file");
        std::fs::write(root.join("admin.token"), ADMIN_TOKEN).expect("admin token");

        let replicas = opts.scheduler_replicas.max(1);
        assert!(replicas <= 2, "at most two scheduler replicas");
        assert!(
            replicas == 1 || opts.postgres,
            "scheduler replicas share a PostgreSQL database: set `postgres`"
        );
        let mut dbs = Vec::new();
        let mut job_db_url = None;
        let mut scheduler_db_url = None;
        let mut tokens_db_url = None;
        if opts.postgres {
            for slot in [&mut job_db_url, &mut scheduler_db_url, &mut tokens_db_url] {
                let db = trainmesh_common::testing::postgres_db()
                    .await
                    .expect("a PostgreSQL mesh needs TRAINMESH_TEST_POSTGRES_URL");
                *slot = Some(db.url.clone());
                dbs.push(db);
            }
        }
        let tokens_env =
            tokens_db_url.map(|url| format!("{},{url}", root.join("tokens.yaml").display()));

        let mut mesh = Mesh {
            dir,
            children: Vec::new(),
            specs: Vec::new(),
            data_root: data_root.clone(),
            tls: (opts.tls || tls::tls_from_env())
                .then(|| tls::MeshTls::generate(&root.join("tls"))),
            opts: opts.clone(),
            _dbs: dbs,
            tokens_env,
        };
        let mut scheduler_extra = Vec::new();
        if opts.controllable_clock {
            scheduler_extra.extend([
                "--clock-offset-file".to_string(),
                mesh.clock_offset_path().display().to_string(),
            ]);
        }
        if let Some(rules) = &opts.approval_rules {
            let path = root.join("approval-rules.yaml");
            std::fs::write(&path, rules).expect("approval rules file");
            scheduler_extra.extend(["--approval-rules".to_string(), path.display().to_string()]);
        }
        if let Some(url) = &scheduler_db_url {
            scheduler_extra.extend(["--database-url".to_string(), url.clone()]);
        }

        let mut instances: Vec<(&str, &str)> = vec![
            ("job-service", "job-service"),
            ("scheduler-service", "scheduler-service"),
        ];
        if replicas == 2 {
            instances.push((SCHEDULER_2, "scheduler-service"));
        }
        instances.push(("metrics-service", "metrics-service"));
        instances.push(("diagnosis-service", "diagnosis-service"));

        for (instance, binary) in &instances {
            let mut args = vec![
                "--listen".to_string(),
                "127.0.0.1:0".into(),
                "--addr-file".into(),
                mesh.addr_file(instance).display().to_string(),
            ];
            // Each service takes only the peers it talks to.
            let wanted: &[&str] = match *binary {
                "job-service" => &["--scheduler-endpoint", "--diagnosis-endpoint"],
                "scheduler-service" => &["--job-endpoint"],
                "diagnosis-service" => &[
                    "--job-endpoint",
                    "--scheduler-endpoint",
                    "--metrics-endpoint",
                ],
                "metrics-service" => &["--job-endpoint"],
                _ => &[],
            };
            for (flag, peer) in [
                ("--job-endpoint", "job-service"),
                ("--scheduler-endpoint", "scheduler-service"),
                ("--metrics-endpoint", "metrics-service"),
                ("--diagnosis-endpoint", "diagnosis-service"),
            ] {
                if wanted.contains(&flag) {
                    args.extend([flag.to_string(), mesh.endpoint(peer)]);
                }
            }
            match *binary {
                "job-service" => {
                    args.extend(["--data-root".into(), data_root.display().to_string()]);
                    if let Some(url) = &job_db_url {
                        args.extend(["--database-url".to_string(), url.clone()]);
                    }
                }
                "scheduler-service" => args.extend(scheduler_extra.iter().cloned()),
                _ => {}
            }
            mesh.spawn(&bins, instance, binary, args);
        }
        for (instance, _) in &instances {
            mesh.wait_healthy(instance).await;
        }
        if !opts.no_runner {
            mesh.spawn_runner("runner", "test-runner", "scheduler-service", &[]);
        }
        mesh
    }

    fn addr_file(&self, instance: &str) -> PathBuf {
        self.dir.path().join("run").join(format!("{instance}.addr"))
    }

    /// `file:` endpoint of an instance, for peers' flags.
    pub fn endpoint(&self, instance: &str) -> String {
        format!("file:{}", self.addr_file(instance).display())
    }

    fn spawn(&mut self, bins: &Path, instance: &str, binary: &str, mut args: Vec<String>) {
        for (n, extra) in &self.opts.extra_args {
            if n == binary {
                args.extend(extra.iter().cloned());
            }
        }
        self.specs.retain(|(i, _, _)| i != instance);
        self.specs
            .push((instance.to_string(), binary.to_string(), args.clone()));
        let root = self.dir.path();
        let mut cmd = Command::new(bins.join(binary));
        cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .args(&args)
            .current_dir(workspace_root())
            .env("TRAINMESH_DATA_DIR", root)
            .env("TRAINMESH_LOG_FORMAT", "json")
            .env("TRAINMESH_LOG_LEVEL", "info")
            .env("TRAINMESH_LOG_FILE", self.log_path(instance));
        cmd.envs(self.client_env());
        match &self.tokens_env {
            Some(tokens) => cmd.env("TRAINMESH_TOKENS", tokens),
            None => cmd.env_remove("TRAINMESH_TOKENS"),
        };
        for (n, vars) in &self.opts.extra_env {
            if n == binary {
                cmd.envs(vars.iter().map(|(k, v)| (k, v)));
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(root.join("logs").join(format!("{instance}.stderr")))
                    .expect("stderr file"),
            ))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {instance}: {e}"));
        self.children.push((instance.to_string(), child));
    }

    fn spawn_runner(&mut self, instance: &str, name: &str, scheduler: &str, extra: &[&str]) {
        let mut args = Vec::new();
        // Unless the test names the credential itself (a runner that joins,
        // say), the runner's is the one the mesh made for its name.
        if !extra.contains(&"--service-token-file") {
            runner_token(name);
            args.extend([
                "--service-token-file".to_string(),
                self.dir
                    .path()
                    .join(format!("runner-{name}.token"))
                    .display()
                    .to_string(),
            ]);
        }
        args.extend([
            "--scheduler-endpoint".to_string(),
            self.endpoint(scheduler),
            "--job-endpoint".into(),
            self.endpoint("job-service"),
            "--metrics-endpoint".into(),
            self.endpoint("metrics-service"),
            "--work-dir".into(),
            self.runner_work_dir(instance).display().to_string(),
            "--name".into(),
            name.into(),
            // The tests' jobs write into the tests' private directories, as
            // the user running the tests.
            "--allow-root-jobs".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(bin_dir(), instance, "runner", args);
    }

    /// Starts a runner process registering as `name` with its own work
    /// directory, without waiting for it to register.
    pub fn spawn_runner_named(&mut self, instance: &str, name: &str, extra: &[&str]) {
        self.spawn_runner(instance, name, "scheduler-service", extra);
    }

    /// Starts one more runner process (instance and registration name
    /// `instance`, talking to the first scheduler) and waits until it has
    /// registered. Returns its runner id.
    pub async fn start_runner(&mut self, instance: &str, extra: &[&str]) -> String {
        self.spawn_runner(instance, instance, "scheduler-service", extra);
        self.wait_runner_registered(instance).await
    }

    /// How many times the instance logged its registration.
    fn registrations(&self, instance: &str) -> usize {
        self.log_text(instance)
            .lines()
            .filter(|l| l.contains("\"registered with the scheduler\""))
            .count()
    }

    /// The runner id from the instance's (latest) "registered with the
    /// scheduler" log line, once there is one.
    pub async fn wait_runner_registered(&self, instance: &str) -> String {
        wait_for(
            &format!("{instance} to register with the scheduler"),
            Duration::from_secs(30),
            || {
                let text = self.log_text(instance);
                async move {
                    text.lines()
                        .rev()
                        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                        .filter(|v| v["message"] == "registered with the scheduler")
                        .find_map(|v| v["runner_id"].as_str().map(str::to_owned))
                }
            },
        )
        .await
    }

    /// `<work-dir>` of a runner instance; attempts run in
    /// `<work-dir>/<job_id>/<attempt>/`.
    pub fn runner_work_dir(&self, instance: &str) -> PathBuf {
        self.dir.path().join(instance)
    }

    /// Sends SIGKILL to an instance and reaps it. A runner's job processes,
    /// and everything they started, die with it (see the runner's shim).
    pub async fn kill(&mut self, instance: &str) -> std::process::ExitStatus {
        let mut child = self.take_child(instance);
        child.start_kill().expect("SIGKILL");
        tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("a killed process is reaped within 20 s")
            .expect("wait")
    }

    /// Sends SIGTERM to an instance (a graceful stop) without waiting.
    pub fn terminate(&self, instance: &str) {
        let pid = self
            .children
            .iter()
            .find(|(n, _)| n == instance)
            .and_then(|(_, c)| c.id())
            .unwrap_or_else(|| panic!("no running instance `{instance}`"));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
    }

    /// Waits up to `timeout` for an instance to exit and reaps it.
    pub async fn wait_exit(
        &mut self,
        instance: &str,
        timeout: Duration,
    ) -> std::process::ExitStatus {
        let mut child = self.take_child(instance);
        tokio::time::timeout(timeout, child.wait())
            .await
            .unwrap_or_else(|_| panic!("{instance} did not exit within {timeout:?}"))
            .expect("wait")
    }

    /// The running instance's process, no longer the mesh's to stop.
    fn take_child(&mut self, instance: &str) -> Child {
        let pos = self
            .children
            .iter()
            .position(|(n, _)| n == instance)
            .unwrap_or_else(|| panic!("no running instance `{instance}`"));
        self.children.remove(pos).1
    }

    /// Stops one instance with SIGTERM and waits for it to exit (SIGKILL
    /// after 20 s). [`Mesh::start_instance`] starts it again.
    pub async fn stop_instance(&mut self, instance: &str) -> std::process::ExitStatus {
        terminate(self.take_child(instance)).await
    }

    /// Starts a stopped (or killed) instance again with the arguments it
    /// had, on a new port (its address file is rewritten, so `file:`
    /// endpoints follow), and waits until it is healthy — for a runner,
    /// until it has registered.
    pub async fn start_instance(&mut self, instance: &str) {
        assert!(
            !self.children.iter().any(|(n, _)| n == instance),
            "`{instance}` is still running"
        );
        let (_, binary, args) = self
            .specs
            .iter()
            .find(|(i, _, _)| i == instance)
            .cloned()
            .unwrap_or_else(|| panic!("`{instance}` was never started"));
        let _ = std::fs::remove_file(self.addr_file(instance));
        let registrations = self.registrations(instance);
        // Arguments are stored with the extras already added.
        let extras = std::mem::take(&mut self.opts.extra_args);
        self.spawn(bin_dir(), instance, &binary, args);
        self.opts.extra_args = extras;
        if binary == "runner" {
            wait_for(
                &format!("{instance} to register again"),
                Duration::from_secs(30),
                || {
                    let n = self.registrations(instance);
                    async move { (n > registrations).then_some(()) }
                },
            )
            .await;
        } else {
            self.wait_healthy(instance).await;
        }
    }

    /// Like [`Mesh::start_instance`], but on the address the instance had,
    /// as a service restarted in place: clients holding that address (a
    /// `trainctl` given `host:port`) reconnect where they were.
    pub async fn start_instance_in_place(&mut self, instance: &str) {
        let was = self.addr(instance);
        assert!(!was.is_empty(), "`{instance}` never reported its address");
        if let Some((_, _, args)) = self.specs.iter_mut().find(|(i, _, _)| i == instance) {
            if let Some(at) = args.iter().position(|a| a == "--listen") {
                if let Some(listen) = args.get_mut(at + 1) {
                    *listen = was;
                }
            }
        }
        self.start_instance(instance).await;
    }

    /// The PostgreSQL URLs of job-service's, the scheduler's and the token
    /// databases (with [`MeshOptions::postgres`]).
    pub fn postgres_urls(&self) -> Vec<String> {
        self._dbs.iter().map(|d| d.url.clone()).collect()
    }

    fn clock_offset_path(&self) -> PathBuf {
        self.dir.path().join("clock-offset")
    }

    /// The schedulers' clock offset in seconds (0 before any advance).
    pub fn clock_offset(&self) -> i64 {
        std::fs::read_to_string(self.clock_offset_path())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Moves the schedulers' "now" forward by `secs` seconds (atomically
    /// replaces the offset file they read).
    pub fn advance_clock(&self, secs: i64) {
        assert!(
            self.opts.controllable_clock,
            "start the mesh with `controllable_clock` to move its clock"
        );
        assert!(secs >= 0, "the clock only moves forward");
        let next = self.clock_offset() + secs;
        let path = self.clock_offset_path();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{next}\n")).expect("write clock offset");
        std::fs::rename(&tmp, &path).expect("replace clock offset");
    }

    pub fn log_path(&self, instance: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{instance}.log"))
    }

    pub fn log_text(&self, instance: &str) -> String {
        std::fs::read_to_string(self.log_path(instance)).unwrap_or_default()
    }

    /// `host:port` of a running instance.
    pub fn addr(&self, instance: &str) -> String {
        std::fs::read_to_string(self.addr_file(instance))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    async fn wait_healthy(&mut self, instance: &str) {
        let run = self.addr_file(instance);
        let tls = self.client_tls().clone();
        let this = &mut *self;
        wait_for(
            &format!("{instance} to become healthy"),
            Duration::from_secs(60),
            || {
                let run = run.clone();
                let tls = tls.clone();
                let status = this
                    .children
                    .iter_mut()
                    .find(|(n, _)| n == instance)
                    .and_then(|(_, c)| c.try_wait().ok().flatten());
                let stderr = this
                    .dir
                    .path()
                    .join("logs")
                    .join(format!("{instance}.stderr"));
                async move {
                    if let Some(st) = status {
                        panic!(
                            "{instance} exited early with {st}: {}",
                            std::fs::read_to_string(stderr).unwrap_or_default()
                        );
                    }
                    let addr = tokio::fs::read_to_string(&run).await.ok()?;
                    let ch = channel_with(addr.trim(), None, &tls).ok()?;
                    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
                    let resp = health
                        .check(tonic_health::pb::HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .ok()?;
                    (resp.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                        .then_some(())
                }
            },
        )
        .await;
    }

    /// A channel to the instance's current address.
    pub fn channel(&self, instance: &str, token: Option<&str>) -> Channel {
        channel_with(&self.addr(instance), token, self.client_tls()).expect("channel")
    }

    /// A channel to the instance's [`Mesh::endpoint`]: it follows the
    /// instance to its new address when it is started again.
    pub fn endpoint_channel(&self, instance: &str, token: Option<&str>) -> Channel {
        channel_with(&self.endpoint(instance), token, self.client_tls()).expect("channel")
    }

    /// How the mesh's clients connect: plaintext, or TLS with the mesh's
    /// CA and identity.
    pub fn client_tls(&self) -> &ClientTls {
        static PLAINTEXT: OnceLock<ClientTls> = OnceLock::new();
        match &self.tls {
            Some(t) => t.client(),
            None => PLAINTEXT.get_or_init(ClientTls::default),
        }
    }

    /// With TLS, the certificates.
    pub fn tls(&self) -> Option<&tls::MeshTls> {
        self.tls.as_ref()
    }

    /// Runs `trainctl ARGS` against this mesh with `token`, and waits for
    /// it to end.
    pub async fn trainctl(&self, token: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(bin_dir().join("trainctl"));
        for (flag, instance) in [
            ("--job-endpoint", "job-service"),
            ("--scheduler-endpoint", "scheduler-service"),
            ("--metrics-endpoint", "metrics-service"),
            ("--diagnosis-endpoint", "diagnosis-service"),
        ] {
            cmd.args([flag.to_owned(), self.addr(instance)]);
        }
        cmd.args(["--token", token])
            .args(args)
            .env_remove("TRAINMESH_TOKEN")
            .envs(self.client_env())
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run trainctl")
    }

    /// Environment that points a trainmesh process (a service, a runner,
    /// `trainctl`, a `healthcheck`) at this mesh's TLS; empty without.
    pub fn client_env(&self) -> Vec<(String, String)> {
        self.tls.as_ref().map(|t| t.env()).unwrap_or_default()
    }

    pub fn jobs(&self, token: &str) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.channel("job-service", Some(token)))
    }

    pub fn scheduler(&self, token: &str) -> SchedulerServiceClient<Channel> {
        self.scheduler_at("scheduler-service", token)
    }

    /// SchedulerService of one scheduler instance (`scheduler-service` or
    /// [`SCHEDULER_2`]).
    pub fn scheduler_at(&self, instance: &str, token: &str) -> SchedulerServiceClient<Channel> {
        SchedulerServiceClient::new(self.channel(instance, Some(token)))
    }

    /// RunnerService of one scheduler instance.
    pub fn runner_service(&self, instance: &str, token: &str) -> RunnerServiceClient<Channel> {
        RunnerServiceClient::new(self.channel(instance, Some(token)))
    }

    /// JobInternalService (job-service).
    pub fn job_internal(
        &self,
        token: &str,
    ) -> trainmesh_proto::job::v1::job_internal_service_client::JobInternalServiceClient<Channel>
    {
        trainmesh_proto::job::v1::job_internal_service_client::JobInternalServiceClient::new(
            self.channel("job-service", Some(token)),
        )
    }

    /// SchedulerInternalService (the first scheduler).
    pub fn scheduler_internal(
        &self,
        token: &str,
    ) -> trainmesh_proto::scheduler::v1::scheduler_internal_service_client::SchedulerInternalServiceClient<Channel>
    {
        trainmesh_proto::scheduler::v1::scheduler_internal_service_client::SchedulerInternalServiceClient::new(
            self.channel("scheduler-service", Some(token)),
        )
    }

    pub fn metrics(&self, token: &str) -> MetricsServiceClient<Channel> {
        MetricsServiceClient::new(self.channel("metrics-service", Some(token)))
    }

    pub fn diagnosis(&self, token: &str) -> DiagnosisServiceClient<Channel> {
        DiagnosisServiceClient::new(self.channel("diagnosis-service", Some(token)))
    }

    /// TokenService (job-service).
    pub fn tokens(&self, token: &str) -> TokenServiceClient<Channel> {
        TokenServiceClient::new(self.channel("job-service", Some(token)))
    }

    /// AuditService of one instance (job-service or a scheduler).
    pub fn audit(&self, instance: &str, token: &str) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel(instance, Some(token)))
    }

    /// Stops every process with SIGTERM (runners first) and waits for it.
    pub async fn stop(mut self) -> Vec<(String, std::process::ExitStatus)> {
        let mut out = Vec::new();
        self.children.reverse();
        for (name, child) in std::mem::take(&mut self.children) {
            out.push((name, terminate(child).await));
        }
        out
    }
}

/// SIGTERM, then SIGKILL if the process has not exited within 20 s.
async fn terminate(mut child: Child) -> std::process::ExitStatus {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
        Ok(Ok(st)) => st,
        _ => {
            let _ = child.kill().await;
            child.wait().await.expect("wait after kill")
        }
    }
}

/// Whether this runs in CI, where a test that needs PostgreSQL must not
/// skip itself.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "false" && v != "0")
        .unwrap_or(false)
}

/// True when `TRAINMESH_TEST_POSTGRES_URL` names a server; otherwise says
/// that `test` is skipped (and fails in CI, which always has one).
pub fn postgres_or_skip(test: &str) -> bool {
    if std::env::var(POSTGRES_ENV).is_ok_and(|v| !v.is_empty()) {
        return true;
    }
    assert!(!in_ci(), "CI must set {POSTGRES_ENV} for {test}");
    eprintln!("skipped {test}: {POSTGRES_ENV} is not set");
    false
}

/// Adds `x-correlation-id` to a request.
pub fn with_correlation<T>(msg: T, id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("x-correlation-id", id.parse().expect("ascii id"));
    req
}

/// Whether a process exists and is not a zombie (a killed job process that
/// nobody reaped yet counts as dead).
pub fn process_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may contain
    // spaces or parentheses itself.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("");
    !matches!(state, "Z" | "X" | "x" | "")
}

/// A gate a job blocks on without polling: a FIFO that the job opens for
/// reading (`open(path).read()` returns once the gate opens).
pub struct Gate(PathBuf);

impl Gate {
    /// Makes the FIFO at `path`.
    pub fn new(path: PathBuf) -> Gate {
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("run mkfifo");
        assert!(status.success(), "mkfifo {}: {status}", path.display());
        Gate(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Opens the gate: waits (up to 60 s) for the job to be at it, then
    /// lets it through.
    pub async fn open(&self) {
        let path = self.0.clone();
        // Opening a FIFO for writing blocks until its reader opens it.
        let write = tokio::task::spawn_blocking(move || std::fs::write(path, b"go"));
        tokio::time::timeout(Duration::from_secs(60), write)
            .await
            .expect("the job to reach the gate within 60 s")
            .expect("gate thread")
            .expect("write to the gate");
    }
}
