//! An in-test scheduler, job-service and metrics-service: one tonic server
//! on loopback implementing RunnerService, JobInternalService and
//! MetricsService that hands out assignments and records every call; and
//! helpers to start the runner against it.

#![allow(dead_code)]

pub mod docker;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runner::{Config, GpuSetting};
use tokio::sync::{oneshot, Notify};
use tonic::{Request, Response, Status};
use trainmesh_common::proto::job::v1::job_internal_service_server::{
    JobInternalService, JobInternalServiceServer,
};
use trainmesh_common::proto::job::v1::{
    AppendJobLogsRequest, AppendJobLogsResponse, AttachDiagnosisRequest, AttachDiagnosisResponse,
    AttemptState, JobSpec, LogLine, UpdateJobStatusRequest, UpdateJobStatusResponse,
};
use trainmesh_common::proto::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use trainmesh_common::proto::metrics::v1::*;
use trainmesh_common::proto::runner::v1::runner_service_server::{
    RunnerService, RunnerServiceServer,
};
use trainmesh_common::proto::runner::v1::*;
use trainmesh_common::testing::{test_tokens, wait_for};

pub const WAIT: Duration = Duration::from_secs(20);

/// One recorded call, with the correlation id it carried.
#[derive(Debug, Clone)]
pub enum Call {
    Register(RegisterRunnerRequest),
    Heartbeat(HeartbeatRequest),
    Report(ReportAttemptStatusRequest, Option<String>),
    Logs(AppendJobLogsRequest, Option<String>),
    Metrics(WriteMetricsRequest, Option<String>),
    Drain(DrainRunnerRequest),
    Deregister(DeregisterRunnerRequest),
}

#[derive(Default)]
pub struct State {
    pub calls: Vec<Call>,
    pub assignments: VecDeque<Assignment>,
    /// Returned by the next heartbeats.
    pub cancel: Vec<AttemptRef>,
    /// Answer the next heartbeat with NOT_FOUND.
    pub forget_runner: bool,
    pub registrations: u32,
    /// Fail this many WriteMetrics/AppendJobLogs calls with UNAVAILABLE first.
    pub fail_shipping: u32,
    /// When set, RegisterRunner answers only once a permit is added.
    pub hold_registration: Option<Arc<tokio::sync::Semaphore>>,
    /// Cut off from the runner: every RunnerService call fails with
    /// UNAVAILABLE and is not recorded (shipping logs and metrics works).
    pub partitioned: bool,
    /// Runner ids whose lease the scheduler let go, as after a partition:
    /// their heartbeats and long polls answer NOT_FOUND, their reports
    /// FAILED_PRECONDITION (recorded all the same).
    pub lost_runners: Vec<String>,
    /// The lease TTL registrations get; `None`: 15 s.
    pub lease_ttl: Option<Duration>,
}

#[derive(Clone, Default)]
pub struct Fake {
    state: Arc<Mutex<State>>,
    assigned: Arc<Notify>,
}

impl Fake {
    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    pub fn assign(&self, a: Assignment) {
        self.with(|s| s.assignments.push_back(a));
        self.assigned.notify_waiters();
    }

    pub fn calls(&self) -> Vec<Call> {
        self.with(|s| s.calls.clone())
    }

    pub fn reports(&self, job_id: &str) -> Vec<ReportAttemptStatusRequest> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Report(r, _) if r.job_id == job_id => Some(r),
                _ => None,
            })
            .collect()
    }

    pub fn log_lines(&self, job_id: &str) -> Vec<LogLine> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Logs(r, _) if r.job_id == job_id => Some(r.lines),
                _ => None,
            })
            .flatten()
            .collect()
    }

    pub fn metrics(&self, job_id: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Metrics(r, _) if r.job_id == job_id => Some(r.json_records),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Waits for the attempt's final report and returns it.
    pub async fn final_report(&self, job_id: &str) -> ReportAttemptStatusRequest {
        wait_for("a final report", WAIT, || async {
            self.reports(job_id).into_iter().find(|r| {
                r.state != AttemptState::Running as i32 && r.state != AttemptState::Scheduled as i32
            })
        })
        .await
    }

    /// UNAVAILABLE while partitioned.
    fn reachable(&self) -> Result<(), Status> {
        if self.with(|s| s.partitioned) {
            return Err(Status::unavailable("the scheduler cannot be reached"));
        }
        Ok(())
    }

    fn is_lost(&self, runner_id: &str) -> bool {
        self.with(|s| s.lost_runners.iter().any(|r| r == runner_id))
    }

    pub fn fail_shipping_once(&self) -> bool {
        self.with(|s| {
            if s.fail_shipping > 0 {
                s.fail_shipping -= 1;
                true
            } else {
                false
            }
        })
    }
}

