//! Helpers for tests that start real servers: port-0 listeners, fresh
//! databases (SQLite always, PostgreSQL when `TRAINMESH_TEST_POSTGRES_URL`
//! is set), tokens, and waiting on a condition with a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::auth::{Caller, Role, TokenStore};

pub const POSTGRES_ENV: &str = "TRAINMESH_TEST_POSTGRES_URL";

/// A listener on 127.0.0.1 with a port chosen by the OS.
pub async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = l.local_addr().expect("local addr");
    (l, addr)
}

/// A service's `run` started in this process on a port-0 listener; `stop`
/// shuts it down and fails the test if it ended with an error.
pub struct Served {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// What a service's `run` is given to wait on before it shuts down.
pub type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl Served {
    /// `run(listener, shutdown)`, e.g. `|l, s| metrics_service::run(config, l, s)`.
    pub async fn start<F, Fut>(run: F) -> Self
    where
        F: FnOnce(TcpListener, Shutdown) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (listener, addr) = listener().await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(run(
            listener,
            Box::pin(async {
                let _ = rx.await;
            }),
        ));
        Self {
            addr,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("the service task").expect("the service ran");
        }
    }
}

/// Polls `check` until it yields `Some`, or panics naming `what` once
/// `timeout` has passed.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// A database for one test; dropped with the test's temp dir.
pub struct TestDb {
    pub url: String,
    pub label: &'static str,
    _dir: Option<tempfile::TempDir>,
}

/// A fresh SQLite file in a temp dir.
pub fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().expect("tempdir");
    TestDb {
        url: crate::db::sqlite_url(dir.path(), "test.db"),
        label: "sqlite",
        _dir: Some(dir),
    }
}

/// A fresh PostgreSQL database, when the environment names a server.
pub async fn postgres_db() -> Option<TestDb> {
    let admin = std::env::var(POSTGRES_ENV).ok().filter(|s| !s.is_empty())?;
    crate::db::connect(&admin, crate::db::Durability::Full)
        .await
        .expect("connect to TRAINMESH_TEST_POSTGRES_URL");
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let pool = crate::db::connect(&admin, crate::db::Durability::Full)
        .await
        .expect("connect");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool.write)
        .await
        .expect("create test database");
    pool.write.close().await;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    Some(TestDb {
        url: format!("{base}/{name}"),
        label: "postgres",
        _dir: None,
    })
}

/// SQLite, plus PostgreSQL when configured: run a repository test on each.
pub async fn all_dbs() -> Vec<TestDb> {
    let mut v = vec![sqlite_db()];
    if let Some(pg) = postgres_db().await {
        v.push(pg);
    }
    v
}

/// Well-known tokens for tests.
pub struct TestTokens {
    pub store: Arc<TokenStore>,
    pub alice: &'static str,
    pub bob: &'static str,
    pub approver: &'static str,
    pub admin: &'static str,
    /// Each service's own credential (user = its name, role `service`).
    pub job_service: &'static str,
    pub scheduler: &'static str,
    pub metrics: &'static str,
    pub diagnosis: &'static str,
    /// Runners `node-1` and `node-2` (role `runner`).
    pub runner: &'static str,
    pub runner_b: &'static str,
}

/// The names of the runners [`TestTokens::runner`] and
/// [`TestTokens::runner_b`] are.
pub const TEST_RUNNER: &str = "node-1";
pub const TEST_RUNNER_B: &str = "node-2";

pub fn test_tokens() -> TestTokens {
    test_tokens_in(TokenStore::default())
}

/// The well-known tokens added to `store` (one that reads a token
/// database, say).
pub fn test_tokens_in(mut store: TokenStore) -> TestTokens {
    let mk = |user: &str, org: &str, roles: &[Role]| Caller {
        user: user.into(),
        org: org.into(),
        roles: roles.to_vec(),
    };
    store.insert("alice-token", mk("alice", "ml", &[Role::User]));
    store.insert("bob-token", mk("bob", "ml", &[Role::User]));
    store.insert(
        "approver-token",
        mk("carol", "ml", &[Role::User, Role::Approver]),
    );
    store.insert("admin-token", mk("admin", "ops", &[Role::Admin]));
    use crate::auth::service;
    let services = [
        ("job-service-token", service::JOB),
        ("scheduler-token", service::SCHEDULER),
        ("metrics-token", service::METRICS),
        ("diagnosis-token", service::DIAGNOSIS),
    ];
    for (token, name) in services {
        store.insert(token, mk(name, "system", &[Role::Service]));
    }
    store.insert("runner-token", mk(TEST_RUNNER, "system", &[Role::Runner]));
    store.insert(
        "runner-b-token",
        mk(TEST_RUNNER_B, "system", &[Role::Runner]),
    );
    TestTokens {
        store: Arc::new(store),
        alice: "alice-token",
        bob: "bob-token",
        approver: "approver-token",
        admin: "admin-token",
        job_service: services[0].0,
        scheduler: services[1].0,
        metrics: services[2].0,
        diagnosis: services[3].0,
        runner: "runner-token",
        runner_b: "runner-b-token",
    }
}

/// Prints logs during tests only when `TEST_LOG` is set.
pub fn init_test_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_test_writer()
            .try_init();
    }
}
