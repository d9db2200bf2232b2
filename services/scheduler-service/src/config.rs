//! Command-line flags and environment, converted into [`crate::Config`].

use std::sync::Arc;
use std::time::Duration;

use trainmesh_common::config::CommonArgs;
use trainmesh_common::time::SystemClock;

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

    /// Jobs one user may have scheduled or running at once (0: no limit).
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_MAX_RUNNING_PER_USER",
        default_value_t = crate::DEFAULT_MAX_RUNNING_PER_USER
    )]
    pub max_running_per_user: u32,

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
        let tokens = self.common.token_store().await?;
        let service_token = self
            .common
            .optional_service_token("status updates to job-service will be refused")?;
        Ok(Config {
            database_url: self
                .common
                .database_url(self.database_url.as_deref(), "scheduler.db"),
            tokens,
            server: self.common.server_options(),
            job_endpoint: self.job_endpoint,
            service_token,
            max_running_per_user: self.max_running_per_user,
            lease_ttl: Duration::from_secs(self.lease_ttl_secs),
            heartbeat_interval: Duration::from_secs(self.heartbeat_interval_secs),
            sweep_interval: Duration::from_millis(self.sweep_interval_ms),
            default_max_attempts: self.default_max_attempts,
            max_long_poll: crate::MAX_LONG_POLL,
            clock: Arc::new(SystemClock),
        })
    }
}
