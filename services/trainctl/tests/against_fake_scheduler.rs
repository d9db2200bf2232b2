//! trainctl's scheduler commands against a fake SchedulerService served by
//! the real common server stack (auth, correlation): what goes over the
//! wire for explain, approve/reject, approvals, limits and the queue.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use clap::Parser;
use tonic::{Request, Response, Status};
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::proto::scheduler::v1 as sched;
use trainmesh_common::proto::scheduler::v1::scheduler_service_server::{
    SchedulerService, SchedulerServiceServer,
};
use trainmesh_common::{auth, server, testing};

#[derive(Default)]
struct Seen {
    users: Vec<String>,
    correlation_ids: Vec<String>,
    explains: Vec<sched::ExplainJobRequest>,
    approves: Vec<sched::ApproveJobRequest>,
    rejects: Vec<sched::RejectJobRequest>,
    approval_lists: Vec<sched::ListApprovalsRequest>,
    get_limits: Vec<sched::GetLimitsRequest>,
    set_limits: Vec<sched::SetLimitsRequest>,
    holds: Vec<sched::HoldQueueRequest>,
    releases: usize,
    runner_lists: usize,
    uncordons: Vec<sched::UncordonRunnerRequest>,
}

#[derive(Clone, Default)]
struct Fake {
    seen: Arc<Mutex<Seen>>,
    /// The rows GetLimits answers with.
    rows: Arc<Mutex<Vec<sched::Limits>>>,
}

impl Fake {
    fn record<T>(&self, req: &Request<T>) -> Result<auth::Caller, Status> {
        let caller = auth::caller(req)?;
        let cid = req
            .metadata()
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut seen = self.seen.lock().unwrap();
        seen.users.push(caller.user.clone());
        seen.correlation_ids.push(cid);
        Ok(caller)
    }
}

