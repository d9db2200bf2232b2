//! One attempt from assignment to final report: directory, launch, RUNNING,
//! log and metrics shipping, cancel/deadline, flush, final report. The same
//! for every backend.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;
use trainmesh_common::proto::job::v1::{AttemptState, JobError};
use trainmesh_common::proto::runner::v1::{Assignment, ReportAttemptStatusRequest};

use crate::backend::{Backend, JobDetails, LaunchRequest, Workload};
use crate::domain::{AttemptKey, Launch, Termination};
use crate::error::Error;
use crate::job_error;
use crate::logs::{self, LogLimits, LogShipper, LogWriter, OutputSink};
use crate::metrics::MetricsShipper;
use crate::rpc::{is_permanent, request, Backoff, Peers, CALL_TIMEOUT};
use crate::tailer::Tailer;

pub const OUTPUT_LOG: &str = "output.log";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const METRICS_CURSOR: &str = "metrics.cursor";

/// How much of the log's end the error classifier reads.
const CLASSIFY_TAIL_BYTES: u64 = 1024 * 1024;
/// How long reports are retried while the runner is not shutting down.
const REPORT_PERSISTENCE: Duration = Duration::from_secs(600);

/// Why an attempt is being stopped from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The scheduler asked (the job was cancelled).
    Cancelled,
    /// The runner is stopping and gives the attempt back, to run again
    /// without using one of the job's attempts.
    HandBack,
    /// The runner lost its lease: the scheduler runs the attempt elsewhere
    /// by `kill_by` or soon after, so it must be dead by then, whatever
    /// its own grace (see `agent::fence`).
    LeaseLost { kill_by: Instant },
}

/// What every attempt of this runner shares.
pub struct AttemptContext {
    pub peers: Peers,
    pub backend: Arc<dyn Backend>,
    /// Absolute.
    pub work_dir: PathBuf,
    pub log_ship_interval: Duration,
    pub metrics_flush_interval: Duration,
    pub default_termination_grace: Duration,
    pub flush_timeout: Duration,
    pub max_backoff: Duration,
    /// How much of each attempt's log is kept on disk.
    pub attempt_log: LogLimits,
    /// Where the values of jobs' secret variables are read (one file per
    /// secret); `None`: this runner holds no secrets.
    pub secrets_dir: Option<PathBuf>,
    /// Opens the env values a job marks secret (sealed by job-service).
    pub secrets_key: Option<Arc<trainmesh_common::sealed::SecretsKey>>,
    /// True once the runner is shutting down: reports then give up sooner.
    pub shutting_down: watch::Receiver<bool>,
}

impl AttemptContext {
    pub fn attempt_dir(&self, key: &AttemptKey) -> PathBuf {
        self.work_dir
            .join(key.job_id.to_string())
            .join(key.attempt.to_string())
    }
}

/// How the workload's run ended, before it is turned into a report.
enum Outcome {
    Exited(Termination),
    Stopped(StopReason, Termination),
    DeadlineExceeded(Duration, Termination),
    /// Waiting on the workload failed (the runner lost track of it).
    Lost(std::io::Error),
}

/// Runs the attempt `assignment` to its final report. `stop` turns
/// `Some` when it must be stopped. Call inside the attempt's correlation
/// scope and span.
pub async fn run(
    ctx: Arc<AttemptContext>,
    runner_id: String,
    key: AttemptKey,
    assignment: Assignment,
    stop: watch::Receiver<Option<StopReason>>,
) {
    let reporter = Reporter {
        ctx: ctx.clone(),
        runner_id,
        key,
    };
    let launch = match Launch::try_from(assignment) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "invalid assignment; reporting it failed");
            let err = Error::from(e).to_job_error();
            reporter
                .report(AttemptState::Failed, Some(-1), Some(err), Vec::new())
                .await;
            return;
        }
    };
    let dir = ctx.attempt_dir(&key);
    let prepared = prepare_dir(&dir, ctx.attempt_log).await;
    let (sink, writer) = match prepared {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, dir = %dir.display(), "cannot prepare the attempt directory");
            reporter
                .report(
                    AttemptState::Failed,
                    Some(-1),
                    Some(e.to_job_error()),
                    Vec::new(),
                )
                .await;
            return;
        }
    };
    Attempt {
        ctx,
        reporter,
        launch,
        dir,
        sink: Some(sink),
        writer,
        stop,
    }
    .run()
    .await
}

