//! Flags and environment of the `runner` binary, and the [`Config`] that
//! `run` takes (tests build it directly with [`Config::new`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use trainmesh_common::config::CommonArgs;
use trainmesh_common::tls::{ClientTls, ServerTls};

mod docker;
pub mod job_user;

use crate::backend::kubernetes::{KubernetesArgs, KubernetesConfig};
use crate::logs::{LogLimits, MAX_LINE_BYTES};
pub use docker::{DockerArgs, DockerSettings, PullPolicy};
pub use job_user::JobUser;

/// Where GPUs come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuSetting {
    /// Ask `nvidia-smi` (none when it is missing or fails).
    Detect,
    /// Exactly this many stand-in GPUs (0 for `none`), without detection.
    Count(u32),
}

impl FromStr for GpuSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" | "detect" => Ok(GpuSetting::Detect),
            "none" => Ok(GpuSetting::Count(0)),
            n => n
                .parse::<u32>()
                .map(GpuSetting::Count)
                .map_err(|_| format!("`{s}`: expected auto, none or a GPU count")),
        }
    }
}

/// What a runner that is stopped (SIGTERM, Ctrl-C) does with the attempts
/// it runs. Either way it first stops taking work and tells the scheduler,
/// and no attempt is cancelled: what is handed back runs again at once,
/// without using one of its job's attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStop {
    /// Let the attempts run to their end, up to the drain timeout; hand
    /// back those still running then.
    Wait,
    /// Hand every attempt back at once (SIGTERM, the job's grace, SIGKILL).
    Handback,
}

impl OnStop {
    pub fn as_str(self) -> &'static str {
        match self {
            OnStop::Wait => "wait",
            OnStop::Handback => "handback",
        }
    }
}

impl FromStr for OnStop {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wait" => Ok(OnStop::Wait),
            "handback" => Ok(OnStop::Handback),
            other => Err(format!("`{other}`: expected wait or handback")),
        }
    }
}

/// The backend attempts run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Local subprocesses.
    Process,
    /// Containers of the local Docker Engine.
    Docker,
    /// Jobs and PyTorchJobs in a Kubernetes cluster.
    Kubernetes,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Process => "process",
            BackendKind::Docker => "docker",
            BackendKind::Kubernetes => "kubernetes",
        }
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "process" => Ok(BackendKind::Process),
            "docker" => Ok(BackendKind::Docker),
            "kubernetes" => Ok(BackendKind::Kubernetes),
            other => Err(format!("`{other}`: expected process, docker or kubernetes")),
        }
    }
}

