//! trainmesh metrics-service.
//!
//! Points `(job, key, step, timestamp, value)` arrive in batches (explicit
//! points and/or the raw JSON lines a job wrote, see [`flatten`]); each batch
//! is one transaction, idempotent on (job, key, step). The latest point of
//! every key is kept in its own table by the write itself. Queries
//! down-sample to at most N points per key, keeping each bucket's extremes;
//! watches stream new points from a cursor with a bounded buffer.
//!
//! Each job may store at most a configured number of points and of
//! distinct keys ([`caps`]); GetLatestMetrics answers in pages of at most
//! 1000 keys. A watch or a streamed write that the server ends because it
//! shuts down ends with UNAVAILABLE, never with OK.
//!
//! Any authenticated caller may write and read any job's metrics (job
//! ownership lives in job-service).

pub mod caps;
pub mod config;
pub mod domain;
pub mod error;
pub mod flatten;
pub mod grpc;
pub mod owners;
pub mod repo;
pub mod service;

use std::future::Future;
use std::sync::Arc;

use tonic::service::Routes;
use trainmesh_common::db::{self, Durability};
use trainmesh_common::proto::metrics::v1::metrics_service_server::{
    MetricsServiceServer, SERVICE_NAME,
};
use trainmesh_common::server;

pub use config::{Args, Config};

/// Serves metrics-service on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Metrics may lose the last commits on power loss in exchange for speed.
    let db = db::open(
        &config.database_url,
        Durability::Relaxed,
        &sqlx::migrate!("./migrations/sqlite"),
        &sqlx::migrate!("./migrations/postgres"),
    )
    .await?;
    let (trigger, watch) = server::shutdown_pair();
    let mut server_opts = config.server;
    server_opts.storage = Some(db.clone());
    let svc = Arc::new(service::Metrics::new(
        repo::Repo::new(db),
        config.watch_poll_interval,
        config.caps,
    ));
    let max = server_opts.max_message_bytes;
    let grpc = grpc::MetricsGrpc::new(svc, watch, config.owners, max);
    let metrics = MetricsServiceServer::new(grpc)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    server::serve(
        "metrics-service",
        Routes::new(metrics),
        &[SERVICE_NAME],
        listener,
        config.tokens,
        server_opts,
        trigger,
        shutdown,
    )
    .await
}