/// Puts the value of each secret variable into `env`, read from
/// `dir/<secret name>` (one trailing newline dropped), and returns the
/// (secret name, value) pairs, for the log to redact. The names were
/// checked with the spec: no path separators, not `.` or `..`.
/// Opens the sealed values of `keys` in `env` in place; returns them
/// (named by their variables) for redaction.
fn open_sealed(
    key: Option<&trainmesh_common::sealed::SecretsKey>,
    owner: &str,
    keys: &[String],
    env: &mut BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, Error> {
    let mut values = Vec::new();
    for variable in keys {
        let Some(value) = env.get_mut(variable) else {
            continue;
        };
        let unavailable = |reason: String| Error::Secret {
            variable: variable.clone(),
            name: "(its sealed env value)".into(),
            reason,
        };
        let key = key.ok_or_else(|| {
            unavailable("the runner has no secrets key (--secrets-key-file)".into())
        })?;
        let plain = key.open(owner, variable, value).map_err(unavailable)?;
        if plain.contains('\0') {
            return Err(unavailable("its value holds a NUL byte".into()));
        }
        *value = plain.clone();
        values.push((variable.clone(), plain));
    }
    Ok(values)
}

fn read_secrets(
    dir: Option<&std::path::Path>,
    secrets: &BTreeMap<String, String>,
    env: &mut BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, Error> {
    let mut values = Vec::new();
    for (variable, name) in secrets {
        let unavailable = |reason: String| Error::Secret {
            variable: variable.clone(),
            name: name.clone(),
            reason,
        };
        let Some(dir) = dir else {
            return Err(unavailable(
                "the runner has no secrets directory (--secrets-dir)".into(),
            ));
        };
        let path = dir.join(name);
        let value = std::fs::read_to_string(&path)
            .map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        let value = value
            .strip_suffix('\n')
            .map(|v| v.strip_suffix('\r').unwrap_or(v))
            .unwrap_or(&value);
        if value.contains('\0') {
            return Err(unavailable("its value holds a NUL byte".into()));
        }
        env.insert(variable.clone(), value.to_owned());
        values.push((name.clone(), value.to_owned()));
    }
    Ok(values)
}

/// Creates the attempt directory afresh and starts its log writer.
async fn prepare_dir(
    dir: &std::path::Path,
    limits: LogLimits,
) -> Result<(OutputSink, LogWriter), Error> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| Error::io(format!("cannot create `{}`", dir.display()), e))?;
    // A redelivered attempt starts clean: an old cursor would skip the new
    // run's metrics.
    for stale in [METRICS_FILE, METRICS_CURSOR] {
        match tokio::fs::remove_file(dir.join(stale)).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("cannot remove `{stale}`"), e)),
        }
    }
    LogWriter::start(&dir.join(OUTPUT_LOG), limits)
        .await
        .map_err(|e| Error::io(format!("cannot create `{OUTPUT_LOG}`"), e))
}

struct Attempt {
    ctx: Arc<AttemptContext>,
    reporter: Reporter,
    launch: Launch,
    dir: PathBuf,
    /// `None` once the log is closed.
    sink: Option<OutputSink>,
    writer: LogWriter,
    stop: watch::Receiver<Option<StopReason>>,
}

