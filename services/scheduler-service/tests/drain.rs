//! Runners that stop: a draining runner gets no new work and gives back at
//! once what it holds but does not run; attempts it hands back (by report,
//! by deregistering, or by letting its lease run out while draining) are
//! retried at once without using their jobs' budget. Every test runs on
//! SQLite, and on PostgreSQL when TRAINMESH_TEST_POSTGRES_URL is set.

mod common;

use std::time::Duration;

use common::{new_job_id, spec, spec_with_attempts, Harness};
use tonic::Code;
use trainmesh_common::proto::job::v1::{AttemptState, FailureCause, JobError, JobState};
use trainmesh_common::proto::runner::v1::{
    AttemptRef, DeregisterRunnerRequest, DrainRunnerRequest,
};
use trainmesh_common::proto::scheduler::v1::GetQueueStatsRequest;
use trainmesh_common::testing::{all_dbs, test_tokens};

/// A one-GPU runner running attempt 1 of a new job of alice's that may
/// start only once (a hand-back counted against it would end it).
async fn one_running_attempt(h: &Harness) -> (String, String) {
    let runner = h.register(1).await;
    let job = new_job_id();
    h.enqueue(&job, "alice", spec_with_attempts(1, 1)).await;
    h.acquire_n(&runner, 1).await;
    h.report(&runner, &job, 1, AttemptState::Running, None)
        .await
        .unwrap();
    (runner, job)
}

async fn drain(h: &Harness, runner: &str, active: &[(&str, i32)]) -> Vec<AttemptRef> {
    h.runners()
        .drain_runner(DrainRunnerRequest {
            runner_id: runner.into(),
            active: active
                .iter()
                .map(|(j, a)| AttemptRef {
                    job_id: (*j).into(),
                    attempt: *a,
                })
                .collect(),
        })
        .await
        .expect("drain")
        .into_inner()
        .requeued
}

async fn deregister(h: &Harness, runner: &str) -> Result<Vec<AttemptRef>, tonic::Status> {
    h.runners()
        .deregister_runner(DeregisterRunnerRequest {
            runner_id: runner.into(),
        })
        .await
        .map(|r| r.into_inner().requeued)
}

async fn live_runners(h: &Harness) -> i32 {
    h.public(test_tokens().admin)
        .get_queue_stats(GetQueueStatsRequest {})
        .await
        .expect("stats")
        .into_inner()
        .runners
}

