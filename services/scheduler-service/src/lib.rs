//! scheduler-service: the queue, per-user limits, runner leases and
//! dispatch of trainmesh.
//!
//! - [`plan`]: the decision as a pure function, property-tested;
//! - [`service`], [`runners`], [`dispatch`]: the logic (no tonic types);
//! - [`repo`]: SQL for SQLite and PostgreSQL;
//! - [`grpc`]: `SchedulerService`, `SchedulerInternalService` and
//!   `RunnerService` adapters.
//!
//! State changes job-service must know (QUEUED, SCHEDULED, RUNNING, the end,
//! requeues) go through the transactional outbox to
//! `JobInternalService.UpdateJobStatus`, in order, with a per-job sequence.

pub mod config;
pub mod dispatch;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod plan;
pub mod repo;
pub mod runners;
pub mod service;
pub mod status_relay;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::server::NamedService;
use trainmesh_common::auth::TokenStore;
use trainmesh_common::db::{self, Durability};
use trainmesh_common::outbox::Relay;
use trainmesh_common::proto::runner::v1::runner_service_server::RunnerServiceServer;
use trainmesh_common::proto::scheduler::v1::scheduler_internal_service_server::SchedulerInternalServiceServer;
use trainmesh_common::proto::scheduler::v1::scheduler_service_server::SchedulerServiceServer;
use trainmesh_common::server::{self, ServerOptions};
use trainmesh_common::time::{Clock, SystemClock};

pub use config::Args;
pub use service::Scheduler;

pub const DEFAULT_MAX_RUNNING_PER_USER: u32 = 2;
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// The server-side cap on an `AcquireAssignments` long-poll.
pub const MAX_LONG_POLL: Duration = Duration::from_secs(30);

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
    /// Jobs a user may have scheduled or running at once; 0 means no limit.
    pub max_running_per_user: u32,
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// Dispatch sweep and lease check period (the safety net behind events).
    pub sweep_interval: Duration,
    /// Attempts of a job when its retry policy does not say.
    pub default_max_attempts: u32,
    pub max_long_poll: Duration,
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
            max_running_per_user: DEFAULT_MAX_RUNNING_PER_USER,
            lease_ttl: DEFAULT_LEASE_TTL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            default_max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_long_poll: MAX_LONG_POLL,
            clock: Arc::new(SystemClock),
        }
    }

    fn settings(&self) -> service::Settings {
        service::Settings {
            limits: plan::Limits {
                max_running_per_user: self.max_running_per_user,
            },
            lease_ttl: self.lease_ttl,
            heartbeat_interval: self.heartbeat_interval,
            sweep_interval: self.sweep_interval.max(Duration::from_millis(10)),
            max_long_poll: self.max_long_poll,
            default_max_attempts: self.default_max_attempts.max(1),
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
    let (trigger, watch) = server::shutdown_pair();
    let relay = Relay::new(db.clone());
    let deliver = status_relay::deliverer(&config.job_endpoint, config.service_token.as_deref())?;
    let sched = Arc::new(Scheduler::new(db, config.settings(), relay.clone()));

    let relay_task = tokio::spawn(relay.run(deliver, watch.clone()));
    let dispatch_task = tokio::spawn(sched.clone().run_dispatcher(watch.clone()));

    let api = grpc::Grpc {
        sched,
        shutdown: watch,
    };
    let max = config.server.max_message_bytes;
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
    );
    let served = server::serve(
        "scheduler-service",
        routes,
        &[
            <SchedulerServiceServer<grpc::Grpc> as NamedService>::NAME,
            <SchedulerInternalServiceServer<grpc::Grpc> as NamedService>::NAME,
            <RunnerServiceServer<grpc::Grpc> as NamedService>::NAME,
        ],
        listener,
        config.tokens.clone(),
        config.server.clone(),
        trigger,
        shutdown,
    )
    .await;
    // The trigger fired inside `serve`; the loops end on their own.
    let _ = dispatch_task.await;
    let _ = relay_task.await;
    served
}
