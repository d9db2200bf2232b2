//! trainmesh diagnosis-service.
//!
//! DiagnoseJob reads a job and the tail of its log from job-service, applies
//! an ordered rule set ([`rules`]: resource checks of the spec, control
//! checks of states and exit codes, execution checks of the error and the
//! log) and answers `Healthy` / `Error` / `Analysis` / `Solution` with the
//! evidence cited, stored for GetDiagnosis and ListDiagnoses. Without an
//! LLM the rules alone answer (`prompt_version` "rules-v1"). With an
//! OpenAI-compatible endpoint configured ([`llm`]) and asked for, the LLM
//! also analyses the master and the abnormal workers (or the job) from
//! prompt templates in Aegis' syntax ([`template`], [`prompt`],
//! [`context`]); its analyses are kept beside the rules' answer and never
//! change it ([`analyst`]).

pub mod analyst;
pub mod answer;
pub mod checks;
pub mod config;
pub mod context;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod llm;
pub mod logwindow;
pub mod prompt;
pub mod repo;
pub mod report;
pub mod rules;
pub mod service;
pub mod template;
pub mod text;

use std::future::Future;
use std::sync::Arc;

use tonic::service::Routes;
use trainmesh_common::db::{self, Durability};
use trainmesh_common::proto::diagnosis::v1::diagnosis_service_server::{
    DiagnosisServiceServer, SERVICE_NAME,
};
use trainmesh_common::server;

pub use config::{Args, Config};

/// Serves diagnosis-service on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let rules = match &config.rules_file {
        Some(path) => rules::RuleSet::load_file(path)?,
        None => rules::RuleSet::builtin(),
    };
    // Checked even without an LLM: a broken template stops the start.
    let prompts = Arc::new(prompt::Prompts::load(config.prompt_dir.as_deref())?);
    let llm = config.llm.clone().map(llm::LlmClient::new).transpose()?;
    let db = db::open(
        &config.database_url,
        Durability::Full,
        &sqlx::migrate!("./migrations/sqlite"),
        &sqlx::migrate!("./migrations/postgres"),
    )
    .await?;
    let jobs = jobs::JobSource::new(
        trainmesh_common::client::channel_with(
            &config.job_endpoint,
            config.service_token.as_deref(),
            &config.client_tls,
        )?,
        config.job_call_timeout,
    );
    let jobs = match &config.scheduler_endpoint {
        Some(endpoint) => jobs.with_scheduler(trainmesh_common::client::channel_with(
            endpoint,
            config.service_token.as_deref(),
            &config.client_tls,
        )?),
        None => jobs,
    };
    // Nothing here streams or loops in the background, so the watch half of
    // the pair is not needed.
    let (trigger, _watch) = server::shutdown_pair();
    let mut server_opts = config.server;
    server_opts.storage = Some(db.clone());
    let repo = repo::Repo::new(db);
    let analyst = llm.map(|client| {
        tracing::info!(model = client.model(), "LLM analyses enabled");
        Arc::new(analyst::Analyst::new(
            client,
            prompts.clone(),
            repo.clone(),
            config.llm_wait,
        ))
    });
    let svc = Arc::new(service::Diagnoser::new(repo, jobs, rules, prompts, analyst));
    let max = server_opts.max_message_bytes;
    let diagnosis = DiagnosisServiceServer::new(grpc::DiagnosisGrpc::new(svc))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    server::serve(
        "diagnosis-service",
        Routes::new(diagnosis),
        &[SERVICE_NAME],
        listener,
        config.tokens,
        server_opts,
        trigger,
        shutdown,
    )
    .await
}
