//! Whose job a metric series belongs to, asked of job-service.
//!
//! Users read and write only their own jobs' metrics; runners and other
//! services (the `service` role) and admins any job's. The owner of a job
//! never changes, so each job's owner is asked once (`JobService.GetJob`
//! with this service's own token) and kept: the ingest path pays one call
//! per job, not per batch.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::Code;
use trainmesh_common::auth::Caller;
use trainmesh_common::client::Channel;
use trainmesh_common::proto::job::v1 as jpb;
use trainmesh_common::proto::job::v1::job_service_client::JobServiceClient;

use crate::domain::JobId;
use crate::error::{Error, Result};

/// Owners kept before the table is started afresh (a few MB at most).
const MAX_KNOWN: usize = 100_000;

#[derive(Debug)]
pub struct JobOwners {
    client: JobServiceClient<Channel>,
    timeout: Duration,
    known: Mutex<HashMap<JobId, String>>,
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

    /// Whether `caller` may read and write `job`'s metrics.
    pub async fn check(&self, caller: &Caller, job: JobId) -> Result<()> {
        if caller.sees_everything() {
            return Ok(());
        }
        let owner = self.owner(job).await?;
        if owner == caller.user {
            Ok(())
        } else {
            // The same answer as for a job that does not exist: another
            // user's job ids are not to be probed for.
            Err(Error::JobNotFound(job))
        }
    }

    async fn owner(&self, job: JobId) -> Result<String> {
        if let Some(owner) = self.lock().get(&job) {
            return Ok(owner.clone());
        }
        let mut client = self.client.clone();
        let req = jpb::GetJobRequest {
            job_id: job.to_string(),
        };
        let answer = tokio::time::timeout(self.timeout, client.get_job(req))
            .await
            .map_err(|_| Error::JobService(format!("GetJob timed out after {:?}", self.timeout)))?;
        let owner = match answer {
            Ok(resp) => resp
                .into_inner()
                .job
                .map(|j| j.owner)
                .ok_or_else(|| Error::JobService("GetJob answered without a job".into()))?,
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
        known.insert(job, owner.clone());
        Ok(owner)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, String>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}
