//! Command-line flags and environment, converted into [`crate::Config`].

use std::sync::Arc;
use std::time::Duration;

use trainmesh_common::config::CommonArgs;
use trainmesh_common::time::{Clock, SystemClock};

use crate::approvals::Rules;
use crate::clock::OffsetFileClock;

use crate::Config;

#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "scheduler-service",
    version,
    about = "trainmesh scheduler: queue, limits, runner leases and dispatch"
)]
pub struct Args {
    /// Address to serve gRPC on.
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_LISTEN",
        default_value = "0.0.0.0:50052"
    )]
    pub listen: String,

    /// `sqlite://PATH` or `postgres://…`. Default: DATA_DIR/scheduler.db.
    #[arg(long, env = "TRAINMESH_SCHEDULER_DATABASE_URL")]
    pub database_url: Option<String>,

    /// job-service, which receives status updates (`host:port` or `file:PATH`).
    #[arg(
        long,
        env = "TRAINMESH_JOB_ENDPOINT",
        default_value = "127.0.0.1:50051"
    )]
    pub job_endpoint: String,

    /// Default limit (USER_DEFAULT) on jobs one user may have scheduled or
    /// running at once (0: no limit). Seeds the stored limits only when no
    /// USER_DEFAULT row exists yet; afterwards `trainctl limits set` wins.
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_MAX_RUNNING_PER_USER",
        default_value_t = crate::DEFAULT_MAX_RUNNING_PER_USER
    )]
    pub max_running_per_user: u32,

    /// Default limit (USER_DEFAULT) on GPUs one user may have in use (0: no
    /// limit); seeds the stored limits like --max-running-per-user.
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_MAX_GPUS_PER_USER",
        default_value_t = 0
    )]
    pub max_gpus_per_user: u32,

    /// Default limit (USER_DEFAULT) on jobs one user may have queued (0: no
    /// limit; job-service enforces it at submit); seeds like the others.
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_MAX_QUEUED_PER_USER",
        default_value_t = 0
    )]
    pub max_queued_per_user: u32,

    /// Ageing: a waiting job gains one priority point per this many minutes
    /// waited, so nothing starves (0: no ageing).
    #[arg(long, env = "TRAINMESH_SCHEDULER_AGEING_MINUTES", default_value_t = 10)]
    pub ageing_minutes: u64,

    /// Approval rules (YAML: ordered `rules` with `name` and `when`, and
    /// `ttl`); without it no job needs approval.
    #[arg(long, env = "TRAINMESH_SCHEDULER_APPROVAL_RULES")]
    pub approval_rules: Option<std::path::PathBuf>,

    /// How long a pending approval lives before the job is cancelled
    /// (default: the rules file's `ttl`, else 24 h).
    #[arg(long, env = "TRAINMESH_SCHEDULER_APPROVAL_TTL_SECS")]
    pub approval_ttl_secs: Option<u64>,

    /// Period of the sweep that expires pending approvals (dispatch rounds
    /// also expire them exactly).
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_APPROVAL_SWEEP_SECS",
        default_value_t = 300
    )]
    pub approval_sweep_secs: u64,

    /// Retry backoff before the second attempt; doubles per started attempt
    /// (a job's retry_policy.initial_backoff overrides it).
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_RETRY_INITIAL_BACKOFF_SECS",
        default_value_t = 10
    )]
    pub retry_initial_backoff_secs: u64,

    /// Cap of the retry backoff (a job's retry_policy.max_backoff overrides it).
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_RETRY_MAX_BACKOFF_SECS",
        default_value_t = 600
    )]
    pub retry_max_backoff_secs: u64,

    /// TTL of the dispatch leader lease shared by replicas on one database;
    /// renewed every fifth of it. A dead leader is replaced after this long.
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_LEADER_LEASE_TTL_SECS",
        default_value_t = 5
    )]
    pub leader_lease_ttl_secs: u64,

    /// TEST ONLY: the scheduler's clock is the wall clock plus the number of
    /// seconds in this file (missing or empty: 0), re-read at most every
    /// 50 ms. Lets tests expire approvals, leases and backoffs. Never set
    /// this in production.
    #[arg(long, env = "TRAINMESH_TEST_CLOCK_OFFSET_FILE")]
    pub clock_offset_file: Option<std::path::PathBuf>,

    /// A runner that does not heartbeat for this long is considered lost.
    #[arg(long, env = "TRAINMESH_SCHEDULER_LEASE_TTL_SECS", default_value_t = 15)]
    pub lease_ttl_secs: u64,

    /// How often runners are told to heartbeat.
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_HEARTBEAT_INTERVAL_SECS",
        default_value_t = 5
    )]
    pub heartbeat_interval_secs: u64,

    /// Period of the dispatch sweep and lease check (events dispatch at once).
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_SWEEP_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub sweep_interval_ms: u64,

    /// Attempts of a job whose retry policy does not set max_attempts.
    #[arg(long, env = "TRAINMESH_SCHEDULER_DEFAULT_MAX_ATTEMPTS", default_value_t = crate::DEFAULT_MAX_ATTEMPTS)]
    pub default_max_attempts: u32,

    /// A runner is cordoned (takes no new work until an admin runs
    /// `trainctl runners uncordon NAME`) after this many node faults: jobs
    /// that failed there because the node could not run GPU work. 0: never.
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_CORDON_AFTER_NODE_FAULTS",
        default_value_t = crate::DEFAULT_CORDON_AFTER_NODE_FAULTS
    )]
    pub cordon_after_node_faults: u32,

    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    pub async fn into_config(self) -> anyhow::Result<Config> {
        if self.lease_ttl_secs == 0 || self.heartbeat_interval_secs == 0 {
            anyhow::bail!("--lease-ttl-secs and --heartbeat-interval-secs must be at least 1");
        }
        if self.heartbeat_interval_secs >= self.lease_ttl_secs {
            anyhow::bail!(
                "--heartbeat-interval-secs ({}) must be shorter than --lease-ttl-secs ({})",
                self.heartbeat_interval_secs,
                self.lease_ttl_secs
            );
        }
        if self.sweep_interval_ms == 0 {
            anyhow::bail!("--sweep-interval-ms must be at least 1");
        }
        if self.default_max_attempts == 0 {
            anyhow::bail!("--default-max-attempts must be at least 1");
        }
        if self.approval_sweep_secs == 0 {
            anyhow::bail!("--approval-sweep-secs must be at least 1");
        }
        if self.approval_ttl_secs == Some(0) {
            anyhow::bail!("--approval-ttl-secs must be at least 1");
        }
        if self.leader_lease_ttl_secs == 0 {
            anyhow::bail!("--leader-lease-ttl-secs must be at least 1");
        }
        if self.retry_max_backoff_secs < self.retry_initial_backoff_secs {
            anyhow::bail!(
                "--retry-max-backoff-secs ({}) must not be below --retry-initial-backoff-secs ({})",
                self.retry_max_backoff_secs,
                self.retry_initial_backoff_secs
            );
        }
        let approval_rules = match &self.approval_rules {
            Some(path) => Rules::load(path)?,
            None => Rules::default(),
        };
        let clock: Arc<dyn Clock> = match &self.clock_offset_file {
            Some(path) => {
                tracing::warn!(path = %path.display(), "test clock in use (--clock-offset-file)");
                Arc::new(OffsetFileClock::new(path))
            }
            None => Arc::new(SystemClock),
        };
        let tokens = self.common.token_store().await?;
        let service_token = self.common.optional_service_token(
            trainmesh_common::auth::service::SCHEDULER,
            "status updates to job-service will be refused",
        )?;
        Ok(Config {
            database_url: self
                .common
                .database_url(self.database_url.as_deref(), "scheduler.db"),
            tokens,
            server: self.common.server_options()?,
            job_endpoint: self.job_endpoint,
            service_token,
            client_tls: self.common.client_tls()?,
            max_running_per_user: self.max_running_per_user,
            max_gpus_per_user: self.max_gpus_per_user,
            max_queued_per_user: self.max_queued_per_user,
            ageing: Duration::from_secs(self.ageing_minutes.saturating_mul(60)),
            approval_rules,
            approval_ttl: self.approval_ttl_secs.map(Duration::from_secs),
            approval_sweep: Duration::from_secs(self.approval_sweep_secs),
            initial_backoff: Duration::from_secs(self.retry_initial_backoff_secs),
            max_backoff: Duration::from_secs(self.retry_max_backoff_secs),
            leader_ttl: Duration::from_secs(self.leader_lease_ttl_secs),
            lease_ttl: Duration::from_secs(self.lease_ttl_secs),
            heartbeat_interval: Duration::from_secs(self.heartbeat_interval_secs),
            sweep_interval: Duration::from_millis(self.sweep_interval_ms),
            default_max_attempts: self.default_max_attempts,
            max_long_poll: crate::MAX_LONG_POLL,
            cordon_after_node_faults: self.cordon_after_node_faults,
            clock,
        })
    }
}
