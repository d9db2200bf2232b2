//! trainctl's client commands against a fake job-service served by the real
//! common server stack (correlation layer, auth), so what is checked is what
//! goes over the wire: the token, the correlation id, the request fields,
//! and how `submit --wait` follows a job across a broken event stream.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use clap::Parser;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::proto::job::v1::job_service_server::{JobService, JobServiceServer};
use trainmesh_common::{auth, server, testing};

#[derive(Default)]
struct Seen {
    created: Vec<pb::CreateJobRequest>,
    correlation_ids: Vec<String>,
    users: Vec<String>,
    watches: Vec<pb::WatchJobsRequest>,
    logs: Vec<pb::StreamJobLogsRequest>,
    lists: Vec<pb::ListJobsRequest>,
    gets: usize,
}

#[derive(Clone)]
struct Fake {
    seen: Arc<Mutex<Seen>>,
    state: Arc<Mutex<pb::JobState>>,
    final_state: pb::JobState,
    watch_served: bool,
}

impl Fake {
    fn record<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let caller = auth::caller(req)?;
        let cid = req
            .metadata()
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut seen = self.seen.lock().unwrap();
        seen.users.push(caller.user);
        seen.correlation_ids.push(cid);
        Ok(())
    }

    fn job(&self) -> pb::Job {
        let state = *self.state.lock().unwrap();
        let failed = state == pb::JobState::Failed;
        pb::Job {
            id: "job-1".into(),
            owner: "alice".into(),
            state: state as i32,
            spec: Some(pb::JobSpec {
                name: "demo".into(),
                ..Default::default()
            }),
            error_message: if failed {
                "Error Type: RuntimeError\nError Message: boom".into()
            } else {
                String::new()
            },
            ..Default::default()
        }
    }
}

