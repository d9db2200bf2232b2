//! Thin gRPC adapters: authorise, convert proto ⇄ domain, call the logic.

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};
use trainmesh_common::auth::{caller, service, Role};
use trainmesh_common::error::FieldError;
use trainmesh_common::proto::job::v1::JobSpec;
use trainmesh_common::proto::runner::v1 as runner_pb;
use trainmesh_common::proto::scheduler::v1 as pb;
use trainmesh_common::server::ShutdownWatch;
use trainmesh_common::time::{from_duration, to_duration, to_timestamp};

use crate::decisions::{approval_proto, Verdict};
use crate::domain::{AttemptReport, JobId, NewEntry, Registration, RunnerId};
use crate::error::Error;
use crate::limits::{LimitKind, LimitRow, LimitTable, Scope};
use crate::plan::WaitReason;
use crate::repo::ApprovalState;
use crate::runner_admin::runner_info;
use crate::service::{QueueItem, Scheduler};

const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;

#[derive(Clone)]
pub struct Grpc {
    pub sched: Arc<Scheduler>,
    pub shutdown: ShutdownWatch,
}

fn page(size: i32, token: &str) -> Result<(usize, usize), FieldError> {
    let size = match size {
        s if s < 0 => return Err(FieldError::new("page_size", "must not be negative")),
        0 => DEFAULT_PAGE_SIZE,
        s => (s as usize).min(MAX_PAGE_SIZE),
    };
    let offset = if token.is_empty() {
        0
    } else {
        token
            .parse::<usize>()
            .map_err(|_| FieldError::new("page_token", "is not a token this service issued"))?
    };
    Ok((size, offset))
}

fn pending_reason(w: &WaitReason) -> pb::PendingReason {
    match w {
        WaitReason::Held => pb::PendingReason::Held,
        WaitReason::AwaitingApproval { .. } => pb::PendingReason::AwaitingApproval,
        WaitReason::Backoff { .. } => pb::PendingReason::Backoff,
        WaitReason::GlobalLimit { .. } => pb::PendingReason::GlobalLimit,
        WaitReason::OrgLimit { .. } => pb::PendingReason::OrgLimit,
        WaitReason::UserRunningLimit { .. } => pb::PendingReason::UserRunningLimit,
        WaitReason::UserGpuLimit { .. } => pb::PendingReason::UserGpuLimit,
        WaitReason::NoRunnerCapacity { .. } => pb::PendingReason::NoRunnerCapacity,
        WaitReason::AvoidingRunners { .. } => pb::PendingReason::AvoidingRunners,
    }
}

/// A runner's list of attempts, validated; `field` names the list.
fn attempts_of(
    field: &str,
    refs: &[runner_pb::AttemptRef],
) -> Result<Vec<(JobId, i64)>, FieldError> {
    refs.iter()
        .enumerate()
        .map(|(i, a)| {
            let job_id = JobId::parse_field(&format!("{field}[{i}].job_id"), &a.job_id)?;
            if a.attempt < 1 {
                return Err(FieldError::new(
                    format!("{field}[{i}].attempt"),
                    "must be 1 or more",
                ));
            }
            Ok((job_id, i64::from(a.attempt)))
        })
        .collect()
}

fn attempt_refs(attempts: Vec<(JobId, i64)>) -> Vec<runner_pb::AttemptRef> {
    attempts
        .into_iter()
        .map(|(job_id, attempt)| runner_pb::AttemptRef {
            job_id: job_id.to_string(),
            attempt: i32_of(attempt),
        })
        .collect()
}

fn i32_of(v: impl TryInto<i32>) -> i32 {
    v.try_into().unwrap_or(i32::MAX)
}

fn queue_entry(item: QueueItem) -> pb::QueueEntry {
    let e = item.entry;
    let (reason, detail) = match &item.waiting {
        Some(w) => (pending_reason(&w.reason), w.detail.clone()),
        None if e.state == crate::domain::EntryState::Queued => (
            pb::PendingReason::Unspecified,
            "starting: a runner has capacity for it".to_owned(),
        ),
        None => (pb::PendingReason::Unspecified, String::new()),
    };
    pb::QueueEntry {
        job_id: e.job_id.to_string(),
        owner: e.owner,
        org: e.org,
        priority: e.priority,
        effective_priority: item.effective_priority as f64,
        position: i32_of(item.position),
        estimated_wait: item.estimated_wait.map(to_duration),
        reason: reason as i32,
        reason_detail: detail,
        gpus: i32_of(e.demand.gpus),
        submit_time: Some(to_timestamp(e.submit_time)),
        state: e.state.proto() as i32,
    }
}

