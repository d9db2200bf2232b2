//! Limits stored in the database and enforced at dispatch, the queue hold,
//! and explanations. Every test runs on SQLite, and on PostgreSQL when
//! TRAINMESH_TEST_POSTGRES_URL is set.

mod common;

use common::{new_job_id, spec, Harness};
use tonic::Code;
use trainmesh_common::proto::job::v1::{AttemptState, JobState};
use trainmesh_common::proto::scheduler::v1::{
    ExplainJobRequest, GetLimitsRequest, GetQueueRequest, GetQueueStatsRequest, HoldQueueRequest,
    LimitScope, Limits, PendingReason, ReleaseQueueRequest, SetLimitsRequest,
};
use trainmesh_common::testing::{all_dbs, test_tokens};

fn limits(scope: LimitScope, subject: &str) -> Limits {
    Limits {
        scope: scope as i32,
        subject: subject.into(),
        ..Default::default()
    }
}

async fn set(h: &Harness, l: Limits) {
    h.public(test_tokens().admin)
        .set_limits(SetLimitsRequest { limits: Some(l) })
        .await
        .expect("set limits");
}

async fn explain(
    h: &Harness,
    token: &str,
    job: &str,
) -> Result<trainmesh_common::proto::scheduler::v1::ExplainJobResponse, tonic::Status> {
    h.public(token)
        .explain_job(ExplainJobRequest { job_id: job.into() })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn set_limits_is_admin_only_and_get_limits_names_the_binding_scope() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let t = test_tokens();
        let mut alice_gpus = limits(LimitScope::User, "alice");
        alice_gpus.max_gpus = Some(4);
        let err = h
            .public(t.alice)
            .set_limits(SetLimitsRequest {
                limits: Some(alice_gpus.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{}", h.label);
        let mut negative = alice_gpus.clone();
        negative.max_running_jobs = Some(-1);
        let err = h
            .public(t.admin)
            .set_limits(SetLimitsRequest {
                limits: Some(negative),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("limits.max_running_jobs"), "{err:?}");

        set(&h, alice_gpus).await;
        let mut org = limits(LimitScope::Org, "ml");
        org.max_running_jobs = Some(1);
        set(&h, org).await;
        let r = h
            .public(t.alice)
            .get_limits(GetLimitsRequest {
                user: "alice".into(),
                org: "ml".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let eff: Vec<(String, i64, i32)> = r
            .effective
            .iter()
            .map(|e| (e.name.clone(), e.value, e.binding_scope))
            .collect();
        assert_eq!(
            eff,
            vec![
                ("max_running_jobs".into(), 1, LimitScope::Org as i32),
                ("max_gpus".into(), 4, LimitScope::User as i32),
            ],
            "{}",
            h.label
        );
        assert_eq!(r.limits.len(), 3, "{}: default, org and user rows", h.label);
        let err = h
            .public(t.alice)
            .get_limits(GetLimitsRequest {
                user: "bob".into(),
                org: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);

        // Unset values clear the row.
        set(&h, limits(LimitScope::Org, "ml")).await;
        let r = h
            .public(t.scheduler)
            .get_limits(GetLimitsRequest {
                user: "alice".into(),
                org: "ml".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.effective[0].binding_scope, LimitScope::UserDefault as i32);
        assert_eq!(r.effective[0].value, 2);
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn global_gpu_limit_holds_at_dispatch_and_explain_names_the_running_job() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let mut global = limits(LimitScope::Global, "");
        global.max_gpus = Some(3);
        set(&h, global).await;
        let runner = h.register(8).await;
        let (a, b) = (new_job_id(), new_job_id());
        h.enqueue_at(&a, "alice", spec(2), Some(1_700_000_000))
            .await;
        h.enqueue_at(&b, "bob", spec(2), Some(1_700_000_001)).await;
        let got = h.acquire_n(&runner, 1).await;
        assert_eq!(got[0].job_id, a, "{}", h.label);

        let x = explain(&h, test_tokens().bob, &b).await.unwrap();
        assert_eq!(x.position, 1);
        assert_eq!(x.causes.len(), 1, "{}: {:?}", h.label, x.causes);
        let c = &x.causes[0];
        assert_eq!(c.reason, PendingReason::GlobalLimit as i32);
        assert_eq!(
            (c.scope, c.limit, c.current),
            (LimitScope::Global as i32, 3, 2)
        );
        assert_eq!(
            c.detail,
            "global limit max_gpus=3; 2 GPU(s) in use, the job needs 2"
        );
        assert!(
            c.unblock
                .contains(&format!("job `{a}` finishing frees GPUs")),
            "{}",
            c.unblock
        );

        // Another user's job does not exist for bob.
        let err = explain(&h, test_tokens().bob, &a).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let running = explain(&h, test_tokens().alice, &a).await.unwrap();
        assert!(running.causes.is_empty());
        assert!(
            running.summary.contains("nothing blocks it"),
            "{}",
            running.summary
        );

        h.report(&runner, &a, 1, AttemptState::Running, None)
            .await
            .unwrap();
        h.report(&runner, &a, 1, AttemptState::Succeeded, Some(0))
            .await
            .unwrap();
        let next = h.acquire_n(&runner, 1).await;
        assert_eq!(next[0].job_id, b, "{}", h.label);
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn explain_lists_every_blocking_cause_with_what_unblocks_it() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(8).await;
        let first: Vec<String> = (0..2).map(|_| new_job_id()).collect();
        for (i, j) in first.iter().enumerate() {
            h.enqueue_at(j, "alice", spec(1), Some(1_700_000_000 + i as i64))
                .await;
        }
        h.acquire_n(&runner, 2).await;
        let big = new_job_id();
        h.enqueue(&big, "alice", spec(16)).await;
        let x = explain(&h, test_tokens().alice, &big).await.unwrap();
        let reasons: Vec<i32> = x.causes.iter().map(|c| c.reason).collect();
        assert_eq!(
            reasons,
            vec![
                PendingReason::UserRunningLimit as i32,
                PendingReason::NoRunnerCapacity as i32
            ],
            "{}",
            h.label
        );
        assert_eq!(
            x.causes[0].detail,
            "user limit max_running_jobs=2 from USER_DEFAULT; alice has 2 running"
        );
        assert_eq!(x.causes[0].scope, LimitScope::UserDefault as i32);
        assert!(
            x.causes[0].unblock.contains(&format!("`{}`", first[0]))
                && x.causes[0].unblock.contains("finishing frees a slot"),
            "{}",
            x.causes[0].unblock
        );
        assert!(
            x.causes[1].unblock.starts_with(
                "no runner has 16 free GPU(s) with 1 CPU and 1024 MiB; largest free: 6"
            ),
            "{}",
            x.causes[1].unblock
        );
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn held_queue_dispatches_nothing_until_released() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let t = test_tokens();
        let err = h
            .public(t.alice)
            .hold_queue(HoldQueueRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        let held = h
            .public(t.admin)
            .hold_queue(HoldQueueRequest {
                reason: "maintenance".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(held.held);
        let runner = h.register(1).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(1)).await;
        assert!(h.acquire(&runner, 0).await.unwrap().is_empty());
        let q = h
            .public(t.alice)
            .get_queue(GetQueueRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(q.held, "{}", h.label);
        assert_eq!(q.entries[0].reason, PendingReason::Held as i32);
        let x = explain(&h, t.alice, &job).await.unwrap();
        assert!(
            x.causes[0].unblock.contains("held by admin: maintenance")
                && x.causes[0].unblock.contains("trainctl queue release"),
            "{}",
            x.causes[0].unblock
        );
        let stats = h
            .public(t.admin)
            .get_queue_stats(GetQueueStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(stats.held);

        h.public(t.admin)
            .release_queue(ReleaseQueueRequest {})
            .await
            .unwrap();
        let got = h.acquire_n(&runner, 1).await;
        assert_eq!(got[0].job_id, job, "{}", h.label);
        h.wait_status(&job, JobState::Scheduled).await;
        let stats = h
            .public(t.admin)
            .get_queue_stats(GetQueueStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(!stats.held);
        assert!(
            stats.average_wait.is_some(),
            "{}: one dispatch in the last hour",
            h.label
        );
        h.stop().await.unwrap();
    }
}