fn event(seq: i64, state: pb::JobState) -> Result<pb::WatchJobsResponse, Status> {
    Ok(pb::WatchJobsResponse {
        kind: Some(pb::watch_jobs_response::Kind::Event(pb::JobEvent {
            job_id: "job-1".into(),
            sequence: seq,
            cursor: format!("c{seq}"),
            r#type: "state_changed".into(),
            state: state as i32,
            ..Default::default()
        })),
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Fake {
    async fn create_job(
        &self,
        req: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::CreateJobResponse>, Status> {
        self.record(&req)?;
        self.seen.lock().unwrap().created.push(req.into_inner());
        Ok(Response::new(pb::CreateJobResponse {
            job: Some(self.job()),
            existing: false,
        }))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        self.record(&req)?;
        self.seen.lock().unwrap().gets += 1;
        if req.get_ref().job_id != "job-1" {
            return Err(Status::not_found(format!(
                "job `{}` not found",
                req.get_ref().job_id
            )));
        }
        Ok(Response::new(pb::GetJobResponse {
            job: Some(self.job()),
        }))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.record(&req)?;
        self.seen.lock().unwrap().lists.push(req.into_inner());
        Ok(Response::new(pb::ListJobsResponse {
            jobs: vec![self.job()],
            next_page_token: String::new(),
        }))
    }

    async fn cancel_job(
        &self,
        _: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn retry_job(
        &self,
        _: Request<pb::RetryJobRequest>,
    ) -> Result<Response<pb::RetryJobResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn delete_job(
        &self,
        _: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    type WatchJobsStream = BoxStream<pb::WatchJobsResponse>;

    /// The first stream breaks after two events; the next one, opened from
    /// the last cursor, finishes the job.
    async fn watch_jobs(
        &self,
        req: Request<pb::WatchJobsRequest>,
    ) -> Result<Response<Self::WatchJobsStream>, Status> {
        self.record(&req)?;
        if !self.watch_served {
            return Err(Status::unimplemented("watch arrives later"));
        }
        let n = {
            let mut seen = self.seen.lock().unwrap();
            seen.watches.push(req.into_inner());
            seen.watches.len()
        };
        let items = if n == 1 {
            vec![
                event(1, pb::JobState::Pending),
                event(2, pb::JobState::Queued),
                Err(Status::unavailable("job-service is restarting")),
            ]
        } else {
            *self.state.lock().unwrap() = self.final_state;
            vec![event(3, pb::JobState::Running), event(4, self.final_state)]
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    type StreamJobLogsStream = BoxStream<pb::StreamJobLogsResponse>;

    /// The first stream sends lines 1-2 and ends as a stopping server ends
    /// it; the resumed one sends line 3 and the real end. A job named
    /// `job-broken` gets an answer about the request instead.
    async fn stream_job_logs(
        &self,
        req: Request<pb::StreamJobLogsRequest>,
    ) -> Result<Response<Self::StreamJobLogsStream>, Status> {
        self.record(&req)?;
        let req = req.into_inner();
        let broken = req.job_id == "job-broken";
        let n = {
            let mut seen = self.seen.lock().unwrap();
            seen.logs.push(req);
            seen.logs.len()
        };
        let lines = |numbers: &[i64]| {
            Ok(pb::StreamJobLogsResponse {
                cursor: format!("1:{}", numbers.last().copied().unwrap_or(0)),
                lines: numbers
                    .iter()
                    .map(|n| pb::LogLine {
                        attempt: 1,
                        number: *n,
                        text: format!("line {n}"),
                    })
                    .collect(),
            })
        };
        let items = match (broken, n) {
            (true, _) => vec![lines(&[1]), Err(Status::internal("internal error"))],
            (false, 1) => vec![
                lines(&[]),
                lines(&[1, 2]),
                Err(Status::unavailable(
                    "job-service is shutting down; resume from cursor `1:2`",
                )),
            ],
            (false, _) => vec![lines(&[3])],
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn create_pipeline(
        &self,
        _: Request<pb::CreatePipelineRequest>,
    ) -> Result<Response<pb::CreatePipelineResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn get_pipeline(
        &self,
        _: Request<pb::GetPipelineRequest>,
    ) -> Result<Response<pb::GetPipelineResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn list_pipelines(
        &self,
        _: Request<pb::ListPipelinesRequest>,
    ) -> Result<Response<pb::ListPipelinesResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn resume_pipeline(
        &self,
        _: Request<pb::ResumePipelineRequest>,
    ) -> Result<Response<pb::ResumePipelineResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn cancel_pipeline(
        &self,
        _: Request<pb::CancelPipelineRequest>,
    ) -> Result<Response<pb::CancelPipelineResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

struct Served {
    addr: SocketAddr,
    fake: Fake,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve(final_state: pb::JobState, watch_served: bool) -> Served {
    let fake = Fake {
        seen: Arc::default(),
        state: Arc::new(Mutex::new(pb::JobState::Pending)),
        final_state,
        watch_served,
    };
    let (listener, addr) = testing::listener().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (trigger, _watch) = server::shutdown_pair();
    let routes = tonic::service::Routes::new(JobServiceServer::new(fake.clone()));
    tokio::spawn(server::serve(
        "fake-job-service",
        routes,
        &[],
        listener,
        testing::test_tokens().store,
        server::ServerOptions::default(),
        trigger,
        async move {
            let _ = stop_rx.await;
        },
    ));
    Served {
        addr,
        fake,
        _stop: stop_tx,
    }
}

fn cli(addr: SocketAddr, token: &str, args: &[&str]) -> trainctl::cli::Cli {
    let endpoint = addr.to_string();
    let mut argv = vec![
        "trainctl",
        "--job-endpoint",
        &endpoint,
        "--token",
        token,
        "--correlation-id",
        "test-cid-1",
    ];
    argv.extend_from_slice(args);
    trainctl::cli::Cli::try_parse_from(argv).unwrap()
}

fn spec_file(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("job.yaml");
    std::fs::write(
        &path,
        "name: demo\ncommand: [python3, train.py]\nlabels: {team: ml}\ndeadline: 1h\n",
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn submit_sends_the_spec_with_token_key_and_correlation_id() {
    let s = serve(pb::JobState::Succeeded, true).await;
    let dir = tempfile::tempdir().unwrap();
    let file = spec_file(&dir);
    let code = trainctl::run(cli(
        s.addr,
        "alice-token",
        &["submit", &file, "--idempotency-key", "k-1"],
    ))
    .await;
    assert_eq!(code, 0);
    let seen = s.fake.seen.lock().unwrap();
    let req = &seen.created[0];
    assert_eq!(req.idempotency_key, "k-1");
    let spec = req.spec.as_ref().unwrap();
    assert_eq!(spec.name, "demo");
    assert_eq!(spec.command, ["python3", "train.py"]);
    assert_eq!(spec.labels["team"], "ml");
    assert_eq!(spec.deadline.as_ref().unwrap().seconds, 3600);
    assert_eq!(seen.users, ["alice"]);
    assert_eq!(seen.correlation_ids, ["test-cid-1"]);
}

#[tokio::test]
async fn submit_wait_follows_a_broken_stream_and_exits_0_on_success() {
    let s = serve(pb::JobState::Succeeded, true).await;
    let dir = tempfile::tempdir().unwrap();
    let file = spec_file(&dir);
    let code = trainctl::run(cli(s.addr, "alice-token", &["submit", &file, "--wait"])).await;
    assert_eq!(code, 0);
    let seen = s.fake.seen.lock().unwrap();
    assert_eq!(seen.watches.len(), 2);
    assert!(seen.watches[0].from_start && seen.watches[0].cursor.is_empty());
    assert_eq!(seen.watches[0].job_id, "job-1");
    assert_eq!(seen.watches[1].cursor, "c2");
    assert!(!seen.watches[1].from_start);
    assert!(seen.correlation_ids.iter().all(|c| c == "test-cid-1"));
}

#[tokio::test]
async fn submit_wait_exits_1_when_the_job_fails() {
    let s = serve(pb::JobState::Failed, true).await;
    let dir = tempfile::tempdir().unwrap();
    let file = spec_file(&dir);
    let code = trainctl::run(cli(
        s.addr,
        "alice-token",
        &["submit", &file, "--wait", "-o", "json"],
    ))
    .await;
    assert_eq!(code, 1);
}

#[tokio::test]
async fn submit_wait_polls_when_watch_is_not_served() {
    let s = serve(pb::JobState::Succeeded, false).await;
    let state = s.fake.state.clone();
    let seen = s.fake.seen.clone();
    // The job finishes only after the CLI has polled it once while pending,
    // so the test proves polling, not a lucky first read.
    tokio::spawn(async move {
        testing::wait_for("a GetJob poll", std::time::Duration::from_secs(30), || {
            let polled = seen.lock().unwrap().gets > 0;
            async move { polled.then_some(()) }
        })
        .await;
        *state.lock().unwrap() = pb::JobState::Succeeded;
    });
    let dir = tempfile::tempdir().unwrap();
    let file = spec_file(&dir);
    let code = trainctl::run(cli(s.addr, "alice-token", &["submit", &file, "--wait"])).await;
    assert_eq!(code, 0);
}

#[tokio::test]
async fn list_passes_filters() {
    let s = serve(pb::JobState::Succeeded, true).await;
    let code = trainctl::run(cli(
        s.addr,
        "admin-token",
        &[
            "list",
            "--state",
            "running",
            "--state",
            "failed",
            "--label",
            "team=ml",
            "--owner",
            "bob",
            "--limit",
            "5",
            "--page-token",
            "p2",
        ],
    ))
    .await;
    assert_eq!(code, 0);
    let seen = s.fake.seen.lock().unwrap();
    let req = &seen.lists[0];
    assert_eq!(
        req.states,
        [pb::JobState::Running as i32, pb::JobState::Failed as i32]
    );
    assert_eq!(req.label_selector, ["team=ml"]);
    assert_eq!(req.owner, "bob");
    assert_eq!(req.page_size, 5);
    assert_eq!(req.page_token, "p2");
}

#[tokio::test]
async fn errors_exit_1() {
    let s = serve(pb::JobState::Succeeded, true).await;
    assert_eq!(
        trainctl::run(cli(s.addr, "alice-token", &["get", "nope"])).await,
        1
    );
    assert_eq!(
        trainctl::run(cli(s.addr, "wrong-token", &["get", "job-1"])).await,
        1
    );
    assert_eq!(
        trainctl::run(cli(s.addr, "alice-token", &["get", "job-1", "-o", "json"])).await,
        0
    );
}

#[tokio::test]
async fn unknown_field_in_the_spec_is_refused_before_any_call() {
    let s = serve(pb::JobState::Succeeded, true).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "name: x\nimage_name: y\n").unwrap();
    let code = trainctl::run(cli(
        s.addr,
        "alice-token",
        &["submit", path.to_str().unwrap()],
    ))
    .await;
    assert_eq!(code, 1);
    assert!(s.fake.seen.lock().unwrap().created.is_empty());
}

#[tokio::test]
async fn logs_follow_resumes_from_the_cursor_after_unavailable() {
    let s = serve(pb::JobState::Running, true).await;
    let code = trainctl::run(cli(
        s.addr,
        "alice-token",
        &["logs", "job-1", "-f", "--tail", "5"],
    ))
    .await;
    assert_eq!(code, 0, "only the real end of the stream is a success");
    let seen = s.fake.seen.lock().unwrap();
    assert_eq!(seen.logs.len(), 2);
    assert_eq!(
        (seen.logs[0].cursor.as_str(), seen.logs[0].tail_lines),
        ("", 5)
    );
    assert!(seen.logs[0].follow && seen.logs[1].follow);
    assert_eq!(seen.logs[1].cursor, "1:2");
}

#[tokio::test]
async fn logs_stop_on_an_error_about_the_request_with_exit_1() {
    let s = serve(pb::JobState::Running, true).await;
    let code = trainctl::run(cli(s.addr, "alice-token", &["logs", "job-broken", "-f"])).await;
    assert_eq!(code, 1);
    // An answer from the server is not a broken connection: no retry.
    assert_eq!(s.fake.seen.lock().unwrap().logs.len(), 1);
}
