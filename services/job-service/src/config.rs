//! Command-line flags and environment.

use std::path::PathBuf;
use std::time::Duration;

use trainmesh_common::config::CommonArgs;

use crate::Config;

/// trainmesh job-service: jobs, attempts, events and logs; the source of
/// truth for job state.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "job-service", version)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Address to listen on.
    #[arg(long, env = "TRAINMESH_JOB_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: String,

    /// `sqlite:PATH` or `postgres://…`. Default: SQLite DATA_DIR/jobs.db.
    #[arg(long, env = "TRAINMESH_JOB_DATABASE_URL")]
    pub database_url: Option<String>,

    /// scheduler-service (`host:port`, `http://host:port` or `file:PATH`).
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_ENDPOINT",
        default_value = "127.0.0.1:50052"
    )]
    pub scheduler_endpoint: String,

    /// diagnosis-service, called when a job fails; an empty value turns
    /// automatic diagnosis off.
    #[arg(
        long,
        env = "TRAINMESH_DIAGNOSIS_ENDPOINT",
        default_value = "127.0.0.1:50054"
    )]
    pub diagnosis_endpoint: String,

    /// Directory under which a job's `training.dataset_path` and
    /// `training.output_path` must resolve (after following symlinks).
    /// Repeatable; the environment variable takes a comma-separated list.
    /// Default: DATA_DIR/datasets and DATA_DIR/outputs, those that exist.
    /// With no existing root, every job that names a dataset or output path
    /// is refused. Roots are never created.
    #[arg(
        long = "data-root",
        env = "TRAINMESH_DATA_ROOTS",
        value_delimiter = ','
    )]
    pub data_roots: Vec<PathBuf>,

    /// Log lines stored per attempt. A longer log keeps its first quarter,
    /// its end and the earliest error lines between; one marker line says
    /// which lines were dropped.
    #[arg(long, env = "TRAINMESH_JOB_MAX_LOG_LINES", default_value_t = 200_000)]
    pub max_log_lines_per_attempt: i64,

    /// Seconds between WatchJobs heartbeats.
    #[arg(long, env = "TRAINMESH_JOB_WATCH_HEARTBEAT_SECS", default_value_t = 5)]
    pub watch_heartbeat_secs: u64,

    /// Milliseconds a user's limits, fetched from the scheduler for the
    /// queued-jobs limit at submit, are used before asking again. When the
    /// scheduler cannot be reached the last known limits apply; when none
    /// were ever known, no queued-jobs limit applies.
    #[arg(long, env = "TRAINMESH_JOB_LIMITS_CACHE_MS", default_value_t = 2000)]
    pub limits_cache_ms: u64,
}

impl Args {
    pub async fn into_config(self) -> anyhow::Result<Config> {
        let tokens = self.common.token_store().await?;
        let database_url = self
            .common
            .database_url(self.database_url.as_deref(), "jobs.db");
        let service_token = self.common.optional_service_token(
            trainmesh_common::auth::service::JOB,
            "calls to the scheduler will be refused",
        )?;
        let data_roots = if self.data_roots.is_empty() {
            ["datasets", "outputs"]
                .iter()
                .map(|d| self.common.data_dir.join(d))
                .filter(|p| p.is_dir())
                .collect()
        } else {
            self.data_roots.clone()
        };
        if self.max_log_lines_per_attempt < 1 {
            anyhow::bail!("--max-log-lines-per-attempt must be at least 1");
        }
        let diagnosis = self.diagnosis_endpoint.trim();
        Ok(Config {
            tokens,
            server: self.common.server_options()?,
            database_url,
            scheduler_endpoint: self.scheduler_endpoint.clone(),
            diagnosis_endpoint: (!diagnosis.is_empty()).then(|| diagnosis.to_owned()),
            service_token,
            client_tls: self.common.client_tls()?,
            data_roots,
            max_log_lines_per_attempt: self.max_log_lines_per_attempt,
            secrets_key: self.common.secrets_key()?,
            watch_heartbeat: Duration::from_secs(self.watch_heartbeat_secs.max(1)),
            stream_poll: Duration::from_secs(1),
            limits_ttl: Duration::from_millis(self.limits_cache_ms),
        })
    }
}
