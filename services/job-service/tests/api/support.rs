//! Starting job-service for a test, clients, and small helpers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use job_service::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use trainmesh_common::client::{channel, Channel};
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::proto::job::v1::job_internal_service_client::JobInternalServiceClient;
use trainmesh_common::proto::job::v1::job_service_client::JobServiceClient;
use trainmesh_common::testing::{self, TestDb, TestTokens};

pub const WAIT: Duration = Duration::from_secs(15);

pub struct App {
    pub addr: SocketAddr,
    pub tokens: TestTokens,
    pub label: &'static str,
    /// Canonical allowed data root.
    pub root: PathBuf,
    /// Canonical directory next to the root (not allowed).
    pub outside: PathBuf,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A config with the test tokens, a data root, no diagnosis peer and a
/// scheduler endpoint nobody listens on (an address file never written).
pub fn config(db: &TestDb, dir: &tempfile::TempDir) -> Config {
    let tokens = testing::test_tokens();
    let mut c = Config::new(tokens.store.clone(), db.url.clone());
    c.service_token = Some(tokens.job_service.to_owned());
    c.scheduler_endpoint = format!("file:{}", dir.path().join("no-scheduler.addr").display());
    c.diagnosis_endpoint = None;
    let base = std::fs::canonicalize(dir.path()).unwrap();
    c.data_roots = vec![base.join("data")];
    // Long: streams must be woken by commits, not by the poll.
    c.stream_poll = Duration::from_secs(30);
    c
}

impl App {
    pub async fn start(db: &TestDb) -> App {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: &TestDb, tweak: impl FnOnce(&mut Config)) -> App {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(db, dir, tweak).await
    }

    /// Starts on `dir` (data root `dir/data`, which is created here).
    pub async fn start_in(
        db: &TestDb,
        dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
    ) -> App {
        testing::init_test_logging();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(base.join("data")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        let mut cfg = config(db, &dir);
        tweak(&mut cfg);
        let (listener, addr) = testing::listener().await;
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(job_service::run(cfg, listener, async move {
            let _ = rx.await;
        }));
        App {
            addr,
            tokens: testing::test_tokens(),
            label: db.label,
            root: base.join("data"),
            outside: base.join("outside"),
            dir,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn channel(&self, token: &str) -> Channel {
        channel(&self.addr.to_string(), Some(token)).unwrap()
    }

    pub fn jobs(&self, token: &str) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.channel(token))
    }

    /// The internal API as the scheduler calls it.
    pub fn internal(&self) -> JobInternalServiceClient<Channel> {
        self.internal_as(self.tokens.scheduler)
    }

    /// The internal API as runner `node-1` calls it.
    pub fn as_runner(&self) -> JobInternalServiceClient<Channel> {
        self.internal_as(self.tokens.runner)
    }

    pub fn internal_as(&self, token: &str) -> JobInternalServiceClient<Channel> {
        JobInternalServiceClient::new(self.channel(token))
    }

    pub fn alice(&self) -> JobServiceClient<Channel> {
        self.jobs(self.tokens.alice)
    }

    /// Stops the server and returns its temp dir (to restart on it).
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(WAIT, h)
                .await
                .expect("server stops")
                .expect("server task")
                .expect("server result");
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub fn spec(name: &str) -> pb::JobSpec {
    pb::JobSpec {
        name: name.into(),
        image: "python:3.12".into(),
        command: vec!["python".into(), "train.py".into()],
        ..Default::default()
    }
}

pub async fn create(client: &mut JobServiceClient<Channel>, spec: pb::JobSpec) -> pb::Job {
    client
        .create_job(pb::CreateJobRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .expect("create job")
        .into_inner()
        .job
        .expect("job")
}

pub async fn get(client: &mut JobServiceClient<Channel>, id: &str) -> Result<pb::Job, Status> {
    Ok(client
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await?
        .into_inner()
        .job
        .expect("job"))
}

/// A status update as the scheduler sends it.
pub fn update(job: &str, state: pb::JobState, seq: i64) -> pb::UpdateJobStatusRequest {
    pb::UpdateJobStatusRequest {
        job_id: job.into(),
        state: state as i32,
        scheduler_sequence: seq,
        ..Default::default()
    }
}

pub async fn apply(app: &App, req: pb::UpdateJobStatusRequest) -> Result<pb::Job, Status> {
    Ok(app
        .internal()
        .update_job_status(req)
        .await?
        .into_inner()
        .job
        .expect("job"))
}

/// QUEUED(1) → SCHEDULED(2, attempt 1 on runner-1, named node-1) →
/// RUNNING(3).
pub async fn make_running(app: &App, job: &str) {
    use pb::JobState::*;
    apply(app, update(job, Queued, 1)).await.unwrap();
    let mut s = update(job, Scheduled, 2);
    s.attempt = 1;
    s.runner_id = "runner-1".into();
    s.runner_name = trainmesh_common::testing::TEST_RUNNER.into();
    apply(app, s).await.unwrap();
    let mut r = update(job, Running, 3);
    r.attempt = 1;
    apply(app, r).await.unwrap();
}

pub fn state(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.state).unwrap()
}

/// The call failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(res: Result<T, Status>, code: Code) -> Status {
    match res {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            s
        }
    }
}

/// INVALID_ARGUMENT whose message and BadRequest details name `field` (a
/// trailing `*` matches any rest).
#[track_caller]
pub fn assert_invalid<T: std::fmt::Debug>(res: Result<T, Status>, field: &str) -> Status {
    let s = assert_code(res, Code::InvalidArgument);
    let (prefix, exact) = match field.strip_suffix('*') {
        Some(p) => (p, false),
        None => (field, true),
    };
    assert!(
        s.message().contains(prefix),
        "message `{}` should name `{field}`",
        s.message()
    );
    let details = s.get_error_details();
    let bad = details.bad_request().expect("BadRequest details");
    let got = &bad.field_violations[0].field;
    if exact {
        assert_eq!(got, field);
    } else {
        assert!(
            got.starts_with(prefix),
            "field `{got}` should start with `{prefix}`"
        );
    }
    s
}

/// Lines `range` of attempt 1, as a runner sends them.
pub fn lines(range: std::ops::RangeInclusive<i64>) -> Vec<pb::LogLine> {
    range
        .map(|n| pb::LogLine {
            attempt: 1,
            number: n,
            text: format!("step {n} loss 0.{n}"),
        })
        .collect()
}

/// Appends lines to attempt 1 as the runner does; returns the last number.
pub async fn append(app: &App, job: &str, ls: Vec<pb::LogLine>) -> i64 {
    app.as_runner()
        .append_job_logs(pb::AppendJobLogsRequest {
            job_id: job.into(),
            attempt: 1,
            lines: ls,
        })
        .await
        .unwrap()
        .into_inner()
        .last_number
}
