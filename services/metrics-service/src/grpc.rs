//! gRPC adapter: proto ⇄ domain, the owner check, errors → `Status`.
//!
//! Users write and read only their own jobs' metrics, runners write those
//! of the attempts placed on them, services and admins read any job's (who
//! owns and ran a job lives in job-service; see [`crate::owners`]).

use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use trainmesh_common::auth::{self, Caller};
use trainmesh_common::error::FieldError;
use trainmesh_common::inbound::stream_message_status;
use trainmesh_common::proto::metrics::v1 as pb;
use trainmesh_common::server::ShutdownWatch;
use trainmesh_common::stream::{until_shutdown, BoxStream};

use crate::domain::{JobId, LatestQuery, Point, RangeQuery, WatchQuery, WriteBatch};
use crate::owners::JobOwners;
use crate::service::Metrics;

#[derive(Debug, Clone)]
pub struct MetricsGrpc {
    svc: Arc<Metrics>,
    shutdown: ShutdownWatch,
    /// `None`: not checked (a metrics-service run alone, in tests).
    owners: Option<Arc<JobOwners>>,
    max_message_bytes: usize,
}

impl MetricsGrpc {
    pub fn new(
        svc: Arc<Metrics>,
        shutdown: ShutdownWatch,
        owners: Option<Arc<JobOwners>>,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            svc,
            shutdown,
            owners,
            max_message_bytes,
        }
    }

    async fn may_use(&self, caller: &Caller, job: JobId) -> Result<(), Status> {
        match &self.owners {
            Some(owners) => Ok(owners.check(caller, job).await?),
            None => Ok(()),
        }
    }

    async fn may_write(&self, caller: &Caller, batch: &WriteBatch) -> Result<(), Status> {
        match &self.owners {
            Some(owners) => Ok(owners
                .check_write(caller, batch.job_id, batch.attempt)
                .await?),
            None => Ok(()),
        }
    }
}

