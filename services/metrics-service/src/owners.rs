//! Whose job a metric series belongs to, and which runners ran it, asked
//! of job-service.
//!
//! Users read and write only their own jobs' metrics; admins and the other
//! services (the `service` role) read any job's; a runner writes only for
//! an attempt placed on it. A job's owner never changes and an attempt's
//! runner neither, so each job is asked about once (`JobService.GetJob`
//! with this service's own token) and kept, and asked again only when a
//! runner names an attempt not seen yet: the ingest path pays one call per
//! job and attempt, not per batch.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::Code;
use trainmesh_common::auth::{Caller, Role};
use trainmesh_common::client::Channel;
use trainmesh_common::error::FieldError;
use trainmesh_common::proto::job::v1 as jpb;
use trainmesh_common::proto::job::v1::job_service_client::JobServiceClient;

use crate::domain::JobId;
use crate::error::{Error, Result};

/// Jobs kept before the table is started afresh (a few MB at most).
const MAX_KNOWN: usize = 100_000;

/// What metrics-service needs to know of a job.
#[derive(Clone, Debug)]
struct Facts {
    owner: String,
    /// The runner (name) of each attempt placed so far, by number.
    runners: HashMap<i32, String>,
}

#[derive(Debug)]
pub struct JobOwners {
    client: JobServiceClient<Channel>,
    timeout: Duration,
    known: Mutex<HashMap<JobId, Facts>>,
}

impl JobOwners {
    /// `channel` connects lazily: metrics-service starts without job-service.
    pub fn new(channel: Channel, timeout: Duration) -> Self {
        Self {
            client: JobServiceClient::new(channel),
            timeout,
            known: Mutex::default(),
        }
    }

    /// Whether `caller` may read `job`'s metrics.
    pub async fn check(&self, caller: &Caller, job: JobId) -> Result<()> {
        if caller.sees_everything() {
            return Ok(());
        }
        self.owned_by(caller, job).await
    }

    /// Whether `caller` may write `job`'s metrics for `attempt` (0: not
    /// said): its owner, an admin, or the runner the attempt was placed on.
    pub async fn check_write(&self, caller: &Caller, job: JobId, attempt: i32) -> Result<()> {
        if let Some(runner) = caller.runner() {
            return self.placed_on(runner, job, attempt).await;
        }
        if caller.has(Role::Admin) {
            return Ok(());
        }
        if caller.has(Role::Service) {
            return Err(Error::PermissionDenied(format!(
                "`{}` may read metrics but not write them: a job's metrics come from the \
                 runner of its attempt or from its owner",
                caller.user
            )));
        }
        self.owned_by(caller, job).await
    }

    async fn owned_by(&self, caller: &Caller, job: JobId) -> Result<()> {
        let facts = match self.cached(job) {
            Some(f) => f,
            None => self.fetch(job).await?,
        };
        if facts.owner == caller.user {
            Ok(())
        } else {
            // The same answer as for a job that does not exist: another
            // user's job ids are not to be probed for.
            Err(Error::JobNotFound(job))
        }
    }

    async fn placed_on(&self, runner: &str, job: JobId, attempt: i32) -> Result<()> {
        if attempt < 1 {
            return Err(FieldError::new(
                "attempt",
                "a runner names the attempt its points come from (at least 1)",
            )
            .into());
        }
        let known = self
            .cached(job)
            .and_then(|f| f.runners.get(&attempt).cloned());
        let name = match known {
            Some(n) => Some(n),
            None => self.fetch(job).await?.runners.get(&attempt).cloned(),
        };
        match name {
            Some(n) if n == runner => Ok(()),
            Some(n) => Err(Error::PermissionDenied(format!(
                "attempt {attempt} of job `{job}` was not placed on runner `{runner}` but on `{n}`"
            ))),
            None => Err(Error::NotYet(format!(
                "attempt {attempt} of job `{job}` is not known to job-service yet; retry"
            ))),
        }
    }

    fn cached(&self, job: JobId) -> Option<Facts> {
        self.lock().get(&job).cloned()
    }

    async fn fetch(&self, job: JobId) -> Result<Facts> {
        let mut client = self.client.clone();
        let req = jpb::GetJobRequest {
            job_id: job.to_string(),
        };
        let answer = tokio::time::timeout(self.timeout, client.get_job(req))
            .await
            .map_err(|_| Error::JobService(format!("GetJob timed out after {:?}", self.timeout)))?;
        let facts = match answer {
            Ok(resp) => {
                let j = resp
                    .into_inner()
                    .job
                    .ok_or_else(|| Error::JobService("GetJob answered without a job".into()))?;
                Facts {
                    owner: j.owner,
                    runners: j
                        .attempts
                        .into_iter()
                        .filter(|a| !a.runner_name.is_empty())
                        .map(|a| (a.number, a.runner_name))
                        .collect(),
                }
            }
            Err(s) if s.code() == Code::NotFound => return Err(Error::JobNotFound(job)),
            Err(s) => {
                return Err(Error::JobService(format!(
                    "GetJob: {:?}: {}",
                    s.code(),
                    s.message()
                )))
            }
        };
        let mut known = self.lock();
        if known.len() >= MAX_KNOWN {
            known.clear();
        }
        known.insert(job, facts.clone());
        Ok(facts)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Facts>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}
