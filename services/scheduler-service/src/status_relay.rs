//! Delivers the outbox's status updates to job-service
//! (`JobInternalService.UpdateJobStatus`) with the service token. The relay
//! keeps them in order per job and retries transient failures; job-service
//! ignores stale and duplicate sequences, so a redelivery is harmless.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tracing::Instrument;
use trainmesh_common::outbox::{classify, Deliver, Delivery, OutboxMessage};
use trainmesh_common::proto::job::v1::job_internal_service_client::JobInternalServiceClient;
use trainmesh_common::proto::job::v1::{JobState, UpdateJobStatusRequest};
use trainmesh_common::tls::ClientTls;

use crate::repo::STATUS_TOPIC;

/// How long one delivery may take before it is retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub fn deliverer(
    job_endpoint: &str,
    service_token: Option<&str>,
    tls: &ClientTls,
) -> anyhow::Result<Deliver> {
    let channel = trainmesh_common::client::channel_with(job_endpoint, service_token, tls)?;
    let client = JobInternalServiceClient::new(channel);
    Ok(Arc::new(move |msg: OutboxMessage| {
        let mut client = client.clone();
        Box::pin(async move {
            if msg.topic != STATUS_TOPIC {
                return Delivery::Drop(format!("unknown outbox topic `{}`", msg.topic));
            }
            let req = match UpdateJobStatusRequest::decode(msg.payload.as_slice()) {
                Ok(r) => r,
                Err(e) => return Delivery::Drop(format!("undecodable status update: {e}")),
            };
            let state = JobState::try_from(req.state)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN");
            let span = tracing::info_span!(
                "status_update",
                job_id = %msg.key,
                correlation_id = %msg.correlation_id,
                state,
                scheduler_sequence = req.scheduler_sequence,
            );
            async move {
                match tokio::time::timeout(CALL_TIMEOUT, client.update_job_status(req)).await {
                    Ok(Ok(_)) => {
                        tracing::debug!("status update delivered to job-service");
                        Delivery::Done
                    }
                    Ok(Err(status)) => classify(&status),
                    Err(_) => Delivery::Unreachable("job-service did not answer in time".into()),
                }
            }
            .instrument(span)
            .await
        })
    }))
}
