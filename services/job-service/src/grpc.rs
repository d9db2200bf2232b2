//! Thin gRPC adapter: authenticate, convert proto ⇄ domain, map errors.

use std::sync::Arc;

use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use trainmesh_common::auth::{caller, service};
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::server::ShutdownWatch;
use trainmesh_common::stream::{until_shutdown, BoxStream};

use crate::domain::{encode_cursor, LogQuery, StatusUpdate};
use crate::repo::{AttemptRecord, EventRecord, JobRecord};
use crate::service::{ts, JobService, JobView};
use crate::stream::{LogBatch, StreamTiming, WatchItem};

/// `trainmesh.job.v1.JobService`.
#[derive(Clone)]
pub struct JobApi {
    pub svc: Arc<JobService>,
    pub timing: StreamTiming,
    pub shutdown: ShutdownWatch,
}

/// `trainmesh.job.v1.JobInternalService` (role `service` only).
#[derive(Clone)]
pub struct JobInternalApi {
    pub svc: Arc<JobService>,
}

/// How streams name this service when they end at shutdown.
const SERVICE: &str = "job-service";

fn attempt_to_proto(a: &AttemptRecord) -> pb::Attempt {
    pb::Attempt {
        number: i32::try_from(a.number).unwrap_or(i32::MAX),
        runner_id: a.runner_id.clone(),
        runner_name: a.runner_name.clone(),
        state: a.state.to_proto() as i32,
        create_time: ts(a.create_time),
        start_time: ts(a.start_time),
        end_time: ts(a.end_time),
        exit_code: a.exit_code.map(|c| i32::try_from(c).unwrap_or(i32::MAX)),
        error: a.error.clone(),
    }
}

fn job_to_proto(job: JobRecord, attempts: &[AttemptRecord]) -> pb::Job {
    pb::Job {
        id: job.id.to_string(),
        owner: job.owner,
        org: job.org,
        spec: Some(job.spec),
        state: job.state.to_proto() as i32,
        failure_cause: job.failure_cause as i32,
        error: job.error,
        error_message: job.error_message,
        state_reason: job.state_reason,
        attempts: attempts.iter().map(attempt_to_proto).collect(),
        create_time: ts(job.create_time),
        update_time: ts(job.update_time),
        start_time: ts(job.start_time),
        end_time: ts(job.end_time),
        correlation_id: job.correlation_id,
        cancel_requested: job.cancel_requested,
        pipeline_id: job.pipeline_id,
        pipeline_stage: job.pipeline_stage,
        diagnosis: job.diagnosis,
    }
}

pub fn view_to_proto(v: JobView) -> pb::Job {
    job_to_proto(v.job, &v.attempts)
}

/// A list shows the first line of `error_message` and no traceback (GetJob
/// has the whole error), so a page of 500 failed jobs stays small.
fn list_item(v: JobView) -> pb::Job {
    let mut job = view_to_proto(v);
    if let Some(first) = job.error_message.lines().next() {
        job.error_message = first.to_owned();
    }
    if let Some(e) = &mut job.error {
        e.traceback.clear();
    }
    for a in &mut job.attempts {
        if let Some(e) = &mut a.error {
            e.traceback.clear();
        }
    }
    job
}

fn event_to_proto(e: EventRecord) -> pb::JobEvent {
    pb::JobEvent {
        job_id: e.job_id,
        sequence: e.sequence,
        cursor: encode_cursor(e.id),
        r#type: e.event_type,
        state: e.state.map(|s| s.to_proto() as i32).unwrap_or(0),
        previous_state: e.previous_state.map(|s| s.to_proto() as i32).unwrap_or(0),
        message: e.message,
        time: ts(e.time),
        attempt: i32::try_from(e.attempt).unwrap_or(i32::MAX),
    }
}

fn watch_item_to_proto(item: WatchItem) -> pb::WatchJobsResponse {
    use pb::watch_jobs_response::Kind;
    let kind = match item {
        WatchItem::Event(e) => Kind::Event(event_to_proto(e)),
        WatchItem::Heartbeat { time, cursor } => Kind::Heartbeat(pb::Heartbeat {
            time: Some(trainmesh_common::time::to_timestamp(time)),
            cursor: encode_cursor(cursor),
        }),
    };
    pb::WatchJobsResponse { kind: Some(kind) }
}

/// The position a WatchJobs message lets a client resume from.
fn watch_cursor(m: &pb::WatchJobsResponse) -> Option<&str> {
    use pb::watch_jobs_response::Kind;
    match m.kind.as_ref()? {
        Kind::Event(e) => Some(e.cursor.as_str()),
        Kind::Heartbeat(h) => Some(h.cursor.as_str()),
    }
}

fn log_batch_to_proto(b: LogBatch) -> pb::StreamJobLogsResponse {
    let attempt = i32::try_from(b.attempt).unwrap_or(i32::MAX);
    pb::StreamJobLogsResponse {
        cursor: b.cursor.encode(),
        lines: b
            .lines
            .into_iter()
            .map(|l| pb::LogLine {
                attempt,
                number: l.number,
                text: l.text,
            })
            .collect(),
    }
}

