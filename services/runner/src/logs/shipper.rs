//! Ships an attempt's log to job-service from its files, by global byte
//! offset, so an unreachable job-service costs disk (bounded by rotation),
//! not memory.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use trainmesh_common::client::Channel;
use trainmesh_common::proto::job::v1::job_internal_service_client::JobInternalServiceClient;
use trainmesh_common::proto::job::v1::{AppendJobLogsRequest, LogLine};

use super::segments::{Cursor, LogFiles};
use super::Progress;
use crate::domain::AttemptKey;
use crate::rpc::{is_permanent, request, Backoff, CALL_TIMEOUT};

pub const SHIP_BATCH_LINES: usize = 500;
const SHIP_BATCH_BYTES: usize = 1024 * 1024;

/// What a shipper got done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shipped {
    /// Lines (or records) acknowledged.
    pub count: u64,
    /// False when it gave up before everything was acknowledged.
    pub complete: bool,
}

/// Ships the log to job-service while the attempt runs, and all of it
/// once `finish` names a deadline. Lines rotated away before they were
/// shipped are skipped (with a warning); the rest keep their true numbers.
pub struct LogShipper {
    pub client: JobInternalServiceClient<Channel>,
    pub key: AttemptKey,
    pub files: LogFiles,
    pub interval: Duration,
    pub max_backoff: Duration,
}

impl LogShipper {
    /// `finish` turns `Some(deadline)` when the log is complete: ship the
    /// rest, giving up at the deadline.
    pub async fn run(
        self,
        mut progress: watch::Receiver<Progress>,
        mut finish: watch::Receiver<Option<Instant>>,
    ) -> Shipped {
        let mut cursor = Cursor::default();
        let mut shipped = 0u64;
        let mut pending: Option<(Vec<LogLine>, Cursor)> = None;
        let mut backoff = Backoff::new(Duration::from_millis(100), self.max_backoff);
        let mut writer_alive = true;
        loop {
            let deadline = *finish.borrow();
            let available = progress.borrow().bytes;
            if pending.is_none() && available > cursor.byte {
                let files = self.files.clone();
                let at = cursor;
                let read = tokio::task::spawn_blocking(move || {
                    files.read(at, SHIP_BATCH_LINES, SHIP_BATCH_BYTES)
                })
                .await;
                match read {
                    Ok(Ok(batch)) => {
                        if batch.skipped > 0 {
                            tracing::warn!(
                                lost_lines = batch.skipped,
                                first_lost = cursor.line,
                                "attempt log lines were rotated away before job-service took them"
                            );
                        }
                        if batch.lines.is_empty() {
                            // Past the lost lines, or nothing new.
                            cursor = batch.next;
                        } else {
                            let first = batch.first_line as i64;
                            let lines = batch
                                .lines
                                .into_iter()
                                .enumerate()
                                .map(|(i, text)| LogLine {
                                    attempt: self.key.attempt,
                                    number: first + i as i64,
                                    text,
                                })
                                .collect();
                            pending = Some((lines, batch.next));
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot read the attempt log; log shipping stops");
                        return Shipped {
                            count: shipped,
                            complete: false,
                        };
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "log reader failed; log shipping stops");
                        return Shipped {
                            count: shipped,
                            complete: false,
                        };
                    }
                }
            }

            if let Some((lines, end)) = &pending {
                let n = lines.len();
                let req = AppendJobLogsRequest {
                    job_id: self.key.job_id.to_string(),
                    attempt: self.key.attempt,
                    lines: lines.clone(),
                };
                match self
                    .client
                    .clone()
                    .append_job_logs(request(req, CALL_TIMEOUT))
                    .await
                {
                    Ok(_) => {
                        cursor = *end;
                        shipped += n as u64;
                        pending = None;
                        backoff.reset();
                        if n == SHIP_BATCH_LINES || deadline.is_some() {
                            continue;
                        }
                    }
                    Err(s) if is_permanent(s.code()) => {
                        tracing::warn!(code = ?s.code(), detail = s.message(),
                            "job-service refused the attempt's log lines; log shipping stops");
                        return Shipped {
                            count: shipped,
                            complete: false,
                        };
                    }
                    Err(s) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(code = ?s.code(), detail = s.message(),
                            retry_in_ms = delay.as_millis() as u64, "cannot ship log lines; will retry");
                        if deadline.is_some_and(|d| Instant::now() + delay > d) {
                            tracing::warn!(
                                "flush deadline reached; the rest of the log stays on the runner"
                            );
                            return Shipped {
                                count: shipped,
                                complete: false,
                            };
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = finish.changed(), if deadline.is_none() => {}
                        }
                        continue;
                    }
                }
            }

            if deadline.is_some() && pending.is_none() && cursor.byte >= progress.borrow().bytes {
                return Shipped {
                    count: shipped,
                    complete: true,
                };
            }
            // Lines up to the cursor are shipped or lost; wake for a full batch after it.
            let target = cursor.line - 1 + SHIP_BATCH_LINES as u64;
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                r = progress.wait_for(|p| p.lines >= target), if writer_alive => {
                    if r.is_err() {
                        writer_alive = false;
                    }
                }
                _ = finish.changed(), if deadline.is_none() => {}
            }
        }
    }
}
