//! Harness for cross-service tests: starts the real binaries (built from
//! this workspace) as child processes on port 0, with JSON logs in a temp
//! dir, and hands out authenticated clients.
//!
//! Services find each other through `--addr-file` / `file:` endpoints, so no
//! port is ever fixed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::process::{Child, Command};
use trainmesh_common::auth::{Role, TokensFile};
use trainmesh_common::client::{channel, Channel};
use trainmesh_common::testing::wait_for;
use trainmesh_proto::diagnosis::v1::diagnosis_service_client::DiagnosisServiceClient;
use trainmesh_proto::job::v1::job_service_client::JobServiceClient;
use trainmesh_proto::metrics::v1::metrics_service_client::MetricsServiceClient;
use trainmesh_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;

pub const SERVICES: [&str; 4] = [
    "job-service",
    "scheduler-service",
    "metrics-service",
    "diagnosis-service",
];

pub const ADMIN_TOKEN: &str = "tm_test_admin";
pub const SERVICE_TOKEN: &str = "tm_test_service";
pub const ALICE_TOKEN: &str = "tm_test_alice";
pub const BOB_TOKEN: &str = "tm_test_bob";

/// The workspace root (where `examples/` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Directory holding the workspace's binaries, built once per test process.
/// `cargo nextest run` builds test targets only, so the harness asks cargo
/// for the binaries (a no-op when `.ci/run` already built them).
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
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--workspace", "--bins", "--quiet"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build for the service binaries");
        assert!(status.success(), "cargo build --workspace --bins failed");
        dir
    })
}

/// One running mesh: four services and a runner.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
    /// A dataset root with a symlink that escapes it, for validation tests.
    pub data_root: PathBuf,
}

#[derive(Default, Clone)]
pub struct MeshOptions {
    /// Start no runner (jobs stay queued).
    pub no_runner: bool,
    /// Extra arguments per binary.
    pub extra_args: Vec<(String, Vec<String>)>,
    /// Extra environment per binary.
    pub extra_env: Vec<(String, Vec<(String, String)>)>,
}

impl Mesh {
    pub async fn start() -> Mesh {
        Self::start_with(MeshOptions::default()).await
    }

    pub async fn start_with(opts: MeshOptions) -> Mesh {
        let bins = bin_dir().to_path_buf();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("logs")).expect("logs dir");
        std::fs::create_dir_all(root.join("run")).expect("run dir");
        let data_root = root.join("datasets");
        std::fs::create_dir_all(data_root.join("ok")).expect("data root");
        std::os::unix::fs::symlink("/etc", data_root.join("escape")).expect("symlink");

        TokensFile::default()
            .with(ADMIN_TOKEN, "admin", "ops", &[Role::Admin])
            .with(SERVICE_TOKEN, "trainmesh", "system", &[Role::Service])
            .with(ALICE_TOKEN, "alice", "ml", &[Role::User])
            .with(BOB_TOKEN, "bob", "ml", &[Role::User])
            .write(&root.join("tokens.yaml"))
            .expect("tokens file");
        std::fs::write(root.join("service.token"), SERVICE_TOKEN).expect("service token");
        std::fs::write(root.join("admin.token"), ADMIN_TOKEN).expect("admin token");

