//! Metrics logic: writes, reads and live watches (no tonic types here).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use trainmesh_common::server::ShutdownWatch;

use crate::caps::Caps;
use crate::domain::{
    latest_page_token, JobId, LatestQuery, MetricKey, Point, RangeQuery, WatchQuery, WriteBatch,
};
use crate::error::Result;
use crate::repo::{Repo, WriteOutcome};

/// Updates a watch may have queued for a client that does not read; beyond
/// this the client gets a resync marker instead of more memory.
pub const WATCH_BUFFER: usize = 16;
/// Points read per poll of a watch.
const WATCH_BATCH: i64 = 1000;

/// One series of a query answer.
#[derive(Clone, Debug)]
pub struct Series {
    pub key: MetricKey,
    pub points: Vec<Point>,
    pub downsampled: bool,
}

/// One message of a watch.
#[derive(Clone, Debug, Default)]
pub struct WatchUpdate {
    pub points: Vec<Point>,
    /// Resume after this position.
    pub cursor: i64,
    /// Points were dropped because the client fell behind: re-query, then
    /// watch on from `cursor`.
    pub resync: bool,
}

#[derive(Debug)]
pub struct Metrics {
    repo: Repo,
    /// Bumped after every commit that stored points, to wake watches in this
    /// process at once; `poll_interval` covers writes by other replicas.
    written: watch::Sender<u64>,
    poll_interval: Duration,
    caps: Caps,
}

/// One page of latest values.
#[derive(Clone, Debug, Default)]
pub struct LatestAnswer {
    pub points: Vec<Point>,
    /// Where the next page starts; `None` on the last page.
    pub next_page_token: Option<String>,
}

impl Metrics {
    pub fn new(repo: Repo, poll_interval: Duration, caps: Caps) -> Self {
        Self {
            repo,
            written: watch::Sender::new(0),
            poll_interval,
            caps,
        }
    }

    pub async fn write(&self, batch: WriteBatch) -> Result<WriteOutcome> {
        let out = self
            .repo
            .write(batch.job_id, &batch.points, self.caps)
            .await?;
        if out.accepted > 0 {
            self.written.send_modify(|v| *v = v.wrapping_add(1));
        }
        tracing::debug!(
            job_id = %batch.job_id,
            accepted = out.accepted,
            duplicates = out.duplicates,
            "metrics batch stored"
        );
        Ok(out)
    }

    /// One page of latest values, in key order.
    pub async fn latest(&self, q: LatestQuery) -> Result<LatestAnswer> {
        // One more than the page shows whether another page follows.
        let mut points = self
            .repo
            .latest(q.job_id, &q.page, q.page_size.saturating_add(1))
            .await?;
        let next_page_token = if points.len() > q.page_size {
            points.truncate(q.page_size);
            points.last().map(|p| latest_page_token(&p.key))
        } else {
            None
        };
        Ok(LatestAnswer {
            points,
            next_page_token,
        })
    }