#[derive(clap::Parser, Debug)]
#[command(
    name = "runner",
    about = "trainmesh runner: registers with the scheduler and runs assigned attempts"
)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    /// scheduler-service (RunnerService): host:port, http://host:port or file:PATH.
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_ENDPOINT",
        default_value = "127.0.0.1:50052"
    )]
    pub scheduler_endpoint: String,

    /// job-service (JobInternalService.AppendJobLogs).
    #[arg(
        long,
        env = "TRAINMESH_JOB_ENDPOINT",
        default_value = "127.0.0.1:50051"
    )]
    pub job_endpoint: String,

    /// metrics-service (MetricsService.WriteMetrics).
    #[arg(
        long,
        env = "TRAINMESH_METRICS_ENDPOINT",
        default_value = "127.0.0.1:50053"
    )]
    pub metrics_endpoint: String,

    /// Name this runner registers under. Default: the hostname. Its
    /// credential (`--service-token-file`) must be one for this name.
    #[arg(long, env = "TRAINMESH_RUNNER_NAME")]
    pub name: Option<String>,

    /// A join token (role `join`): when the runner's credential file does
    /// not exist yet, the runner trades this for its own credential
    /// (`TokenService.JoinRunner` on job-service) and writes it there, owner
    /// only, for every later start.
    #[arg(long, env = "TRAINMESH_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,

    /// process, docker or kubernetes.
    #[arg(long, env = "TRAINMESH_RUNNER_BACKEND", default_value = "process")]
    pub backend: BackendKind,

    #[command(flatten)]
    pub docker: DockerArgs,

    /// Per-attempt directories `<work-dir>/<job_id>/<attempt>/`. Default:
    /// DATA_DIR/runner.
    #[arg(long, env = "TRAINMESH_RUNNER_WORK_DIR")]
    pub work_dir: Option<PathBuf>,

    /// Attempts run at the same time at most.
    #[arg(long, env = "TRAINMESH_RUNNER_MAX_CONCURRENT", default_value_t = 8)]
    pub max_concurrent: usize,

    /// GPUs: auto (nvidia-smi), none, or a fixed count. Default: auto.
    /// (`--k8s-gpus` declares a cluster's GPUs by product instead.)
    #[arg(long, env = "TRAINMESH_RUNNER_GPUS")]
    pub gpus: Option<GpuSetting>,

    /// CPU cores to offer. Default: what the OS reports.
    #[arg(long, env = "TRAINMESH_RUNNER_CPU")]
    pub cpu: Option<f64>,

    /// Memory to offer in MiB. Default: MemTotal of /proc/meminfo.
    #[arg(long, env = "TRAINMESH_RUNNER_MEMORY_MIB")]
    pub memory_mib: Option<i64>,

    /// Labels to register with, `key=value` (repeat or comma-separate).
    #[arg(long = "label", env = "TRAINMESH_RUNNER_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,

    /// How often new log lines are shipped (sooner when 500 are waiting).
    #[arg(
        long,
        env = "TRAINMESH_RUNNER_LOG_SHIP_INTERVAL_MS",
        default_value_t = 200
    )]
    pub log_ship_interval_ms: u64,

    /// How often new metrics lines are shipped (sooner when 1000 are waiting).
    #[arg(
        long,
        env = "TRAINMESH_RUNNER_METRICS_FLUSH_INTERVAL_MS",
        default_value_t = 500
    )]
    pub metrics_flush_interval_ms: u64,

    /// Process backend: the user jobs run as (`NAME`, `UID` or `UID:GID`).
    /// Needs a runner running as root; see --allow-root-jobs. `auto`:
    /// `nobody` when the runner is root and `nobody` can reach the work
    /// dir, else the runner's own user (root only with a warning).
    #[arg(long, env = "TRAINMESH_RUNNER_JOB_USER")]
    pub job_user: Option<String>,

    /// Process backend: let jobs run as root (a runner running as root
    /// without --job-user refuses to start otherwise).
    #[arg(long, env = "TRAINMESH_RUNNER_ALLOW_ROOT_JOBS")]
    pub allow_root_jobs: bool,

    /// Process and docker backends: a directory with one file per secret a
    /// job may name in `secret_env` (the file holds the value).
    #[arg(long, env = "TRAINMESH_RUNNER_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,

    /// Grace between SIGTERM and SIGKILL when the job's spec sets none.
    #[arg(
        long,
        env = "TRAINMESH_RUNNER_TERMINATION_GRACE_SECS",
        default_value_t = 10
    )]
    pub termination_grace_secs: u64,

    /// How long an ended attempt may spend shipping its remaining logs and
    /// metrics before its final report is sent anyway.
    #[arg(
        long,
        env = "TRAINMESH_RUNNER_FLUSH_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub flush_timeout_secs: u64,

    /// Disk kept for each attempt's log, all its files together; the
    /// oldest lines are deleted beyond it (shipped ones, unless job-service
    /// was unreachable that long).
    #[arg(
        long,
        env = "TRAINMESH_RUNNER_ATTEMPT_LOG_MAX_MIB",
        default_value_t = 256
    )]
    pub attempt_log_max_mib: u64,

    /// Files each attempt's log is kept in, `output.log` included: it is
    /// rotated at max-mib / files.
    #[arg(long, env = "TRAINMESH_RUNNER_ATTEMPT_LOG_FILES", default_value_t = 4)]
    pub attempt_log_files: u32,

    /// When stopped: `wait` lets running attempts end, up to
    /// --drain-timeout-secs, then hands back the rest; `handback` hands
    /// them all back at once. Handed-back attempts run again at once and do
    /// not use up their job's attempts.
    #[arg(long, env = "TRAINMESH_RUNNER_ON_STOP", default_value = "wait")]
    pub on_stop: OnStop,

    /// With --on-stop wait: how long a stopped runner waits for its
    /// attempts before it hands back those still running.
    #[arg(
        long,
        env = "TRAINMESH_RUNNER_DRAIN_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub drain_timeout_secs: u64,

    /// How long an ended attempt's directory (its log files, metrics file
    /// and whatever the job wrote to $TRAINMESH_OUTPUT_DIR) is kept before
    /// it is deleted. The log has been shipped to job-service by then.
    #[arg(
        long,
        env = "TRAINMESH_RUNNER_ATTEMPT_DIR_KEEP_SECS",
        default_value_t = 86_400
    )]
    pub attempt_dir_keep_secs: u64,

    /// Serve the standard gRPC health service (grpc.health.v1), and
    /// nothing else, on this address (conventionally port 50055), for
    /// Kubernetes probes and compose health checks. Health is reported for
    /// the service name "" only (other names answer NOT_FOUND): SERVING
    /// while the runner is registered, its latest registration or
    /// heartbeat succeeded and its backend answers (docker: the engine's
    /// ping; kubernetes: the API's /version; process: always), checked
    /// every 5 s; NOT_SERVING otherwise, before registration and from the
    /// moment it starts to stop. Default: no health server.
    #[arg(long, env = "TRAINMESH_RUNNER_HEALTH_LISTEN")]
    pub health_listen: Option<String>,

    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
}