fn approval_state(v: i32) -> Result<Option<ApprovalState>, FieldError> {
    Ok(match pb::ApprovalState::try_from(v) {
        Ok(pb::ApprovalState::Unspecified) => None,
        Ok(pb::ApprovalState::Pending) => Some(ApprovalState::Pending),
        Ok(pb::ApprovalState::Approved) => Some(ApprovalState::Approved),
        Ok(pb::ApprovalState::Rejected) => Some(ApprovalState::Rejected),
        Ok(pb::ApprovalState::Expired) => Some(ApprovalState::Expired),
        Err(_) => return Err(FieldError::new("state", "is not an ApprovalState")),
    })
}

#[tonic::async_trait]
impl pb::scheduler_internal_service_server::SchedulerInternalService for Grpc {
    async fn enqueue_job(
        &self,
        req: Request<pb::EnqueueJobRequest>,
    ) -> Result<Response<pb::EnqueueJobResponse>, Status> {
        caller(&req)?.require_service(service::JOB)?;
        let req = req.into_inner();
        let raw_id = req.job_id.clone();
        let entry = match NewEntry::try_from(req) {
            Ok(entry) => entry,
            Err(refusal) => {
                if let Ok(job_id) = JobId::parse_field("job_id", &raw_id) {
                    self.sched.refuse(job_id, &refusal.to_string()).await?;
                }
                return Err(refusal.into());
            }
        };
        let (state, created) = self.sched.enqueue(entry).await?;
        Ok(Response::new(pb::EnqueueJobResponse {
            state: state.proto() as i32,
            created,
        }))
    }

    async fn cancel_queued_job(
        &self,
        req: Request<pb::CancelQueuedJobRequest>,
    ) -> Result<Response<pb::CancelQueuedJobResponse>, Status> {
        caller(&req)?.require_service(service::JOB)?;
        let req = req.into_inner();
        let job_id = JobId::parse_field("job_id", &req.job_id)?;
        let state = self.sched.cancel(job_id, &req.reason).await?;
        Ok(Response::new(pb::CancelQueuedJobResponse {
            state: state.proto() as i32,
        }))
    }
}