/// The fakes take calls from a runner's credential only, as the real
/// services do.
pub fn service<T>(req: &Request<T>) -> Result<(), Status> {
    trainmesh_common::auth::caller(req)?
        .require_runner()
        .map(|_| ())
}

pub fn cid() -> Option<String> {
    trainmesh_common::correlation::current()
}

#[tonic::async_trait]
impl RunnerService for Fake {
    async fn register_runner(
        &self,
        req: Request<RegisterRunnerRequest>,
    ) -> Result<Response<RegisterRunnerResponse>, Status> {
        service(&req)?;
        self.reachable()?;
        let (n, hold, ttl) = self.with(|s| {
            s.calls.push(Call::Register(req.get_ref().clone()));
            s.registrations += 1;
            (
                s.registrations,
                s.hold_registration.clone(),
                s.lease_ttl.unwrap_or(Duration::from_secs(15)),
            )
        });
        if let Some(hold) = hold {
            let _ = hold.acquire().await;
        }
        Ok(Response::new(RegisterRunnerResponse {
            runner_id: format!("runner-{n}"),
            lease_ttl: Some(trainmesh_common::time::to_duration(ttl)),
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 50_000_000,
            }),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        service(&req)?;
        self.reachable()?;
        let lost = self.is_lost(&req.get_ref().runner_id);
        self.with(|s| {
            s.calls.push(Call::Heartbeat(req.get_ref().clone()));
            if std::mem::take(&mut s.forget_runner) || lost {
                return Err(Status::not_found("runner `x` is not registered"));
            }
            Ok(Response::new(HeartbeatResponse {
                lease_expire_time: None,
                cancel: s.cancel.clone(),
            }))
        })
    }

    async fn acquire_assignments(
        &self,
        req: Request<AcquireAssignmentsRequest>,
    ) -> Result<Response<AcquireAssignmentsResponse>, Status> {
        service(&req)?;
        self.reachable()?;
        let max = req.get_ref().max_assignments.max(0) as usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let notified = self.assigned.notified();
            // Nothing is placed on a runner whose lease is gone, even one
            // already waiting.
            if self.is_lost(&req.get_ref().runner_id) {
                return Err(Status::not_found("runner `x` is not registered"));
            }
            let taken: Vec<Assignment> = self.with(|s| {
                let n = max.min(s.assignments.len());
                s.assignments.drain(..n).collect()
            });
            if !taken.is_empty() {
                return Ok(Response::new(AcquireAssignmentsResponse {
                    assignments: taken,
                }));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Response::new(AcquireAssignmentsResponse::default()));
            }
        }
    }

    async fn report_attempt_status(
        &self,
        req: Request<ReportAttemptStatusRequest>,
    ) -> Result<Response<ReportAttemptStatusResponse>, Status> {
        service(&req)?;
        self.reachable()?;
        self.with(|s| s.calls.push(Call::Report(req.get_ref().clone(), cid())));
        if self.is_lost(&req.get_ref().runner_id) {
            return Err(Status::failed_precondition(
                "runner `x` does not hold the attempt: it was lost",
            ));
        }
        Ok(Response::new(ReportAttemptStatusResponse { changed: true }))
    }

    async fn drain_runner(
        &self,
        req: Request<DrainRunnerRequest>,
    ) -> Result<Response<DrainRunnerResponse>, Status> {
        service(&req)?;
        self.reachable()?;
        self.with(|s| s.calls.push(Call::Drain(req.get_ref().clone())));
        Ok(Response::new(DrainRunnerResponse::default()))
    }

    async fn deregister_runner(
        &self,
        req: Request<DeregisterRunnerRequest>,
    ) -> Result<Response<DeregisterRunnerResponse>, Status> {
        service(&req)?;
        self.reachable()?;
        self.with(|s| s.calls.push(Call::Deregister(req.get_ref().clone())));
        Ok(Response::new(DeregisterRunnerResponse::default()))
    }
}

