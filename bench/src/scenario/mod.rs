//! The scenarios. Each starts its own services on fresh databases, measures,
//! stops them and drops the databases, so one scenario's leftovers never
//! slow down the next.

pub mod create;
pub mod dispatch;
pub mod latency;
pub mod plan_time;
pub mod recovery;
pub mod rules;

use std::future::Future;

use crate::env::{Backend, Databases};

/// Runs `body` on fresh databases and drops them afterwards, whatever
/// `body` returned.
pub async fn with_databases<T, F, Fut>(
    backend: Backend,
    postgres_url: Option<&str>,
    body: F,
) -> anyhow::Result<T>
where
    F: FnOnce(Databases) -> Fut,
    Fut: Future<Output = (Databases, anyhow::Result<T>)>,
{
    let dbs = Databases::new(backend, postgres_url)?;
    let (dbs, result) = body(dbs).await;
    dbs.cleanup().await;
    result
}