/// Everything `run` needs. Tests build it with [`Config::new`] and adjust
/// fields.
#[derive(Clone, Debug)]
pub struct Config {
    pub name: String,
    pub scheduler_endpoint: String,
    pub job_endpoint: String,
    pub metrics_endpoint: String,
    /// The runner's own credential, sent on every call.
    pub token: String,
    /// How calls to the services connect.
    pub client_tls: ClientTls,
    pub backend: BackendKind,
    pub work_dir: PathBuf,
    pub max_concurrent: usize,
    /// Not consulted when `kubernetes.gpus` declares GPUs by product.
    pub gpus: GpuSetting,
    pub cpu: Option<f64>,
    pub memory_mib: Option<i64>,
    pub labels: BTreeMap<String, String>,
    pub log_ship_interval: Duration,
    pub metrics_flush_interval: Duration,
    pub default_termination_grace: Duration,
    pub flush_timeout: Duration,
    /// How much of each attempt's log is kept on disk.
    pub attempt_log: LogLimits,
    /// Long-poll wait asked of AcquireAssignments.
    pub acquire_wait: Duration,
    /// Heartbeat interval used until the scheduler names one.
    pub default_heartbeat_interval: Duration,
    /// Cap of the back-off between retries of failed calls.
    pub max_backoff: Duration,
    /// Working directory of jobs whose spec has none. `None`: the runner's.
    pub default_working_dir: Option<PathBuf>,
    /// Process backend: the user jobs run as; `None`: the runner's own.
    pub job_user: Option<JobUser>,
    /// Process backend: jobs may run as root.
    pub allow_root_jobs: bool,
    /// Where secret variables' values are read; `None`: no secrets.
    pub secrets_dir: Option<PathBuf>,
    /// Opens the env values jobs mark secret; `None`: such jobs fail.
    pub secrets_key: Option<std::sync::Arc<trainmesh_common::sealed::SecretsKey>>,
    /// Variables passed from the runner's environment to every job (the
    /// rest of the runner's environment — tokens, endpoints — is not).
    pub inherit_env: Vec<String>,
    /// Used when `backend` is docker.
    pub docker: DockerSettings,
    /// Settings of the kubernetes backend.
    pub kubernetes: KubernetesConfig,
    /// What to do with running attempts when stopped.
    pub on_stop: OnStop,
    /// With [`OnStop::Wait`], how long to wait before handing back.
    pub drain_timeout: Duration,
    /// How long an ended attempt's directory is kept.
    pub attempt_dir_keep: Duration,
    /// The program the process backend starts attempts through: this
    /// runner's own binary (see [`crate::shim`]). `None`: the running
    /// executable, which is right for the `runner` binary; a program that
    /// embeds the runner names the `runner` binary here.
    pub shim: Option<PathBuf>,
    /// Where to serve grpc.health.v1 (see [`crate::health`]); `None`: not
    /// at all.
    pub health_listen: Option<String>,
    /// How the health server accepts connections.
    pub health_tls: ServerTls,
}

/// Passed through to jobs: what programs need to be found and to behave.
pub const DEFAULT_INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
];