        let addr = |name: &str| {
            format!(
                "file:{}",
                root.join("run").join(format!("{name}.addr")).display()
            )
        };
        let mut mesh = Mesh {
            dir,
            children: Vec::new(),
            data_root: data_root.clone(),
        };
        let peers = [
            "--job-endpoint".to_string(),
            addr("job-service"),
            "--scheduler-endpoint".into(),
            addr("scheduler-service"),
            "--metrics-endpoint".into(),
            addr("metrics-service"),
            "--diagnosis-endpoint".into(),
            addr("diagnosis-service"),
        ];
        for name in SERVICES {
            let mut args = vec![
                "--listen".to_string(),
                "127.0.0.1:0".into(),
                "--addr-file".into(),
                root.join("run")
                    .join(format!("{name}.addr"))
                    .display()
                    .to_string(),
            ];
            // Each service takes only the peers it talks to.
            let wanted: &[&str] = match name {
                "job-service" => &["--scheduler-endpoint", "--diagnosis-endpoint"],
                "scheduler-service" => &["--job-endpoint"],
                "diagnosis-service" => &["--job-endpoint", "--metrics-endpoint"],
                _ => &[],
            };
            for pair in peers.chunks(2) {
                if wanted.contains(&pair[0].as_str()) {
                    args.extend(pair.iter().cloned());
                }
            }
            if name == "job-service" {
                args.extend(["--data-root".into(), data_root.display().to_string()]);
            }
            mesh.spawn(&bins, name, args, &opts);
        }
        for name in SERVICES {
            mesh.wait_healthy(name).await;
        }
        if !opts.no_runner {
            let args = vec![
                "--scheduler-endpoint".to_string(),
                addr("scheduler-service"),
                "--job-endpoint".into(),
                addr("job-service"),
                "--metrics-endpoint".into(),
                addr("metrics-service"),
                "--work-dir".into(),
                root.join("runner").display().to_string(),
                "--name".into(),
                "test-runner".into(),
            ];
            mesh.spawn(&bins, "runner", args, &opts);
        }
        mesh
    }

    fn spawn(&mut self, bins: &Path, name: &str, mut args: Vec<String>, opts: &MeshOptions) {
        for (n, extra) in &opts.extra_args {
            if n == name {
                args.extend(extra.iter().cloned());
            }
        }
        let root = self.dir.path();
        let mut cmd = Command::new(bins.join(name));
        cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        for (n, vars) in &opts.extra_env {
            if n == name {
                cmd.envs(vars.iter().map(|(k, v)| (k, v)));
            }
        }
        let child = cmd
            .args(&args)
            .current_dir(workspace_root())
            .env("TRAINMESH_DATA_DIR", root)
            .env("TRAINMESH_LOG_FORMAT", "json")
            .env("TRAINMESH_LOG_LEVEL", "info")
            .env("TRAINMESH_LOG_FILE", self.log_path(name))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(root.join("logs").join(format!("{name}.stderr")))
                    .expect("stderr file"),
            ))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        self.children.push((name.to_string(), child));
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    pub fn log_text(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// `host:port` of a running service.
    pub fn addr(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("run").join(format!("{name}.addr")))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    async fn wait_healthy(&mut self, name: &str) {
        let run = self.dir.path().join("run").join(format!("{name}.addr"));
        let this = &mut *self;
        wait_for(
            &format!("{name} to become healthy"),
            Duration::from_secs(60),
            || {
                let run = run.clone();
                let status = this
                    .children
                    .iter_mut()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, c)| c.try_wait().ok().flatten());
                let stderr = this.dir.path().join("logs").join(format!("{name}.stderr"));
                async move {
                    if let Some(st) = status {
                        panic!(
                            "{name} exited early with {st}: {}",
                            std::fs::read_to_string(stderr).unwrap_or_default()
                        );
                    }
                    let addr = tokio::fs::read_to_string(&run).await.ok()?;
                    let ch = channel(addr.trim(), None).ok()?;
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

    pub fn channel(&self, name: &str, token: Option<&str>) -> Channel {
        channel(&self.addr(name), token).expect("channel")
    }

    pub fn jobs(&self, token: &str) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.channel("job-service", Some(token)))
    }

    pub fn scheduler(&self, token: &str) -> SchedulerServiceClient<Channel> {
        SchedulerServiceClient::new(self.channel("scheduler-service", Some(token)))
    }

    pub fn metrics(&self, token: &str) -> MetricsServiceClient<Channel> {
        MetricsServiceClient::new(self.channel("metrics-service", Some(token)))
    }

    pub fn diagnosis(&self, token: &str) -> DiagnosisServiceClient<Channel> {
        DiagnosisServiceClient::new(self.channel("diagnosis-service", Some(token)))
    }

    /// Stops every process with SIGTERM (runner first) and waits for it.
    pub async fn stop(mut self) -> Vec<(String, std::process::ExitStatus)> {
        let mut out = Vec::new();
        self.children.reverse();
        for (name, mut child) in std::mem::take(&mut self.children) {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let status = match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
                Ok(Ok(st)) => st,
                _ => {
                    let _ = child.kill().await;
                    child.wait().await.expect("wait after kill")
                }
            };
            out.push((name, status));
        }
        out
    }
}

/// Adds `x-correlation-id` to a request.
pub fn with_correlation<T>(msg: T, id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("x-correlation-id", id.parse().expect("ascii id"));
    req
}