fn pipelines_later() -> Status {
    Status::unimplemented("pipelines arrive with a later release of trainmesh")
}

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobApi {
    async fn create_job(
        &self,
        req: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::CreateJobResponse>, Status> {
        let who = caller(&req)?;
        who.require_person()?;
        let r = req.into_inner();
        let (view, existing) = self.svc.create(&who, r.spec, &r.idempotency_key).await?;
        Ok(Response::new(pb::CreateJobResponse {
            job: Some(view_to_proto(view)),
            existing,
        }))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let who = caller(&req)?;
        let view = self.svc.get(&who, &req.get_ref().job_id).await?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(view_to_proto(view)),
        }))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let (views, next) = self
            .svc
            .list(
                &who,
                &r.states,
                &r.label_selector,
                &r.owner,
                r.page_size,
                &r.page_token,
            )
            .await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: views.into_iter().map(list_item).collect(),
            next_page_token: next,
        }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let who = caller(&req)?;
        who.require_person()?;
        let r = req.into_inner();
        let view = self.svc.cancel(&who, &r.job_id, &r.reason).await?;
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(view_to_proto(view)),
        }))
    }

    async fn retry_job(
        &self,
        req: Request<pb::RetryJobRequest>,
    ) -> Result<Response<pb::RetryJobResponse>, Status> {
        let who = caller(&req)?;
        who.require_person()?;
        let view = self.svc.retry(&who, &req.get_ref().job_id).await?;
        Ok(Response::new(pb::RetryJobResponse {
            job: Some(view_to_proto(view)),
        }))
    }

    async fn delete_job(
        &self,
        req: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let who = caller(&req)?;
        who.require_person()?;
        self.svc.delete(&who, &req.get_ref().job_id).await?;
        Ok(Response::new(pb::DeleteJobResponse {}))
    }

    type WatchJobsStream = BoxStream<pb::WatchJobsResponse>;

    async fn watch_jobs(
        &self,
        req: Request<pb::WatchJobsRequest>,
    ) -> Result<Response<Self::WatchJobsStream>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let rx = self
            .svc
            .watch(
                &who,
                &r.job_id,
                &r.cursor,
                r.from_start,
                self.timing,
                self.shutdown.clone(),
            )
            .await?;
        let stream =
            ReceiverStream::new(rx).map(|item| item.map(watch_item_to_proto).map_err(Status::from));
        Ok(Response::new(until_shutdown(
            SERVICE,
            stream,
            self.shutdown.clone(),
            r.cursor,
            watch_cursor,
        )))
    }

    type StreamJobLogsStream = BoxStream<pb::StreamJobLogsResponse>;

    async fn stream_job_logs(
        &self,
        req: Request<pb::StreamJobLogsRequest>,
    ) -> Result<Response<Self::StreamJobLogsStream>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let start = r.cursor.clone();
        let query = LogQuery::try_from(r)?;
        let rx = self
            .svc
            .stream_logs(&who, query, self.timing, self.shutdown.clone())
            .await?;
        let stream =
            ReceiverStream::new(rx).map(|item| item.map(log_batch_to_proto).map_err(Status::from));
        Ok(Response::new(until_shutdown(
            SERVICE,
            stream,
            self.shutdown.clone(),
            start,
            |m: &pb::StreamJobLogsResponse| Some(m.cursor.as_str()),
        )))
    }

    async fn create_pipeline(
        &self,
        req: Request<pb::CreatePipelineRequest>,
    ) -> Result<Response<pb::CreatePipelineResponse>, Status> {
        caller(&req)?;
        Err(pipelines_later())
    }

    async fn get_pipeline(
        &self,
        req: Request<pb::GetPipelineRequest>,
    ) -> Result<Response<pb::GetPipelineResponse>, Status> {
        caller(&req)?;
        Err(pipelines_later())
    }

    async fn list_pipelines(
        &self,
        req: Request<pb::ListPipelinesRequest>,
    ) -> Result<Response<pb::ListPipelinesResponse>, Status> {
        caller(&req)?;
        Err(pipelines_later())
    }

    async fn resume_pipeline(
        &self,
        req: Request<pb::ResumePipelineRequest>,
    ) -> Result<Response<pb::ResumePipelineResponse>, Status> {
        caller(&req)?;
        Err(pipelines_later())
    }

    async fn cancel_pipeline(
        &self,
        req: Request<pb::CancelPipelineRequest>,
    ) -> Result<Response<pb::CancelPipelineResponse>, Status> {
        caller(&req)?;
        Err(pipelines_later())
    }
}

#[tonic::async_trait]
impl pb::job_internal_service_server::JobInternalService for JobInternalApi {
    async fn update_job_status(
        &self,
        req: Request<pb::UpdateJobStatusRequest>,
    ) -> Result<Response<pb::UpdateJobStatusResponse>, Status> {
        caller(&req)?.require_service(service::SCHEDULER)?;
        let update = StatusUpdate::try_from(req.into_inner())?;
        let view = self.svc.update_status(update).await?;
        Ok(Response::new(pb::UpdateJobStatusResponse {
            job: Some(view_to_proto(view)),
        }))
    }

    async fn append_job_logs(
        &self,
        req: Request<pb::AppendJobLogsRequest>,
    ) -> Result<Response<pb::AppendJobLogsResponse>, Status> {
        let who = caller(&req)?;
        let runner = who.require_runner()?;
        let r = req.into_inner();
        let last_number = self
            .svc
            .append_logs(runner, &r.job_id, r.attempt, r.lines)
            .await?;
        Ok(Response::new(pb::AppendJobLogsResponse { last_number }))
    }

    async fn attach_diagnosis(
        &self,
        req: Request<pb::AttachDiagnosisRequest>,
    ) -> Result<Response<pb::AttachDiagnosisResponse>, Status> {
        caller(&req)?.require_service(service::DIAGNOSIS)?;
        let r = req.into_inner();
        let d = r.diagnosis.ok_or_else(|| {
            Status::from(trainmesh_common::error::FieldError::new(
                "diagnosis",
                "is required",
            ))
        })?;
        self.svc.attach_diagnosis(&r.job_id, d).await?;
        Ok(Response::new(pb::AttachDiagnosisResponse {}))
    }
}
