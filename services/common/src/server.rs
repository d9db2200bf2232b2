//! The one server builder every service uses.
//!
//! Layers, outermost first:
//! 1. correlation id + request span (+ trace parent) — so even rejected
//!    calls are logged with an id the caller can quote;
//! 2. authentication — before any work is admitted;
//! 3. a cap on the streams each caller holds open, then load shedding — a
//!    bounded number of calls in flight, beyond which callers get
//!    RESOURCE_EXHAUSTED at once instead of queueing — and oversized
//!    requests answered RESOURCE_EXHAUSTED ([`crate::inbound`]);
//! 4. the services, with a per-call timeout.
//!
//! Health (`grpc.health.v1`) and reflection (v1 and v1alpha) are mounted on
//! every server. Shutdown is graceful: health turns NOT_SERVING, streams are
//! told to end through [`ShutdownWatch`], in-flight calls get a drain period.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tonic::service::Routes;
use tonic::Status;

use crate::auth::{AuthLayer, TokenStore};
use crate::correlation::CorrelationLayer;
use crate::db::Db;
use crate::inbound::{oversize_layer, streaming_methods, StreamCapLayer};
use crate::tls::ServerTls;

#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub max_concurrent_requests: usize,
    pub request_timeout: Duration,
    /// Largest request or response message accepted.
    pub max_message_bytes: usize,
    /// How long in-flight calls may take to finish after shutdown begins.
    pub drain_timeout: Duration,
    /// Streaming calls one caller may hold open at once.
    pub max_streams_per_caller: usize,
    /// The service's database: health is NOT_SERVING while it cannot be
    /// written (see [`crate::storage`]).
    pub storage: Option<Db>,
    /// TLS, or plaintext (refused off loopback unless insecure).
    pub tls: ServerTls,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 1024,
            request_timeout: Duration::from_secs(60),
            max_message_bytes: 4 * 1024 * 1024,
            drain_timeout: Duration::from_secs(10),
            max_streams_per_caller: crate::inbound::DEFAULT_MAX_STREAMS_PER_CALLER,
            storage: None,
            tls: ServerTls::default(),
        }
    }
}

/// Tells long-running work (streams, loops) that the server is stopping.
#[derive(Clone, Debug)]
pub struct ShutdownWatch(watch::Receiver<bool>);

#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

pub fn shutdown_pair() -> (ShutdownTrigger, ShutdownWatch) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), ShutdownWatch(rx))
}

impl ShutdownTrigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }

    /// A watch on this trigger.
    pub fn subscribe(&self) -> ShutdownWatch {
        ShutdownWatch(self.0.subscribe())
    }
}

impl ShutdownWatch {
    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.0.borrow()
    }

    /// A watch that never fires, for tools and tests that do not stop.
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        ShutdownWatch(rx)
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = futures::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}

/// Serves `routes` (plus health and reflection) on `listener` until
/// `shutdown` resolves; then fires `trigger` so streams end, and drains.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    name: &'static str,
    routes: Routes,
    service_names: &[&'static str],
    listener: TcpListener,
    tokens: Arc<TokenStore>,
    opts: ServerOptions,
    trigger: ShutdownTrigger,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // First, so that a refused listen address starts nothing.
    let addr = listener.local_addr()?;
    let builder = opts.tls.server_builder(addr)?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    // "" is the server as a whole, what a Kubernetes gRPC probe asks for.
    let mut names: Vec<&'static str> = vec![""];
    names.extend_from_slice(service_names);
    set_health(&health, &names, true).await;
    // Set once shutdown has begun; from then on only shutdown sets health.
    let stopping = Arc::new(tokio::sync::Mutex::new(false));
    if let Some(db) = opts.storage.clone() {
        let mut writable = db.storage.subscribe();
        tokio::spawn(crate::storage::run_prober(db, trigger.subscribe()));
        let (health, names, stopping) = (health.clone(), names.clone(), stopping.clone());
        let mut stop = trigger.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = writable.changed() => if changed.is_err() { return },
                    _ = stop.wait() => return,
                }
                let now = *writable.borrow_and_update();
                let stopping = stopping.lock().await;
                if *stopping {
                    return;
                }
                set_health(&health, &names, now).await;
            }
        });
    }
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(trainmesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let routes = routes
        .add_service(health_svc)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);

    let layers = tower::ServiceBuilder::new()
        .layer(CorrelationLayer)
        .layer(AuthLayer::new(tokens))
        .layer(StreamCapLayer::new(
            opts.max_streams_per_caller,
            streaming_methods(&[trainmesh_proto::FILE_DESCRIPTOR_SET]),
        ))
        .layer(ShedLayer::new(opts.max_concurrent_requests))
        .layer(oversize_layer(opts.max_message_bytes))
        .into_inner();

    tracing::info!(service = name, %addr, tls = opts.tls.is_tls(), "serving");

    let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
    let graceful = async move {
        shutdown.await;
        {
            let mut stopping = stopping.lock().await;
            *stopping = true;
            set_health(&health, &names, false).await;
        }
        trigger.fire();
        let _ = began_tx.send(());
    };

    let server = builder
        .timeout(opts.request_timeout)
        .tcp_nodelay(true)
        .layer(layers)
        .add_routes(routes)
        // `tcp_nodelay` above is ignored for an incoming stream; set it on
        // the accepted sockets, or every small response waits out Nagle and
        // delayed ACK (~40 ms per hop).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            graceful,
        );
    tokio::pin!(server);
    let drain = opts.drain_timeout;
    let forced = async move {
        if began_rx.await.is_ok() {
            tokio::time::sleep(drain).await;
        } else {
            futures::future::pending::<()>().await;
        }
    };
    tokio::select! {
        res = &mut server => res?,
        _ = forced => tracing::warn!(service = name, "drain timed out; closing remaining calls"),
    }
    tracing::info!(service = name, "stopped");
    Ok(())
}

async fn set_health(
    health: &tonic_health::server::HealthReporter,
    names: &[&'static str],
    serving: bool,
) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for name in names {
        health.set_service_status(*name, status).await;
    }
}

/// Bounded in-flight calls; beyond the bound, RESOURCE_EXHAUSTED at once.
#[derive(Clone, Debug)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
}

impl ShedLayer {
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max.max(1))),
        }
    }
}

impl<S> tower::Layer<S> for ShedLayer {
    type Service = ShedService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ShedService {
            inner,
            permits: self.permits.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ShedService<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for ShedService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Box::pin(async move {
                let resp = inner.call(req).await;
                drop(permit);
                resp
            }),
            Err(_) => {
                let resp = Status::resource_exhausted(
                    "server is at its limit of concurrent calls; retry with backoff",
                )
                .into_http();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    #[tokio::test]
    async fn calls_beyond_the_limit_are_refused_with_resource_exhausted() {
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let inner = tower::service_fn(move |_req: http::Request<()>| {
            let mut release = release_rx.clone();
            async move {
                let _ = release.wait_for(|r| *r).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
            }
        });
        let mut svc = ShedLayer::new(1).layer(inner);
        let first = svc.ready().await.unwrap().call(http::Request::new(()));
        let first = tokio::spawn(first);
        let refused = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(
            refused.headers().get("grpc-status").unwrap(),
            &(tonic::Code::ResourceExhausted as i32).to_string()
        );
        release_tx.send(true).unwrap();
        let ok = first.await.unwrap().unwrap();
        assert!(ok.headers().get("grpc-status").is_none());
        // The permit came back: the next call is admitted.
        let again = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        assert!(again.headers().get("grpc-status").is_none());
    }
}
