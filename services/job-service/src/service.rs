//! Job logic: every state change, its event and its outbox message commit
//! in one transaction. No tonic types here.

use std::sync::Arc;

use prost::Message;
use sqlx::AnyConnection;
use tokio::sync::watch;
use trainmesh_common::audit::{AuditAction, AuditRecord, AuditTable};
use trainmesh_common::auth::Caller;
use trainmesh_common::db::Db;
use trainmesh_common::error::FieldError;
use trainmesh_common::group_commit::GroupCommit;
use trainmesh_common::outbox::{self, Relay};
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::proto::scheduler::v1 as spb;
use trainmesh_common::time::{now_micros, to_timestamp};
use trainmesh_common::{correlation, time};

use crate::domain::{
    JobId, JobState, LabelSelector, PageToken, RESERVED_LABEL_PREFIX, RETRY_OF_LABEL,
};
use crate::error::{Error, Result};
use crate::group_commit::{CreateQueue, Inserted, NewJob};
use crate::limits::{LimitsCache, QueuedLimits};
use crate::paths::PathPolicy;
use crate::repo::{self, AttemptRecord, JobFilter, JobRecord, NewEvent};
use crate::validate::{validate_idempotency_key, validate_reason, validate_spec, ValidSpec};

pub const TOPIC_ENQUEUE: &str = "enqueue";
pub const TOPIC_CANCEL: &str = "cancel";
pub const TOPIC_DIAGNOSE: &str = "diagnose";

pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 500;

/// A job with its attempts, as GetJob shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub job: JobRecord,
    pub attempts: Vec<AttemptRecord>,
}

/// Tunables of the service.
#[derive(Clone, Debug)]
pub struct Settings {
    pub paths: PathPolicy,
    /// Enqueue a "diagnose" outbox message when a job fails.
    pub auto_diagnose: bool,
    pub max_log_lines_per_attempt: i64,
    pub secrets_key: Option<Arc<trainmesh_common::sealed::SecretsKey>>,
}

/// Wakes watchers after commits. Only counters are sent, never events, so
/// a slow watcher costs no memory: it re-reads from its own cursor.
#[derive(Debug)]
pub struct Signals {
    pub events: watch::Sender<u64>,
    pub logs: watch::Sender<u64>,
}

impl Signals {
    fn new() -> Self {
        Self {
            events: watch::channel(0).0,
            logs: watch::channel(0).0,
        }
    }

    pub(crate) fn bump(tx: &watch::Sender<u64>) {
        tx.send_modify(|v| *v = v.wrapping_add(1));
    }
}

pub struct JobService {
    pub(crate) db: Db,
    pub(crate) relay: Relay,
    pub(crate) settings: Settings,
    pub(crate) signals: Signals,
    /// Queued-jobs limits from the scheduler; `None`: no limit.
    pub(crate) limits: Option<LimitsCache>,
    /// New jobs go through one writer that commits them in groups.
    pub(crate) creates: CreateQueue,
    /// Status updates share commits on SQLite (see `update_status`).
    pub(crate) statuses: GroupCommit<(JobView, Option<bool>), Error>,
}

/// Another user's job looks exactly like a missing one.
fn visible(caller: &Caller, job: &JobRecord) -> bool {
    caller.sees_everything() || job.owner == caller.user
}

