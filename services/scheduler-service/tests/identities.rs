//! Narrow identities at the scheduler: a runner acts only as itself, a
//! name is held by one runner at a time, and each internal call takes only
//! the service that owns it. SQLite, and PostgreSQL when
//! TRAINMESH_TEST_POSTGRES_URL is set.

mod common;

use common::{capacity, new_job_id, spec, Harness, H100};
use tonic::Code;
use trainmesh_common::proto::job::v1::AttemptState;
use trainmesh_common::proto::runner::v1::{
    AcquireAssignmentsRequest, DeregisterRunnerRequest, DrainRunnerRequest, HeartbeatRequest,
    RegisterRunnerRequest, ReportAttemptStatusRequest,
};
use trainmesh_common::proto::scheduler::v1::{CancelQueuedJobRequest, EnqueueJobRequest};
use trainmesh_common::testing::{all_dbs, test_tokens};

fn registration(name: &str, instance: &str) -> RegisterRunnerRequest {
    RegisterRunnerRequest {
        name: name.into(),
        backend: "process".into(),
        capacity: Some(capacity(1, H100)),
        labels: Default::default(),
        instance: instance.into(),
    }
}

fn running(runner_id: &str, job: &str) -> ReportAttemptStatusRequest {
    ReportAttemptStatusRequest {
        runner_id: runner_id.into(),
        job_id: job.into(),
        attempt: 1,
        state: AttemptState::Running as i32,
        ..Default::default()
    }
}

#[track_caller]
fn refused<T: std::fmt::Debug>(res: Result<T, tonic::Status>, code: Code, says: &str) {
    let err = res.expect_err("refused");
    assert_eq!(err.code(), code, "{err:?}");
    assert!(err.message().contains(says), "{err:?}");
}

#[tokio::test]
async fn a_runner_acts_only_as_itself() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let t = test_tokens();
        let a = h.register(1).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(1)).await;
        let got = h.acquire(&a, 5).await.unwrap();
        assert_eq!(got.len(), 1, "{}", h.label);

        let mut b = h.runners_as(t.runner_b);
        refused(
            b.register_runner(registration("node-1", "b")).await,
            Code::PermissionDenied,
            "may not register as `node-1`",
        );
        let b_id = b
            .register_runner(registration("node-2", "b"))
            .await
            .unwrap()
            .into_inner()
            .runner_id;
        let not_a = "may not act for runner";
        refused(
            b.heartbeat(HeartbeatRequest {
                runner_id: a.clone(),
                active: vec![],
            })
            .await,
            Code::PermissionDenied,
            not_a,
        );
        refused(
            b.acquire_assignments(AcquireAssignmentsRequest {
                runner_id: a.clone(),
                ..Default::default()
            })
            .await,
            Code::PermissionDenied,
            not_a,
        );
        refused(
            b.report_attempt_status(running(&a, &job)).await,
            Code::PermissionDenied,
            not_a,
        );
        refused(
            b.drain_runner(DrainRunnerRequest {
                runner_id: a.clone(),
                active: vec![],
            })
            .await,
            Code::PermissionDenied,
            not_a,
        );
        refused(
            b.deregister_runner(DeregisterRunnerRequest {
                runner_id: a.clone(),
            })
            .await,
            Code::PermissionDenied,
            not_a,
        );
        // Under its own registration B still holds nothing of A's.
        refused(
            b.report_attempt_status(running(&b_id, &job)).await,
            Code::FailedPrecondition,
            "does not hold attempt 1",
        );
        // A goes on as before.
        h.runners()
            .report_attempt_status(running(&a, &job))
            .await
            .unwrap();

        // Services and people are not runners.
        for token in [t.job_service, t.scheduler, t.admin, t.alice] {
            refused(
                h.runners_as(token)
                    .register_runner(registration("node-1", "x"))
                    .await,
                Code::PermissionDenied,
                "only a runner",
            );
        }
    }
}

#[tokio::test]
async fn only_job_service_enqueues_and_cancels() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let t = test_tokens();
        let job = new_job_id();
        for token in [t.runner, t.scheduler, t.metrics, t.admin] {
            let mut c = h.internal_as(token);
            refused(
                c.enqueue_job(EnqueueJobRequest {
                    job_id: job.clone(),
                    owner: "alice".into(),
                    org: "ml".into(),
                    spec: Some(spec(1)),
                    ..Default::default()
                })
                .await,
                Code::PermissionDenied,
                "only job-service",
            );
            refused(
                c.cancel_queued_job(CancelQueuedJobRequest {
                    job_id: job.clone(),
                    reason: String::new(),
                })
                .await,
                Code::PermissionDenied,
                "only job-service",
            );
        }
        assert!(
            h.enqueue(&job, "alice", spec(1)).await.created,
            "{}",
            h.label
        );
    }
}

#[tokio::test]
async fn a_live_name_is_held_by_one_installation() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let mut c = h.runners();
        let first = c
            .register_runner(registration("node-1", "one"))
            .await
            .unwrap();
        refused(
            c.register_runner(registration("node-1", "two")).await,
            Code::AlreadyExists,
            "held by another live runner",
        );
        // No key at all is never the same installation.
        refused(
            c.register_runner(registration("node-1", "")).await,
            Code::AlreadyExists,
            "held by another live runner",
        );
        // The same installation starting again registers at once.
        let again = c
            .register_runner(registration("node-1", "one"))
            .await
            .unwrap();
        for r in [first, again] {
            c.deregister_runner(DeregisterRunnerRequest {
                runner_id: r.into_inner().runner_id,
            })
            .await
            .unwrap();
        }
        // Once its runner has left, the name is free.
        c.register_runner(registration("node-1", "two"))
            .await
            .unwrap();
    }
}
