//! scheduler-service: the queue, limits, approvals, retries, runner leases
//! and dispatch of trainmesh.
//!
//! - [`plan`]: the decision as a pure function, property-tested (public, so
//!   benchmarks can time it);
//! - [`limits`], [`approvals`], [`retry`]: the policies;
//! - [`service`], [`runners`], [`leases`], [`dispatch`], [`decisions`],
//!   [`explain`]: the logic (no tonic types);
//! - [`leader`]: which replica dispatches when several share PostgreSQL;
//! - [`repo`]: SQL for SQLite and PostgreSQL;
//! - [`grpc`]: `SchedulerService`, `SchedulerInternalService` and
//!   `RunnerService` adapters; `AuditService` lists the audit log that
//!   approvals, rejections, limit changes and holds write (in the same
//!   transaction as the change).
//!
//! State changes job-service must know (QUEUED, SCHEDULED, RUNNING, the end,
//! requeues) go through the transactional outbox to
//! `JobInternalService.UpdateJobStatus`, in order, with a per-job sequence.

pub mod approvals;
pub mod attempt_end;
pub mod clock;
pub mod config;
pub mod decisions;
pub mod dispatch;
pub mod domain;
pub mod error;
pub mod explain;
pub mod grpc;
mod handoff;
pub mod leader;
pub mod leases;
pub mod limits;
pub mod plan;
mod queue_cache;
pub mod repo;
pub mod retry;
pub mod retry_record;
pub mod runner_admin;
pub mod runners;
pub mod service;
pub mod status_relay;
#[cfg(test)]
mod test_support;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::server::NamedService;
use trainmesh_common::audit::{AuditApi, AuditTable};
use trainmesh_common::auth::TokenStore;
use trainmesh_common::db::{self, Durability};
use trainmesh_common::outbox::Relay;
use trainmesh_common::proto::audit::v1::audit_service_server::AuditServiceServer;
use trainmesh_common::proto::runner::v1::runner_service_server::RunnerServiceServer;
use trainmesh_common::proto::scheduler::v1::scheduler_internal_service_server::SchedulerInternalServiceServer;
use trainmesh_common::proto::scheduler::v1::scheduler_service_server::SchedulerServiceServer;
use trainmesh_common::server::{self, ServerOptions};
use trainmesh_common::time::{Clock, SystemClock};
use trainmesh_common::tls::ClientTls;

pub use config::Args;
pub use service::Scheduler;

pub const DEFAULT_MAX_RUNNING_PER_USER: u32 = 2;
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// One priority point per this long waited.
pub const DEFAULT_AGEING: Duration = Duration::from_secs(10 * 60);
pub const DEFAULT_APPROVAL_SWEEP: Duration = Duration::from_secs(300);
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(600);
/// The dispatch leader's lease; renewed every fifth of it.
pub const DEFAULT_LEADER_TTL: Duration = Duration::from_secs(5);
/// How often a long-poll on a replica that is not the leader re-reads its
/// runner's assignments (the leader's wake-ups do not cross processes).
pub const REPLICA_POLL: Duration = Duration::from_millis(100);
/// The server-side cap on an `AcquireAssignments` long-poll.
pub const MAX_LONG_POLL: Duration = Duration::from_secs(30);
/// Node faults after which a runner is cordoned.
pub const DEFAULT_CORDON_AFTER_NODE_FAULTS: u32 = 3;

/// Everything `run` needs; tests build it directly (see [`Config::new`]).
#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: String,
    pub tokens: Arc<TokenStore>,
    pub server: ServerOptions,
    /// job-service, for status updates: `host:port`, a URL or `file:PATH`.
    pub job_endpoint: String,
    /// Sent on calls to job-service.
    pub service_token: Option<String>,
    /// How calls to job-service connect.
    pub client_tls: ClientTls,
    /// Seeds USER_DEFAULT max_running_jobs when no such row is stored; 0: none.
    pub max_running_per_user: u32,
    /// Seeds USER_DEFAULT max_gpus; 0: none.
    pub max_gpus_per_user: u32,
    /// Seeds USER_DEFAULT max_queued_jobs; 0: none.
    pub max_queued_per_user: u32,
    /// One priority point per this long waited; zero turns ageing off.
    pub ageing: Duration,
    pub approval_rules: approvals::Rules,
    /// `None`: the rules file's `ttl`, else 24 h.
    pub approval_ttl: Option<Duration>,
    pub approval_sweep: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub leader_ttl: Duration,
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// Dispatch sweep and lease check period (the safety net behind events).
    pub sweep_interval: Duration,
    /// Attempts of a job when its retry policy does not say.
    pub default_max_attempts: u32,
    pub max_long_poll: Duration,
    /// Node faults after which a runner is cordoned (0: never).
    pub cordon_after_node_faults: u32,
    pub clock: Arc<dyn Clock>,
}