impl Config {
    /// A config with the documented defaults.
    pub fn new(
        name: impl Into<String>,
        scheduler_endpoint: impl Into<String>,
        job_endpoint: impl Into<String>,
        metrics_endpoint: impl Into<String>,
        token: impl Into<String>,
        work_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            name: name.into(),
            scheduler_endpoint: scheduler_endpoint.into(),
            job_endpoint: job_endpoint.into(),
            metrics_endpoint: metrics_endpoint.into(),
            token: token.into(),
            client_tls: ClientTls::default(),
            backend: BackendKind::Process,
            work_dir: work_dir.into(),
            max_concurrent: 8,
            gpus: GpuSetting::Detect,
            cpu: None,
            memory_mib: None,
            labels: BTreeMap::new(),
            log_ship_interval: Duration::from_millis(200),
            metrics_flush_interval: Duration::from_millis(500),
            default_termination_grace: Duration::from_secs(10),
            flush_timeout: Duration::from_secs(30),
            attempt_log: LogLimits::default(),
            acquire_wait: Duration::from_secs(25),
            default_heartbeat_interval: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
            default_working_dir: None,
            job_user: None,
            allow_root_jobs: false,
            secrets_dir: None,
            secrets_key: None,
            inherit_env: DEFAULT_INHERITED_ENV
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            docker: DockerSettings::default(),
            kubernetes: KubernetesConfig::default(),
            on_stop: OnStop::Wait,
            drain_timeout: Duration::from_secs(30),
            attempt_dir_keep: Duration::from_secs(24 * 3600),
            shim: None,
            health_listen: None,
            health_tls: ServerTls::default(),
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_concurrent >= 1,
            "max_concurrent must be at least 1"
        );
        if let Some(cpu) = self.cpu {
            anyhow::ensure!(cpu.is_finite() && cpu > 0.0, "cpu must be positive");
        }
        if let Some(m) = self.memory_mib {
            anyhow::ensure!(m >= 0, "memory_mib must not be negative");
        }
        anyhow::ensure!(
            !self.log_ship_interval.is_zero() && !self.metrics_flush_interval.is_zero(),
            "ship intervals must be positive"
        );
        anyhow::ensure!(!self.name.trim().is_empty(), "name must not be empty");
        anyhow::ensure!(
            self.attempt_log.max_bytes > 0 && self.attempt_log.files > 0,
            "the attempt log cap and file count must be positive"
        );
        // A segment smaller than the longest line would be all one line.
        anyhow::ensure!(
            self.attempt_log.segment_bytes() > MAX_LINE_BYTES as u64,
            "attempt log files of {} bytes cannot hold a {} KiB line: raise the cap or use fewer files",
            self.attempt_log.segment_bytes(),
            MAX_LINE_BYTES / 1024
        );
        anyhow::ensure!(
            (0..=i64::MAX / (1024 * 1024)).contains(&self.docker.shm_size_mib),
            "docker shm size must not be negative"
        );
        if self.backend == BackendKind::Process {
            job_user::check(
                self.job_user.as_ref(),
                self.allow_root_jobs,
                nix::unistd::geteuid().as_raw(),
                &self.work_dir,
            )?;
        }
        self.kubernetes.validate()?;
        // Only the kubernetes backend pins pods to a product; elsewhere the
        // declared GPUs would be handed out as if a node had them.
        anyhow::ensure!(
            self.kubernetes.gpus.is_empty() || self.backend == BackendKind::Kubernetes,
            "`--k8s-gpus` needs `--backend kubernetes`: other backends detect (`--gpus auto`) \
             or count (`--gpus N`) their node's GPUs"
        );
        Ok(())
    }
}

impl Args {
    pub fn into_config(self) -> anyhow::Result<Config> {
        let token = self.common.service_token("runner")?;
        let work_dir = self
            .work_dir
            .unwrap_or_else(|| self.common.data_dir.join("runner"));
        let name = self.name.unwrap_or_else(hostname);
        let mut labels = BTreeMap::new();
        for l in self.labels.iter().filter(|l| !l.trim().is_empty()) {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("invalid label `{l}`: expected key=value"))?;
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        let mut c = Config::new(
            name,
            self.scheduler_endpoint,
            self.job_endpoint,
            self.metrics_endpoint,
            token,
            work_dir,
        );
        c.backend = self.backend;
        c.docker = self.docker.into_settings();
        c.max_concurrent = self.max_concurrent;
        c.kubernetes = self.kubernetes.into_config()?;
        // Both would describe the same GPUs twice, one of them untyped:
        // refused rather than one silently winning.
        anyhow::ensure!(
            self.gpus.is_none() || c.kubernetes.gpus.is_empty(),
            "`--gpus` and `--k8s-gpus` cannot be used together: `--k8s-gpus` declares the \
             cluster's GPUs by product, `--gpus` as an untyped count"
        );
        c.gpus = self.gpus.unwrap_or(GpuSetting::Detect);
        c.cpu = self.cpu;
        c.memory_mib = self.memory_mib;
        c.labels = labels;
        c.log_ship_interval = Duration::from_millis(self.log_ship_interval_ms);
        c.metrics_flush_interval = Duration::from_millis(self.metrics_flush_interval_ms);
        c.default_termination_grace = Duration::from_secs(self.termination_grace_secs);
        c.flush_timeout = Duration::from_secs(self.flush_timeout_secs);
        c.attempt_log = LogLimits {
            max_bytes: self.attempt_log_max_mib.saturating_mul(1024 * 1024),
            files: self.attempt_log_files,
        };
        c.on_stop = self.on_stop;
        c.drain_timeout = Duration::from_secs(self.drain_timeout_secs);
        c.attempt_dir_keep = Duration::from_secs(self.attempt_dir_keep_secs);
        c.health_listen = self.health_listen.filter(|a| !a.trim().is_empty());
        c.allow_root_jobs = self.allow_root_jobs;
        c.job_user = match self.job_user.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(job_user::AUTO) => job_user::auto(&c.work_dir, &mut c.allow_root_jobs)?,
            Some(spec) => Some(JobUser::parse(spec)?),
        };
        c.secrets_dir = self.secrets_dir;
        c.secrets_key = self.common.secrets_key()?;
        c.client_tls = self.common.client_tls()?;
        c.health_tls = self.common.server_tls.load()?;
        c.validate()?;
        Ok(c)
    }
}

/// The kernel's hostname, for the default runner name.
pub fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "runner".to_owned())
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
