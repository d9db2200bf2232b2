//! Ships an attempt's metrics file to metrics-service with the [`Tailer`]:
//! batches of complete lines, the cursor committed after each acknowledged
//! batch.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use trainmesh_common::client::Channel;
use trainmesh_common::proto::metrics::v1::metrics_service_client::MetricsServiceClient;
use trainmesh_common::proto::metrics::v1::WriteMetricsRequest;

use crate::domain::AttemptKey;
use crate::logs::Shipped;
use crate::rpc::{is_permanent, request, Backoff, CALL_TIMEOUT};
use crate::tailer::{Batch, Limits, Tailer};

/// Records refused one by one for a per-job cap, in a row, after which the
/// job is taken to be past its cap for good and shipping stops.
const CAPPED_IN_A_ROW: u32 = 100;

/// metrics-service's refusal of a batch that would take the job past a
/// per-job cap (points or keys): RESOURCE_EXHAUSTED with a QuotaFailure,
/// unlike load shedding, which a retry fixes.
fn is_cap(s: &tonic::Status) -> bool {
    use tonic_types::StatusExt;
    s.code() == tonic::Code::ResourceExhausted && s.get_error_details().quota_failure().is_some()
}

pub struct MetricsShipper {
    pub client: MetricsServiceClient<Channel>,
    pub key: AttemptKey,
    pub tailer: Tailer,
    pub interval: Duration,
    pub max_backoff: Duration,
}

impl MetricsShipper {
    /// Ships while the job runs; once `finish` names a deadline the job has
    /// exited: ship the rest (a last line without newline included), giving
    /// up at the deadline.
    pub async fn run(mut self, mut finish: watch::Receiver<Option<Instant>>) -> Shipped {
        let full = Limits::default();
        let mut limits = full;
        let mut shipped = 0u64;
        let mut capped_in_a_row = 0u32;
        let mut backoff = Backoff::new(Duration::from_millis(100), self.max_backoff);
        loop {
            let deadline = *finish.borrow();
            let (tailer, polled) = poll(self.tailer, limits, deadline.is_some()).await;
            self.tailer = tailer;
            let retry_in = match polled {
                Ok(None) => {
                    if deadline.is_some() {
                        return Shipped {
                            count: shipped,
                            complete: true,
                        };
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(self.interval) => {}
                        _ = finish.changed() => {}
                    }
                    continue;
                }
                Ok(Some(batch)) if batch.records.is_empty() => {
                    // Only invalid lines: move past them.
                    self.commit(&batch);
                    continue;
                }
                Ok(Some(batch)) => match self.send(&batch).await {
                    Ok(()) => {
                        shipped += batch.records.len() as u64;
                        self.commit(&batch);
                        limits = full;
                        capped_in_a_row = 0;
                        backoff.reset();
                        if batch.records.len() < limits.max_lines && deadline.is_none() {
                            tokio::select! {
                                _ = tokio::time::sleep(self.interval) => {}
                                _ = finish.changed() => {}
                            }
                        }
                        continue;
                    }
                    Err(s) if s.code() == tonic::Code::InvalidArgument || is_cap(&s) => {
                        // Too many points for one batch, a record the
                        // service rejects, or one past a per-job cap (a
                        // new key at the key cap, while points of known
                        // keys still go): halve until the refused record
                        // is alone, then skip it.
                        if batch.records.len() > 1 {
                            limits.max_lines = batch.records.len() / 2;
                            continue;
                        }
                        tracing::warn!(record = %batch.records[0].chars().take(200).collect::<String>(),
                            detail = s.message(), "metrics-service refused a record; skipping it");
                        self.commit(&batch);
                        if !is_cap(&s) {
                            limits = full;
                            continue;
                        }
                        // Past a cap, records go one at a time until one
                        // is taken again.
                        capped_in_a_row += 1;
                        if capped_in_a_row >= CAPPED_IN_A_ROW {
                            tracing::warn!(
                                detail = s.message(),
                                "the job is past its metrics cap; metrics shipping stops"
                            );
                            return Shipped {
                                count: shipped,
                                complete: false,
                            };
                        }
                        continue;
                    }
                    Err(s) if is_permanent(s.code()) => {
                        tracing::warn!(code = ?s.code(), detail = s.message(),
                            "metrics-service refused the attempt's metrics; metrics shipping stops");
                        return Shipped {
                            count: shipped,
                            complete: false,
                        };
                    }
                    Err(s) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(code = ?s.code(), detail = s.message(),
                            retry_in_ms = delay.as_millis() as u64, "cannot ship metrics; will retry");
                        delay
                    }
                },
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, path = %self.tailer.path().display(),
                        "cannot read the metrics file; will retry");
                    delay
                }
            };
            if deadline.is_some_and(|d| Instant::now() + retry_in > d) {
                tracing::warn!(
                    "flush deadline reached; unshipped metrics stay in the attempt's metrics file"
                );
                return Shipped {
                    count: shipped,
                    complete: false,
                };
            }
            tokio::select! {
                _ = tokio::time::sleep(retry_in) => {}
                _ = finish.changed(), if deadline.is_none() => {}
            }
        }
    }

    async fn send(&self, batch: &Batch) -> Result<(), tonic::Status> {
        let req = WriteMetricsRequest {
            job_id: self.key.job_id.to_string(),
            points: Vec::new(),
            json_records: batch.records.clone(),
            attempt: self.key.attempt,
        };
        self.client
            .clone()
            .write_metrics(request(req, CALL_TIMEOUT))
            .await
            .map(|_| ())
    }

    fn commit(&mut self, batch: &Batch) {
        if let Err(e) = self.tailer.commit(batch) {
            // The batch is acknowledged; only a restarted runner would send
            // it again, and metrics-service ignores duplicates.
            tracing::warn!(error = %e, "cannot persist the metrics cursor");
        }
    }
}

/// Polls on the blocking pool: file reads do not stall the runtime.
async fn poll(
    tailer: Tailer,
    limits: Limits,
    eof_is_end: bool,
) -> (Tailer, std::io::Result<Option<Batch>>) {
    let path = tailer.path().to_owned();
    match tokio::task::spawn_blocking(move || {
        let r = tailer.poll(limits, eof_is_end);
        (tailer, r)
    })
    .await
    {
        Ok(v) => v,
        Err(e) => {
            // The blocking task panicked: start over from the persisted
            // cursor rather than lose the attempt's metrics entirely.
            let cursor = path.with_file_name(crate::attempt::METRICS_CURSOR);
            (
                Tailer::open(path, cursor),
                Err(std::io::Error::other(e.to_string())),
            )
        }
    }
}
