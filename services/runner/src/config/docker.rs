//! The docker backend's settings and their `--docker-*` flags.

use std::str::FromStr;
use std::time::Duration;

/// When the docker backend pulls a job's image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    /// Only when the engine does not have it (Kubernetes' default for
    /// tagged images): a node with a warm cache starts at once.
    IfNotPresent,
    /// Before every attempt, so a moved tag is picked up.
    Always,
    /// Never: air-gapped nodes whose images are loaded by hand.
    Never,
}

impl FromStr for PullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "if-not-present" | "IfNotPresent" => Ok(PullPolicy::IfNotPresent),
            "always" | "Always" => Ok(PullPolicy::Always),
            "never" | "Never" => Ok(PullPolicy::Never),
            other => Err(format!(
                "`{other}`: expected if-not-present, always or never"
            )),
        }
    }
}

/// How the docker backend talks to the engine and shapes containers.
#[derive(Clone, Debug, PartialEq)]
pub struct DockerSettings {
    /// `unix:///path`, `tcp://host:port`; `None`: `DOCKER_HOST`, else the
    /// local socket.
    pub host: Option<String>,
    /// `/dev/shm` of jobs whose spec sets no `resources.shm_mib`. Docker's
    /// own 64 MiB makes NCCL fail as soon as it uses shared memory.
    pub shm_size_mib: i64,
    pub pull_policy: PullPolicy,
    /// Network of job containers (`host` for multi-node NCCL); `None`: the
    /// engine's default bridge.
    pub network: Option<String>,
    /// Run the engine's init (tini) as PID 1: it forwards SIGTERM and
    /// reaps orphans that the job's own PID 1 would ignore.
    pub init: bool,
    /// How long finished containers are kept for `docker inspect` and
    /// `docker logs` before they are removed; zero removes them as soon as
    /// the attempt has read its result.
    pub keep_succeeded: Duration,
    pub keep_failed: Duration,
    /// The runner's name, labelled on its containers: a restarted runner
    /// stops the containers an earlier run of it left running.
    pub runner: String,
}

impl Default for DockerSettings {
    fn default() -> Self {
        Self {
            host: None,
            runner: String::new(),
            shm_size_mib: 1024,
            pull_policy: PullPolicy::IfNotPresent,
            network: None,
            init: false,
            keep_succeeded: Duration::ZERO,
            keep_failed: Duration::from_secs(3600),
        }
    }
}

/// The `--docker-*` flags.
#[derive(clap::Args, Debug)]
pub struct DockerArgs {
    /// Docker Engine address (unix:///var/run/docker.sock, tcp://host:2375).
    /// Default: DOCKER_HOST, else the local socket.
    #[arg(long, env = "TRAINMESH_DOCKER_HOST")]
    pub docker_host: Option<String>,

    /// /dev/shm size in MiB of jobs whose spec sets none (NCCL needs more
    /// than Docker's 64 MiB).
    #[arg(long, env = "TRAINMESH_DOCKER_SHM_SIZE_MIB", default_value_t = 1024)]
    pub docker_shm_size_mib: i64,

    /// if-not-present, always or never.
    #[arg(
        long,
        env = "TRAINMESH_DOCKER_PULL_POLICY",
        default_value = "if-not-present"
    )]
    pub docker_pull_policy: PullPolicy,

    /// Network for job containers (e.g. host). Default: the engine's bridge.
    #[arg(long, env = "TRAINMESH_DOCKER_NETWORK")]
    pub docker_network: Option<String>,

    /// Run Docker's init as PID 1 in job containers.
    #[arg(long, env = "TRAINMESH_DOCKER_INIT")]
    pub docker_init: bool,

    /// Seconds a succeeded container is kept before removal (0: at once).
    #[arg(
        long,
        env = "TRAINMESH_DOCKER_KEEP_SUCCEEDED_SECS",
        default_value_t = 0
    )]
    pub docker_keep_succeeded_secs: u64,

    /// Seconds a failed container is kept for inspection before removal.
    #[arg(
        long,
        env = "TRAINMESH_DOCKER_KEEP_FAILED_SECS",
        default_value_t = 3600
    )]
    pub docker_keep_failed_secs: u64,
}

impl DockerArgs {
    pub fn into_settings(self) -> DockerSettings {
        DockerSettings {
            host: self.docker_host.filter(|h| !h.trim().is_empty()),
            shm_size_mib: self.docker_shm_size_mib,
            pull_policy: self.docker_pull_policy,
            network: self.docker_network.filter(|n| !n.trim().is_empty()),
            init: self.docker_init,
            keep_succeeded: Duration::from_secs(self.docker_keep_succeeded_secs),
            keep_failed: Duration::from_secs(self.docker_keep_failed_secs),
            // Set from the runner's name where the backend starts.
            runner: String::new(),
        }
    }
}
