//! trainmesh job-service: the source of truth for jobs.
//!
//! - `trainmesh.job.v1.JobService`: create (validated, idempotent), get,
//!   list, cancel, delete, retry, watch events, stream logs. Pipelines
//!   answer UNIMPLEMENTED until a later release.
//! - `trainmesh.job.v1.JobInternalService` (role `service`): status updates
//!   from the scheduler, log lines from runners, diagnoses.
//! - `trainmesh.auth.v1.TokenService` ([`tokens`], admin): tokens in the
//!   token database every service reads.
//! - `trainmesh.audit.v1.AuditService` (admin): admins cancelling other
//!   users' jobs (recorded with the cancel) and token changes (recorded in
//!   the token database, with the change).
//! - An outbox relay hands jobs and cancels to the scheduler and failed jobs
//!   to diagnosis-service.
//!
//! Behaviour worth knowing as a client:
//! - An idempotency key is unique per owner; a retry with the same key gets
//!   the original job (`existing = true`) even when its spec differs.
//!   Deleting the job frees the key.
//! - ListJobs is newest first; its items carry only the first line of
//!   `error_message` and no tracebacks (GetJob has the whole error).
//! - WatchJobs starts with a heartbeat carrying the starting cursor, then
//!   events; heartbeats carry the position to resume from, which also moves
//!   past events the caller may not see.
//! - DeleteJob keeps the job's events (a final `deleted` event is added).
//! - RetryJob makes a new job labelled `trainmesh.io/retry-of=<old id>`;
//!   users cannot set `trainmesh.io/` labels themselves.
//! - CreateJob/RetryJob enforce the scheduler's queued-jobs limits
//!   ([`limits`]): PENDING + QUEUED + AWAITING_APPROVAL jobs of the user
//!   (effective limit), the org and everyone are counted in the inserting
//!   transaction; over a limit the answer is RESOURCE_EXHAUSTED naming it.
//!   An idempotent retry of an existing key is never refused.
//! - New jobs are committed in groups ([`group_commit`]); a job is
//!   acknowledged only once committed.
//! - Status updates: AWAITING_APPROVAL is recorded as an
//!   `approval_requested` event; CANCELLED with cause APPROVAL_EXPIRED as
//!   an `approval_expired` event with state_reason `approval-expired`; a
//!   requeue (QUEUED naming a FAILED/LOST attempt) ends that attempt with
//!   its exit code and error while the job waits again.

pub mod config;
pub mod domain;
pub mod error;
pub mod group_commit;
pub mod grpc;
pub mod internal;
pub mod limits;
pub mod paths;
pub mod relay;
pub mod repo;
pub mod service;
pub mod stream;
pub mod tokens;
pub mod validate;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::server::NamedService;
use tonic::service::Routes;
use trainmesh_common::audit::{AuditApi, AuditTable};
use trainmesh_common::auth::TokenStore;
use trainmesh_common::client;
use trainmesh_common::db::{self, Durability};
use trainmesh_common::outbox::Relay;
use trainmesh_common::proto::audit::v1::audit_service_server::AuditServiceServer;
use trainmesh_common::proto::auth::v1::token_service_server::TokenServiceServer;
use trainmesh_common::proto::job::v1::job_internal_service_server::JobInternalServiceServer;
use trainmesh_common::proto::job::v1::job_service_server::JobServiceServer;
use trainmesh_common::server::{self, ServerOptions};
use trainmesh_common::tls::ClientTls;

use crate::grpc::{JobApi, JobInternalApi};
use crate::limits::{LimitsCache, SchedulerLimits};
use crate::paths::PathPolicy;
use crate::service::{JobService, Settings};
use crate::stream::StreamTiming;
use crate::tokens::TokenApi;

/// Everything `run` needs. Tests build it directly with [`Config::new`].
#[derive(Clone, Debug)]
pub struct Config {
    pub tokens: Arc<TokenStore>,
    pub server: ServerOptions,
    pub database_url: String,
    /// scheduler-service, for the outbox ("enqueue", "cancel").
    pub scheduler_endpoint: String,
    /// diagnosis-service; `None` turns automatic diagnosis of failed jobs off.
    pub diagnosis_endpoint: Option<String>,
    /// This service's token for calls to its peers.
    pub service_token: Option<String>,
    /// How calls to its peers connect.
    pub client_tls: ClientTls,
    /// Allowed roots for dataset/output paths (non-existent ones are ignored).
    pub data_roots: Vec<PathBuf>,
    pub max_log_lines_per_attempt: i64,
    pub watch_heartbeat: Duration,
    /// How often streams re-read their tables without being woken.
    pub stream_poll: Duration,
    /// How long a GetLimits answer from the scheduler is used before it is
    /// asked again (queued-jobs limit at submit).
    pub limits_ttl: Duration,
    /// Seals env values a job marks secret; `None`: such jobs are refused.
    pub secrets_key: Option<Arc<trainmesh_common::sealed::SecretsKey>>,
}

