//! Test harness: a real scheduler on a port-0 listener, a recording
//! job-service peer on loopback, clients with the test tokens.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use scheduler_service::{run, Config};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use trainmesh_common::client::{channel, Channel};
use trainmesh_common::proto::job::v1::job_internal_service_server::{
    JobInternalService, JobInternalServiceServer,
};
use trainmesh_common::proto::job::v1::{
    AppendJobLogsRequest, AppendJobLogsResponse, AttachDiagnosisRequest, AttachDiagnosisResponse,
    JobSpec, JobState, Resources, RetryPolicy, UpdateJobStatusRequest, UpdateJobStatusResponse,
};
use trainmesh_common::proto::runner::v1::runner_service_client::RunnerServiceClient;
use trainmesh_common::proto::runner::v1::{
    AcquireAssignmentsRequest, Assignment, AttemptRef, Capacity, Gpu, HeartbeatRequest,
    RegisterRunnerRequest, ReportAttemptStatusRequest,
};
use trainmesh_common::proto::scheduler::v1::scheduler_internal_service_client::SchedulerInternalServiceClient;
use trainmesh_common::proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use trainmesh_common::proto::scheduler::v1::{
    CancelQueuedJobRequest, EnqueueJobRequest, EnqueueJobResponse,
};
use trainmesh_common::testing::{self, TestDb};
use trainmesh_common::time::OffsetClock;

pub const DEADLINE: Duration = Duration::from_secs(10);
pub const H100: &str = "NVIDIA H100 80GB HBM3";

/// One `UpdateJobStatus` call as job-service received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub req: UpdateJobStatusRequest,
    pub authorization: Option<String>,
    pub correlation_id: Option<String>,
}

#[derive(Clone, Default)]
pub struct FakeJobService {
    pub calls: Arc<Mutex<Vec<Recorded>>>,
}

#[tonic::async_trait]
impl JobInternalService for FakeJobService {
    async fn update_job_status(
        &self,
        req: Request<UpdateJobStatusRequest>,
    ) -> Result<Response<UpdateJobStatusResponse>, Status> {
        let md = req.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let rec = Recorded {
            authorization: get("authorization"),
            correlation_id: get("x-correlation-id"),
            req: req.into_inner(),
        };
        self.calls.lock().unwrap().push(rec);
        Ok(Response::new(UpdateJobStatusResponse { job: None }))
    }

    async fn append_job_logs(
        &self,
        _req: Request<AppendJobLogsRequest>,
    ) -> Result<Response<AppendJobLogsResponse>, Status> {
        Ok(Response::new(AppendJobLogsResponse::default()))
    }

    async fn attach_diagnosis(
        &self,
        _req: Request<AttachDiagnosisRequest>,
    ) -> Result<Response<AttachDiagnosisResponse>, Status> {
        Ok(Response::new(AttachDiagnosisResponse::default()))
    }
}

pub struct Harness {
    pub addr: SocketAddr,
    pub clock: OffsetClock,
    pub jobs: FakeJobService,
    pub label: &'static str,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    job_task: JoinHandle<()>,
    _db: Option<TestDb>,
}

impl Harness {
    pub async fn start(db: TestDb) -> Self {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: TestDb, tweak: impl FnOnce(&mut Config)) -> Self {
        let (url, label) = (db.url.clone(), db.label);
        Self::start_url(url, label, Some(db), tweak).await
    }

