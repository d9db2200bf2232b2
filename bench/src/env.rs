//! Databases and in-process services for one scenario run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::Connection as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use trainmesh_common::client::{channel, Channel};
use trainmesh_common::proto::job::v1 as job_pb;
use trainmesh_common::proto::job::v1::job_internal_service_server::{
    JobInternalService, JobInternalServiceServer,
};
use trainmesh_common::proto::job::v1::job_service_client::JobServiceClient;
use trainmesh_common::proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use trainmesh_common::proto::scheduler::v1::GetQueueStatsRequest;
use trainmesh_common::testing::{test_tokens, TestTokens};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// The latency and dispatch targets are set for SQLite; on PostgreSQL
    /// those figures are reported, not judged.
    pub fn sqlite_target(self, target: crate::report::Target) -> Option<crate::report::Target> {
        (self == Backend::Sqlite).then_some(target)
    }
}

/// Databases of one scenario run: SQLite files in a temp dir, or fresh
/// PostgreSQL databases dropped by [`Databases::cleanup`].
pub struct Databases {
    backend: Backend,
    dir: tempfile::TempDir,
    admin_url: Option<String>,
    created: Vec<String>,
    run_id: String,
}

impl Databases {
    pub fn new(backend: Backend, postgres_url: Option<&str>) -> anyhow::Result<Self> {
        let admin_url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(
                postgres_url
                    .filter(|u| !u.is_empty())
                    .context("PostgreSQL needs --postgres-url or TRAINMESH_TEST_POSTGRES_URL")?
                    .to_owned(),
            ),
        };
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        Ok(Databases {
            backend,
            dir: tempfile::Builder::new()
                .prefix("trainmesh-bench.")
                .tempdir()?,
            admin_url,
            created: Vec::new(),
            run_id,
        })
    }

    /// A new, empty database for one service.
    pub async fn create(&mut self, name: &str) -> anyhow::Result<String> {
        match (&self.backend, &self.admin_url) {
            (Backend::Postgres, Some(admin)) => {
                let db = format!("bench_{}_{name}", self.run_id);
                let mut conn = sqlx::PgConnection::connect(admin)
                    .await
                    .with_context(|| format!("connect to PostgreSQL at {}", redact(admin)))?;
                sqlx::query(&format!("CREATE DATABASE {db}"))
                    .execute(&mut conn)
                    .await
                    .with_context(|| format!("create database {db}"))?;
                conn.close().await?;
                self.created.push(db.clone());
                Ok(with_database(admin, &db))
            }
            _ => Ok(trainmesh_common::db::sqlite_url(
                self.dir.path(),
                &format!("{name}.db"),
            )),
        }
    }

    /// Drops the PostgreSQL databases (SQLite files go with the temp dir).
    pub async fn cleanup(self) {
        let Some(admin) = &self.admin_url else {
            return;
        };
        if self.created.is_empty() {
            return;
        }
        match sqlx::PgConnection::connect(admin).await {
            Ok(mut conn) => {
                for db in &self.created {
                    if let Err(e) =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                            .execute(&mut conn)
                            .await
                    {
                        tracing::warn!(database = %db, error = %e, "could not drop benchmark database");
                    }
                }
                let _ = conn.close().await;
            }
            Err(e) => tracing::warn!(error = %e, "could not drop benchmark databases"),
        }
    }
}

/// `admin` with its database name replaced by `db` (query string kept).
pub fn with_database(admin: &str, db: &str) -> String {
    let (base, query) = match admin.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{db}?{q}"),
        None => format!("{root}/{db}"),
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A service started with its library's `run` on a port-0 listener.
pub struct Service {
    pub name: &'static str,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Service {
    fn spawn<F>(
        name: &'static str,
        addr: SocketAddr,
        run: impl FnOnce(oneshot::Receiver<()>) -> F,
    ) -> Self
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(stopped));
        Service {
            name,
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Fires shutdown and waits (bounded) for `run` to return.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match tokio::time::timeout(Duration::from_secs(30), &mut self.task).await {
            Ok(joined) => joined
                .with_context(|| format!("{} task", self.name))?
                .with_context(|| format!("{} run", self.name)),
            Err(_) => {
                self.task.abort();
                anyhow::bail!("{} did not stop within 30 s", self.name)
            }
        }
    }
}