fn approval(job_id: &str, state: sched::ApprovalState, by: &str, note: &str) -> sched::Approval {
    sched::Approval {
        job_id: job_id.into(),
        owner: "alice".into(),
        state: state as i32,
        rule: "big-gpu-jobs".into(),
        decided_by: by.into(),
        note: note.into(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl SchedulerService for Fake {
    async fn get_queue(
        &self,
        req: Request<sched::GetQueueRequest>,
    ) -> Result<Response<sched::GetQueueResponse>, Status> {
        self.record(&req)?;
        Ok(Response::new(sched::GetQueueResponse {
            entries: vec![sched::QueueEntry {
                job_id: "job-1".into(),
                owner: "alice".into(),
                position: 1,
                reason: sched::PendingReason::Held as i32,
                state: pb::JobState::Queued as i32,
                ..Default::default()
            }],
            next_page_token: String::new(),
            held: true,
        }))
    }

    async fn explain_job(
        &self,
        req: Request<sched::ExplainJobRequest>,
    ) -> Result<Response<sched::ExplainJobResponse>, Status> {
        self.record(&req)?;
        let r = req.into_inner();
        self.seen.lock().unwrap().explains.push(r.clone());
        if r.job_id != "job-1" {
            return Err(Status::not_found(format!("job `{}` not found", r.job_id)));
        }
        Ok(Response::new(sched::ExplainJobResponse {
            job_id: r.job_id,
            state: pb::JobState::AwaitingApproval as i32,
            causes: vec![sched::BlockingCause {
                reason: sched::PendingReason::AwaitingApproval as i32,
                detail: "approval required by rule `big-gpu-jobs`".into(),
                unblock: "an approver (role approver) runs `trainctl approve job-1`".into(),
                ..Default::default()
            }],
            position: 2,
            summary: "waiting for approval".into(),
            ..Default::default()
        }))
    }

    async fn get_queue_stats(
        &self,
        req: Request<sched::GetQueueStatsRequest>,
    ) -> Result<Response<sched::GetQueueStatsResponse>, Status> {
        self.record(&req)?;
        Ok(Response::new(sched::GetQueueStatsResponse {
            queued: 3,
            ..Default::default()
        }))
    }

    async fn approve_job(
        &self,
        req: Request<sched::ApproveJobRequest>,
    ) -> Result<Response<sched::ApproveJobResponse>, Status> {
        let caller = self.record(&req)?;
        caller.require(auth::Role::Approver)?;
        let r = req.into_inner();
        let mut seen = self.seen.lock().unwrap();
        if !seen.approves.is_empty() {
            return Err(Status::failed_precondition(format!(
                "approval of job `{}` is already APPROVED",
                r.job_id
            )));
        }
        seen.approves.push(r.clone());
        Ok(Response::new(sched::ApproveJobResponse {
            approval: Some(approval(
                &r.job_id,
                sched::ApprovalState::Approved,
                &caller.user,
                &r.note,
            )),
        }))
    }

    async fn reject_job(
        &self,
        req: Request<sched::RejectJobRequest>,
    ) -> Result<Response<sched::RejectJobResponse>, Status> {
        let caller = self.record(&req)?;
        caller.require(auth::Role::Approver)?;
        let r = req.into_inner();
        self.seen.lock().unwrap().rejects.push(r.clone());
        Ok(Response::new(sched::RejectJobResponse {
            approval: Some(approval(
                &r.job_id,
                sched::ApprovalState::Rejected,
                &caller.user,
                &r.note,
            )),
        }))
    }

    async fn list_approvals(
        &self,
        req: Request<sched::ListApprovalsRequest>,
    ) -> Result<Response<sched::ListApprovalsResponse>, Status> {
        self.record(&req)?;
        self.seen
            .lock()
            .unwrap()
            .approval_lists
            .push(req.into_inner());
        Ok(Response::new(sched::ListApprovalsResponse {
            approvals: vec![approval("job-1", sched::ApprovalState::Pending, "", "")],
            next_page_token: String::new(),
        }))
    }

    async fn set_limits(
        &self,
        req: Request<sched::SetLimitsRequest>,
    ) -> Result<Response<sched::SetLimitsResponse>, Status> {
        self.record(&req)?.require(auth::Role::Admin)?;
        let r = req.into_inner();
        self.seen.lock().unwrap().set_limits.push(r.clone());
        Ok(Response::new(sched::SetLimitsResponse { limits: r.limits }))
    }

    async fn get_limits(
        &self,
        req: Request<sched::GetLimitsRequest>,
    ) -> Result<Response<sched::GetLimitsResponse>, Status> {
        self.record(&req)?;
        let r = req.into_inner();
        let effective = if r.user.is_empty() {
            Vec::new()
        } else {
            vec![sched::EffectiveLimit {
                name: "max_running_jobs".into(),
                value: 2,
                binding_scope: sched::LimitScope::UserDefault as i32,
            }]
        };
        self.seen.lock().unwrap().get_limits.push(r);
        Ok(Response::new(sched::GetLimitsResponse {
            limits: self.rows.lock().unwrap().clone(),
            effective,
        }))
    }

    async fn hold_queue(
        &self,
        req: Request<sched::HoldQueueRequest>,
    ) -> Result<Response<sched::HoldQueueResponse>, Status> {
        self.record(&req)?.require(auth::Role::Admin)?;
        self.seen.lock().unwrap().holds.push(req.into_inner());
        Ok(Response::new(sched::HoldQueueResponse { held: true }))
    }

    async fn release_queue(
        &self,
        req: Request<sched::ReleaseQueueRequest>,
    ) -> Result<Response<sched::ReleaseQueueResponse>, Status> {
        self.record(&req)?.require(auth::Role::Admin)?;
        self.seen.lock().unwrap().releases += 1;
        Ok(Response::new(sched::ReleaseQueueResponse { held: false }))
    }

    async fn list_runners(
        &self,
        req: Request<sched::ListRunnersRequest>,
    ) -> Result<Response<sched::ListRunnersResponse>, Status> {
        self.record(&req)?.require(auth::Role::Admin)?;
        self.seen.lock().unwrap().runner_lists += 1;
        Ok(Response::new(sched::ListRunnersResponse {
            runners: vec![cordoned_runner()],
        }))
    }

    async fn uncordon_runner(
        &self,
        req: Request<sched::UncordonRunnerRequest>,
    ) -> Result<Response<sched::UncordonRunnerResponse>, Status> {
        self.record(&req)?.require(auth::Role::Admin)?;
        let req = req.into_inner();
        if req.name != "gpu-node-7" {
            return Err(Status::not_found(format!("no runner named `{}`", req.name)));
        }
        self.seen.lock().unwrap().uncordons.push(req);
        Ok(Response::new(sched::UncordonRunnerResponse {
            runner: Some(sched::RunnerInfo {
                state: sched::RunnerState::Ready as i32,
                node_faults: 0,
                suspect: false,
                cordon_reason: String::new(),
                ..cordoned_runner()
            }),
            was_cordoned: true,
        }))
    }
}

fn cordoned_runner() -> sched::RunnerInfo {
    sched::RunnerInfo {
        name: "gpu-node-7".into(),
        runner_id: "r-1".into(),
        state: sched::RunnerState::Cordoned as i32,
        backend: "process".into(),
        node_faults: 3,
        suspect: true,
        cordon_reason: "cordoned after 3 node faults".into(),
        ..Default::default()
    }
}

struct Served {
    addr: SocketAddr,
    fake: Fake,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve() -> Served {
    let fake = Fake::default();
    let (listener, addr) = testing::listener().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (trigger, _watch) = server::shutdown_pair();
    let routes = tonic::service::Routes::new(SchedulerServiceServer::new(fake.clone()));
    tokio::spawn(server::serve(
        "fake-scheduler-service",
        routes,
        &[],
        listener,
        testing::test_tokens().store,
        server::ServerOptions::default(),
        trigger,
        async move {
            let _ = stop_rx.await;
        },
    ));
    Served {
        addr,
        fake,
        _stop: stop_tx,
    }
}

async fn run(s: &Served, token: &str, args: &[&str]) -> u8 {
    let endpoint = s.addr.to_string();
    let mut argv = vec![
        "trainctl",
        "--scheduler-endpoint",
        &endpoint,
        "--token",
        token,
        "--correlation-id",
        "test-cid-2",
    ];
    argv.extend_from_slice(args);
    trainctl::run(trainctl::cli::Cli::try_parse_from(argv).unwrap()).await
}

#[tokio::test]
async fn explain_asks_for_the_job_and_fails_on_an_unknown_one() {
    let s = serve().await;
    assert_eq!(run(&s, "alice-token", &["explain", "job-1"]).await, 0);
    assert_eq!(
        run(&s, "alice-token", &["explain", "job-1", "-o", "json"]).await,
        0
    );
    assert_eq!(run(&s, "alice-token", &["explain", "nope"]).await, 1);
    let seen = s.fake.seen.lock().unwrap();
    let asked: Vec<_> = seen.explains.iter().map(|r| r.job_id.as_str()).collect();
    assert_eq!(asked, ["job-1", "job-1", "nope"]);
    assert!(seen.users.iter().all(|u| u == "alice"));
    assert!(seen.correlation_ids.iter().all(|c| c == "test-cid-2"));
}

#[tokio::test]
async fn approve_and_reject_send_the_note_and_a_second_decision_fails() {
    let s = serve().await;
    assert_eq!(
        run(
            &s,
            "approver-token",
            &["approve", "job-1", "--note", "ok this week"]
        )
        .await,
        0
    );
    // The fake refuses a second decision, as the scheduler does.
    assert_eq!(run(&s, "approver-token", &["approve", "job-1"]).await, 1);
    // A plain user is not an approver.
    assert_eq!(run(&s, "alice-token", &["reject", "job-2"]).await, 1);
    assert_eq!(
        run(
            &s,
            "approver-token",
            &["reject", "job-2", "--note", "too big", "-o", "json"]
        )
        .await,
        0
    );
    let seen = s.fake.seen.lock().unwrap();
    assert_eq!(seen.approves.len(), 1);
    assert_eq!(seen.approves[0].job_id, "job-1");
    assert_eq!(seen.approves[0].note, "ok this week");
    assert_eq!(seen.rejects.len(), 1);
    assert_eq!(
        (
            seen.rejects[0].job_id.as_str(),
            seen.rejects[0].note.as_str()
        ),
        ("job-2", "too big")
    );
}

#[tokio::test]
async fn limits_set_keeps_what_is_not_named_and_clears_none() {
    let s = serve().await;
    *s.fake.rows.lock().unwrap() = vec![
        sched::Limits {
            scope: sched::LimitScope::User as i32,
            subject: "alice".into(),
            max_running_jobs: Some(2),
            max_gpus: Some(8),
            max_queued_jobs: Some(10),
        },
        sched::Limits {
            scope: sched::LimitScope::User as i32,
            subject: "bob".into(),
            max_running_jobs: Some(1),
            ..Default::default()
        },
    ];
    let code = run(
        &s,
        "admin-token",
        &[
            "limits",
            "set",
            "--scope",
            "user",
            "--subject",
            "alice",
            "--max-running",
            "4",
            "--max-gpus",
            "none",
        ],
    )
    .await;
    assert_eq!(code, 0);
    // A scope with no row yet.
    let code = run(
        &s,
        "admin-token",
        &[
            "limits",
            "set",
            "--scope",
            "user-default",
            "--max-queued",
            "20",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0);
    // Refused before any call: no subject for a user scope, nothing to set.
    let before = s.fake.seen.lock().unwrap().users.len();
    assert_eq!(
        run(
            &s,
            "admin-token",
            &["limits", "set", "--scope", "user", "--max-running", "1"]
        )
        .await,
        1
    );
    assert_eq!(
        run(&s, "admin-token", &["limits", "set", "--scope", "global"]).await,
        1
    );
    assert_eq!(s.fake.seen.lock().unwrap().users.len(), before);
    // Only an admin may set limits.
    assert_eq!(
        run(
            &s,
            "alice-token",
            &["limits", "set", "--scope", "global", "--max-gpus", "8"]
        )
        .await,
        1
    );

    let seen = s.fake.seen.lock().unwrap();
    let sent: Vec<_> = seen
        .set_limits
        .iter()
        .map(|r| r.limits.clone().unwrap())
        .collect();
    assert_eq!(
        sent,
        [
            sched::Limits {
                scope: sched::LimitScope::User as i32,
                subject: "alice".into(),
                max_running_jobs: Some(4),
                max_gpus: None,
                max_queued_jobs: Some(10),
            },
            sched::Limits {
                scope: sched::LimitScope::UserDefault as i32,
                subject: String::new(),
                max_running_jobs: None,
                max_gpus: None,
                max_queued_jobs: Some(20),
            },
        ]
    );
}

#[tokio::test]
async fn limits_show_passes_user_and_org() {
    let s = serve().await;
    assert_eq!(
        run(
            &s,
            "alice-token",
            &["limits", "--user", "alice", "--org", "ml"]
        )
        .await,
        0
    );
    assert_eq!(run(&s, "alice-token", &["limits", "-o", "json"]).await, 0);
    let seen = s.fake.seen.lock().unwrap();
    assert_eq!(seen.get_limits[0].user, "alice");
    assert_eq!(seen.get_limits[0].org, "ml");
    assert_eq!(seen.get_limits[1], sched::GetLimitsRequest::default());
}

#[tokio::test]
async fn approvals_filter_by_state() {
    let s = serve().await;
    assert_eq!(run(&s, "approver-token", &["approvals"]).await, 0);
    assert_eq!(
        run(
            &s,
            "approver-token",
            &["approvals", "--state", "all", "--limit", "5", "-o", "json"]
        )
        .await,
        0
    );
    assert_eq!(
        run(&s, "approver-token", &["approvals", "--state", "expired"]).await,
        0
    );
    let seen = s.fake.seen.lock().unwrap();
    let states: Vec<_> = seen.approval_lists.iter().map(|r| r.state).collect();
    assert_eq!(
        states,
        [
            sched::ApprovalState::Pending as i32,
            sched::ApprovalState::Unspecified as i32,
            sched::ApprovalState::Expired as i32,
        ]
    );
    assert_eq!(seen.approval_lists[1].page_size, 5);
}

#[tokio::test]
async fn queue_hold_release_and_stats() {
    let s = serve().await;
    assert_eq!(
        run(&s, "admin-token", &["queue", "hold", "--reason", "upgrade"]).await,
        0
    );
    assert_eq!(run(&s, "admin-token", &["queue", "release"]).await, 0);
    assert_eq!(run(&s, "alice-token", &["queue", "hold"]).await, 1);
    assert_eq!(run(&s, "alice-token", &["queue", "stats"]).await, 0);
    assert_eq!(
        run(&s, "alice-token", &["queue", "stats", "-o", "json"]).await,
        0
    );
    assert_eq!(run(&s, "alice-token", &["queue"]).await, 0);
    let seen = s.fake.seen.lock().unwrap();
    assert_eq!(seen.holds.len(), 1);
    assert_eq!(seen.holds[0].reason, "upgrade");
    assert_eq!(seen.releases, 1);
}

#[tokio::test]
async fn runners_lists_them_and_uncordon_names_one_with_a_note() {
    let s = serve().await;
    assert_eq!(run(&s, "admin-token", &["runners"]).await, 0);
    assert_eq!(run(&s, "admin-token", &["runners", "-o", "json"]).await, 0);
    // Not an admin: refused.
    assert_eq!(run(&s, "alice-token", &["runners"]).await, 1);
    assert_eq!(
        run(
            &s,
            "admin-token",
            &["runners", "uncordon", "gpu-node-7", "--note", "new GPU"]
        )
        .await,
        0
    );
    assert_eq!(
        run(&s, "admin-token", &["runners", "uncordon", "nope"]).await,
        1
    );
    let seen = s.fake.seen.lock().unwrap();
    assert_eq!(seen.runner_lists, 2);
    assert_eq!(seen.uncordons.len(), 1);
    assert_eq!(
        (
            seen.uncordons[0].name.as_str(),
            seen.uncordons[0].note.as_str()
        ),
        ("gpu-node-7", "new GPU")
    );
}
