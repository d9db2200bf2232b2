//! WatchJobs and StreamJobLogs: server streams read from the tables.
//!
//! Each stream is a task that reads from its own position in the table and
//! sends into a small bounded channel; commits only bump a counter that
//! wakes the task (plus a poll as the safety net, e.g. for a second replica
//! writing the same PostgreSQL). So an event is never lost (it is in the
//! table), and a slow client only slows its own task: memory stays bounded.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use trainmesh_common::auth::Caller;
use trainmesh_common::server::ShutdownWatch;
use trainmesh_common::time::now_micros;

use crate::domain::{decode_cursor, JobId, LogCursor, LogQuery};
use crate::error::Result;
use crate::repo::{self, EventRecord, LogLine};
use crate::service::JobService;

/// Rows read per query.
const READ_BATCH: i64 = 256;
/// Messages buffered per stream.
const CHANNEL: usize = 16;
/// Largest batch of log text in one message (well under the 4 MiB default).
const MAX_LOG_MESSAGE_BYTES: usize = 1024 * 1024;

/// How often streams look at the tables without being woken, and how often
/// WatchJobs sends a heartbeat.
#[derive(Clone, Copy, Debug)]
pub struct StreamTiming {
    pub heartbeat: Duration,
    pub poll: Duration,
}

impl Default for StreamTiming {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            poll: Duration::from_secs(1),
        }
    }
}

/// What WatchJobs sends.
#[derive(Clone, Debug, PartialEq)]
pub enum WatchItem {
    Event(EventRecord),
    /// `cursor` is where to resume if the stream breaks now.
    Heartbeat {
        time: i64,
        cursor: i64,
    },
}

/// Lines of one attempt, as StreamJobLogs sends them.
#[derive(Clone, Debug, PartialEq)]
pub struct LogBatch {
    pub attempt: i64,
    pub lines: Vec<LogLine>,
    /// Where a client resumes after this message.
    pub cursor: LogCursor,
}

/// The channel a stream task writes into.
pub type Items<T> = mpsc::Receiver<Result<T>>;