fn spawn_scheduler(
    config: scheduler_service::Config,
    listener: TcpListener,
    addr: SocketAddr,
) -> Service {
    Service::spawn("scheduler-service", addr, move |stopped| {
        scheduler_service::run(config, listener, async {
            let _ = stopped.await;
        })
    })
}

async fn bind() -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    Ok((l, addr))
}

/// Scheduler settings a scenario chooses.
#[derive(Clone, Debug)]
pub struct SchedulerOptions {
    pub max_running_per_user: u32,
}

fn scheduler_config(
    url: String,
    tokens: &TestTokens,
    job_endpoint: String,
    opts: &SchedulerOptions,
) -> scheduler_service::Config {
    let mut c = scheduler_service::Config::new(url, tokens.store.clone());
    c.job_endpoint = job_endpoint;
    c.service_token = Some(tokens.scheduler.to_owned());
    c.max_running_per_user = opts.max_running_per_user;
    c
}

fn job_config(url: String, tokens: &TestTokens, scheduler_endpoint: String) -> job_service::Config {
    let mut c = job_service::Config::new(tokens.store.clone(), url);
    c.scheduler_endpoint = scheduler_endpoint;
    c.service_token = Some(tokens.job_service.to_owned());
    // Nothing in the benchmark fails on purpose; no diagnosis peer runs.
    c.diagnosis_endpoint = None;
    c
}

/// job-service and scheduler-service talking to each other.
pub struct Mesh {
    pub jobs: Service,
    pub scheduler: Service,
    pub tokens: TestTokens,
    /// To start the scheduler again on the same address and database.
    scheduler_config: scheduler_service::Config,
}

impl Mesh {
    pub async fn start(dbs: &mut Databases, opts: &SchedulerOptions) -> anyhow::Result<Self> {
        let tokens = test_tokens();
        let jobs_url = dbs.create("jobs").await?;
        let sched_url = dbs.create("scheduler").await?;
        let (jl, jaddr) = bind().await?;
        let (sl, saddr) = bind().await?;
        let scfg = scheduler_config(sched_url, &tokens, jaddr.to_string(), opts);
        let jcfg = job_config(jobs_url, &tokens, saddr.to_string());
        let scheduler = spawn_scheduler(scfg.clone(), sl, saddr);
        let jobs = Service::spawn("job-service", jaddr, move |stopped| {
            job_service::run(jcfg, jl, async {
                let _ = stopped.await;
            })
        });
        let mesh = Mesh {
            jobs,
            scheduler,
            tokens,
            scheduler_config: scfg,
        };
        wait_scheduler_ready(mesh.scheduler.addr, mesh.tokens.admin).await?;
        wait_jobs_ready(mesh.jobs.addr, mesh.tokens.alice).await?;
        Ok(mesh)
    }

    pub fn job_client(&self, token: &str) -> anyhow::Result<JobServiceClient<Channel>> {
        Ok(JobServiceClient::new(channel(
            &self.jobs.addr.to_string(),
            Some(token),
        )?))
    }

    /// Stops the scheduler (job-service keeps running and keeps taking
    /// jobs).
    pub async fn stop_scheduler(&mut self) -> anyhow::Result<()> {
        self.scheduler.stop().await
    }

    /// Starts the scheduler again on its address and database; returns
    /// once it answers.
    pub async fn start_scheduler(&mut self) -> anyhow::Result<()> {
        let addr = self.scheduler.addr;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind the scheduler's address {addr} again"))?;
        self.scheduler = spawn_scheduler(self.scheduler_config.clone(), listener, addr);
        wait_scheduler_ready(addr, self.tokens.admin).await
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        // job-service first: its relay would otherwise retry enqueues
        // against a scheduler that is going away.
        let j = self.jobs.stop().await;
        let s = self.scheduler.stop().await;
        j.and(s)
    }
}

/// The scheduler alone, with a job-service stand-in that acknowledges its
/// status updates (so the outbox drains as it would in production).
pub struct SchedulerAlone {
    pub scheduler: Service,
    pub sink: StatusSink,
    sink_task: JoinHandle<()>,
    pub tokens: TestTokens,
}

