//! Delivery of job-service's outbox messages.
//!
//! | topic      | call                                              |
//! |------------|---------------------------------------------------|
//! | `enqueue`  | `SchedulerInternalService.EnqueueJob`             |
//! | `cancel`   | `SchedulerInternalService.CancelQueuedJob`        |
//! | `diagnose` | `DiagnosisService.DiagnoseJob`, then the summary is stored on the job |
//!
//! Messages are keyed by job id (`diagnose:<job id>` for diagnoses, which
//! need no order with the scheduler's messages). Payloads are the
//! prost-encoded request messages; the receivers are
//! idempotent, so a redelivery after a crash changes nothing.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tracing::Instrument;
use trainmesh_common::client::Channel;
use trainmesh_common::error::{ErrorCode, ServiceError};
use trainmesh_common::outbox::{classify, Deliver, Delivery, OutboxMessage};
use trainmesh_common::proto::diagnosis::v1 as dpb;
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::proto::scheduler::v1 as spb;

use crate::service::{JobService, TOPIC_CANCEL, TOPIC_DIAGNOSE, TOPIC_ENQUEUE};

/// A peer that hangs must not hold up the relay for ever.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The peers the relay calls.
#[derive(Clone)]
pub struct Peers {
    pub scheduler: Channel,
    pub diagnosis: Option<Channel>,
}

pub fn deliver(svc: Arc<JobService>, peers: Peers) -> Deliver {
    Arc::new(move |msg: OutboxMessage| {
        let svc = svc.clone();
        let peers = peers.clone();
        let span = tracing::info_span!(
            "outbox",
            topic = %msg.topic,
            job_id = %msg.key.trim_start_matches("diagnose:"),
            correlation_id = %msg.correlation_id,
            attempt = msg.attempts
        );
        Box::pin(
            async move {
                let outcome = deliver_one(&svc, &peers, &msg).await;
                match &outcome {
                    Delivery::Done => tracing::debug!("outbox message delivered"),
                    Delivery::Retry(why) => {
                        tracing::info!(error = %why, "outbox delivery failed; will retry")
                    }
                    Delivery::Unreachable(why) => {
                        tracing::debug!(error = %why, "outbox destination unreachable")
                    }
                    Delivery::Drop(_) => {}
                }
                outcome
            }
            .instrument(span),
        )
    })
}

/// The peer's answer, or `Err` when it gave none in time.
async fn answer<T>(
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<Result<T, tonic::Status>, Delivery> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(answer) => Ok(answer.map(tonic::Response::into_inner)),
        Err(_) => Err(Delivery::Unreachable(format!(
            "no answer within {}s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

async fn call<T>(
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Delivery> {
    answer(fut).await?.map_err(|status| classify(&status))
}

fn decode<M: Message + Default>(msg: &OutboxMessage) -> Result<M, Delivery> {
    M::decode(msg.payload.as_slice())
        .map_err(|e| Delivery::Drop(format!("undecodable `{}` payload: {e}", msg.topic)))
}

async fn deliver_one(svc: &Arc<JobService>, peers: &Peers, msg: &OutboxMessage) -> Delivery {
    let result = match msg.topic.as_str() {
        TOPIC_ENQUEUE => enqueue(svc, peers, msg).await,
        TOPIC_CANCEL => cancel(peers, msg).await,
        TOPIC_DIAGNOSE => diagnose(svc, peers, msg).await,
        other => Err(Delivery::Drop(format!("unknown outbox topic `{other}`"))),
    };
    result.unwrap_or_else(|d| d)
}

/// A refusal ends the job FAILED with the scheduler's reason: dropping the
/// message alone would leave the job PENDING for ever.
async fn enqueue(
    svc: &Arc<JobService>,
    peers: &Peers,
    msg: &OutboxMessage,
) -> Result<Delivery, Delivery> {
    let req: spb::EnqueueJobRequest = decode(msg)?;
    let job_id = req.job_id.clone();
    let mut client = spb::scheduler_internal_service_client::SchedulerInternalServiceClient::new(
        peers.scheduler.clone(),
    );
    let status = match answer(client.enqueue_job(req)).await? {
        Ok(resp) => {
            tracing::info!(created = resp.created, "job handed to the scheduler");
            return Ok(Delivery::Done);
        }
        Err(status) => status,
    };
    match classify(&status) {
        Delivery::Drop(_) => Ok(match svc.refuse(&job_id, status.message()).await {
            Ok(()) => Delivery::Done,
            Err(e) => after_local_error(e),
        }),
        other => Err(other),
    }
}

/// What to do with a message whose delivery got through but whose local
/// follow-up failed.
fn after_local_error(e: crate::error::Error) -> Delivery {
    match e.code() {
        // Deleted meanwhile: nothing left to change.
        ErrorCode::NotFound => Delivery::Done,
        ErrorCode::Unavailable | ErrorCode::Internal => Delivery::Retry(e.to_string()),
        _ => Delivery::Drop(e.to_string()),
    }
}

async fn cancel(peers: &Peers, msg: &OutboxMessage) -> Result<Delivery, Delivery> {
    let req: spb::CancelQueuedJobRequest = decode(msg)?;
    let mut client = spb::scheduler_internal_service_client::SchedulerInternalServiceClient::new(
        peers.scheduler.clone(),
    );
    call(client.cancel_queued_job(req)).await?;
    tracing::info!("cancel handed to the scheduler");
    Ok(Delivery::Done)
}

async fn diagnose(
    svc: &JobService,
    peers: &Peers,
    msg: &OutboxMessage,
) -> Result<Delivery, Delivery> {
    let Some(channel) = &peers.diagnosis else {
        return Ok(Delivery::Drop("no diagnosis endpoint is configured".into()));
    };
    let req: dpb::DiagnoseJobRequest = decode(msg)?;
    let job_id = req.job_id.clone();
    let mut client = dpb::diagnosis_service_client::DiagnosisServiceClient::new(channel.clone());
    // The deadline travels with the call (grpc-timeout), so the diagnosis
    // can give an optional LLM only the time that leaves, and answer
    // before the relay gives up and delivers the message again.
    let mut req = tonic::Request::new(req);
    req.set_timeout(CALL_TIMEOUT);
    let resp = call(client.diagnose_job(req)).await?;
    let Some(d) = resp.diagnosis else {
        return Ok(Delivery::Drop(
            "DiagnoseJob answered without a diagnosis".into(),
        ));
    };
    let summary = pb::DiagnosisSummary {
        diagnosis_id: d.id,
        healthy: d.healthy,
        error: d.error,
        solution: d.solution,
    };
    match svc.attach_diagnosis(&job_id, summary).await {
        Ok(()) => {
            tracing::info!("diagnosis attached");
            Ok(Delivery::Done)
        }
        Err(e) => Ok(after_local_error(e)),
    }
}