fn points(points: &[Point]) -> Vec<pb::MetricPoint> {
    points.iter().map(Point::to_proto).collect()
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

type WatchStream = BoxStream<pb::WatchMetricsResponse>;

/// How streams name this service when they end at shutdown.
const SERVICE: &str = "metrics-service";

#[tonic::async_trait]
impl pb::metrics_service_server::MetricsService for MetricsGrpc {
    async fn write_metrics(
        &self,
        req: Request<pb::WriteMetricsRequest>,
    ) -> Result<Response<pb::WriteMetricsResponse>, Status> {
        let caller = auth::caller(&req)?;
        let batch = WriteBatch::try_from(req.into_inner())?;
        self.may_write(&caller, &batch).await?;
        let out = self.svc.write(batch).await?;
        Ok(Response::new(pb::WriteMetricsResponse {
            accepted: count(out.accepted),
            duplicates: count(out.duplicates),
        }))
    }

    async fn stream_write_metrics(
        &self,
        req: Request<Streaming<pb::StreamWriteMetricsRequest>>,
    ) -> Result<Response<pb::StreamWriteMetricsResponse>, Status> {
        let caller = auth::caller(&req)?;
        let mut stream = req.into_inner();
        let mut shutdown = self.shutdown.clone();
        let mut resp = pb::StreamWriteMetricsResponse::default();
        loop {
            // A client stream could keep the server from stopping for as
            // long as it writes: at shutdown, stop reading and say how far
            // it got (the batches are idempotent, so re-sending is safe).
            let msg = tokio::select! {
                biased;
                _ = shutdown.wait() => {
                    return Err(Status::unavailable(format!(
                        "{SERVICE} is shutting down; the first {} batches of this stream were \
                         stored; send the rest again (writes are idempotent)",
                        resp.batches
                    )));
                }
                msg = stream.next() => msg,
            };
            let Some(msg) = msg else { break };
            let msg = msg.map_err(|s| stream_message_status(self.max_message_bytes, s))?;
            let n = resp.batches + 1;
            let batch = WriteBatch::try_from(msg.batch.unwrap_or_default()).map_err(|e| {
                FieldError::new(
                    format!("batch.{}", e.field),
                    format!(
                        "{} (message {n} of the stream; the {} before it were stored)",
                        e.description, resp.batches
                    ),
                )
            })?;
            let written = match self.may_write(&caller, &batch).await {
                Ok(()) => self.svc.write(batch).await.map_err(Status::from),
                Err(status) => Err(status),
            };
            let out = written.map_err(|status| {
                Status::with_details(
                    status.code(),
                    format!(
                        "{} (message {n} of the stream; the {} before it were stored)",
                        status.message(),
                        resp.batches
                    ),
                    status.details().to_vec().into(),
                )
            })?;
            resp.accepted = resp.accepted.saturating_add(count(out.accepted));
            resp.duplicates = resp.duplicates.saturating_add(count(out.duplicates));
            resp.batches = n;
        }
        Ok(Response::new(resp))
    }

    async fn get_latest_metrics(
        &self,
        req: Request<pb::GetLatestMetricsRequest>,
    ) -> Result<Response<pb::GetLatestMetricsResponse>, Status> {
        let caller = auth::caller(&req)?;
        let q = LatestQuery::try_from(req.into_inner())?;
        self.may_use(&caller, q.job_id).await?;
        let latest = self.svc.latest(q).await?;
        Ok(Response::new(pb::GetLatestMetricsResponse {
            points: points(&latest.points),
            next_page_token: latest.next_page_token.unwrap_or_default(),
        }))
    }

    async fn query_metrics(
        &self,
        req: Request<pb::QueryMetricsRequest>,
    ) -> Result<Response<pb::QueryMetricsResponse>, Status> {
        let caller = auth::caller(&req)?;
        let q = RangeQuery::try_from(req.into_inner())?;
        self.may_use(&caller, q.job_id).await?;
        let series = self.svc.query(q).await?;
        Ok(Response::new(pb::QueryMetricsResponse {
            series: series
                .into_iter()
                .map(|s| pb::Series {
                    points: points(&s.points),
                    key: s.key.into_string(),
                    downsampled: s.downsampled,
                })
                .collect(),
        }))
    }

    async fn list_metric_keys(
        &self,
        req: Request<pb::ListMetricKeysRequest>,
    ) -> Result<Response<pb::ListMetricKeysResponse>, Status> {
        let caller = auth::caller(&req)?;
        let job = JobId::parse_field("job_id", &req.get_ref().job_id)?;
        self.may_use(&caller, job).await?;
        let keys = self.svc.keys(job).await?;
        Ok(Response::new(pb::ListMetricKeysResponse { keys }))
    }

    type WatchMetricsStream = WatchStream;

    async fn watch_metrics(
        &self,
        req: Request<pb::WatchMetricsRequest>,
    ) -> Result<Response<Self::WatchMetricsStream>, Status> {
        let caller = auth::caller(&req)?;
        let r = req.into_inner();
        let start = r.cursor.clone();
        let q = WatchQuery::try_from(r)?;
        self.may_use(&caller, q.job_id).await?;
        let rx = self.svc.watch(q, self.shutdown.clone()).await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| {
            item.map(|u| pb::WatchMetricsResponse {
                points: points(&u.points),
                cursor: u.cursor.to_string(),
                resync: u.resync,
            })
            .map_err(Status::from)
        });
        Ok(Response::new(until_shutdown(
            SERVICE,
            stream,
            self.shutdown.clone(),
            start,
            |m: &pb::WatchMetricsResponse| Some(m.cursor.as_str()),
        )))
    }

    async fn list_anomalies(
        &self,
        _req: Request<pb::ListAnomaliesRequest>,
    ) -> Result<Response<pb::ListAnomaliesResponse>, Status> {
        Err(Status::unimplemented(
            "ListAnomalies arrives with a later release",
        ))
    }
}
