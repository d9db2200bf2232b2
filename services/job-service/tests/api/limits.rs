//! The queued-jobs limit at CreateJob against an in-test scheduler peer
//! (real gRPC on loopback) that answers GetLimits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::proto::scheduler::v1 as spb;
use trainmesh_common::testing::{self, all_dbs};

use crate::support::*;

#[derive(Default)]
struct State {
    answer: spb::GetLimitsResponse,
    /// Answer UNAVAILABLE instead.
    down: bool,
    asked: Vec<(spb::GetLimitsRequest, String)>,
}

/// A scheduler that answers GetLimits from `state` (and acknowledges the
/// relay's EnqueueJob so the log stays quiet).
#[derive(Clone, Default)]
struct LimitsPeer {
    state: Arc<Mutex<State>>,
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in the fake"))
}

#[tonic::async_trait]
impl spb::scheduler_service_server::SchedulerService for LimitsPeer {
    async fn get_limits(
        &self,
        req: Request<spb::GetLimitsRequest>,
    ) -> Result<Response<spb::GetLimitsResponse>, Status> {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut st = self.state.lock().unwrap();
        st.asked.push((req.into_inner(), auth));
        if st.down {
            return Err(Status::unavailable("scheduler is down"));
        }
        Ok(Response::new(st.answer.clone()))
    }

    async fn get_queue(
        &self,
        _: Request<spb::GetQueueRequest>,
    ) -> Result<Response<spb::GetQueueResponse>, Status> {
        unimplemented()
    }
    async fn explain_job(
        &self,
        _: Request<spb::ExplainJobRequest>,
    ) -> Result<Response<spb::ExplainJobResponse>, Status> {
        unimplemented()
    }
    async fn get_queue_stats(
        &self,
        _: Request<spb::GetQueueStatsRequest>,
    ) -> Result<Response<spb::GetQueueStatsResponse>, Status> {
        unimplemented()
    }
    async fn approve_job(
        &self,
        _: Request<spb::ApproveJobRequest>,
    ) -> Result<Response<spb::ApproveJobResponse>, Status> {
        unimplemented()
    }
    async fn reject_job(
        &self,
        _: Request<spb::RejectJobRequest>,
    ) -> Result<Response<spb::RejectJobResponse>, Status> {
        unimplemented()
    }
    async fn list_approvals(
        &self,
        _: Request<spb::ListApprovalsRequest>,
    ) -> Result<Response<spb::ListApprovalsResponse>, Status> {
        unimplemented()
    }
    async fn set_limits(
        &self,
        _: Request<spb::SetLimitsRequest>,
    ) -> Result<Response<spb::SetLimitsResponse>, Status> {
        unimplemented()
    }
    async fn hold_queue(
        &self,
        _: Request<spb::HoldQueueRequest>,
    ) -> Result<Response<spb::HoldQueueResponse>, Status> {
        unimplemented()
    }
    async fn release_queue(
        &self,
        _: Request<spb::ReleaseQueueRequest>,
    ) -> Result<Response<spb::ReleaseQueueResponse>, Status> {
        unimplemented()
    }

    async fn list_runners(
        &self,
        _: Request<spb::ListRunnersRequest>,
    ) -> Result<Response<spb::ListRunnersResponse>, Status> {
        unimplemented()
    }

    async fn uncordon_runner(
        &self,
        _: Request<spb::UncordonRunnerRequest>,
    ) -> Result<Response<spb::UncordonRunnerResponse>, Status> {
        unimplemented()
    }
}

#[tonic::async_trait]
impl spb::scheduler_internal_service_server::SchedulerInternalService for LimitsPeer {
    async fn enqueue_job(
        &self,
        _: Request<spb::EnqueueJobRequest>,
    ) -> Result<Response<spb::EnqueueJobResponse>, Status> {
        Ok(Response::new(spb::EnqueueJobResponse {
            state: pb::JobState::Queued as i32,
            created: true,
        }))
    }

    async fn cancel_queued_job(
        &self,
        _: Request<spb::CancelQueuedJobRequest>,
    ) -> Result<Response<spb::CancelQueuedJobResponse>, Status> {
        Ok(Response::new(spb::CancelQueuedJobResponse {
            state: pb::JobState::Cancelled as i32,
        }))
    }
}

impl LimitsPeer {
    fn new(answer: spb::GetLimitsResponse) -> Self {
        let peer = Self::default();
        peer.state.lock().unwrap().answer = answer;
        peer
    }

    /// Serves on a port-0 listener; returns its address.
    async fn start(&self) -> String {
        let (listener, addr) = testing::listener().await;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(spb::scheduler_service_server::SchedulerServiceServer::new(
                    self.clone(),
                ))
                .add_service(
                    spb::scheduler_internal_service_server::SchedulerInternalServiceServer::new(
                        self.clone(),
                    ),
                )
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        addr.to_string()
    }