#[tonic::async_trait]
impl runner_pb::runner_service_server::RunnerService for Grpc {
    async fn register_runner(
        &self,
        req: Request<runner_pb::RegisterRunnerRequest>,
    ) -> Result<Response<runner_pb::RegisterRunnerResponse>, Status> {
        let who = caller(&req)?;
        let name = who.require_runner()?;
        let reg = Registration::try_from(req.into_inner())?;
        if reg.name != name {
            return Err(Status::permission_denied(format!(
                "runner `{name}` may not register as `{}`: a runner's credential names the \
                 runner it is",
                reg.name
            )));
        }
        let r = self.sched.register(reg).await?;
        Ok(Response::new(runner_pb::RegisterRunnerResponse {
            runner_id: r.runner_id.to_string(),
            lease_ttl: Some(to_duration(r.lease_ttl)),
            heartbeat_interval: Some(to_duration(r.heartbeat_interval)),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<runner_pb::HeartbeatRequest>,
    ) -> Result<Response<runner_pb::HeartbeatResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let runner_id = self.own_runner(&who, &req.runner_id).await?;
        let active = attempts_of("active", &req.active)?;
        let out = self.sched.heartbeat(runner_id, &active).await?;
        Ok(Response::new(runner_pb::HeartbeatResponse {
            lease_expire_time: Some(to_timestamp(out.lease_expires_at)),
            cancel: attempt_refs(out.cancel),
        }))
    }

    async fn drain_runner(
        &self,
        req: Request<runner_pb::DrainRunnerRequest>,
    ) -> Result<Response<runner_pb::DrainRunnerResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let runner_id = self.own_runner(&who, &req.runner_id).await?;
        let active = attempts_of("active", &req.active)?;
        let requeued = self.sched.drain(runner_id, &active).await?;
        Ok(Response::new(runner_pb::DrainRunnerResponse {
            requeued: attempt_refs(requeued),
        }))
    }

    async fn deregister_runner(
        &self,
        req: Request<runner_pb::DeregisterRunnerRequest>,
    ) -> Result<Response<runner_pb::DeregisterRunnerResponse>, Status> {
        let who = caller(&req)?;
        let runner_id = self.own_runner(&who, &req.get_ref().runner_id).await?;
        let requeued = self.sched.deregister(runner_id).await?;
        Ok(Response::new(runner_pb::DeregisterRunnerResponse {
            requeued: attempt_refs(requeued),
        }))
    }

    async fn acquire_assignments(
        &self,
        req: Request<runner_pb::AcquireAssignmentsRequest>,
    ) -> Result<Response<runner_pb::AcquireAssignmentsResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let runner_id = self.own_runner(&who, &req.runner_id).await?;
        if req.max_assignments < 0 {
            return Err(FieldError::new("max_assignments", "must not be negative").into());
        }
        let wait = match &req.wait {
            None => std::time::Duration::ZERO,
            Some(d) => {
                from_duration(d).ok_or_else(|| FieldError::new("wait", "must not be negative"))?
            }
        };
        let got = self
            .sched
            .acquire(
                runner_id,
                i64::from(req.max_assignments),
                wait,
                self.shutdown.clone(),
            )
            .await?;
        let mut assignments = Vec::with_capacity(got.len());
        for d in got {
            let spec = JobSpec::decode(d.spec.as_slice())
                .map_err(|e| Error::Corrupt(format!("spec of job `{}`: {e}", d.job_id)))?;
            assignments.push(runner_pb::Assignment {
                job_id: d.job_id.to_string(),
                attempt: i32::try_from(d.attempt).unwrap_or(i32::MAX),
                owner: d.owner,
                org: d.org,
                spec: Some(spec),
                correlation_id: d.correlation_id,
                gpu_indexes: d.gpu_indexes,
            });
        }
        Ok(Response::new(runner_pb::AcquireAssignmentsResponse {
            assignments,
        }))
    }

    async fn report_attempt_status(
        &self,
        req: Request<runner_pb::ReportAttemptStatusRequest>,
    ) -> Result<Response<runner_pb::ReportAttemptStatusResponse>, Status> {
        let who = caller(&req)?;
        let report = AttemptReport::try_from(req.into_inner())?;
        self.sched
            .check_runner(who.require_runner()?, report.runner_id)
            .await?;
        let changed = self.sched.report(report).await?;
        Ok(Response::new(runner_pb::ReportAttemptStatusResponse {
            changed,
        }))
    }
}

impl Grpc {
    /// The registration a runner's call names, once the caller is shown to
    /// be the runner that made it.
    async fn own_runner(
        &self,
        who: &trainmesh_common::auth::Caller,
        runner_id: &str,
    ) -> Result<RunnerId, Status> {
        let name = who.require_runner()?;
        let id = RunnerId::parse_field("runner_id", runner_id)?;
        self.sched.check_runner(name, id).await?;
        Ok(id)
    }

    /// ApproveJob and RejectJob: the approver role, then a compare-and-set
    /// on the pending approval.
    async fn decide(
        &self,
        who: &trainmesh_common::auth::Caller,
        job_id: &str,
        note: &str,
        verdict: Verdict,
    ) -> Result<pb::Approval, Status> {
        who.require(Role::Approver)?;
        let job_id = JobId::parse_field("job_id", job_id)?;
        let a = self.sched.decide(job_id, verdict, &who.user, note).await?;
        Ok(approval_proto(&a))
    }
}