/// What the runner reports for an attempt it stopped and handed back.
fn handed_back() -> JobError {
    JobError {
        r#type: "RunnerShutdown".into(),
        message: "the runner was stopped".into(),
        exit_code: 143,
        signal: 15,
        category: "runner-shutdown".into(),
        retryable: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_draining_runner_gets_no_new_work_and_gives_back_what_it_was_not_running() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let a = h.register(2).await;
        // Placed on A, never handed over: A has not asked yet.
        let undelivered = new_job_id();
        h.enqueue(&undelivered, "alice", spec_with_attempts(1, 1))
            .await;
        let scheduled = h.wait_status(&undelivered, JobState::Scheduled).await;
        assert_eq!(scheduled.runner_id, a, "{}", h.label);

        let requeued = drain(&h, &a, &[]).await;
        assert_eq!(requeued.len(), 1, "{}: {requeued:?}", h.label);
        assert_eq!(
            (requeued[0].job_id.as_str(), requeued[0].attempt),
            (undelivered.as_str(), 1)
        );
        let back = h.wait_status_n(&undelivered, JobState::Queued, 2).await;
        assert_eq!(
            back.attempt_state,
            AttemptState::Failed as i32,
            "{}",
            h.label
        );
        assert_eq!(back.runner_id, a);
        assert!(
            back.reason.contains("does not count"),
            "{}: {}",
            h.label,
            back.reason
        );
        assert_eq!(back.error.as_ref().unwrap().r#type, "RunnerShutdown");
        assert_eq!(
            live_runners(&h).await,
            0,
            "{}: A offers nothing now",
            h.label
        );

        // A new submission waits for another runner instead of going to A.
        let fresh = new_job_id();
        h.enqueue(&fresh, "alice", spec(1)).await;
        let err = h.acquire(&a, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{}: {err:?}", h.label);
        // Draining again changes nothing; heartbeats still hold the lease.
        assert!(drain(&h, &a, &[]).await.is_empty());
        assert!(h.heartbeat(&a, &[]).await.unwrap().is_empty());

        let b = h.register(2).await;
        let got = h.acquire_n(&b, 2).await;
        let mut got: Vec<(String, i32)> = got.into_iter().map(|x| (x.job_id, x.attempt)).collect();
        got.sort();
        let mut want = vec![(undelivered.clone(), 2), (fresh.clone(), 1)];
        want.sort();
        assert_eq!(
            got, want,
            "{}: both on B, the first in its second attempt",
            h.label
        );
        for s in h.statuses(&fresh) {
            assert_ne!(s.runner_id, a, "{}: {s:?}", h.label);
        }
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn an_attempt_handed_back_by_its_runner_is_retried_at_once_without_using_the_budget() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        // One attempt only: were the hand-back counted, the job would fail.
        let (a, job) = one_running_attempt(&h).await;
        assert!(drain(&h, &a, &[(&job, 1)]).await.is_empty(), "{}", h.label);
        h.report_error(
            &a,
            &job,
            1,
            AttemptState::Failed,
            Some(143),
            Some(handed_back()),
        )
        .await
        .unwrap();
        let back = h.wait_status_n(&job, JobState::Queued, 2).await;
        assert!(
            back.reason.contains("does not count"),
            "{}: {}",
            h.label,
            back.reason
        );
        assert_eq!(back.attempt_state, AttemptState::Failed as i32);
        assert_ne!(back.failure_cause, FailureCause::Cancelled as i32);
        assert!(deregister(&h, &a).await.unwrap().is_empty());

        let b = h.register(1).await;
        let again = h.acquire_n(&b, 1).await;
        assert_eq!(
            (again[0].job_id.as_str(), again[0].attempt),
            (job.as_str(), 2)
        );
        h.report(&b, &job, 2, AttemptState::Running, None)
            .await
            .unwrap();
        // The second attempt is the one the budget allows: a lost runner
        // now ends the job, so the first one did not count.
        h.report(&b, &job, 2, AttemptState::Failed, Some(137))
            .await
            .unwrap();
        let failed = h.wait_status(&job, JobState::Failed).await;
        assert!(
            failed.reason.contains("1 of 1 started"),
            "{}: {}",
            h.label,
            failed.reason
        );
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_cancel_the_runner_was_not_asked_for_is_a_hand_back() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let (a, job) = one_running_attempt(&h).await;
        // What a runner that predates draining sends when it is stopped.
        h.report(&a, &job, 1, AttemptState::Cancelled, Some(143))
            .await
            .unwrap();
        let back = h.wait_status_n(&job, JobState::Queued, 2).await;
        assert_eq!(
            back.attempt_state,
            AttemptState::Failed as i32,
            "{}",
            h.label
        );
        assert_eq!(back.error.as_ref().unwrap().category, "runner-shutdown");
        assert!(
            !h.statuses(&job)
                .iter()
                .any(|s| s.state == JobState::Cancelled as i32),
            "{}: never cancelled",
            h.label
        );
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_draining_runner_whose_lease_runs_out_hands_its_attempts_back() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let (a, job) = one_running_attempt(&h).await;
        drain(&h, &a, &[(&job, 1)]).await;
        // Killed while draining: no report, no deregistration.
        h.clock.advance(Duration::from_secs(20));
        let back = h.wait_status_n(&job, JobState::Queued, 2).await;
        assert_eq!(back.attempt_state, AttemptState::Lost as i32, "{}", h.label);
        assert!(
            back.reason.contains("does not count"),
            "{}: {}",
            h.label,
            back.reason
        );
        let b = h.register(1).await;
        let again = h.acquire_n(&b, 1).await;
        assert_eq!(again[0].attempt, 2, "{}", h.label);
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn deregistering_frees_the_runner_at_once_and_hands_back_what_it_held() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let a = h.register(1).await;
        assert_eq!(live_runners(&h).await, 1, "{}", h.label);
        let job = new_job_id();
        h.enqueue(&job, "alice", spec_with_attempts(1, 1)).await;
        h.acquire_n(&a, 1).await;
        h.report(&a, &job, 1, AttemptState::Running, None)
            .await
            .unwrap();
        // Its final report was lost on the way; it leaves anyway.
        let requeued = deregister(&h, &a).await.unwrap();
        assert_eq!(requeued.len(), 1, "{}", h.label);
        let back = h.wait_status_n(&job, JobState::Queued, 2).await;
        assert!(
            back.reason.contains("does not count"),
            "{}: {}",
            h.label,
            back.reason
        );
        assert_eq!(live_runners(&h).await, 0, "{}", h.label);
        let err = h.heartbeat(&a, &[]).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{}", h.label);
        let err = h
            .report(&a, &job, 1, AttemptState::Succeeded, Some(0))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::FailedPrecondition,
            "{}: late report",
            h.label
        );
        let err = deregister(&h, &a).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{}", h.label);
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn drain_and_deregister_name_bad_fields() {
    let h = Harness::start(trainmesh_common::testing::sqlite_db()).await;
    let err = h
        .runners()
        .drain_runner(DrainRunnerRequest {
            runner_id: "not-a-uuid".into(),
            active: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("runner_id"), "{}", err.message());
    let a = h.register(1).await;
    let err = h
        .runners()
        .drain_runner(DrainRunnerRequest {
            runner_id: a.clone(),
            active: vec![AttemptRef {
                job_id: new_job_id(),
                attempt: 0,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("active[0].attempt"),
        "{}",
        err.message()
    );
    let err = h
        .runners()
        .deregister_runner(DeregisterRunnerRequest {
            runner_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    h.stop().await.unwrap();
}