    fn asked(&self) -> Vec<(spb::GetLimitsRequest, String)> {
        self.state.lock().unwrap().asked.clone()
    }
}

fn user_default(max_queued: i64) -> spb::EffectiveLimit {
    spb::EffectiveLimit {
        name: "max_queued_jobs".into(),
        value: max_queued,
        binding_scope: spb::LimitScope::UserDefault as i32,
    }
}

fn row(scope: spb::LimitScope, subject: &str, max_queued: i32) -> spb::Limits {
    spb::Limits {
        scope: scope as i32,
        subject: subject.into(),
        max_queued_jobs: Some(max_queued),
        ..Default::default()
    }
}

/// job-service with `peer` as its scheduler; limits asked again after `ttl`.
async fn start(db: &testing::TestDb, peer: &LimitsPeer, ttl: Duration) -> App {
    let addr = peer.start().await;
    App::start_with(db, move |c| {
        c.scheduler_endpoint = addr;
        c.limits_ttl = ttl;
    })
    .await
}

async fn submit(
    client: &mut trainmesh_common::proto::job::v1::job_service_client::JobServiceClient<
        trainmesh_common::client::Channel,
    >,
    name: &str,
    key: &str,
) -> Result<pb::CreateJobResponse, Status> {
    Ok(client
        .create_job(pb::CreateJobRequest {
            spec: Some(spec(name)),
            idempotency_key: key.into(),
        })
        .await?
        .into_inner())
}

const TTL: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn submit_over_the_user_limit_is_refused_naming_it() {
    for db in all_dbs().await {
        let peer = LimitsPeer::new(spb::GetLimitsResponse {
            effective: vec![user_default(2)],
            ..Default::default()
        });
        let app = start(&db, &peer, TTL).await;
        let mut alice = app.alice();
        for i in 0..2 {
            submit(&mut alice, &format!("ok-{i}"), "").await.unwrap();
        }
        let s = assert_code(
            submit(&mut alice, "over", "").await,
            Code::ResourceExhausted,
        );
        assert_eq!(
            s.message(),
            "queued-jobs limit reached: user `alice` has 2 of 2 (limit from USER_DEFAULT)",
            "{}",
            app.label
        );
        // Another user is not affected.
        submit(&mut app.jobs(app.tokens.bob), "bob", "")
            .await
            .unwrap();
        let asked = peer.asked();
        assert_eq!(asked[0].0.user, "alice");
        assert_eq!(asked[0].0.org, "ml");
        assert_eq!(asked[0].1, "Bearer job-service-token");
        assert_eq!(
            asked.iter().filter(|(r, _)| r.user == "alice").count(),
            1,
            "cached"
        );
        // The refused job was never stored.
        let listed = alice
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs;
        assert_eq!(listed.len(), 2, "{}", app.label);
    }
}

#[tokio::test]
async fn an_idempotent_retry_is_never_refused() {
    for db in all_dbs().await {
        let peer = LimitsPeer::new(spb::GetLimitsResponse {
            effective: vec![user_default(1)],
            ..Default::default()
        });
        let app = start(&db, &peer, Duration::ZERO).await;
        let mut alice = app.alice();
        let first = submit(&mut alice, "first", "key-1").await.unwrap();
        let again = submit(&mut alice, "first", "key-1").await.unwrap();
        assert!(again.existing, "{}", app.label);
        assert_eq!(again.job.unwrap().id, first.job.unwrap().id);
        assert_code(
            submit(&mut alice, "second", "key-2").await,
            Code::ResourceExhausted,
        );
        // A refused key was not kept: once there is room, it submits.
        peer.state.lock().unwrap().answer.effective = vec![user_default(2)];
        let second = submit(&mut alice, "second", "key-2").await.unwrap();
        assert!(!second.existing, "{}", app.label);
    }
}

#[tokio::test]
async fn only_undispatched_jobs_count() {
    use pb::JobState::*;
    for db in all_dbs().await {
        let peer = LimitsPeer::new(spb::GetLimitsResponse {
            effective: vec![user_default(2)],
            ..Default::default()
        });
        let app = start(&db, &peer, TTL).await;
        let mut alice = app.alice();
        let a = submit(&mut alice, "a", "").await.unwrap().job.unwrap();
        let b = submit(&mut alice, "b", "").await.unwrap().job.unwrap();
        // PENDING and AWAITING_APPROVAL count.
        apply(&app, update(&b.id, AwaitingApproval, 1))
            .await
            .unwrap();
        assert_code(submit(&mut alice, "c", "").await, Code::ResourceExhausted);
        // A dispatched job no longer does, nor a cancelled one.
        apply(&app, update(&a.id, Queued, 1)).await.unwrap();
        let mut s = update(&a.id, Scheduled, 2);
        s.attempt = 1;
        apply(&app, s).await.unwrap();
        submit(&mut alice, "c", "").await.unwrap();
        assert_code(submit(&mut alice, "d", "").await, Code::ResourceExhausted);
        apply(&app, update(&b.id, Cancelled, 2)).await.unwrap();
        submit(&mut alice, "d", "").await.unwrap();
    }
}

