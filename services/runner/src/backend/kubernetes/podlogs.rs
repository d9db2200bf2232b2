//! Pod logs into the attempt's output: the master's followed while it
//! runs, abnormal workers' read once when seen failing. Pods go with their
//! job (TTL, cancel), so what the diagnosis needs is copied before that.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncBufReadExt, AsyncReadExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, LogParams};
use tokio::task::JoinHandle;

use super::status::{PodView, Role};
use crate::logs::{clean_line, OutputSink, MAX_LINE_BYTES};

/// Lines of a pod's log kept in memory for classifying its failure.
const TAIL_LINES: usize = 2000;
/// Lines read from an abnormal worker's log.
pub const WORKER_LOG_LINES: i64 = 500;
/// Pause before following again after the log stream broke.
const REFOLLOW_DELAY: Duration = Duration::from_secs(2);
/// Consecutive failures to open the stream before the follower gives up.
const MAX_OPEN_FAILURES: u32 = 30;
/// How long the master's log may keep arriving after the job ended.
const LOG_DRAIN: Duration = Duration::from_secs(30);
/// Abnormal workers whose logs are copied (the diagnosis reads five).
const MAX_WORKER_LOGS: usize = 5;

/// The last lines of a pod's log, shared with the task that reads it.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    pub fn push(&self, line: &str) {
        if let Ok(mut t) = self.0.lock() {
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line.to_owned());
        }
    }

    pub fn text(&self) -> String {
        self.0
            .lock()
            .map(|t| t.iter().map(|l| format!("{l}\n")).collect())
            .unwrap_or_default()
    }
}

/// Splits `<RFC 3339 timestamp> <text>` (the API's `timestamps=true`).
pub fn split_timestamp(line: &str) -> (Option<Timestamp>, &str) {
    match line.split_once(' ') {
        Some((ts, rest)) => match ts.parse::<Timestamp>() {
            Ok(t) => (Some(t), rest),
            Err(_) => (None, line),
        },
        None => match line.parse::<Timestamp>() {
            // An empty line: just the timestamp.
            Ok(t) => (Some(t), ""),
            Err(_) => (None, line),
        },
    }
}

/// Where a follow left off, so that following again neither repeats nor
/// skips lines: the last timestamp and how many lines carried it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    pub last: Option<Timestamp>,
    pub at_last: usize,
    /// Lines stamped `last` still to drop in a restarted stream.
    skip: usize,
}

impl Resume {
    /// A new stream starts (again) from [`Resume::since`].
    pub fn restart(&mut self) {
        self.skip = self.at_last;
    }

    /// Whether a line stamped `ts` is new (not a repeat of one delivered
    /// before the stream restarted); counts it when it is. Lines without a
    /// timestamp cannot be told apart and pass.
    pub fn admit(&mut self, ts: Option<Timestamp>) -> bool {
        let Some(ts) = ts else { return true };
        if let Some(last) = self.last {
            if ts < last {
                return false;
            }
            if ts == last {
                if self.skip > 0 {
                    self.skip -= 1;
                    return false;
                }
                self.at_last += 1;
                return true;
            }
        }
        self.last = Some(ts);
        self.at_last = 1;
        self.skip = 0;
        true
    }

    /// `sinceTime` for following again: the API rounds it to seconds, so
    /// ask from a second earlier and let [`Resume::admit`] drop repeats.
    pub fn since(&self) -> Option<Timestamp> {
        self.last.and_then(|t| {
            t.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(1))
                .ok()
        })
    }
}

/// Follows `container` of `pod` into `sink` (and `tail`) until the
/// container has ended and its log is read to the end, or the pod is gone.
pub async fn follow(pods: Api<Pod>, pod: String, container: String, sink: OutputSink, tail: Tail) {
    let mut resume = Resume::default();
    let mut failures = 0u32;
    loop {
        let lp = LogParams {
            container: Some(container.clone()),
            follow: true,
            timestamps: true,
            since_time: resume.since(),
            ..LogParams::default()
        };
        match pods.log_stream(&pod, &lp).await {
            Ok(stream) => {
                failures = 0;
                let mut reader = Box::pin(stream);
                resume.restart();
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match (&mut reader)
                        .take(MAX_LINE_BYTES as u64)
                        .read_until(b'\n', &mut buf)
                        .await
                    {
                        Ok(0) => break,
                        Ok(_) => {
                            let line = clean_line(&buf);
                            let (ts, text) = split_timestamp(&line);
                            if resume.admit(ts) {
                                tail.push(text);
                                sink.line(text).await;
                            }
                        }
                        Err(e) => {
                            tracing::debug!(pod, error = %e, "pod log stream broke; following again");
                            break;
                        }
                    }
                }
            }
            Err(kube::Error::Api(s)) if s.code == 404 => return,
            Err(e) => {
                failures += 1;
                tracing::debug!(pod, error = %e, failures, "cannot follow the pod's log yet");
                if failures >= MAX_OPEN_FAILURES {
                    tracing::warn!(pod, error = %e, "giving up following the pod's log");
                    return;
                }
            }
        }
        // The stream also ends when the API server drops a long request:
        // only a container that has ended has nothing more to say.
        match pods.get_opt(&pod).await {
            Ok(None) => return,
            Ok(Some(p)) if container_ended(&p, &container) && failures == 0 => return,
            _ => {}
        }
        tokio::time::sleep(REFOLLOW_DELAY).await;
    }
}