impl SchedulerAlone {
    pub async fn start(dbs: &mut Databases, opts: &SchedulerOptions) -> anyhow::Result<Self> {
        let tokens = test_tokens();
        let sink = StatusSink::default();
        let (jl, jaddr) = bind().await?;
        let svc = JobInternalServiceServer::new(sink.clone()).max_decoding_message_size(16 << 20);
        let sink_task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                // `serve_with_incoming` ignores the builder's nodelay; set it here.
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(jl).with_nodelay(Some(true)),
                )
                .await;
        });
        let sched_url = dbs.create("scheduler").await?;
        let (sl, saddr) = bind().await?;
        let scfg = scheduler_config(sched_url, &tokens, jaddr.to_string(), opts);
        let scheduler = spawn_scheduler(scfg, sl, saddr);
        wait_scheduler_ready(saddr, tokens.admin).await?;
        Ok(SchedulerAlone {
            scheduler,
            sink,
            sink_task,
            tokens,
        })
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        let r = self.scheduler.stop().await;
        self.sink_task.abort();
        r
    }
}

/// Counts the status updates the scheduler delivers, per state.
#[derive(Clone, Default)]
pub struct StatusSink {
    pub by_state: Arc<[AtomicUsize; 9]>,
    pub notify: Arc<tokio::sync::Notify>,
}

impl StatusSink {
    pub fn count(&self, state: job_pb::JobState) -> usize {
        self.by_state
            .get(state as usize)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

#[tonic::async_trait]
impl JobInternalService for StatusSink {
    async fn update_job_status(
        &self,
        req: Request<job_pb::UpdateJobStatusRequest>,
    ) -> Result<Response<job_pb::UpdateJobStatusResponse>, Status> {
        let state = req.get_ref().state;
        if let Some(c) = usize::try_from(state)
            .ok()
            .and_then(|i| self.by_state.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.notify.notify_waiters();
        Ok(Response::new(job_pb::UpdateJobStatusResponse { job: None }))
    }

    async fn append_job_logs(
        &self,
        _req: Request<job_pb::AppendJobLogsRequest>,
    ) -> Result<Response<job_pb::AppendJobLogsResponse>, Status> {
        Ok(Response::new(job_pb::AppendJobLogsResponse::default()))
    }

    async fn attach_diagnosis(
        &self,
        _req: Request<job_pb::AttachDiagnosisRequest>,
    ) -> Result<Response<job_pb::AttachDiagnosisResponse>, Status> {
        Ok(Response::new(job_pb::AttachDiagnosisResponse::default()))
    }
}

const READY_DEADLINE: Duration = Duration::from_secs(60);

async fn wait_scheduler_ready(addr: SocketAddr, admin: &str) -> anyhow::Result<()> {
    let mut c = SchedulerServiceClient::new(channel(&addr.to_string(), Some(admin))?);
    let deadline = tokio::time::Instant::now() + READY_DEADLINE;
    loop {
        match c.get_queue_stats(GetQueueStatsRequest {}).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!("scheduler-service not ready after {READY_DEADLINE:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn wait_jobs_ready(addr: SocketAddr, token: &str) -> anyhow::Result<()> {
    let mut c = JobServiceClient::new(channel(&addr.to_string(), Some(token))?);
    let deadline = tokio::time::Instant::now() + READY_DEADLINE;
    loop {
        // Any answer from the service itself (NOT_FOUND here) means it serves.
        match c
            .get_job(job_pb::GetJobRequest {
                job_id: uuid::Uuid::now_v7().to_string(),
            })
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == tonic::Code::NotFound => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!("job-service not ready after {READY_DEADLINE:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Jobs the scheduler holds queued now (0 when it does not answer).
pub async fn queued_now(stats: &mut SchedulerServiceClient<Channel>) -> usize {
    stats
        .get_queue_stats(GetQueueStatsRequest {})
        .await
        .map(|r| usize::try_from(r.into_inner().queued).unwrap_or(0))
        .unwrap_or(0)
}

/// The job every scenario submits: one GPU, one CPU, 1 GiB.
pub fn job_spec(name: &str) -> job_pb::JobSpec {
    job_pb::JobSpec {
        name: name.into(),
        image: "python:3.12".into(),
        command: vec!["python".into(), "train.py".into()],
        resources: Some(job_pb::Resources {
            gpus: 1,
            cpu: 1.0,
            memory_mib: 1024,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced_and_query_kept() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5432/postgres", "b1"),
            "postgres://u:p@127.0.0.1:5432/b1"
        );
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "b1"),
            "postgres://u:p@h:5432/b1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "b1"),
            "postgres://h:5432/b1"
        );
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
    }
}