impl Attempt {
    async fn run(mut self) {
        let key = self.launch.key;
        let (finish_tx, finish_rx) = watch::channel::<Option<Instant>>(None);
        let log_shipper = spawn_in_scope(
            &self.launch.correlation_id,
            LogShipper {
                client: self.ctx.peers.jobs.clone(),
                key,
                files: self.writer.files.clone(),
                interval: self.ctx.log_ship_interval,
                max_backoff: self.ctx.max_backoff,
            }
            .run(self.writer.progress.clone(), finish_rx.clone()),
        );

        let stopped_early = *self.stop.borrow();
        if let Some(reason) = stopped_early {
            tracing::info!(?reason, "attempt stopped before it was launched");
            let (state, error, why) = match reason {
                StopReason::Cancelled => (
                    AttemptState::Cancelled,
                    None,
                    "the attempt was cancelled before it started",
                ),
                StopReason::HandBack => (
                    AttemptState::Failed,
                    Some(job_error::handed_back_error(None)),
                    "the runner is stopping; the attempt goes back to the queue unstarted",
                ),
                StopReason::LeaseLost { .. } => (
                    AttemptState::Failed,
                    Some(job_error::lease_lost_error(None)),
                    "the runner lost its lease with the scheduler; the attempt was not started",
                ),
            };
            self.notice(why).await;
            self.conclude(finish_tx, log_shipper, None, None).await;
            self.reporter
                .report(state, None, error, self.writer.tail())
                .await;
            tracing::info!(state = state.as_str_name(), "attempt finished");
            return;
        }

        let metrics_file = self.dir.join(METRICS_FILE);
        let mut env: BTreeMap<String, String> = self.launch.env.clone();
        env.insert("TRAINMESH_JOB_ID".into(), key.job_id.to_string());
        env.insert("TRAINMESH_ATTEMPT".into(), key.attempt.to_string());
        env.insert(
            "TRAINMESH_CORRELATION_ID".into(),
            self.launch.correlation_id.clone(),
        );
        let by_reference = self.ctx.backend.secrets_by_reference();
        let referenced = if by_reference {
            Ok(Vec::new())
        } else {
            read_secrets(
                self.ctx.secrets_dir.as_deref(),
                &self.launch.secret_env,
                &mut env,
            )
        };
        let secrets = referenced.and_then(|mut values| {
            values.extend(open_sealed(
                self.ctx.secrets_key.as_deref(),
                &self.launch.owner,
                &self.launch.secret_env_keys,
                &mut env,
            )?);
            Ok(values)
        });
        let output = self.sink.clone().unwrap_or_else(OutputSink::closed);
        let output = match &secrets {
            Ok(values) => output.redacting(values),
            Err(_) => output,
        };
        let req = LaunchRequest {
            key,
            owner: self.launch.owner.clone(),
            correlation_id: self.launch.correlation_id.clone(),
            command: self.launch.command.clone(),
            image: self.launch.image.clone(),
            env,
            working_dir: self.launch.working_dir.clone(),
            gpu_indexes: self.launch.gpu_indexes.clone(),
            resources: self.launch.resources,
            attempt_dir: self.dir.clone(),
            metrics_file: metrics_file.clone(),
            output,
            details: JobDetails {
                labels: self.launch.labels.clone(),
                gpus: u32::try_from(self.launch.gpus_requested).unwrap_or(0),
                workers: self.launch.workers,
                deadline: self.launch.deadline,
                termination_grace: self
                    .launch
                    .termination_grace
                    .unwrap_or(self.ctx.default_termination_grace),
                secret_refs: if by_reference {
                    self.launch.secret_env.clone()
                } else {
                    BTreeMap::new()
                },
            },
        };
        let launched = match secrets {
            Ok(_) => self.ctx.backend.launch(req).await,
            Err(e) => {
                // Its copy of the log's sink would keep the log open.
                drop(req);
                Err(e)
            }
        };
        let mut workload = match launched {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, command = ?self.launch.command, "attempt could not be started");
                self.notice(&e.to_string()).await;
                self.conclude(finish_tx, log_shipper, None, None).await;
                let err = e.to_job_error();
                self.reporter
                    .report(
                        AttemptState::Failed,
                        Some(err.exit_code),
                        Some(err),
                        self.writer.tail(),
                    )
                    .await;
                tracing::info!(state = "ATTEMPT_STATE_FAILED", "attempt finished");
                return;
            }
        };
        tracing::info!(workload = %workload.describe(), command = ?self.launch.command,
            gpus = ?self.launch.gpu_indexes, dir = %self.dir.display(), "attempt launched");

        let running = {
            let reporter = self.reporter.clone();
            spawn_in_scope(&self.launch.correlation_id, async move {
                reporter
                    .report(AttemptState::Running, None, None, Vec::new())
                    .await
            })
        };
        let metrics_shipper = spawn_in_scope(
            &self.launch.correlation_id,
            MetricsShipper {
                client: self.ctx.peers.metrics.clone(),
                key,
                tailer: Tailer::open(metrics_file, self.dir.join(METRICS_CURSOR)),
                interval: self.ctx.metrics_flush_interval,
                max_backoff: self.ctx.max_backoff,
            }
            .run(finish_rx.clone()),
        );

        let outcome = self.supervise(workload.as_mut()).await;
        self.conclude(finish_tx, log_shipper, Some(metrics_shipper), Some(running))
            .await;

        let (state, exit_code, error) = match outcome {
            Outcome::Exited(t) if t.success() => (AttemptState::Succeeded, Some(0), None),
            Outcome::Exited(t) => {
                let files = self.writer.files.clone();
                let text =
                    tokio::task::spawn_blocking(move || files.tail_text(CLASSIFY_TAIL_BYTES))
                        .await
                        .unwrap_or_default();
                let err = workload.failure().or_else(|| job_error::classify(t, &text));
                let facts = job_error::AttemptFacts {
                    gpus: self.launch.gpus_requested,
                    // Only Kubernetes spreads a job's replicas over nodes.
                    single_node: self.launch.workers == 0
                        || self.ctx.backend.kind() != "kubernetes",
                };
                let err = err.map(|e| job_error::judge_node_fault(e, facts));
                (AttemptState::Failed, Some(t.exit_code()), err)
            }
            Outcome::Stopped(StopReason::Cancelled, t) => {
                (AttemptState::Cancelled, Some(t.exit_code()), None)
            }
            // Not the user's doing, and not the end of the job: the
            // scheduler runs it again without counting this attempt.
            Outcome::Stopped(StopReason::HandBack, t) => (
                AttemptState::Failed,
                Some(t.exit_code()),
                Some(job_error::handed_back_error(Some(t))),
            ),
            // Never SUCCEEDED, even if the job exited 0 on SIGTERM: the
            // scheduler may already run it elsewhere.
            Outcome::Stopped(StopReason::LeaseLost { .. }, t) => (
                AttemptState::Failed,
                Some(t.exit_code()),
                Some(job_error::lease_lost_error(Some(t))),
            ),
            Outcome::DeadlineExceeded(d, t) => (
                AttemptState::Failed,
                Some(t.exit_code()),
                Some(job_error::deadline_error(d, t)),
            ),
            Outcome::Lost(e) => (
                AttemptState::Failed,
                None,
                Some(job_error::platform_error(
                    "RunnerLostWorkload",
                    format!("the runner lost track of the workload: {e}"),
                )),
            ),
        };
        self.reporter
            .report(state, exit_code, error.clone(), self.writer.tail())
            .await;
        tracing::info!(
            state = state.as_str_name(),
            exit_code,
            error_type = error.as_ref().map(|e| e.r#type.as_str()),
            category = error.as_ref().map(|e| e.category.as_str()),
            "attempt finished"
        );
    }

    /// A line of the runner's own in the attempt's log, so the user sees
    /// why the attempt ended the way it did.
    async fn notice(&self, text: &str) {
        if let Some(sink) = &self.sink {
            sink.line(format!("[trainmesh] {text}")).await;
        }
    }

    /// Waits for the workload to end, stopping it on cancel, shutdown or
    /// deadline.
    async fn supervise(&mut self, workload: &mut dyn Workload) -> Outcome {
        let grace = self
            .launch
            .termination_grace
            .unwrap_or(self.ctx.default_termination_grace);
        let deadline = self.launch.deadline;
        let mut stop = self.stop.clone();
        let stopped = async {
            let reason = stop.wait_for(Option::is_some).await.map(|r| *r);
            match reason {
                Ok(r) => r,
                // The runner dropped the handle: nobody can stop us now.
                Err(_) => futures::future::pending().await,
            }
        };
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => futures::future::pending().await,
            }
        };
        let result = tokio::select! {
            r = workload.wait() => Ok(r),
            reason = stopped => Err((reason, None)),
            _ = expired => Err((None, deadline)),
        };
        let (reason, deadline) = match result {
            Ok(Ok(t)) => return Outcome::Exited(t),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot wait for the workload");
                return Outcome::Lost(e);
            }
            Err(v) => v,
        };
        let why = match (reason, deadline) {
            (Some(StopReason::Cancelled), _) => "the job was cancelled".to_owned(),
            (Some(StopReason::HandBack), _) => {
                "the runner is stopping; the attempt goes back to the queue".to_owned()
            }
            (Some(StopReason::LeaseLost { .. }), _) => {
                "the runner lost its lease with the scheduler, which runs the attempt elsewhere"
                    .to_owned()
            }
            (None, d) => format!(
                "the attempt ran past its deadline of {}s",
                d.unwrap_or_default().as_secs_f64()
            ),
        };
        // Dead before the scheduler gives the attempt to another runner.
        let grace = match reason {
            Some(StopReason::LeaseLost { kill_by }) => {
                grace.min(kill_by.saturating_duration_since(Instant::now()))
            }
            _ => grace,
        };
        tracing::info!(reason = %why, grace_s = grace.as_secs_f64(), "stopping the workload");
        self.notice(&format!(
            "stopping: {why} (SIGTERM, then SIGKILL after {}s)",
            grace.as_secs_f64()
        ))
        .await;
        let term = match workload.stop(grace).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot stop the workload");
                return Outcome::Lost(e);
            }
        };
        match (reason, deadline) {
            (Some(r), _) => Outcome::Stopped(r, term),
            (None, d) => Outcome::DeadlineExceeded(d.unwrap_or_default(), term),
        }
    }

    /// After the workload ended: closes the log, ships what is left of the
    /// log and metrics (bounded by the flush timeout), and makes sure the
    /// RUNNING report went first.
    async fn conclude(
        &mut self,
        finish_tx: watch::Sender<Option<Instant>>,
        log_shipper: tokio::task::JoinHandle<logs::Shipped>,
        metrics_shipper: Option<tokio::task::JoinHandle<logs::Shipped>>,
        running: Option<tokio::task::JoinHandle<()>>,
    ) {
        // Our own clone is the last sender once the workload is done.
        self.sink = None;
        if tokio::time::timeout(self.ctx.flush_timeout, self.writer.finished())
            .await
            .is_err()
        {
            // Only when the workload was lost with its output still open.
            tracing::warn!("the attempt's output did not close; shipping what was written");
        }
        let _ = finish_tx.send(Some(Instant::now() + self.ctx.flush_timeout));
        match log_shipper.await {
            Ok(s) => tracing::debug!(lines = s.count, complete = s.complete, "log shipped"),
            Err(e) => tracing::error!(error = %e, "log shipper failed"),
        }
        if let Some(m) = metrics_shipper {
            match m.await {
                Ok(s) => {
                    tracing::debug!(records = s.count, complete = s.complete, "metrics shipped")
                }
                Err(e) => tracing::error!(error = %e, "metrics shipper failed"),
            }
        }
        if let Some(r) = running {
            let _ = r.await;
        }
    }
}