fn container_ended(pod: &Pod, container: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == container))
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.terminated.is_some())
}

/// The last lines of `container` of `pod` (of its previous run when
/// `previous`), copied into `sink` with the pod's name in front of each so
/// they stand apart from the master's output. Returns the text, for
/// classifying the pod's failure.
pub async fn copy_tail(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    previous: bool,
    header: &str,
    sink: &OutputSink,
) -> String {
    let lp = LogParams {
        container: Some(container.to_owned()),
        previous,
        tail_lines: Some(WORKER_LOG_LINES),
        ..LogParams::default()
    };
    match pods.logs(pod, &lp).await {
        Ok(text) => {
            sink.line(format!("[trainmesh] k8s: {header}")).await;
            for line in text.lines() {
                sink.line(format!("[{pod}] {}", clean_line(line.as_bytes())))
                    .await;
            }
            text
        }
        Err(e) => {
            tracing::warn!(pod, error = %e, "cannot read the pod's log");
            sink.line(format!(
                "[trainmesh] k8s: cannot read the log of pod {pod}: {e}"
            ))
            .await;
            String::new()
        }
    }
}

/// The pod logs of one attempt: the master's follower, the abnormal
/// workers' copied once per run, and the last lines of each.
#[derive(Default)]
pub struct Copies {
    master: Option<(String, JoinHandle<()>)>,
    /// Pod logs kept for classifying a failure, by pod name.
    tails: HashMap<String, Tail>,
    /// Worker logs copied: (pod, restart count).
    copied: HashSet<(String, i32)>,
}

impl Copies {
    /// Follows the master once it has started; copies the logs of workers
    /// seen failing or restarted, once per run.
    pub async fn update(&mut self, api: &Api<Pod>, sink: &OutputSink, pods: &[PodView]) {
        if self.master.is_none() {
            if let Some(m) = pods.iter().find(|p| p.role == Role::Master && p.started()) {
                let container = m.main().map(|c| c.name.clone()).unwrap_or_default();
                let tail = self.tails.entry(m.name.clone()).or_default().clone();
                let task = tokio::spawn(follow(
                    api.clone(),
                    m.name.clone(),
                    container,
                    sink.clone(),
                    tail,
                ));
                self.master = Some((m.name.clone(), task));
            }
        }
        for w in pods
            .iter()
            .filter(|p| matches!(p.role, Role::Worker(_)) && p.abnormal())
        {
            let Some(c) = w.main() else { continue };
            let run = (w.name.clone(), c.restart_count);
            let workers_copied: HashSet<&String> = self.copied.iter().map(|(p, _)| p).collect();
            if self.copied.contains(&run)
                || (!workers_copied.contains(&w.name) && workers_copied.len() >= MAX_WORKER_LOGS)
            {
                continue;
            }
            // A worker restarted and running again: its failed run is the
            // previous one.
            let previous = w.terminated().is_none() && c.last.is_some();
            let header = format!(
                "log of {} (pod {}), last {} lines{}:",
                w.role,
                w.name,
                WORKER_LOG_LINES,
                if previous { ", previous run" } else { "" }
            );
            let text = copy_tail(api, &w.name, &c.name, previous, &header, sink).await;
            let tail = self.tails.entry(w.name.clone()).or_default();
            for line in text.lines() {
                tail.push(line);
            }
            self.copied.insert(run);
        }
    }

    /// Waits a while for the master's log to end after the job did.
    pub async fn drain_master(&mut self) {
        if let Some((pod, mut task)) = self.master.take() {
            if tokio::time::timeout(LOG_DRAIN, &mut task).await.is_err() {
                tracing::warn!(pod, "the master's log did not end; the rest is not copied");
                task.abort();
            }
        }
    }

    /// The last lines copied from `pod`, for classifying its failure.
    pub fn tail_text(&self, pod: &str) -> String {
        self.tails.get(pod).map(Tail::text).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Option<Timestamp> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn timestamps_are_split_from_the_line() {
        let (t, text) = split_timestamp("2024-05-14T09:12:31.123456789Z step 1 loss=2.3");
        assert_eq!(t, ts("2024-05-14T09:12:31.123456789Z"));
        assert_eq!(text, "step 1 loss=2.3");
        assert_eq!(split_timestamp("no stamp here"), (None, "no stamp here"));
        assert_eq!(split_timestamp("2024-05-14T09:12:31Z").1, "");
    }

    #[test]
    fn a_restarted_follow_neither_repeats_nor_skips() {
        let mut r = Resume::default();
        let a = ts("2024-05-14T09:00:00.5Z");
        let b = ts("2024-05-14T09:00:01Z");
        // First stream: two lines share a timestamp.
        assert!(r.admit(a));
        assert!(r.admit(b));
        assert!(r.admit(b));
        // Following again starts a second earlier (the API rounds
        // sinceTime to seconds) and replays what was read.
        assert!(r.since().unwrap() < b.unwrap());
        r.restart();
        assert!(!r.admit(a));
        assert!(!r.admit(b));
        assert!(!r.admit(b));
        // A third line at the same instant is new.
        assert!(r.admit(b));
        assert!(r.admit(ts("2024-05-14T09:00:02Z")));
        assert!(r.admit(None));
    }

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let t = Tail::default();
        for i in 0..(TAIL_LINES + 5) {
            t.push(&format!("line {i}"));
        }
        let text = t.text();
        assert_eq!(text.lines().count(), TAIL_LINES);
        assert!(text.starts_with("line 5\n"));
    }
}
