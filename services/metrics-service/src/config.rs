//! Command-line flags and environment of `metrics-service`.

use std::sync::Arc;
use std::time::Duration;

use trainmesh_common::auth::TokenStore;
use trainmesh_common::config::CommonArgs;
use trainmesh_common::server::ServerOptions;

use crate::caps::{Caps, DEFAULT_MAX_KEYS_PER_JOB, DEFAULT_MAX_POINTS_PER_JOB};
use crate::owners::JobOwners;

/// Everything `run` needs; tests build it directly.
#[derive(Clone, Debug)]
pub struct Config {
    pub tokens: Arc<TokenStore>,
    pub server: ServerOptions,
    /// `sqlite://PATH` or `postgres://…`.
    pub database_url: String,
    /// How often a watch looks for points written by another replica
    /// (writes through this process wake watches at once).
    pub watch_poll_interval: Duration,
    /// Per-job caps on stored points and distinct keys.
    pub caps: Caps,
    /// Who owns each job, from job-service. `None`: every authenticated
    /// caller may use every job's metrics, for tests that run
    /// metrics-service alone; the binary always checks.
    pub owners: Option<Arc<JobOwners>>,
}

impl Config {
    /// Defaults for everything but the tokens and the database.
    pub fn new(tokens: Arc<TokenStore>, database_url: impl Into<String>) -> Self {
        Self {
            tokens,
            server: ServerOptions::default(),
            database_url: database_url.into(),
            watch_poll_interval: Duration::from_secs(1),
            caps: Caps::default(),
            owners: None,
        }
    }
}

/// trainmesh metrics-service: ingest, latest values, queries and watches of
/// training metrics.
#[derive(clap::Parser, Debug)]
#[command(name = "metrics-service", version, about)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Address to listen on.
    #[arg(
        long,
        env = "TRAINMESH_METRICS_LISTEN",
        default_value = "0.0.0.0:50053"
    )]
    pub listen: String,

    /// `sqlite://PATH`, `postgres://…`, or a plain file path for SQLite.
    /// Default: the SQLite file metrics.db in the data dir.
    #[arg(long, env = "TRAINMESH_METRICS_DATABASE_URL")]
    pub database_url: Option<String>,

    /// How often (ms) a watch polls for points written by another replica.
    #[arg(long, env = "TRAINMESH_METRICS_WATCH_POLL_MS", default_value_t = 1000)]
    pub watch_poll_ms: u64,

    /// job-service endpoint (`host:port`, `http://…` or `file:PATH`), asked
    /// who owns a job before a user reads or writes its metrics.
    #[arg(
        long,
        env = "TRAINMESH_JOB_ENDPOINT",
        default_value = "127.0.0.1:50051"
    )]
    pub job_endpoint: String,

    /// Seconds allowed for each call to job-service.
    #[arg(long, env = "TRAINMESH_METRICS_JOB_TIMEOUT_SECS", default_value_t = 10)]
    pub job_timeout_secs: u64,

    /// Most metric points one job may store; a batch that would pass it is
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "TRAINMESH_METRICS_MAX_POINTS_PER_JOB",
          default_value_t = DEFAULT_MAX_POINTS_PER_JOB,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub max_points_per_job: i64,

    /// Most distinct metric keys one job may store; a batch that would pass
    /// it is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "TRAINMESH_METRICS_MAX_KEYS_PER_JOB",
          default_value_t = DEFAULT_MAX_KEYS_PER_JOB,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub max_keys_per_job: i64,
}

/// A plain path means a SQLite file.
fn database_url(common: &CommonArgs, explicit: Option<&str>) -> String {
    match explicit {
        Some(u) if !u.contains(':') => {
            trainmesh_common::db::sqlite_url(std::path::Path::new("."), u)
        }
        other => common.database_url(other, "metrics.db"),
    }
}

impl Args {
    pub async fn into_config(self) -> anyhow::Result<Config> {
        let token = self.common.optional_service_token(
            trainmesh_common::auth::service::METRICS,
            "users' calls are refused until job-service can be asked who owns a job",
        )?;
        let channel = trainmesh_common::client::channel_with(
            &self.job_endpoint,
            token.as_deref(),
            &self.common.client_tls()?,
        )?;
        let owners = JobOwners::new(channel, Duration::from_secs(self.job_timeout_secs.max(1)));
        Ok(Config {
            owners: Some(Arc::new(owners)),
            tokens: self.common.token_store().await?,
            server: self.common.server_options()?,
            database_url: database_url(&self.common, self.database_url.as_deref()),
            watch_poll_interval: Duration::from_millis(self.watch_poll_ms.max(10)),
            caps: Caps {
                points: self.max_points_per_job,
                keys: self.max_keys_per_job,
            },
        })
    }
}