impl Config {
    /// Defaults for everything but the database and tokens.
    pub fn new(database_url: impl Into<String>, tokens: Arc<TokenStore>) -> Self {
        Config {
            database_url: database_url.into(),
            tokens,
            server: ServerOptions::default(),
            job_endpoint: "127.0.0.1:50051".into(),
            service_token: None,
            client_tls: ClientTls::default(),
            max_running_per_user: DEFAULT_MAX_RUNNING_PER_USER,
            max_gpus_per_user: 0,
            max_queued_per_user: 0,
            ageing: DEFAULT_AGEING,
            approval_rules: approvals::Rules::default(),
            approval_ttl: None,
            approval_sweep: DEFAULT_APPROVAL_SWEEP,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            leader_ttl: DEFAULT_LEADER_TTL,
            lease_ttl: DEFAULT_LEASE_TTL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            default_max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_long_poll: MAX_LONG_POLL,
            cordon_after_node_faults: DEFAULT_CORDON_AFTER_NODE_FAULTS,
            clock: Arc::new(SystemClock),
        }
    }

    fn settings(&self) -> service::Settings {
        let some = |n: u32| (n > 0).then_some(n);
        service::Settings {
            default_limits: limits::LimitValues {
                max_running_jobs: some(self.max_running_per_user),
                max_gpus: some(self.max_gpus_per_user),
                max_queued_jobs: some(self.max_queued_per_user),
            },
            ageing: self.ageing,
            approval_rules: Arc::new(self.approval_rules.clone()),
            approval_ttl: self
                .approval_ttl
                .or(self.approval_rules.ttl)
                .unwrap_or(approvals::DEFAULT_TTL),
            approval_sweep: self.approval_sweep.max(Duration::from_millis(10)),
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff.max(self.initial_backoff),
            leader_ttl: self.leader_ttl.max(Duration::from_millis(100)),
            lease_ttl: self.lease_ttl,
            heartbeat_interval: self.heartbeat_interval,
            sweep_interval: self.sweep_interval.max(Duration::from_millis(10)),
            max_long_poll: self.max_long_poll,
            default_max_attempts: self.default_max_attempts.max(1),
            cordon_after_node_faults: self.cordon_after_node_faults,
            clock: self.clock.clone(),
        }
    }
}

/// Opens the database (running migrations), starts the dispatch loop and
/// the outbox relay, and serves until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let db = db::open(
        &config.database_url,
        Durability::Full,
        &sqlx::migrate!("./migrations/sqlite"),
        &sqlx::migrate!("./migrations/postgres"),
    )
    .await?;
    AuditTable::SERVICE.prepare(&db).await?;
    let (trigger, watch) = server::shutdown_pair();
    let relay = Relay::new(db.clone()).with_route(|_| "job-service");
    let deliver = status_relay::deliverer(
        &config.job_endpoint,
        config.service_token.as_deref(),
        &config.client_tls,
    )?;
    let settings = config.settings();
    limits::seed_user_default(&db, settings.default_limits, settings.clock.now_micros()).await?;
    let mut server_opts = config.server.clone();
    server_opts.storage = Some(db.clone());
    let audit = AuditServiceServer::new(AuditApi::<error::Error>::new(
        "scheduler-service",
        vec![(db.clone(), AuditTable::SERVICE)],
    ));
    let sched = Arc::new(Scheduler::new(db, settings, relay.clone()));

    let relay_task = tokio::spawn(relay.run(deliver, watch.clone()));
    let leader_task = tokio::spawn(sched.clone().run_leader_lease(watch.clone()));
    let dispatch_task = tokio::spawn(sched.clone().run_dispatcher(watch.clone()));
    let sweep_task = tokio::spawn(sched.clone().run_approval_sweep(watch.clone()));

    let api = grpc::Grpc {
        sched: sched.clone(),
        shutdown: watch,
    };
    let max = server_opts.max_message_bytes;
    let routes = tonic::service::Routes::new(
        SchedulerServiceServer::new(api.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
    .add_service(
        SchedulerInternalServiceServer::new(api.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
    .add_service(
        RunnerServiceServer::new(api)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
    .add_service(audit);
    let served = server::serve(
        "scheduler-service",
        routes,
        &[
            <SchedulerServiceServer<grpc::Grpc> as NamedService>::NAME,
            <SchedulerInternalServiceServer<grpc::Grpc> as NamedService>::NAME,
            <RunnerServiceServer<grpc::Grpc> as NamedService>::NAME,
            <AuditServiceServer<AuditApi<error::Error>> as NamedService>::NAME,
        ],
        listener,
        config.tokens.clone(),
        server_opts,
        trigger,
        shutdown,
    )
    .await;
    // The trigger fired inside `serve`; the loops end on their own.
    let _ = dispatch_task.await;
    let _ = sweep_task.await;
    let _ = leader_task.await;
    sched.resign().await;
    let _ = relay_task.await;
    served
}