#[tonic::async_trait]
impl JobInternalService for Fake {
    async fn update_job_status(
        &self,
        _req: Request<UpdateJobStatusRequest>,
    ) -> Result<Response<UpdateJobStatusResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn append_job_logs(
        &self,
        req: Request<AppendJobLogsRequest>,
    ) -> Result<Response<AppendJobLogsResponse>, Status> {
        service(&req)?;
        if self.fail_shipping_once() {
            return Err(Status::unavailable("job-service is restarting"));
        }
        let last = req.get_ref().lines.last().map(|l| l.number).unwrap_or(0);
        self.with(|s| s.calls.push(Call::Logs(req.get_ref().clone(), cid())));
        Ok(Response::new(AppendJobLogsResponse { last_number: last }))
    }

    async fn attach_diagnosis(
        &self,
        _req: Request<AttachDiagnosisRequest>,
    ) -> Result<Response<AttachDiagnosisResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
}

#[tonic::async_trait]
impl MetricsService for Fake {
    async fn write_metrics(
        &self,
        req: Request<WriteMetricsRequest>,
    ) -> Result<Response<WriteMetricsResponse>, Status> {
        service(&req)?;
        if self.fail_shipping_once() {
            return Err(Status::unavailable("metrics-service is restarting"));
        }
        let n = req.get_ref().json_records.len() as i32;
        self.with(|s| s.calls.push(Call::Metrics(req.get_ref().clone(), cid())));
        Ok(Response::new(WriteMetricsResponse {
            accepted: n,
            duplicates: 0,
        }))
    }

    async fn stream_write_metrics(
        &self,
        _req: Request<tonic::Streaming<StreamWriteMetricsRequest>>,
    ) -> Result<Response<StreamWriteMetricsResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn get_latest_metrics(
        &self,
        _req: Request<GetLatestMetricsRequest>,
    ) -> Result<Response<GetLatestMetricsResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn query_metrics(
        &self,
        _req: Request<QueryMetricsRequest>,
    ) -> Result<Response<QueryMetricsResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn list_metric_keys(
        &self,
        _req: Request<ListMetricKeysRequest>,
    ) -> Result<Response<ListMetricKeysResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    type WatchMetricsStream = futures::stream::Empty<Result<WatchMetricsResponse, Status>>;
    async fn watch_metrics(
        &self,
        _req: Request<WatchMetricsRequest>,
    ) -> Result<Response<Self::WatchMetricsStream>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn list_anomalies(
        &self,
        _req: Request<ListAnomaliesRequest>,
    ) -> Result<Response<ListAnomaliesResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
}

/// Serves the fake on `listener` until the returned sender is dropped.
pub fn serve(fake: &Fake, listener: tokio::net::TcpListener) -> oneshot::Sender<()> {
    let routes = tonic::service::Routes::new(RunnerServiceServer::new(fake.clone()))
        .add_service(JobInternalServiceServer::new(fake.clone()))
        .add_service(MetricsServiceServer::new(fake.clone()));
    let (tx, rx) = oneshot::channel::<()>();
    let (trigger, _watch) = trainmesh_common::server::shutdown_pair();
    tokio::spawn(trainmesh_common::server::serve(
        "fake-mesh",
        routes,
        &[],
        listener,
        test_tokens().store,
        trainmesh_common::server::ServerOptions {
            drain_timeout: Duration::from_millis(100),
            ..Default::default()
        },
        trigger,
        async move {
            let _ = rx.await;
        },
    ));
    tx
}

pub struct Mesh {
    pub fake: Fake,
    pub addr: SocketAddr,
    pub _server: oneshot::Sender<()>,
}

pub async fn mesh() -> Mesh {
    trainmesh_common::testing::init_test_logging();
    let (listener, addr) = trainmesh_common::testing::listener().await;
    let fake = Fake::default();
    let server = serve(&fake, listener);
    Mesh {
        fake,
        addr,
        _server: server,
    }
}

pub fn config(endpoint: &str, work_dir: &std::path::Path) -> Config {
    let mut c = Config::new(
        trainmesh_common::testing::TEST_RUNNER,
        endpoint,
        endpoint,
        endpoint,
        test_tokens().runner,
        work_dir,
    );
    c.gpus = GpuSetting::Count(2);
    c.cpu = Some(4.0);
    c.memory_mib = Some(8192);
    c.log_ship_interval = Duration::from_millis(20);
    c.metrics_flush_interval = Duration::from_millis(20);
    c.max_backoff = Duration::from_millis(200);
    c.acquire_wait = Duration::from_secs(2);
    c.flush_timeout = Duration::from_secs(10);
    c.shim = Some(shim());
    // The tests' jobs write into the tests' own (private) directories.
    c.allow_root_jobs = true;
    c
}