    /// Series in the order asked (or by key when none are named); a named
    /// key without points gives an empty series.
    pub async fn query(&self, q: RangeQuery) -> Result<Vec<Series>> {
        let keys = if q.keys.is_empty() {
            self.repo
                .keys(q.job_id)
                .await?
                .into_iter()
                .map(MetricKey::stored)
                .collect()
        } else {
            let mut seen = HashSet::new();
            q.keys
                .into_iter()
                .filter(|k| seen.insert(k.clone()))
                .collect::<Vec<_>>()
        };
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let (points, downsampled) = self
                .repo
                .series(q.job_id, &key, q.start_step, q.end_step, q.max_points)
                .await?;
            out.push(Series {
                key,
                points,
                downsampled,
            });
        }
        Ok(out)
    }

    pub async fn keys(&self, job: JobId) -> Result<Vec<String>> {
        self.repo.keys(job).await
    }

    /// Starts a watch. The first update carries no points and the starting
    /// cursor, so a client knows the watch is in place.
    pub async fn watch(
        self: &Arc<Self>,
        q: WatchQuery,
        shutdown: ShutdownWatch,
    ) -> Result<mpsc::Receiver<Result<WatchUpdate>>> {
        let start = match q.after_seq {
            Some(s) => s,
            None => self.repo.last_seq(q.job_id).await?,
        };
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let first = WatchUpdate {
            cursor: start,
            ..WatchUpdate::default()
        };
        if tx.try_send(Ok(first)).is_err() {
            return Ok(rx);
        }
        let this = Arc::clone(self);
        let written = self.written.subscribe();
        tokio::spawn(async move { this.watch_loop(q, start, tx, written, shutdown).await });
        Ok(rx)
    }

    async fn watch_loop(
        &self,
        q: WatchQuery,
        mut cursor: i64,
        tx: mpsc::Sender<Result<WatchUpdate>>,
        mut written: watch::Receiver<u64>,
        mut shutdown: ShutdownWatch,
    ) {
        use mpsc::error::TrySendError;
        let keys: HashSet<MetricKey> = q.keys.into_iter().collect();
        let mut resync = false;
        // From an explicit cursor there may be history to catch up on.
        let mut more = q.after_seq.is_some();
        loop {
            // A pending resync waits for room below, not for new writes.
            if !more && !resync {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tx.closed() => return,
                    _ = written.changed() => {},
                    _ = tokio::time::sleep(self.poll_interval) => {},
                }
            }
            if resync {
                // Skip what the client could not take; tell it as soon as it
                // makes room (waiting for the slot, not polling for it).
                let permit = tokio::select! {
                    p = tx.reserve() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = shutdown.wait() => return,
                };
                match self.repo.last_seq(q.job_id).await {
                    Ok(s) => cursor = cursor.max(s),
                    Err(e) => {
                        permit.send(Err(e));
                        return;
                    }
                }
                permit.send(Ok(WatchUpdate {
                    cursor,
                    resync: true,
                    ..WatchUpdate::default()
                }));
                resync = false;
            }
            // A client with no room left takes nothing more now: skip ahead
            // rather than read points only to drop them. Deciding here, right
            // after the send that filled the buffer, also means a full buffer
            // always ends in a resync marker, whenever the client drains it.
            if tx.capacity() == 0 {
                tracing::debug!(job_id = %q.job_id, "watch client fell behind; resync");
                resync = true;
                more = false;
                continue;
            }
            let rows = match self.repo.after(q.job_id, cursor, WATCH_BATCH).await {
                Ok(rows) => rows,
                Err(e) => {
                    let _ = tx.try_send(Err(e));
                    return;
                }
            };
            more = rows.len() as i64 == WATCH_BATCH;
            let Some(last) = rows.last().map(|r| r.0) else {
                continue;
            };
            cursor = last;
            let points: Vec<Point> = rows
                .into_iter()
                .map(|(_, p)| p)
                .filter(|p| keys.is_empty() || keys.contains(&p.key))
                .collect();
            if points.is_empty() {
                continue;
            }
            let update = WatchUpdate {
                points,
                cursor,
                resync: false,
            };
            match tx.try_send(Ok(update)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    tracing::debug!(job_id = %q.job_id, "watch client fell behind; resync");
                    resync = true;
                    more = false;
                }
                Err(TrySendError::Closed(_)) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MetricKey;
    use trainmesh_common::db::{self, Durability};

    async fn metrics(url: &str) -> Arc<Metrics> {
        let db = db::open(
            url,
            Durability::Relaxed,
            &sqlx::migrate!("./migrations/sqlite"),
            &sqlx::migrate!("./migrations/postgres"),
        )
        .await
        .unwrap();
        Arc::new(Metrics::new(
            Repo::new(db),
            Duration::from_millis(20),
            Caps::default(),
        ))
    }

    #[tokio::test]
    async fn a_watch_client_that_does_not_read_gets_a_resync_marker() {
        for tdb in trainmesh_common::testing::all_dbs().await {
            let svc = metrics(&tdb.url).await;
            let job = JobId::new();
            let n_batches = (WATCH_BUFFER + 4) as i64;
            for b in 0..n_batches {
                let points = (0..WATCH_BATCH)
                    .map(|i| Point {
                        key: MetricKey::parse("k", "loss").unwrap(),
                        step: b * WATCH_BATCH + i,
                        ts_micros: 0,
                        value: 1.0,
                    })
                    .collect();
                svc.write(WriteBatch {
                    job_id: job,
                    attempt: 0,
                    points,
                })
                .await
                .unwrap();
            }
            let last = n_batches * WATCH_BATCH;
            // From the start: the loop catches up without waiting and fills
            // the buffer long before this test reads anything.
            let q = WatchQuery {
                job_id: job,
                keys: vec![],
                after_seq: Some(0),
            };
            let mut rx = svc.watch(q, ShutdownWatch::never()).await.unwrap();
            trainmesh_common::testing::wait_for("a full buffer", Duration::from_secs(60), || {
                let full = rx.len() == WATCH_BUFFER;
                async move { full.then_some(()) }
            })
            .await;
            let mut delivered = 0usize;
            let marker = loop {
                let u = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{}: no update after {delivered} points", tdb.label))
                    .unwrap_or_else(|| panic!("{}: the watch ended", tdb.label))
                    .unwrap();
                if u.resync {
                    break u;
                }
                delivered += u.points.len();
            };
            assert_eq!(marker.cursor, last, "{}", tdb.label);
            assert!(delivered < last as usize, "{}", tdb.label);
            assert!(rx.len() <= WATCH_BUFFER);
        }
    }
}
