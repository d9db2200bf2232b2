//! Reads a job and its log from job-service (`JobService.GetJob` and
//! `StreamJobLogs(tail_lines = 1000, follow = false)`), and for a job with
//! a deadline the owner's earlier successful runs of the same name
//! (`ListJobs`), and, for a job that asks for resources, what the
//! scheduler's runners offer (`ListRunners`), with this service's
//! own token; the `service` role may read any job, so the caller's right to
//! see the job is checked by the service, not here.

use std::time::Duration;

use tonic::Code;
use trainmesh_common::client::Channel;
use trainmesh_common::proto::job::v1 as jpb;
use trainmesh_common::proto::job::v1::job_service_client::JobServiceClient;
use trainmesh_common::proto::scheduler::v1 as spb;
use trainmesh_common::proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use trainmesh_common::time::from_timestamp;

use crate::domain::{JobFacts, JobId, LogLine, Offer};
use crate::error::{Error, Result};
use crate::logwindow::TAIL_LINES;

/// Recent successful jobs of the owner looked through for earlier runs.
const HISTORY_SCAN: i32 = 200;
/// Earlier runs compared with the deadline.
const HISTORY_RUNS: usize = 10;

/// Longest log line kept, in bytes; the rest of a longer line is cut.
const MAX_LINE_BYTES: usize = 4096;

/// A job and the tail of its log.
#[derive(Clone, Debug)]
pub struct JobSnapshot {
    pub job: JobFacts,
    pub log: Vec<LogLine>,
    /// Why the log is missing, when it could not be read.
    pub log_note: Option<String>,
}