/// The runner binary, which the process backend runs attempts through.
pub fn shim() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_runner").into()
}

pub struct Runner {
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub stop: Option<oneshot::Sender<()>>,
    pub work: tempfile::TempDir,
}

impl Runner {
    pub fn start(config_for: impl FnOnce(&std::path::Path) -> Config) -> Runner {
        Self::start_in(tempfile::tempdir().unwrap(), config_for)
    }

    /// A runner whose work dir is `work` (which may hold an earlier run's
    /// attempts).
    pub fn start_in(
        work: tempfile::TempDir,
        config_for: impl FnOnce(&std::path::Path) -> Config,
    ) -> Runner {
        let config = config_for(work.path());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(runner::run(config, async move {
            let _ = rx.await;
        }));
        Runner {
            handle,
            stop: Some(tx),
            work,
        }
    }

    /// A runner serving its health on a port of its own; returns the
    /// port's address too.
    pub async fn start_with_health(
        config_for: impl FnOnce(&std::path::Path) -> Config,
    ) -> (Runner, SocketAddr) {
        let (listener, addr) = trainmesh_common::testing::listener().await;
        let work = tempfile::tempdir().unwrap();
        let config = config_for(work.path());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(runner::run_with_health_listener(
            config,
            Some(listener),
            async move {
                let _ = rx.await;
            },
        ));
        let runner = Runner {
            handle,
            stop: Some(tx),
            work,
        };
        (runner, addr)
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.begin_stop();
        self.stopped().await
    }

    /// Tells the runner to stop, without waiting for it.
    pub fn begin_stop(&mut self) {
        drop(self.stop.take());
    }

    /// Waits for a runner told to stop to return.
    pub async fn stopped(self) -> anyhow::Result<()> {
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("runner stops in time")
            .expect("runner task")
    }
}

pub fn assignment(argv: &[&str]) -> Assignment {
    Assignment {
        job_id: uuid::Uuid::now_v7().to_string(),
        attempt: 1,
        owner: "alice".into(),
        org: "ml".into(),
        spec: Some(JobSpec {
            name: "test".into(),
            image: "test".into(),
            command: argv.iter().map(|s| s.to_string()).collect(),
            ..JobSpec::default()
        }),
        correlation_id: format!("cid-{}", uuid::Uuid::new_v4().simple()),
        gpu_indexes: vec![],
    }
}

pub fn states(reports: &[ReportAttemptStatusRequest]) -> Vec<AttemptState> {
    reports
        .iter()
        .map(|r| AttemptState::try_from(r.state).unwrap())
        .collect()
}

pub fn index_of(calls: &[Call], pred: impl Fn(&Call) -> bool) -> usize {
    calls.iter().position(pred).expect("call present")
}

/// The runner's health as its health port answers for service "", or
/// `None` while it does not answer.
pub async fn health(addr: SocketAddr) -> Option<tonic_health::ServingStatus> {
    use tonic_health::pb::health_check_response::ServingStatus as S;
    let channel = trainmesh_common::client::channel(&addr.to_string(), None).ok()?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    match resp.into_inner().status() {
        S::Serving => Some(tonic_health::ServingStatus::Serving),
        S::NotServing => Some(tonic_health::ServingStatus::NotServing),
        S::Unknown | S::ServiceUnknown => Some(tonic_health::ServingStatus::Unknown),
    }
}

/// Waits up to `within` for the health port to answer `want`.
pub async fn wait_health(addr: SocketAddr, want: tonic_health::ServingStatus, within: Duration) {
    wait_for(&format!("health {want:?}"), within, || async {
        (health(addr).await == Some(want)).then_some(())
    })
    .await;
}

/// Whether process `pid` exists (a reaped one does not).
pub fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The pid the job printed as `pid N`, once it has been shipped.
pub async fn printed_pid(fake: &Fake, job_id: &str) -> i32 {
    wait_for("the job's pid", WAIT, || async {
        fake.log_lines(job_id)
            .iter()
            .find_map(|l| l.text.strip_prefix("pid ")?.trim().parse().ok())
    })
    .await
}

/// The pid a job wrote to `dir/name`, once it is there.
pub async fn read_pid_at(dir: &std::path::Path, name: &str) -> i32 {
    let path = dir.join(name);
    trainmesh_common::testing::wait_for(&format!("{name} to be written"), WAIT, || {
        let path = path.clone();
        async move {
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
        }
    })
    .await
}
