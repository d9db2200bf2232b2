//! Command-line flags and environment of `diagnosis-service`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use trainmesh_common::auth::TokenStore;
use trainmesh_common::config::CommonArgs;
use trainmesh_common::server::ServerOptions;
use trainmesh_common::tls::ClientTls;

use crate::llm::LlmSettings;

/// Inside job-service's 15 s limit for the DiagnoseJob it sends when a job
/// fails, with room to read the job first.
const DEFAULT_LLM_WAIT_SECS: u64 = 10;

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
    /// scheduler-service, for the runners' offers the spec is checked
    /// against; none: that check is skipped.
    pub scheduler_endpoint: Option<String>,
    /// This service's token for job-service (needs the `service` role).
    pub service_token: Option<String>,
    /// How calls to job-service connect.
    pub client_tls: ClientTls,
    /// Extra rules (YAML), tried before the built-in ones.
    pub rules_file: Option<PathBuf>,
    /// Limit for each call to job-service.
    pub job_call_timeout: Duration,
    /// `job.tmpl`, `master.tmpl`, `worker.tmpl` overriding the built-in
    /// prompt templates.
    pub prompt_dir: Option<PathBuf>,
    /// The chat-completions endpoint; without it the rules alone answer.
    pub llm: Option<LlmSettings>,
    /// How long DiagnoseJob waits for the LLM (less when the caller's
    /// deadline is nearer); later answers update the stored diagnosis.
    pub llm_wait: Duration,
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
            scheduler_endpoint: None,
            service_token,
            client_tls: ClientTls::default(),
            rules_file: None,
            job_call_timeout: Duration::from_secs(15),
            prompt_dir: None,
            llm: None,
            llm_wait: Duration::from_secs(DEFAULT_LLM_WAIT_SECS),
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

    /// scheduler-service endpoint: a job's resources are checked against
    /// what its runners offer (`ListRunners`).
    #[arg(
        long,
        env = "TRAINMESH_SCHEDULER_ENDPOINT",
        default_value = "127.0.0.1:50052"
    )]
    pub scheduler_endpoint: String,

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

    /// Directory of prompt templates (`job.tmpl`, `master.tmpl`,
    /// `worker.tmpl`, Go template syntax with the Aegis variables) that
    /// override the built-in ones; a Kubernetes ConfigMap, say.
    #[arg(long, env = "TRAINMESH_DIAGNOSIS_PROMPT_DIR")]
    pub prompt_dir: Option<PathBuf>,

    /// OpenAI-compatible endpoint for LLM analyses, e.g.
    /// `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`
    /// (`/chat/completions` is appended). Without it the rules alone answer.
    #[arg(long, env = "TRAINMESH_LLM_BASE_URL")]
    pub llm_base_url: Option<String>,

    /// Model asked, e.g. `gpt-4o-mini` or the name vLLM serves.
    #[arg(long, env = "TRAINMESH_LLM_MODEL")]
    pub llm_model: Option<String>,

    /// File holding the endpoint's API key (sent as `Authorization: Bearer`).
    #[arg(long, env = "TRAINMESH_LLM_API_KEY_FILE")]
    pub llm_api_key_file: Option<PathBuf>,

    /// Seconds allowed for one LLM request.
    #[arg(long, env = "TRAINMESH_LLM_TIMEOUT_SECS", default_value_t = 60)]
    pub llm_timeout_secs: u64,

    /// Tries after the first on connection errors, 429 and 5xx.
    #[arg(long, env = "TRAINMESH_LLM_RETRIES", default_value_t = 2)]
    pub llm_retries: u32,

    /// Seconds DiagnoseJob waits for the LLM before answering with the
    /// rules' diagnosis and the analyses still pending (never past the
    /// caller's deadline).
    #[arg(
        long,
        env = "TRAINMESH_DIAGNOSIS_LLM_WAIT_SECS",
        default_value_t = DEFAULT_LLM_WAIT_SECS
    )]
    pub llm_wait_secs: u64,
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
    fn llm(&self) -> anyhow::Result<Option<LlmSettings>> {
        let Some(base_url) = self.llm_base_url.clone().filter(|u| !u.trim().is_empty()) else {
            anyhow::ensure!(
                self.llm_model.is_none() && self.llm_api_key_file.is_none(),
                "--llm-model and --llm-api-key-file need --llm-base-url"
            );
            return Ok(None);
        };
        let Some(model) = self.llm_model.clone().filter(|m| !m.trim().is_empty()) else {
            anyhow::bail!("--llm-base-url needs --llm-model");
        };
        let mut s = LlmSettings::new(base_url, model);
        s.api_key_file = self.llm_api_key_file.clone();
        s.timeout = Duration::from_secs(self.llm_timeout_secs.max(1));
        s.retries = self.llm_retries;
        Ok(Some(s))
    }

    pub async fn into_config(self) -> anyhow::Result<Config> {
        let llm = self.llm()?;
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
            scheduler_endpoint: Some(self.scheduler_endpoint),
            service_token,
            client_tls: self.common.client_tls()?,
            rules_file: self.rules_file,
            job_call_timeout: Duration::from_secs(self.job_timeout_secs.max(1)),
            prompt_dir: self.prompt_dir,
            llm,
            llm_wait: Duration::from_secs(self.llm_wait_secs),
        })
    }
}