#[derive(Clone, Debug)]
pub struct JobSource {
    client: JobServiceClient<Channel>,
    /// For the runners' offers; none when no scheduler is configured.
    scheduler: Option<SchedulerServiceClient<Channel>>,
    timeout: Duration,
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_LINE_BYTES {
        let mut end = MAX_LINE_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl JobSource {
    /// `channel` connects lazily: diagnosis-service starts without job-service.
    pub fn new(channel: Channel, timeout: Duration) -> Self {
        Self {
            client: JobServiceClient::new(channel),
            scheduler: None,
            timeout,
        }
    }

    /// Also compare jobs with what the scheduler's runners offer.
    pub fn with_scheduler(mut self, channel: Channel) -> Self {
        self.scheduler = Some(SchedulerServiceClient::new(channel));
        self
    }

    pub async fn fetch(&self, id: JobId) -> Result<JobSnapshot> {
        let mut job = self.get_job(id).await?;
        let asks = job.gpus > 0 || job.checks.cpu > 0.0 || job.checks.memory_mib > 0;
        if asks && self.scheduler.is_some() {
            match self.offers().await {
                Ok(o) => job.checks.fleet = Some(o),
                Err(e) => tracing::warn!(job_id = %id, error = %e, "runners' offers unavailable"),
            }
        }
        if job.checks.deadline.is_some() && !job.name.is_empty() {
            // Only the deadline check reads it; without it the rest stands.
            match self.history(&job).await {
                Ok(h) => job.checks.history = h,
                Err(e) => tracing::warn!(job_id = %id, error = %e, "earlier runs unavailable"),
            }
        }
        let (log, log_note) = match self.tail(id).await {
            Ok(log) => (log, None),
            // The job is there; a diagnosis without its log still helps.
            Err(e) => {
                tracing::warn!(job_id = %id, error = %e, "job log unavailable; diagnosing without it");
                (Vec::new(), Some(e.to_string()))
            }
        };
        Ok(JobSnapshot { job, log, log_note })
    }

    async fn get_job(&self, id: JobId) -> Result<JobFacts> {
        let mut client = self.client.clone();
        let req = jpb::GetJobRequest {
            job_id: id.to_string(),
        };
        let resp = tokio::time::timeout(self.timeout, client.get_job(req))
            .await
            .map_err(|_| Error::JobService(format!("GetJob timed out after {:?}", self.timeout)))?
            .map_err(|s| match s.code() {
                Code::NotFound => Error::JobNotFound(id),
                _ => Error::JobService(format!("GetJob: {:?}: {}", s.code(), s.message())),
            })?;
        let job = resp
            .into_inner()
            .job
            .ok_or_else(|| Error::JobService("GetJob answered without a job".into()))?;
        JobFacts::from_proto(&job)
            .map_err(|e| Error::JobService(format!("GetJob answered a bad job: {e}")))
    }

    /// How long the newest successful jobs of the same owner and name
    /// ran, newest first.
    async fn history(&self, job: &JobFacts) -> Result<Vec<Duration>> {
        let mut client = self.client.clone();
        let req = jpb::ListJobsRequest {
            states: vec![jpb::JobState::Succeeded as i32],
            owner: job.owner.clone(),
            page_size: HISTORY_SCAN,
            ..Default::default()
        };
        let resp = tokio::time::timeout(self.timeout, client.list_jobs(req))
            .await
            .map_err(|_| Error::JobService("ListJobs timed out".into()))?
            .map_err(|s| Error::JobService(format!("ListJobs: {:?}: {}", s.code(), s.message())))?;
        Ok(resp
            .into_inner()
            .jobs
            .iter()
            .filter(|j| j.id != job.id.to_string())
            .filter(|j| j.spec.as_ref().is_some_and(|s| s.name == job.name))
            .filter_map(|j| {
                let start = from_timestamp(j.start_time.as_ref()?);
                let end = from_timestamp(j.end_time.as_ref()?);
                let micros = u64::try_from(end.checked_sub(start)?).ok()?;
                Some(Duration::from_micros(micros))
            })
            .take(HISTORY_RUNS)
            .collect())
    }

    /// What each runner taking work offers a replica.
    async fn offers(&self) -> Result<Vec<Offer>> {
        let Some(mut client) = self.scheduler.clone() else {
            return Ok(Vec::new());
        };
        let resp = tokio::time::timeout(
            self.timeout,
            client.list_runners(spb::ListRunnersRequest {}),
        )
        .await
        .map_err(|_| Error::Scheduler("ListRunners timed out".into()))?
        .map_err(|s| Error::Scheduler(format!("ListRunners: {:?}: {}", s.code(), s.message())))?;
        Ok(resp
            .into_inner()
            .runners
            .into_iter()
            .filter(|r| r.state == spb::RunnerState::Ready as i32)
            .map(|r| {
                let c = r.capacity.unwrap_or_default();
                Offer {
                    runner: r.name,
                    gpus: c.gpus.into_iter().map(|g| g.model).collect(),
                    cpu: c.cpu,
                    memory_mib: c.memory_mib,
                }
            })
            .collect())
    }

    async fn tail(&self, id: JobId) -> Result<Vec<LogLine>> {
        let mut client = self.client.clone();
        let req = jpb::StreamJobLogsRequest {
            job_id: id.to_string(),
            attempt: 0,
            tail_lines: TAIL_LINES as i32,
            follow: false,
            cursor: String::new(),
        };
        let read = async {
            let mut stream = client
                .stream_job_logs(req)
                .await
                .map_err(|s| format!("StreamJobLogs: {:?}: {}", s.code(), s.message()))?
                .into_inner();
            let mut lines = Vec::new();
            while let Some(msg) = stream
                .message()
                .await
                .map_err(|s| format!("StreamJobLogs: {:?}: {}", s.code(), s.message()))?
            {
                lines.extend(
                    msg.lines
                        .into_iter()
                        .map(|l| LogLine::new(l.number, cut(l.text))),
                );
                // A peer that ignores tail_lines must not cost us memory.
                if lines.len() > 2 * TAIL_LINES {
                    lines.drain(..lines.len() - TAIL_LINES);
                }
            }
            Ok::<_, String>(lines)
        };
        let mut lines = tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| Error::JobService("StreamJobLogs timed out".into()))?
            .map_err(Error::JobService)?;
        if lines.len() > TAIL_LINES {
            lines.drain(..lines.len() - TAIL_LINES);
        }
        Ok(lines)
    }
}