#[tokio::test]
async fn org_and_global_totals_are_capped_too() {
    for db in all_dbs().await {
        let peer = LimitsPeer::new(spb::GetLimitsResponse {
            limits: vec![
                row(spb::LimitScope::Org, "ml", 3),
                row(spb::LimitScope::Org, "other", 1),
                row(spb::LimitScope::Global, "", 4),
            ],
            ..Default::default()
        });
        let app = start(&db, &peer, TTL).await;
        let (mut alice, mut bob) = (app.alice(), app.jobs(app.tokens.bob));
        submit(&mut alice, "a1", "").await.unwrap();
        submit(&mut alice, "a2", "").await.unwrap();
        submit(&mut bob, "b1", "").await.unwrap();
        let s = assert_code(submit(&mut bob, "b2", "").await, Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "queued-jobs limit reached: org `ml` has 3 of 3 (limit from ORG)",
            "{}",
            app.label
        );
        // admin is in org `ops`, which has no limit of its own.
        let mut admin = app.jobs(app.tokens.admin);
        submit(&mut admin, "x1", "").await.unwrap();
        let s = assert_code(submit(&mut admin, "x2", "").await, Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "queued-jobs limit reached: the platform has 4 of 4 (limit from GLOBAL)"
        );
    }
}

#[tokio::test]
async fn concurrent_submits_never_exceed_the_limit() {
    for db in all_dbs().await {
        let peer = LimitsPeer::new(spb::GetLimitsResponse {
            limits: vec![row(spb::LimitScope::Org, "ml", 9)],
            effective: vec![user_default(5)],
        });
        let app = start(&db, &peer, TTL).await;
        let mut tasks = Vec::new();
        for i in 0..48 {
            let token = if i % 2 == 0 {
                app.tokens.alice
            } else {
                app.tokens.bob
            };
            let mut client = app.jobs(token);
            tasks.push(tokio::spawn(async move {
                submit(&mut client, &format!("c-{i}"), "").await
            }));
        }
        let (mut ok, mut refused) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(s) if s.code() == Code::ResourceExhausted => refused += 1,
                Err(s) => panic!("{}: unexpected {s:?}", app.label),
            }
        }
        // 5 each would be 10; the org allows 9.
        assert_eq!((ok, refused), (9, 39), "{}", app.label);
        let all = app
            .jobs(app.tokens.admin)
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs;
        assert_eq!(all.len(), 9);
        for user in ["alice", "bob"] {
            let n = all.iter().filter(|j| j.owner == user).count();
            assert!(n <= 5, "{}: {user} has {n} queued", app.label);
        }
    }
}

#[tokio::test]
async fn without_the_scheduler_the_last_known_limits_apply() {
    for db in all_dbs().await {
        let peer = LimitsPeer::new(spb::GetLimitsResponse {
            effective: vec![user_default(1)],
            ..Default::default()
        });
        // Asked on every submission.
        let app = start(&db, &peer, Duration::ZERO).await;
        let mut alice = app.alice();
        submit(&mut alice, "a", "").await.unwrap();
        peer.state.lock().unwrap().down = true;
        assert_code(submit(&mut alice, "b", "").await, Code::ResourceExhausted);
        // Never known for bob: no limit.
        let mut bob = app.jobs(app.tokens.bob);
        submit(&mut bob, "b1", "").await.unwrap();
        submit(&mut bob, "b2", "").await.unwrap();
        assert!(peer.asked().len() >= 4, "{}", app.label);
    }
}

#[tokio::test]
async fn two_job_services_on_one_postgres_never_exceed_the_limit() {
    let Some(db) = testing::postgres_db().await else {
        eprintln!("skipped: TRAINMESH_TEST_POSTGRES_URL is not set");
        return;
    };
    let peer = LimitsPeer::new(spb::GetLimitsResponse {
        limits: vec![row(spb::LimitScope::Org, "ml", 7)],
        effective: vec![user_default(4)],
    });
    let a = start(&db, &peer, TTL).await;
    let b = start(&db, &peer, TTL).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let app = if i % 2 == 0 { &a } else { &b };
        let token = if i % 4 < 2 {
            app.tokens.alice
        } else {
            app.tokens.bob
        };
        let mut client = app.jobs(token);
        tasks.push(tokio::spawn(async move {
            submit(&mut client, &format!("r-{i}"), "").await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
        }
    }
    assert_eq!(ok, 7);
    let all = a
        .jobs(a.tokens.admin)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(all.len(), 7);
    for user in ["alice", "bob"] {
        assert!(all.iter().filter(|j| j.owner == user).count() <= 4);
    }
}