/// Sends an attempt's status reports, retrying what can be retried.
#[derive(Clone)]
struct Reporter {
    ctx: Arc<AttemptContext>,
    runner_id: String,
    key: AttemptKey,
}

impl Reporter {
    async fn report(
        &self,
        state: AttemptState,
        exit_code: Option<i32>,
        error: Option<JobError>,
        log_tail: Vec<String>,
    ) {
        let req = ReportAttemptStatusRequest {
            runner_id: self.runner_id.clone(),
            job_id: self.key.job_id.to_string(),
            attempt: self.key.attempt,
            state: state as i32,
            exit_code,
            error,
            log_tail,
            time: Some(trainmesh_common::time::to_timestamp(
                trainmesh_common::time::now_micros(),
            )),
        };
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), self.ctx.max_backoff);
        loop {
            let mut client = self.ctx.peers.scheduler.clone();
            match client
                .report_attempt_status(request(req.clone(), CALL_TIMEOUT))
                .await
            {
                Ok(resp) => {
                    tracing::debug!(
                        state = state.as_str_name(),
                        changed = resp.get_ref().changed,
                        "attempt status reported"
                    );
                    return;
                }
                Err(s) if is_permanent(s.code()) => {
                    // Fenced: the scheduler gave this attempt to someone
                    // else (or forgot this runner). Its call, not ours.
                    tracing::warn!(state = state.as_str_name(), code = ?s.code(), detail = s.message(),
                        "scheduler refused the attempt status report");
                    return;
                }
                Err(s) => {
                    let patience = if *self.ctx.shutting_down.borrow() {
                        self.ctx.flush_timeout
                    } else {
                        REPORT_PERSISTENCE
                    };
                    let delay = backoff.next_delay();
                    if started.elapsed() + delay > patience {
                        tracing::error!(state = state.as_str_name(), code = ?s.code(), detail = s.message(),
                            "giving up reporting the attempt status");
                        return;
                    }
                    tracing::warn!(state = state.as_str_name(), code = ?s.code(), detail = s.message(),
                        retry_in_ms = delay.as_millis() as u64, "cannot report the attempt status; will retry");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Spawns `fut` with the current correlation id and span, so its log lines
/// and outgoing calls carry them too (task-locals do not cross `spawn`).
fn spawn_in_scope<F>(correlation_id: &str, fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let span = tracing::Span::current();
    tokio::spawn(trainmesh_common::correlation::scope(
        correlation_id.to_owned(),
        fut.instrument(span),
    ))
}