impl JobService {
    pub fn new(db: Db, relay: Relay, settings: Settings, limits: Option<LimitsCache>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            statuses: GroupCommit::start(&db),
            db,
            relay,
            settings,
            signals: Signals::new(),
            limits,
            creates: CreateQueue::start(me.clone()),
        })
    }

    async fn queued_limits(&self, owner: &str, org: &str) -> QueuedLimits {
        match &self.limits {
            Some(cache) => cache.get(owner, org).await,
            None => QueuedLimits::default(),
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub(crate) fn committed(&self, outbox: bool) {
        Signals::bump(&self.signals.events);
        if outbox {
            self.relay.notify();
        }
    }

    pub(crate) async fn load_view(
        &self,
        conn: &mut AnyConnection,
        job: JobRecord,
    ) -> Result<JobView> {
        // Attempts are made only with `current_attempt` raised to them, so
        // a job still at 0 has none: no need to ask (most status updates
        // are for such jobs).
        let attempts = if job.current_attempt == 0 {
            Vec::new()
        } else {
            repo::attempts_of(conn, &[job.id])
                .await?
                .remove(&job.id)
                .unwrap_or_default()
        };
        Ok(JobView { job, attempts })
    }

    /// The job if `caller` may see it; otherwise NOT_FOUND.
    pub async fn get(&self, caller: &Caller, raw_id: &str) -> Result<JobView> {
        let id = JobId::parse_field("job_id", raw_id)?;
        // One snapshot for the job and its attempts: read apart, a status
        // update committing in between shows a QUEUED job with a running
        // attempt.
        let mut tx = trainmesh_common::db::snapshot(&self.db).await?;
        match repo::get_job(&mut tx, id).await? {
            Some(job) if visible(caller, &job) => self.load_view(&mut tx, job).await,
            _ => Err(Error::JobNotFound(id.to_string())),
        }
    }

    /// Validates a user's spec. Path checks touch the file system (which may
    /// be a slow network mount), so they run on the blocking pool.
    async fn validate(&self, spec: Option<pb::JobSpec>) -> Result<ValidSpec> {
        let has_paths = spec
            .as_ref()
            .and_then(|s| s.training.as_ref())
            .is_some_and(|t| !t.dataset_path.is_empty() || !t.output_path.is_empty());
        if !has_paths {
            return Ok(validate_spec(spec, &self.settings.paths, false)?);
        }
        let paths = self.settings.paths.clone();
        tokio::task::spawn_blocking(move || validate_spec(spec, &paths, false))
            .await
            .map_err(|e| Error::Retry(format!("validation did not complete: {e}")))?
            .map_err(Error::from)
    }

    /// `spec` with the values it marks secret sealed for `owner`; a value
    /// that is sealed already stays as it is.
    fn sealed(&self, owner: &str, mut spec: pb::JobSpec) -> Result<pb::JobSpec> {
        use trainmesh_common::sealed::{is_sealed, sealed_len};
        use trainmesh_common::spec::limits::MAX_VALUE_BYTES;
        if spec.secret_env_keys.is_empty() {
            return Ok(spec);
        }
        let Some(key) = &self.settings.secrets_key else {
            return Err(Error::FailedPrecondition(
                "spec.secret_env_keys: this mesh has no secrets key to seal values with; give \
                 job-service and the runners --secrets-key-file (trainctl tokens init writes one)"
                    .into(),
            ));
        };
        for name in &spec.secret_env_keys {
            let Some(value) = spec.env.get_mut(name) else {
                continue;
            };
            if is_sealed(value) {
                continue;
            }
            if sealed_len(value) > MAX_VALUE_BYTES {
                return Err(FieldError::new(
                    format!("spec.env[\"{name}\"]"),
                    format!(
                        "a secret value may be at most {} bytes (sealing makes it longer)",
                        (MAX_VALUE_BYTES - sealed_len("")) / 2
                    ),
                )
                .into());
            }
            *value = key.seal(owner, name, value);
        }
        Ok(spec)
    }

    /// `spec` with the sealed values it marks secret opened, where they
    /// open; for comparing a submission with a stored job only.
    fn opened(&self, owner: &str, mut spec: pb::JobSpec) -> pb::JobSpec {
        let Some(key) = &self.settings.secrets_key else {
            return spec;
        };
        for name in &spec.secret_env_keys {
            if let Some(value) = spec.env.get_mut(name) {
                if let Ok(plain) = key.open(owner, name, value) {
                    *value = plain;
                }
            }
        }
        spec
    }

    /// A request that reuses `key` must be the submission that first used
    /// it: the same spec, before or after validation (which resolves paths).
    /// Otherwise the caller would be told their new job exists when it is
    /// someone else's, or an older one.
    async fn same_submission(
        &self,
        key: &str,
        job: &JobRecord,
        spec: Option<&pb::JobSpec>,
    ) -> Result<()> {
        // Sealed values differ at every sealing: compare what they hold.
        let stored = self.opened(&job.owner, job.spec.clone());
        let spec = spec.map(|s| self.opened(&job.owner, s.clone()));
        if spec.as_ref() == Some(&stored) {
            return Ok(());
        }
        if let Ok(valid) = self.validate(spec).await {
            if valid.get() == &stored {
                return Ok(());
            }
        }
        Err(FieldError::new(
            "idempotency_key",
            format!(
                "`{key}` was already used for job `{}` with a different spec; \
                 use a new key for a new job",
                job.id
            ),
        )
        .into())
    }

    /// CreateJob. Returns the job and whether the idempotency key matched an
    /// existing one (then the stored job is returned as it is; a different
    /// spec under the same key is refused).
    pub async fn create(
        &self,
        caller: &Caller,
        spec: Option<pb::JobSpec>,
        idempotency_key: &str,
    ) -> Result<(JobView, bool)> {
        let key = validate_idempotency_key(idempotency_key)?;
        // The key first: a retry gets its original job even if the roots
        // changed since, and costs no file-system look-ups.
        if let Some(k) = &key {
            let mut conn = self.db.read.acquire().await?;
            if let Some(id) = repo::find_idempotent(&mut conn, &caller.user, k).await? {
                if let Some(job) = repo::get_job(&mut conn, id).await? {
                    self.same_submission(k, &job, spec.as_ref()).await?;
                    return Ok((self.load_view(&mut conn, job).await?, true));
                }
            }
        }
        // Kept only to compare with a concurrent submission under the key.
        let raw = if key.is_some() { spec.clone() } else { None };
        let valid = self.validate(spec).await?;
        let sealed = self.sealed(&caller.user, valid.into_inner())?;
        let (view, replayed) = self
            .insert_new(&caller.user, &caller.org, sealed, key.as_deref())
            .await?;
        if replayed {
            let k = key.as_deref().unwrap_or_default();
            self.same_submission(k, &view.job, raw.as_ref()).await?;
        }
        Ok((view, replayed))
    }

    async fn insert_new(
        &self,
        owner: &str,
        org: &str,
        spec: pb::JobSpec,
        key: Option<&str>,
    ) -> Result<(JobView, bool)> {
        // Asked before queueing: no network wait inside the transaction.
        let limits = self.queued_limits(owner, org).await;
        let cid = correlation::current().unwrap_or_else(correlation::generate);
        let now = now_micros();
        let job = JobRecord::new(JobId::new(), owner, org, spec, &cid, now);
        let enqueue = spb::EnqueueJobRequest {
            job_id: job.id.to_string(),
            owner: job.owner.clone(),
            org: job.org.clone(),
            spec: Some(job.spec.clone()),
            correlation_id: cid.clone(),
            submit_time: Some(to_timestamp(now)),
        };
        let item = NewJob {
            job,
            key: key.map(str::to_owned),
            limits,
            enqueue: enqueue.encode_to_vec(),
            traceparent: correlation::traceparent(),
        };
        match self.creates.submit(item).await? {
            Inserted::Created(job) => {
                tracing::info!(job_id = %job.id, owner, correlation_id = %cid, "job created");
                Ok((
                    JobView {
                        job: *job,
                        attempts: Vec::new(),
                    },
                    false,
                ))
            }
            Inserted::KeyTaken => {
                // Lost a race with a concurrent retry: answer with its job.
                let k = key.unwrap_or_default();
                let mut conn = self.db.write.acquire().await?;
                let existing = match repo::find_idempotent(&mut conn, owner, k).await? {
                    Some(id) => repo::get_job(&mut conn, id).await?,
                    None => None,
                };
                match existing {
                    Some(j) => Ok((self.load_view(&mut conn, j).await?, true)),
                    None => Err(Error::Retry(
                        "a concurrent request with this idempotency key did not complete; retry"
                            .into(),
                    )),
                }
            }
        }
    }

    /// ListJobs. A user may name only themself as `owner`.
    pub async fn list(
        &self,
        caller: &Caller,
        states: &[i32],
        selectors: &[String],
        owner: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<JobView>, String)> {
        let owner = if owner.is_empty() {
            (!caller.sees_everything()).then(|| caller.user.clone())
        } else if owner == caller.user || caller.sees_everything() {
            Some(owner.to_owned())
        } else {
            return Err(Error::PermissionDenied(format!(
                "`{}` may list only their own jobs, not `{owner}`'s",
                caller.user
            )));
        };
        let states = states
            .iter()
            .enumerate()
            .map(|(i, s)| JobState::from_proto(&format!("states[{i}]"), *s))
            .collect::<Result<Vec<_>, FieldError>>()?;
        if selectors.len() > trainmesh_common::spec::limits::MAX_LABELS {
            return Err(FieldError::new(
                "label_selector",
                format!(
                    "at most {} selectors are allowed",
                    trainmesh_common::spec::limits::MAX_LABELS
                ),
            )
            .into());
        }
        let labels = selectors
            .iter()
            .enumerate()
            .map(|(i, s)| LabelSelector::parse(&format!("label_selector[{i}]"), s))
            .collect::<Result<Vec<_>, FieldError>>()?;
        let limit = match i64::from(page_size) {
            n if n < 0 => return Err(FieldError::new("page_size", "must not be negative").into()),
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = (!page_token.is_empty())
            .then(|| PageToken::decode("page_token", page_token))
            .transpose()?;
        let filter = JobFilter {
            owner,
            states,
            labels,
            after,
            // One more than asked tells whether another page exists.
            limit: limit + 1,
        };
        // Jobs and their attempts from one snapshot (see `get`).
        let mut conn = trainmesh_common::db::snapshot(&self.db).await?;
        let mut jobs = repo::list_jobs(&mut conn, &filter).await?;
        let more = jobs.len() as i64 > limit;
        jobs.truncate(limit as usize);
        let next = match (more, jobs.last()) {
            (true, Some(last)) => PageToken {
                create_time: last.create_time,
                id: last.id.to_string(),
            }
            .encode(),
            _ => String::new(),
        };
        let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
        let mut attempts = repo::attempts_of(&mut conn, &ids).await?;
        let views = jobs
            .into_iter()
            .map(|job| JobView {
                attempts: attempts.remove(&job.id).unwrap_or_default(),
                job,
            })
            .collect();
        Ok((views, next))
    }

    /// CancelJob. Cancelling twice is harmless.
    pub async fn cancel(&self, caller: &Caller, raw_id: &str, reason: &str) -> Result<JobView> {
        let id = JobId::parse_field("job_id", raw_id)?;
        let reason = validate_reason("reason", reason)?;
        let reason = if reason.is_empty() {
            format!("cancelled by {}", caller.user)
        } else {
            reason
        };
        let mut tx = self.db.begin_write().await?;
        let mut job = match repo::lock_job_for_change(&mut tx, self.db.backend, id).await? {
            Some(j) if visible(caller, &j) => j,
            _ => return Err(Error::JobNotFound(id.to_string())),
        };
        if job.state.is_terminal() {
            return Err(Error::FailedPrecondition(format!(
                "job `{id}` already ended ({}); only unfinished jobs can be cancelled",
                job.state
            )));
        }
        if job.cancel_requested {
            let view = self.load_view(&mut tx, job).await?;
            tx.commit().await?;
            return Ok(view);
        }
        let now = now_micros();
        let prev = job.state;
        job.cancel_requested = true;
        job.update_time = now;
        // Kept as the reason of the final CANCELLED when the scheduler
        // reports none.
        job.state_reason = reason.clone();
        let event_type = if prev == JobState::Pending {
            // Not yet in the scheduler's hands: cancelled at once. The
            // "cancel" message still follows the "enqueue" (same key, in
            // order), so a queue entry made meanwhile is closed too.
            job.state = JobState::Cancelled;
            job.end_time = now;
            job.failure_cause = pb::FailureCause::Cancelled;
            "state_changed"
        } else {
            "cancel_requested"
        };
        let sequence = repo::save_job(&mut tx, &job).await?;
        let msg = spb::CancelQueuedJobRequest {
            job_id: id.to_string(),
            reason: reason.clone(),
        };
        outbox::enqueue(
            &mut tx,
            TOPIC_CANCEL,
            &id.to_string(),
            &msg.encode_to_vec(),
            &job.correlation_id,
        )
        .await?;
        repo::append_event(
            &mut tx,
            self.db.backend,
            sequence,
            &NewEvent {
                job_id: id,
                owner: &job.owner,
                event_type,
                state: job.state,
                previous_state: Some(prev),
                message: &reason,
                attempt: job.current_attempt,
                time: now,
            },
        )
        .await?;
        if caller.user != job.owner {
            // An admin stopping someone else's work is worth a record.
            AuditRecord::new(&caller.user, AuditAction::CancelJob, &id.to_string())
                .detail("owner", &job.owner)
                .detail("reason", &reason)
                .detail("state", prev.to_string())
                .write(&mut tx, AuditTable::SERVICE, now)
                .await?;
        }
        let view = self.load_view(&mut tx, job).await?;
        tx.commit().await?;
        self.committed(true);
        tracing::info!(job_id = %id, user = %caller.user, %reason, "cancel requested");
        Ok(view)
    }

    /// DeleteJob: only a finished job, or one no runner was ever given.
    pub async fn delete(&self, caller: &Caller, raw_id: &str) -> Result<()> {
        let id = JobId::parse_field("job_id", raw_id)?;
        let mut tx = self.db.begin_write().await?;
        let job = match repo::lock_job_for_change(&mut tx, self.db.backend, id).await? {
            Some(j) if visible(caller, &j) => j,
            _ => return Err(Error::JobNotFound(id.to_string())),
        };
        let unstarted = job.state.never_started() && job.current_attempt == 0;
        if !job.state.is_terminal() && !unstarted {
            return Err(Error::FailedPrecondition(format!(
                "job `{id}` is {}; cancel it and wait for it to end before deleting it",
                job.state
            )));
        }
        if !job.state.is_terminal() {
            // The scheduler may already hold a queue entry for it.
            let msg = spb::CancelQueuedJobRequest {
                job_id: id.to_string(),
                reason: format!("deleted by {}", caller.user),
            };
            outbox::enqueue(
                &mut tx,
                TOPIC_CANCEL,
                &id.to_string(),
                &msg.encode_to_vec(),
                &job.correlation_id,
            )
            .await?;
        }
        repo::delete_job_data(&mut tx, id).await?;
        let sequence = repo::next_event_sequence(&mut tx, id).await?;
        repo::append_event(
            &mut tx,
            self.db.backend,
            sequence,
            &NewEvent {
                job_id: id,
                owner: &job.owner,
                event_type: "deleted",
                state: job.state,
                previous_state: Some(job.state),
                message: &format!("deleted by {}", caller.user),
                attempt: job.current_attempt,
                time: now_micros(),
            },
        )
        .await?;
        repo::delete_job_row(&mut tx, id).await?;
        tx.commit().await?;
        self.committed(!job.state.is_terminal());
        tracing::info!(job_id = %id, user = %caller.user, "job deleted");
        Ok(())
    }

    /// RetryJob: a NEW job with the failed/cancelled job's spec and owner,
    /// labelled `trainmesh.io/retry-of=<old id>`. The spec is validated
    /// again (the data roots may have changed since).
    pub async fn retry(&self, caller: &Caller, raw_id: &str) -> Result<JobView> {
        let old = self.get(caller, raw_id).await?.job;
        if !matches!(old.state, JobState::Failed | JobState::Cancelled) {
            return Err(Error::FailedPrecondition(format!(
                "job `{}` is {}; only FAILED or CANCELLED jobs can be retried",
                old.id, old.state
            )));
        }
        let mut spec = old.spec.clone();
        spec.labels
            .retain(|k, _| !k.starts_with(RESERVED_LABEL_PREFIX));
        let spec = self.validate(Some(spec)).await?.map_unchecked(|s| {
            s.labels
                .insert(RETRY_OF_LABEL.to_owned(), old.id.to_string());
        });
        let (view, _) = self
            .insert_new(&old.owner, &old.org, spec.into_inner(), None)
            .await?;
        tracing::info!(job_id = %view.job.id, retry_of = %old.id, "job retried");
        Ok(view)
    }
}

/// Micros to a protobuf timestamp, `None` for 0.
pub fn ts(micros: i64) -> Option<prost_types::Timestamp> {
    time::to_opt_timestamp(micros)
}