#[tonic::async_trait]
impl pb::scheduler_service_server::SchedulerService for Grpc {
    async fn get_queue(
        &self,
        req: Request<pb::GetQueueRequest>,
    ) -> Result<Response<pb::GetQueueResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let (size, offset) = page(req.page_size, &req.page_token)?;
        let owner = req.owner.trim();
        let filter = if who.sees_everything() {
            (!owner.is_empty()).then(|| owner.to_owned())
        } else {
            if !owner.is_empty() && owner != who.user {
                return Err(Error::OtherUsersQueue(owner.to_owned()).into());
            }
            Some(who.user.clone())
        };
        let items = self.sched.queue(filter.as_deref()).await?;
        let held = self.sched.hold().await?.is_some();
        let total = items.len();
        let entries: Vec<pb::QueueEntry> = items
            .into_iter()
            .skip(offset)
            .take(size)
            .map(queue_entry)
            .collect();
        let next = offset + entries.len();
        Ok(Response::new(pb::GetQueueResponse {
            entries,
            next_page_token: if next < total {
                next.to_string()
            } else {
                String::new()
            },
            held,
        }))
    }

    async fn explain_job(
        &self,
        req: Request<pb::ExplainJobRequest>,
    ) -> Result<Response<pb::ExplainJobResponse>, Status> {
        let who = caller(&req)?;
        let job_id = JobId::parse_field("job_id", &req.into_inner().job_id)?;
        let x = self.sched.explain(job_id).await?;
        if !who.sees_everything() && x.entry.owner != who.user {
            // Another user's job does not exist for this caller.
            return Err(Error::JobNotFound(job_id).into());
        }
        let causes = x
            .causes
            .into_iter()
            .map(|c| pb::BlockingCause {
                reason: pending_reason(&c.cause.reason) as i32,
                detail: c.cause.detail,
                unblock: c.unblock,
                scope: c.scope.map(|s| s.proto()).unwrap_or_default() as i32,
                limit: c.limit,
                current: c.current,
            })
            .collect();
        Ok(Response::new(pb::ExplainJobResponse {
            job_id: job_id.to_string(),
            state: x.entry.state.proto() as i32,
            causes,
            position: i32_of(x.position),
            estimated_wait: x.estimated_wait.map(to_duration),
            summary: x.summary,
            last_retry: x.last_retry.as_ref().map(|r| r.proto()),
            avoided_runners: x.entry.avoid_runners,
        }))
    }

    async fn get_queue_stats(
        &self,
        req: Request<pb::GetQueueStatsRequest>,
    ) -> Result<Response<pb::GetQueueStatsResponse>, Status> {
        let who = caller(&req)?;
        let s = self.sched.stats().await?;
        let by_user = s
            .by_user
            .into_iter()
            .filter(|(owner, _)| who.sees_everything() || *owner == who.user)
            .map(|(owner, u)| pb::UserQueueStats {
                owner,
                queued: i32::try_from(u.queued).unwrap_or(i32::MAX),
                running: i32::try_from(u.running).unwrap_or(i32::MAX),
                gpus_in_use: i32::try_from(u.gpus_in_use).unwrap_or(i32::MAX),
            })
            .collect();
        let i = |v: i64| i32::try_from(v).unwrap_or(i32::MAX);
        Ok(Response::new(pb::GetQueueStatsResponse {
            queued: i(i64::from(s.queued)),
            running: i(i64::from(s.running)),
            awaiting_approval: i(i64::from(s.awaiting_approval)),
            by_user,
            average_wait: s.average_wait.map(to_duration),
            runners: i(s.runners),
            gpus_total: i(s.gpus_total),
            gpus_in_use: i(s.gpus_in_use),
            held: s.held,
        }))
    }

    async fn approve_job(
        &self,
        req: Request<pb::ApproveJobRequest>,
    ) -> Result<Response<pb::ApproveJobResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let approval = self
            .decide(&who, &req.job_id, &req.note, Verdict::Approve)
            .await?;
        Ok(Response::new(pb::ApproveJobResponse {
            approval: Some(approval),
        }))
    }

    async fn reject_job(
        &self,
        req: Request<pb::RejectJobRequest>,
    ) -> Result<Response<pb::RejectJobResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let approval = self
            .decide(&who, &req.job_id, &req.note, Verdict::Reject)
            .await?;
        Ok(Response::new(pb::RejectJobResponse {
            approval: Some(approval),
        }))
    }

    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let state = approval_state(req.state)?;
        let (size, offset) = page(req.page_size, &req.page_token)?;
        // Approvers see every approval; a plain user only their own jobs'.
        let owner = (!(who.has(Role::Approver) || who.sees_everything())).then(|| who.user.clone());
        let rows = self
            .sched
            .list_approvals(state, owner.as_deref(), size as i64 + 1, offset as i64)
            .await?;
        let more = rows.len() > size;
        let approvals: Vec<pb::Approval> = rows.iter().take(size).map(approval_proto).collect();
        Ok(Response::new(pb::ListApprovalsResponse {
            next_page_token: if more {
                (offset + approvals.len()).to_string()
            } else {
                String::new()
            },
            approvals,
        }))
    }

    async fn set_limits(
        &self,
        req: Request<pb::SetLimitsRequest>,
    ) -> Result<Response<pb::SetLimitsResponse>, Status> {
        let who = caller(&req)?;
        who.require(Role::Admin)?;
        let row = LimitRow::try_from(req.into_inner().limits)?;
        self.sched.set_limits(&who.user, &row).await?;
        Ok(Response::new(pb::SetLimitsResponse {
            limits: Some(row.proto()),
        }))
    }

    async fn get_limits(
        &self,
        req: Request<pb::GetLimitsRequest>,
    ) -> Result<Response<pb::GetLimitsResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let user = req.user.trim();
        let org = req.org.trim();
        let everything = who.sees_everything();
        if !everything
            && ((!user.is_empty() && user != who.user) || (!org.is_empty() && org != who.org))
        {
            return Err(Status::permission_denied(format!(
                "`{}` may only read the limits of their own user and org",
                who.user
            )));
        }
        // A plain caller asking about themselves: their org is known.
        let org = if org.is_empty() && !everything && user == who.user {
            who.org.as_str()
        } else {
            org
        };
        let rows = self.sched.limit_rows().await?;
        let table = LimitTable::from_rows(&rows);
        let visible = |r: &&LimitRow| {
            everything
                || match r.scope {
                    Scope::Global | Scope::UserDefault => true,
                    Scope::Org => r.subject == who.org,
                    Scope::User => r.subject == who.user,
                }
        };
        let limits = rows.iter().filter(visible).map(LimitRow::proto).collect();
        let effective = if user.is_empty() && org.is_empty() {
            Vec::new()
        } else {
            LimitKind::ALL
                .iter()
                .filter_map(|kind| {
                    table
                        .effective(
                            (!user.is_empty()).then_some(user),
                            (!org.is_empty()).then_some(org),
                            *kind,
                        )
                        .map(|b| pb::EffectiveLimit {
                            name: kind.name().into(),
                            value: i64::from(b.value),
                            binding_scope: b.scope.proto() as i32,
                        })
                })
                .collect()
        };
        Ok(Response::new(pb::GetLimitsResponse { limits, effective }))
    }

    async fn hold_queue(
        &self,
        req: Request<pb::HoldQueueRequest>,
    ) -> Result<Response<pb::HoldQueueResponse>, Status> {
        let who = caller(&req)?;
        who.require(Role::Admin)?;
        let reason = req.into_inner().reason;
        let held = self.sched.set_hold(&who.user, Some(&reason)).await?;
        Ok(Response::new(pb::HoldQueueResponse { held }))
    }

    async fn release_queue(
        &self,
        req: Request<pb::ReleaseQueueRequest>,
    ) -> Result<Response<pb::ReleaseQueueResponse>, Status> {
        let who = caller(&req)?;
        who.require(Role::Admin)?;
        let held = self.sched.set_hold(&who.user, None).await?;
        Ok(Response::new(pb::ReleaseQueueResponse { held }))
    }

    async fn list_runners(
        &self,
        req: Request<pb::ListRunnersRequest>,
    ) -> Result<Response<pb::ListRunnersResponse>, Status> {
        let who = caller(&req)?;
        // The diagnosis reads capacities for its static checks.
        if !who.has(Role::Admin) {
            who.require_service(service::DIAGNOSIS)?;
        }
        let runners = self
            .sched
            .list_runners()
            .await?
            .into_iter()
            .map(runner_info)
            .collect();
        Ok(Response::new(pb::ListRunnersResponse { runners }))
    }

    async fn uncordon_runner(
        &self,
        req: Request<pb::UncordonRunnerRequest>,
    ) -> Result<Response<pb::UncordonRunnerResponse>, Status> {
        let who = caller(&req)?;
        who.require(Role::Admin)?;
        let req = req.into_inner();
        let (view, was_cordoned) = self.sched.uncordon(&who.user, &req.name, &req.note).await?;
        Ok(Response::new(pb::UncordonRunnerResponse {
            runner: Some(runner_info(view)),
            was_cordoned,
        }))
    }
}
