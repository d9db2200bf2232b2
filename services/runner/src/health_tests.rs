//! Health against a scripted backend: what each condition does to the
//! served status, and that a backend probe is bounded by its timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tonic_health::pb::health_check_response::ServingStatus as Status;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use trainmesh_common::testing::wait_for;

use super::*;
use crate::backend::{LaunchRequest, Workload};
use crate::error::Error;

const WAIT: Duration = Duration::from_secs(10);

const ANSWERS: u8 = 0;
const FAILS: u8 = 1;
const HANGS: u8 = 2;

/// A backend whose ping answers, fails or hangs, as the test says.
#[derive(Default)]
struct Scripted {
    ping: AtomicU8,
}

impl Backend for Scripted {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    fn launch(&self, _req: LaunchRequest) -> BoxFuture<'_, Result<Box<dyn Workload>, Error>> {
        Box::pin(async { Err(Error::UnknownGpu { index: 0 }) })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            match self.ping.load(Ordering::SeqCst) {
                ANSWERS => Ok(()),
                FAILS => Err(Error::UnknownGpu { index: 0 }),
                _ => futures::future::pending().await,
            }
        })
    }
}

struct Served {
    addr: SocketAddr,
    health: Health,
    backend: Arc<Scripted>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn served() -> Served {
    let (listener, addr) = trainmesh_common::testing::listener().await;
    let health = Health::new();
    let backend = Arc::new(Scripted::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let probe = Probe {
        interval: Duration::from_millis(20),
        timeout: Duration::from_millis(100),
    };
    tokio::spawn(serve(
        listener,
        ServerTls::default(),
        health.clone(),
        backend.clone(),
        probe,
        async move {
            let _ = stopped.await;
        },
    ));
    Served {
        addr,
        health,
        backend,
        _stop: stop,
    }
}

async fn status(addr: SocketAddr, service: &str) -> Result<Status, tonic::Status> {
    let channel = trainmesh_common::client::channel(&addr.to_string(), None)
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = HealthClient::new(channel);
    let resp = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(resp.into_inner().status())
}

async fn wait_status(addr: SocketAddr, want: Status) {
    wait_for(&format!("health {want:?}"), WAIT, || async {
        (status(addr, SERVICE).await.ok() == Some(want)).then_some(())
    })
    .await;
}

#[test]
fn serving_needs_the_lease_and_the_backend_and_not_stopping() {
    let all = Conditions {
        lease: true,
        backend: true,
        stopping: false,
    };
    assert!(all.serving());
    assert!(!Conditions {
        lease: false,
        ..all
    }
    .serving());
    assert!(!Conditions {
        backend: false,
        ..all
    }
    .serving());
    assert!(!Conditions {
        stopping: true,
        ..all
    }
    .serving());
    assert!(!Conditions::default().serving());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_backend_is_not_serving_until_it_answers_again() {
    let s = served().await;
    wait_status(s.addr, Status::NotServing).await;
    s.health.set_lease(true);
    wait_status(s.addr, Status::Serving).await;

    s.backend.ping.store(FAILS, Ordering::SeqCst);
    wait_status(s.addr, Status::NotServing).await;
    assert!(!s.health.conditions().backend);
    s.backend.ping.store(ANSWERS, Ordering::SeqCst);
    wait_status(s.addr, Status::Serving).await;

    // A ping that never answers counts as a failure once its timeout ends.
    s.backend.ping.store(HANGS, Ordering::SeqCst);
    wait_status(s.addr, Status::NotServing).await;
    s.backend.ping.store(ANSWERS, Ordering::SeqCst);
    wait_status(s.addr, Status::Serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_runner_is_not_serving_and_other_names_are_unknown() {
    let s = served().await;
    s.health.set_lease(true);
    wait_status(s.addr, Status::Serving).await;
    let other = status(s.addr, "trainmesh.runner.v1.RunnerService").await;
    assert_eq!(other.unwrap_err().code(), tonic::Code::NotFound);

    s.health.set_stopping();
    wait_status(s.addr, Status::NotServing).await;
    // Stopping is for good: a renewed lease does not bring it back.
    s.health.set_lease(true);
    s.health.set_backend(true);
    assert!(!s.health.conditions().serving());
}
