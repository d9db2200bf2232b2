//! What the diagnosis-service tests share: an in-test job-service (a real
//! tonic peer that serves GetJob and StreamJobLogs), an in-test
//! chat-completions endpoint ([`fake_llm`]), and the service under test
//! started on port 0.

#![allow(dead_code)]

pub mod fake_llm;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use diagnosis_service::{run, Config};
use dpb::diagnosis_service_client::DiagnosisServiceClient;
use jpb::job_service_server::{JobService, JobServiceServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use trainmesh_common::client::{self, Channel};
use trainmesh_common::proto::diagnosis::v1 as dpb;
use trainmesh_common::proto::job::v1 as jpb;
use trainmesh_common::testing::{self, TestDb};

/// job-service as far as diagnosis-service uses it.
#[derive(Default)]
pub struct FakeJobs {
    pub jobs: Mutex<HashMap<String, (jpb::Job, Vec<String>)>>,
    /// Correlation ids GetJob was called with.
    pub seen_correlation_ids: Mutex<Vec<String>>,
}

impl FakeJobs {
    fn check_service_token<T>(req: &Request<T>) -> Result<(), Status> {
        let expected = format!("Bearer {}", testing::test_tokens().diagnosis);
        match req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            Some(v) if v == expected => Ok(()),
            _ => Err(Status::unauthenticated(
                "fake job-service wants the service token",
            )),
        }
    }
}

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not in the fake"))
}

type LogStream = Pin<Box<dyn Stream<Item = Result<jpb::StreamJobLogsResponse, Status>> + Send>>;
type WatchStream = Pin<Box<dyn Stream<Item = Result<jpb::WatchJobsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for FakeJobs {
    async fn get_job(
        &self,
        req: Request<jpb::GetJobRequest>,
    ) -> Result<Response<jpb::GetJobResponse>, Status> {
        FakeJobs::check_service_token(&req)?;
        if let Some(cid) = req
            .metadata()
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok())
        {
            self.seen_correlation_ids
                .lock()
                .unwrap()
                .push(cid.to_owned());
        }
        let jobs = self.jobs.lock().unwrap();
        match jobs.get(&req.get_ref().job_id) {
            Some((job, _)) => Ok(Response::new(jpb::GetJobResponse {
                job: Some(job.clone()),
            })),
            None => Err(Status::not_found("job not found")),
        }
    }

    type StreamJobLogsStream = LogStream;

    async fn stream_job_logs(
        &self,
        req: Request<jpb::StreamJobLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        FakeJobs::check_service_token(&req)?;
        let r = req.into_inner();
        assert!(!r.follow, "diagnosis must not follow logs");
        let jobs = self.jobs.lock().unwrap();
        let Some((_, log)) = jobs.get(&r.job_id) else {
            return Err(Status::not_found("job not found"));
        };
        let numbered: Vec<jpb::LogLine> = log
            .iter()
            .enumerate()
            .map(|(i, t)| jpb::LogLine {
                attempt: 1,
                number: i as i64 + 1,
                text: t.clone(),
            })
            .collect();
        let tail = r.tail_lines.max(0) as usize;
        let start = if tail == 0 {
            0
        } else {
            numbered.len().saturating_sub(tail)
        };
        let msgs: Vec<Result<jpb::StreamJobLogsResponse, Status>> = numbered[start..]
            .chunks(100)
            .map(|c| {
                Ok(jpb::StreamJobLogsResponse {
                    lines: c.to_vec(),
                    cursor: String::new(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }

    async fn create_job(
        &self,
        _: Request<jpb::CreateJobRequest>,
    ) -> Result<Response<jpb::CreateJobResponse>, Status> {
        unimplemented()
    }
    async fn list_jobs(
        &self,
        _: Request<jpb::ListJobsRequest>,
    ) -> Result<Response<jpb::ListJobsResponse>, Status> {
        unimplemented()
    }
    async fn cancel_job(
        &self,
        _: Request<jpb::CancelJobRequest>,
    ) -> Result<Response<jpb::CancelJobResponse>, Status> {
        unimplemented()
    }
    async fn retry_job(
        &self,
        _: Request<jpb::RetryJobRequest>,
    ) -> Result<Response<jpb::RetryJobResponse>, Status> {
        unimplemented()
    }
    async fn delete_job(
        &self,
        _: Request<jpb::DeleteJobRequest>,
    ) -> Result<Response<jpb::DeleteJobResponse>, Status> {
        unimplemented()
    }
    type WatchJobsStream = WatchStream;
    async fn watch_jobs(
        &self,
        _: Request<jpb::WatchJobsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        unimplemented()
    }
    async fn create_pipeline(
        &self,
        _: Request<jpb::CreatePipelineRequest>,
    ) -> Result<Response<jpb::CreatePipelineResponse>, Status> {
        unimplemented()
    }
    async fn get_pipeline(
        &self,
        _: Request<jpb::GetPipelineRequest>,
    ) -> Result<Response<jpb::GetPipelineResponse>, Status> {
        unimplemented()
    }
    async fn list_pipelines(
        &self,
        _: Request<jpb::ListPipelinesRequest>,
    ) -> Result<Response<jpb::ListPipelinesResponse>, Status> {
        unimplemented()
    }
    async fn resume_pipeline(
        &self,
        _: Request<jpb::ResumePipelineRequest>,
    ) -> Result<Response<jpb::ResumePipelineResponse>, Status> {
        unimplemented()
    }
    async fn cancel_pipeline(
        &self,
        _: Request<jpb::CancelPipelineRequest>,
    ) -> Result<Response<jpb::CancelPipelineResponse>, Status> {
        unimplemented()
    }
}

pub async fn start_fake_jobs(fake: Arc<FakeJobs>) -> SocketAddr {
    let (listener, addr) = testing::listener().await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(JobServiceServer::from_arc(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

pub struct Diag {
    pub addr: SocketAddr,
    served: testing::Served,
}

impl Diag {
    pub async fn start(
        db: &TestDb,
        job_endpoint: &str,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        testing::init_test_logging();
        let tokens = testing::test_tokens();
        let mut config = Config::new(
            tokens.store.clone(),
            db.url.clone(),
            job_endpoint,
            Some(tokens.diagnosis.to_owned()),
        );
        configure(&mut config);
        let served = testing::Served::start(|l, stop| run(config, l, stop)).await;
        Self {
            addr: served.addr,
            served,
        }
    }

    pub fn client(&self, token: &str) -> DiagnosisServiceClient<Channel> {
        DiagnosisServiceClient::new(client::channel(&self.addr.to_string(), Some(token)).unwrap())
    }

    pub async fn stop(self) {
        self.served.stop().await;
    }
}

impl FakeJobs {
    pub fn add(&self, job: jpb::Job, log: Vec<String>) {
        self.jobs.lock().unwrap().insert(job.id.clone(), (job, log));
    }
}