impl Config {
    /// Defaults for everything but the tokens and the database.
    pub fn new(tokens: Arc<TokenStore>, database_url: impl Into<String>) -> Self {
        Self {
            tokens,
            server: ServerOptions::default(),
            database_url: database_url.into(),
            scheduler_endpoint: "127.0.0.1:50052".into(),
            client_tls: ClientTls::default(),
            diagnosis_endpoint: Some("127.0.0.1:50054".into()),
            service_token: None,
            data_roots: Vec::new(),
            max_log_lines_per_attempt: 200_000,
            watch_heartbeat: Duration::from_secs(5),
            stream_poll: Duration::from_secs(1),
            limits_ttl: Duration::from_secs(2),
            secrets_key: None,
        }
    }
}

/// A submission waits at most this long for the scheduler's limits (then
/// the last known ones apply).
const LIMITS_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves job-service on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (trigger, watch) = server::shutdown_pair();
    let db = db::open(
        &config.database_url,
        Durability::Full,
        &sqlx::migrate!("./migrations/sqlite"),
        &sqlx::migrate!("./migrations/postgres"),
    )
    .await?;
    AuditTable::SERVICE.prepare(&db).await?;
    // Token changes are recorded in the token database, with the change.
    let mut audit_sources = vec![(db.clone(), AuditTable::SERVICE)];
    if let Some(tokens_db) = config.tokens.database() {
        audit_sources.push((tokens_db.clone(), AuditTable::TOKENS));
    }
    let audit =
        AuditServiceServer::new(AuditApi::<error::Error>::new("job-service", audit_sources));
    let token_api = TokenServiceServer::new(TokenApi {
        tokens: config.tokens.clone(),
    });
    let paths = PathPolicy::new(&config.data_roots);
    if paths.roots().is_empty() {
        tracing::warn!("no data roots exist; jobs naming a dataset or output path will be refused");
    } else {
        tracing::info!(roots = ?paths.roots(), "data roots");
    }
    let mut server_opts = config.server.clone();
    server_opts.storage = Some(db.clone());
    let relay = Relay::new(db.clone()).with_route(|topic| match topic {
        service::TOPIC_DIAGNOSE => "diagnosis-service",
        _ => "scheduler-service",
    });
    let token = config.service_token.as_deref();
    let tls = &config.client_tls;
    let scheduler = client::channel_with(&config.scheduler_endpoint, token, tls)?;
    let limits = LimitsCache::new(
        SchedulerLimits {
            channel: scheduler.clone(),
            timeout: LIMITS_CALL_TIMEOUT,
        },
        config.limits_ttl,
    );
    let svc = JobService::new(
        db,
        relay.clone(),
        Settings {
            paths,
            auto_diagnose: config.diagnosis_endpoint.is_some(),
            max_log_lines_per_attempt: config.max_log_lines_per_attempt.max(1),
            secrets_key: config.secrets_key.clone(),
        },
        Some(limits),
    );
    let peers = relay::Peers {
        scheduler,
        diagnosis: config
            .diagnosis_endpoint
            .as_deref()
            .map(|ep| client::channel_with(ep, token, tls))
            .transpose()?,
    };
    let relay_task = tokio::spawn(relay.run(relay::deliver(svc.clone(), peers), watch.clone()));

    let max = server_opts.max_message_bytes;
    let api = JobServiceServer::new(JobApi {
        svc: svc.clone(),
        timing: StreamTiming {
            heartbeat: config.watch_heartbeat,
            poll: config.stream_poll,
        },
        shutdown: watch,
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let internal = JobInternalServiceServer::new(JobInternalApi { svc })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let routes = Routes::new(api)
        .add_service(internal)
        .add_service(token_api)
        .add_service(audit);
    let result = server::serve(
        "job-service",
        routes,
        &[
            JobServiceServer::<JobApi>::NAME,
            JobInternalServiceServer::<JobInternalApi>::NAME,
            TokenServiceServer::<TokenApi>::NAME,
            AuditServiceServer::<AuditApi<error::Error>>::NAME,
        ],
        listener,
        config.tokens,
        server_opts,
        trigger,
        shutdown,
    )
    .await;
    // The relay stops on the shutdown watch; don't wait for ever if serving
    // failed before shutdown began.
    let abort = relay_task.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), relay_task)
        .await
        .is_err()
    {
        abort.abort();
    }
    result
}