    /// A scheduler on `url`, which other harnesses may share (replicas).
    pub async fn start_url(
        url: String,
        label: &'static str,
        db: Option<TestDb>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        testing::init_test_logging();
        let jobs = FakeJobService::default();
        let (job_listener, job_addr) = testing::listener().await;
        let svc = JobInternalServiceServer::new(jobs.clone());
        let job_task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(job_listener))
                .await;
        });

        let tokens = testing::test_tokens();
        let clock = OffsetClock::default();
        let mut config = Config::new(url, tokens.store.clone());
        config.job_endpoint = job_addr.to_string();
        config.service_token = Some(tokens.scheduler.to_owned());
        config.sweep_interval = Duration::from_millis(50);
        config.clock = Arc::new(clock.clone());
        tweak(&mut config);

        let (listener, addr) = testing::listener().await;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(config, listener, async {
            let _ = stopped.await;
        }));
        let h = Harness {
            addr,
            clock,
            jobs,
            label,
            stop: Some(stop),
            task: Some(task),
            job_task,
            _db: db,
        };
        // Ready once it answers.
        let c = h.public(tokens.admin);
        testing::wait_for("scheduler to serve", DEADLINE, || {
            let mut c = c.clone();
            async move {
                c.get_queue_stats(trainmesh_common::proto::scheduler::v1::GetQueueStatsRequest {})
                    .await
                    .ok()
            }
        })
        .await;
        h
    }

    fn channel(&self, token: &str) -> Channel {
        channel(&self.addr.to_string(), Some(token)).expect("channel")
    }

    pub fn internal(&self) -> SchedulerInternalServiceClient<Channel> {
        SchedulerInternalServiceClient::new(self.channel(testing::test_tokens().job_service))
    }

    pub fn internal_as(&self, token: &str) -> SchedulerInternalServiceClient<Channel> {
        SchedulerInternalServiceClient::new(self.channel(token))
    }

    /// RunnerService as runner `node-1`.
    pub fn runners(&self) -> RunnerServiceClient<Channel> {
        self.runners_as(testing::test_tokens().runner)
    }

    pub fn runners_as(&self, token: &str) -> RunnerServiceClient<Channel> {
        RunnerServiceClient::new(self.channel(token))
    }

    pub fn public(&self, token: &str) -> SchedulerServiceClient<Channel> {
        SchedulerServiceClient::new(self.channel(token))
    }

    /// Stops the server; returns how `run` ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let res = match self.task.take() {
            Some(t) => tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("run ends after shutdown")
                .expect("run task"),
            None => Ok(()),
        };
        self.job_task.abort();
        res
    }

    /// Fires shutdown without waiting.
    pub fn begin_stop(&mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.take().expect("running")
    }

    pub fn statuses(&self, job_id: &str) -> Vec<UpdateJobStatusRequest> {
        self.jobs
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.req.job_id == job_id)
            .map(|r| r.req.clone())
            .collect()
    }

    pub fn recorded(&self, job_id: &str) -> Vec<Recorded> {
        self.jobs
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.req.job_id == job_id)
            .cloned()
            .collect()
    }

    /// Waits until job-service has received `state` for the job; returns
    /// that update.
    pub async fn wait_status(&self, job_id: &str, state: JobState) -> UpdateJobStatusRequest {
        self.wait_status_n(job_id, state, 1).await
    }

    /// Waits for the `n`th update with `state` for the job.
    pub async fn wait_status_n(
        &self,
        job_id: &str,
        state: JobState,
        n: usize,
    ) -> UpdateJobStatusRequest {
        testing::wait_for(
            &format!("{} status {n}x {:?} for {job_id}", self.label, state),
            DEADLINE,
            || async {
                self.statuses(job_id)
                    .into_iter()
                    .filter(|s| s.state == state as i32)
                    .nth(n - 1)
            },
        )
        .await
    }

    pub async fn enqueue(&self, job_id: &str, owner: &str, spec: JobSpec) -> EnqueueJobResponse {
        self.enqueue_at(job_id, owner, spec, None).await
    }

    pub async fn enqueue_at(
        &self,
        job_id: &str,
        owner: &str,
        spec: JobSpec,
        submit_secs: Option<i64>,
    ) -> EnqueueJobResponse {
        self.internal()
            .enqueue_job(EnqueueJobRequest {
                job_id: job_id.into(),
                owner: owner.into(),
                org: "ml".into(),
                spec: Some(spec),
                correlation_id: format!("cid-{job_id}"),
                submit_time: submit_secs.map(|s| prost_types::Timestamp {
                    seconds: s,
                    nanos: 0,
                }),
            })
            .await
            .expect("enqueue")
            .into_inner()
    }

    pub async fn cancel(&self, job_id: &str) -> JobState {
        let r = self
            .internal()
            .cancel_queued_job(CancelQueuedJobRequest {
                job_id: job_id.into(),
                reason: "user asked".into(),
            })
            .await
            .expect("cancel")
            .into_inner();
        JobState::try_from(r.state).expect("state")
    }

    pub async fn register(&self, gpus: i32) -> String {
        self.register_model(gpus, H100).await
    }

    pub async fn register_model(&self, gpus: i32, model: &str) -> String {
        self.runners()
            .register_runner(RegisterRunnerRequest {
                name: testing::TEST_RUNNER.into(),
                backend: "process".into(),
                capacity: Some(capacity(gpus, model)),
                labels: Default::default(),
                // One installation may hold several registrations of its
                // name; the tests stand for one runner that re-registers.
                instance: "harness".into(),
            })
            .await
            .expect("register")
            .into_inner()
            .runner_id
    }

    /// Registers runner `name` with its credential `token` (`gpus` H100s).
    pub async fn register_as(&self, token: &str, name: &str, gpus: i32) -> String {
        self.runners_as(token)
            .register_runner(RegisterRunnerRequest {
                name: name.into(),
                backend: "process".into(),
                capacity: Some(capacity(gpus, H100)),
                labels: Default::default(),
                instance: "harness".into(),
            })
            .await
            .expect("register")
            .into_inner()
            .runner_id
    }

    /// Acquires as the runner of credential `token`, waiting up to
    /// `wait_secs` for work.
    pub async fn acquire_as(
        &self,
        token: &str,
        runner_id: &str,
        wait_secs: i64,
    ) -> Result<Vec<Assignment>, Status> {
        self.runners_as(token)
            .acquire_assignments(AcquireAssignmentsRequest {
                runner_id: runner_id.into(),
                max_assignments: 0,
                wait: Some(prost_types::Duration {
                    seconds: wait_secs,
                    nanos: 0,
                }),
            })
            .await
            .map(|r| r.into_inner().assignments)
    }

    /// Reports as the runner of credential `token`.
    #[allow(clippy::too_many_arguments)]
    pub async fn report_as(
        &self,
        token: &str,
        runner_id: &str,
        job_id: &str,
        attempt: i32,
        state: trainmesh_common::proto::job::v1::AttemptState,
        exit_code: Option<i32>,
        error: Option<trainmesh_common::proto::job::v1::JobError>,
    ) -> Result<bool, Status> {
        self.runners_as(token)
            .report_attempt_status(ReportAttemptStatusRequest {
                runner_id: runner_id.into(),
                job_id: job_id.into(),
                attempt,
                state: state as i32,
                exit_code,
                error,
                log_tail: vec![],
                time: None,
            })
            .await
            .map(|r| r.into_inner().changed)
    }

    pub async fn acquire(
        &self,
        runner_id: &str,
        wait_secs: i64,
    ) -> Result<Vec<Assignment>, Status> {
        self.runners()
            .acquire_assignments(AcquireAssignmentsRequest {
                runner_id: runner_id.into(),
                max_assignments: 0,
                wait: Some(prost_types::Duration {
                    seconds: wait_secs,
                    nanos: 0,
                }),
            })
            .await
            .map(|r| r.into_inner().assignments)
    }

    /// A long-poll for at most `max` assignments (0: no limit) waiting up
    /// to 30 s, running in the background.
    pub fn long_poll(
        &self,
        runner_id: &str,
        max: i32,
    ) -> JoinHandle<Result<Vec<Assignment>, Status>> {
        let mut client = self.runners();
        let req = AcquireAssignmentsRequest {
            runner_id: runner_id.into(),
            max_assignments: max,
            wait: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
        };
        tokio::spawn(async move {
            client
                .acquire_assignments(req)
                .await
                .map(|r| r.into_inner().assignments)
        })
    }

    /// Acquires until `n` assignments have been handed out.
    pub async fn acquire_n(&self, runner_id: &str, n: usize) -> Vec<Assignment> {
        let mut got = Vec::new();
        tokio::time::timeout(DEADLINE, async {
            while got.len() < n {
                got.extend(self.acquire(runner_id, 30).await.expect("acquire"));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{}: only {} of {n} assignments", self.label, got.len()));
        got
    }

    pub async fn report(
        &self,
        runner_id: &str,
        job_id: &str,
        attempt: i32,
        state: trainmesh_common::proto::job::v1::AttemptState,
        exit_code: Option<i32>,
    ) -> Result<bool, Status> {
        self.report_error(runner_id, job_id, attempt, state, exit_code, None)
            .await
    }

    /// [`Self::report`] with the runner's structured error.
    pub async fn report_error(
        &self,
        runner_id: &str,
        job_id: &str,
        attempt: i32,
        state: trainmesh_common::proto::job::v1::AttemptState,
        exit_code: Option<i32>,
        error: Option<trainmesh_common::proto::job::v1::JobError>,
    ) -> Result<bool, Status> {
        let token = testing::test_tokens().runner;
        self.report_as(token, runner_id, job_id, attempt, state, exit_code, error)
            .await
    }

    pub async fn heartbeat(
        &self,
        runner_id: &str,
        active: &[(&str, i32)],
    ) -> Result<Vec<AttemptRef>, Status> {
        self.runners()
            .heartbeat(HeartbeatRequest {
                runner_id: runner_id.into(),
                active: active
                    .iter()
                    .map(|(j, a)| AttemptRef {
                        job_id: (*j).into(),
                        attempt: *a,
                    })
                    .collect(),
            })
            .await
            .map(|r| r.into_inner().cancel)
    }
}

pub fn capacity(gpus: i32, model: &str) -> Capacity {
    Capacity {
        gpus: (0..gpus)
            .map(|i| Gpu {
                index: i,
                uuid: format!("GPU-{i}"),
                model: model.into(),
                memory_mib: 81_559,
            })
            .collect(),
        cpu: 32.0,
        memory_mib: 256 * 1024,
    }
}

pub fn spec(gpus: i32) -> JobSpec {
    JobSpec {
        name: "train".into(),
        image: "busybox".into(),
        command: vec!["true".into()],
        resources: Some(Resources {
            gpus,
            cpu: 1.0,
            memory_mib: 1024,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn spec_with_attempts(gpus: i32, max_attempts: i32) -> JobSpec {
    JobSpec {
        retry_policy: Some(RetryPolicy {
            max_attempts,
            ..Default::default()
        }),
        ..spec(gpus)
    }
}

pub fn new_job_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
