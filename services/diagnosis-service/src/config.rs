//! Command-line flags and environment of `diagnosis-service`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use trainmesh_common::auth::TokenStore;
use trainmesh_common::config::CommonArgs;
use trainmesh_common::server::ServerOptions;
use trainmesh_common::tls::ClientTls;

/// Everything `run` needs; tests build it directly.
#[derive(Clone, Debug)]
pub struct Config {
    pub tokens: Arc<TokenStore>,
    pub server: ServerOptions,
    /// `sqlite://PATH` or `postgres://…`.
    pub database_url: String,
    /// job-service: `host:port`, `http://host:port` or `file:PATH`.
    pub job_endpoint: String,
    /// metrics-service; not called yet (anomalies arrive with a later release).
    pub metrics_endpoint: String,
    /// This service's token for job-service (needs the `service` role).
    pub service_token: Option<String>,
    /// How calls to job-service connect.
    pub client_tls: ClientTls,
    /// Extra rules (YAML), tried before the built-in ones.
    pub rules_file: Option<PathBuf>,
    /// Limit for each call to job-service.
    pub job_call_timeout: Duration,
}

impl Config {
    /// Defaults for everything but the tokens, the database and job-service.
    pub fn new(
        tokens: Arc<TokenStore>,
        database_url: impl Into<String>,
        job_endpoint: impl Into<String>,
        service_token: Option<String>,
    ) -> Self {
        Self {
            tokens,
            server: ServerOptions::default(),
            database_url: database_url.into(),
            job_endpoint: job_endpoint.into(),
            metrics_endpoint: "127.0.0.1:50053".into(),
            service_token,
            client_tls: ClientTls::default(),
            rules_file: None,
            job_call_timeout: Duration::from_secs(15),
        }
    }
}

/// trainmesh diagnosis-service: explains failed jobs from their state, error
/// and log with an ordered rule set.
#[derive(clap::Parser, Debug)]
#[command(name = "diagnosis-service", version, about)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Address to listen on.
    #[arg(
        long,
        env = "TRAINMESH_DIAGNOSIS_LISTEN",
        default_value = "0.0.0.0:50054"
    )]
    pub listen: String,

    /// `sqlite://PATH`, `postgres://…`, or a plain file path for SQLite.
    /// Default: the SQLite file diagnosis.db in the data dir.
    #[arg(long, env = "TRAINMESH_DIAGNOSIS_DATABASE_URL")]
    pub database_url: Option<String>,

    /// job-service endpoint (`host:port`, `http://…` or `file:PATH`).
    #[arg(
        long,
        env = "TRAINMESH_JOB_ENDPOINT",
        default_value = "127.0.0.1:50051"
    )]
    pub job_endpoint: String,

    /// metrics-service endpoint (not used yet).
    #[arg(
        long,
        env = "TRAINMESH_METRICS_ENDPOINT",
        default_value = "127.0.0.1:50053"
    )]
    pub metrics_endpoint: String,

    /// YAML file of extra diagnosis rules (see the `rules` module docs).
    #[arg(long, env = "TRAINMESH_DIAGNOSIS_RULES_FILE")]
    pub rules_file: Option<PathBuf>,

    /// Seconds allowed for each call to job-service.
    #[arg(
        long,
        env = "TRAINMESH_DIAGNOSIS_JOB_TIMEOUT_SECS",
        default_value_t = 15
    )]
    pub job_timeout_secs: u64,
}

/// A plain path means a SQLite file.
fn database_url(common: &CommonArgs, explicit: Option<&str>) -> String {
    match explicit {
        Some(u) if !u.contains(':') => {
            trainmesh_common::db::sqlite_url(std::path::Path::new("."), u)
        }
        other => common.database_url(other, "diagnosis.db"),
    }
}

impl Args {
    pub async fn into_config(self) -> anyhow::Result<Config> {
        // Without the token, DiagnoseJob answers UNAVAILABLE but stored
        // diagnoses can still be read, so a missing token is not fatal.
        let service_token = self.common.optional_service_token(
            trainmesh_common::auth::service::DIAGNOSIS,
            "DiagnoseJob cannot read jobs",
        )?;
        Ok(Config {
            tokens: self.common.token_store().await?,
            server: self.common.server_options()?,
            database_url: database_url(&self.common, self.database_url.as_deref()),
            job_endpoint: self.job_endpoint,
            metrics_endpoint: self.metrics_endpoint,
            service_token,
            client_tls: self.common.client_tls()?,
            rules_file: self.rules_file,
            job_call_timeout: Duration::from_secs(self.job_timeout_secs.max(1)),
        })
    }
}