impl JobService {
    /// Starts a WatchJobs stream. Users see only their own jobs' events; a
    /// `job_id` they may not see is NOT_FOUND. The first message is a
    /// heartbeat with the starting cursor (so a client knows the watch is
    /// established before it acts).
    pub async fn watch(
        self: &Arc<Self>,
        caller: &Caller,
        job_id: &str,
        cursor: &str,
        from_start: bool,
        timing: StreamTiming,
        shutdown: ShutdownWatch,
    ) -> Result<Items<WatchItem>> {
        let job = if job_id.is_empty() {
            None
        } else {
            Some(self.get(caller, job_id).await?.job.id)
        };
        let mut conn = self.db.read.acquire().await?;
        let start = if !cursor.is_empty() {
            decode_cursor("cursor", cursor)?
        } else if from_start {
            0
        } else {
            repo::max_event_id(&mut conn).await?
        };
        drop(conn);
        let owner = (!caller.sees_everything()).then(|| caller.user.clone());
        let (tx, rx) = mpsc::channel(CHANNEL);
        let svc = self.clone();
        tokio::spawn(async move {
            if let Err(e) = svc
                .watch_loop(&tx, start, owner, job, timing, shutdown)
                .await
            {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(rx)
    }

    async fn watch_loop(
        &self,
        tx: &mpsc::Sender<Result<WatchItem>>,
        mut cursor: i64,
        owner: Option<String>,
        job: Option<JobId>,
        timing: StreamTiming,
        mut shutdown: ShutdownWatch,
    ) -> Result<()> {
        let mut woken = self.signals.events.subscribe();
        let heartbeat = |cursor| {
            Ok(WatchItem::Heartbeat {
                time: now_micros(),
                cursor,
            })
        };
        if tx.send(heartbeat(cursor)).await.is_err() {
            return Ok(());
        }
        let mut next_heartbeat = Instant::now() + timing.heartbeat;
        loop {
            // Marked seen before reading: a commit after this wakes us.
            woken.borrow_and_update();
            loop {
                let mut conn = self.db.read.acquire().await?;
                let upto = repo::max_event_id(&mut conn).await?;
                if upto <= cursor {
                    break;
                }
                let events = repo::events_between(
                    &mut conn,
                    cursor,
                    upto,
                    owner.as_deref(),
                    job,
                    READ_BATCH,
                )
                .await?;
                drop(conn);
                let full = events.len() as i64 == READ_BATCH;
                for e in events {
                    cursor = e.id;
                    if tx.send(Ok(WatchItem::Event(e))).await.is_err() {
                        return Ok(());
                    }
                }
                if !full {
                    // Everything up to `upto` was examined, seen or not.
                    cursor = upto;
                    break;
                }
            }
            tokio::select! {
                _ = woken.changed() => {}
                _ = tokio::time::sleep(timing.poll) => {}
                _ = tokio::time::sleep_until(next_heartbeat) => {
                    if tx.send(heartbeat(cursor)).await.is_err() {
                        return Ok(());
                    }
                    next_heartbeat = Instant::now() + timing.heartbeat;
                }
                _ = shutdown.wait() => return Ok(()),
                _ = tx.closed() => return Ok(()),
            }
        }
    }

    /// Starts a StreamJobLogs stream: the last `tail` lines (0: all) of
    /// `attempt` (0: the latest), or the lines after `resume`; then, with
    /// `follow`, new lines until the job has ended and every line was sent.
    /// The first message has no lines and carries the starting position.
    pub async fn stream_logs(
        self: &Arc<Self>,
        caller: &Caller,
        query: LogQuery,
        timing: StreamTiming,
        shutdown: ShutdownWatch,
    ) -> Result<Items<LogBatch>> {
        let job = self.get(caller, &query.job_id).await?.job.id;
        let (tx, rx) = mpsc::channel(CHANNEL);
        let svc = self.clone();
        tokio::spawn(async move {
            if let Err(e) = svc.logs_loop(&tx, job, query, timing, shutdown).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(rx)
    }

    async fn logs_loop(
        &self,
        tx: &mpsc::Sender<Result<LogBatch>>,
        job_id: JobId,
        req: LogQuery,
        timing: StreamTiming,
        mut shutdown: ShutdownWatch,
    ) -> Result<()> {
        let mut new_lines = self.signals.logs.subscribe();
        let mut new_events = self.signals.events.subscribe();
        // A resumed stream starts on the cursor's attempt (when following
        // "the latest", later attempts follow as they did for the first
        // stream) right after its line; the tail applied only to the first.
        let (mut attempt, mut after) = match req.resume {
            Some(c) if req.attempt == 0 && c.attempt > 0 => (c.attempt, Some(c.number)),
            Some(c) => (req.attempt, Some(c.number)),
            None => (req.attempt, None),
        };
        let tail = if req.resume.is_some() { 0 } else { req.tail };
        let mut started = false;
        loop {
            new_lines.borrow_and_update();
            new_events.borrow_and_update();
            let mut conn = self.db.read.acquire().await?;
            // The state is read BEFORE the lines: runners flush their log
            // before reporting the end, so once a read state is terminal,
            // the lines read after it are all there are.
            let Some(job) = repo::get_job(&mut conn, job_id).await? else {
                return Ok(()); // deleted meanwhile
            };
            let ended = job.state.is_terminal();
            if attempt == 0 {
                attempt = job
                    .current_attempt
                    .max(repo::latest_log_attempt(&mut conn, job_id).await?);
            }
            let mut pos = match after {
                Some(p) => p,
                None if tail > 0 && attempt > 0 => {
                    repo::tail_start(&mut conn, job_id, attempt, tail).await?
                }
                None => 0,
            };
            if !started {
                started = true;
                let first = LogBatch {
                    attempt,
                    lines: Vec::new(),
                    cursor: LogCursor {
                        attempt,
                        number: pos,
                    },
                };
                if tx.send(Ok(first)).await.is_err() {
                    return Ok(());
                }
            }
            if attempt > 0 {
                loop {
                    let lines =
                        repo::logs_after(&mut conn, job_id, attempt, pos, READ_BATCH).await?;
                    let full = lines.len() as i64 == READ_BATCH;
                    if let Some(last) = lines.last() {
                        pos = last.number;
                    }
                    for lines in by_size(lines) {
                        let cursor = LogCursor {
                            attempt,
                            number: lines.last().map_or(pos, |l| l.number),
                        };
                        let batch = LogBatch {
                            attempt,
                            lines,
                            cursor,
                        };
                        if tx.send(Ok(batch)).await.is_err() {
                            return Ok(());
                        }
                    }
                    if !full {
                        break;
                    }
                }
                after = Some(pos);
            }
            // Following "the latest attempt" moves on to a newer one (after a
            // requeue) once the current one has been sent.
            if req.follow && req.attempt == 0 && attempt > 0 {
                let latest = job
                    .current_attempt
                    .max(repo::latest_log_attempt(&mut conn, job_id).await?);
                if latest > attempt {
                    attempt = latest;
                    after = Some(0);
                    continue;
                }
            }
            drop(conn);
            if !req.follow || ended {
                return Ok(());
            }
            tokio::select! {
                _ = new_lines.changed() => {}
                _ = new_events.changed() => {}
                _ = tokio::time::sleep(timing.poll) => {}
                _ = shutdown.wait() => return Ok(()),
                _ = tx.closed() => return Ok(()),
            }
        }
    }
}

/// Splits lines into messages of at most [`MAX_LOG_MESSAGE_BYTES`] of text.
fn by_size(lines: Vec<LogLine>) -> Vec<Vec<LogLine>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for l in lines {
        if !cur.is_empty() && bytes + l.text.len() > MAX_LOG_MESSAGE_BYTES {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += l.text.len() + 16;
        cur.push(l);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}
