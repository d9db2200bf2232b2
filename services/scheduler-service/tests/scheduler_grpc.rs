//! The scheduler over gRPC, with a recording job-service peer. Every test
//! runs on SQLite, and on PostgreSQL when TRAINMESH_TEST_POSTGRES_URL is set.

mod common;

use std::time::Duration;

use common::{new_job_id, spec, spec_with_attempts, Harness, DEADLINE};
use tonic::Code;
use trainmesh_common::proto::job::v1::{AttemptState, FailureCause, JobState};
use trainmesh_common::proto::scheduler::v1::{
    EnqueueJobRequest, GetLimitsRequest, GetQueueRequest, GetQueueStatsRequest, LimitScope,
    PendingReason,
};
use trainmesh_common::testing::{all_dbs, test_tokens};

#[tokio::test]
async fn enqueue_is_idempotent() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let job = new_job_id();
        let first = h.enqueue(&job, "alice", spec(1)).await;
        assert!(first.created, "{}", h.label);
        assert_eq!(first.state, JobState::Queued as i32);
        let again = h.enqueue(&job, "alice", spec(4)).await;
        assert!(!again.created, "{}: a redelivery is not a new job", h.label);
        assert_eq!(again.state, JobState::Queued as i32);
        let q = h
            .public(test_tokens().admin)
            .get_queue(GetQueueRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(q.entries.len(), 1, "{}", h.label);
        assert_eq!(q.entries[0].gpus, 1, "{}: the first spec is kept", h.label);

        // A later change of the same job is delivered after everything
        // before it, so once it arrives no duplicate QUEUED can be pending.
        assert_eq!(h.cancel(&job).await, JobState::Cancelled);
        h.wait_status(&job, JobState::Cancelled).await;
        let states: Vec<(i32, i64)> = h
            .statuses(&job)
            .iter()
            .map(|s| (s.state, s.scheduler_sequence))
            .collect();
        assert_eq!(
            states,
            vec![
                (JobState::Queued as i32, 1),
                (JobState::Cancelled as i32, 2)
            ],
            "{}",
            h.label
        );
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn status_updates_reach_job_service_in_order() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(1).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(1)).await;
        let a = h.acquire_n(&runner, 1).await;
        assert_eq!(a[0].job_id, job);
        assert_eq!(a[0].attempt, 1);
        assert_eq!(a[0].correlation_id, format!("cid-{job}"));
        assert_eq!(a[0].spec.as_ref().unwrap().image, "busybox");
        assert!(h
            .report(&runner, &job, 1, AttemptState::Running, None)
            .await
            .unwrap());
        assert!(h
            .report(&runner, &job, 1, AttemptState::Succeeded, Some(0))
            .await
            .unwrap());
        h.wait_status(&job, JobState::Succeeded).await;

        let rec = h.recorded(&job);
        let states: Vec<i32> = rec.iter().map(|r| r.req.state).collect();
        assert_eq!(
            states,
            vec![
                JobState::Queued as i32,
                JobState::Scheduled as i32,
                JobState::Running as i32,
                JobState::Succeeded as i32
            ],
            "{}",
            h.label
        );
        let seqs: Vec<i64> = rec.iter().map(|r| r.req.scheduler_sequence).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4], "{}", h.label);
        assert_eq!(rec[1].req.attempt, 1);
        assert_eq!(rec[1].req.runner_id, runner);
        assert_eq!(rec[1].req.attempt_state, AttemptState::Scheduled as i32);
        assert_eq!(rec[3].req.exit_code, Some(0));
        for r in &rec {
            assert_eq!(r.authorization.as_deref(), Some("Bearer scheduler-token"));
            assert_eq!(
                r.correlation_id.as_deref(),
                Some(format!("cid-{job}").as_str())
            );
        }
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn long_poll_wakes_when_a_job_is_assigned() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(1).await;
        let poll = h.long_poll(&runner, 1);
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(1)).await;
        // Well before the 30 s wait: the assignment woke the poll.
        let got = tokio::time::timeout(DEADLINE, poll)
            .await
            .expect("long-poll returned before its wait expired")
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 1, "{}", h.label);
        assert_eq!(got[0].job_id, job);
        assert_eq!(got[0].gpu_indexes, vec![0]);
        // Delivered once only.
        assert!(h.acquire(&runner, 0).await.unwrap().is_empty());
        h.stop().await.unwrap();
    }
}

/// Whether a dispatch hands attempts to the waiting call itself or the
/// call reads them afterwards, the call gets no more than it asked for,
/// and the rest reach the next call, each exactly once.
#[tokio::test]
async fn a_waiting_long_poll_takes_at_most_its_max_and_the_rest_come_next() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(3).await;
        let poll = h.long_poll(&runner, 1);
        let jobs: Vec<String> = (0..3).map(|_| new_job_id()).collect();
        let owners = ["alice", "bob", "carol"];
        for (job, owner) in jobs.iter().zip(owners) {
            h.enqueue(job, owner, spec(1)).await;
        }
        let first = tokio::time::timeout(DEADLINE, poll)
            .await
            .expect("long-poll returned before its wait expired")
            .unwrap()
            .unwrap();
        assert_eq!(first.len(), 1, "{}: {first:?}", h.label);
        let mut all: Vec<String> = first.into_iter().map(|a| a.job_id).collect();
        all.extend(h.acquire_n(&runner, 2).await.into_iter().map(|a| a.job_id));
        all.sort();
        let mut want = jobs.clone();
        want.sort();
        assert_eq!(all, want, "{}: each job once", h.label);
        assert!(
            h.acquire(&runner, 0).await.unwrap().is_empty(),
            "{}",
            h.label
        );
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn long_poll_returns_empty_when_nothing_is_assigned() {
    let h = Harness::start(trainmesh_common::testing::sqlite_db()).await;
    let runner = h.register(0).await;
    assert!(h.acquire(&runner, 0).await.unwrap().is_empty());
    let unknown = new_job_id();
    let err = h.acquire(&unknown, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn long_poll_returns_promptly_on_shutdown() {
    let mut h = Harness::start_with(trainmesh_common::testing::sqlite_db(), |c| {
        // A poll that ignored shutdown would hold `run` for the whole drain.
        c.server.drain_timeout = Duration::from_secs(120);
    })
    .await;
    let runner = h.register(1).await;
    let poll = h.long_poll(&runner, 0);
    // A round trip after the poll was sent gives it time to reach the server.
    h.heartbeat(&runner, &[]).await.unwrap();
    let stopped = h.begin_stop();
    tokio::time::timeout(DEADLINE, stopped)
        .await
        .expect("run ends promptly although a long-poll was open")
        .unwrap()
        .unwrap();
    let polled = tokio::time::timeout(DEADLINE, poll)
        .await
        .expect("poll ended before its 30 s wait")
        .unwrap();
    // Answered (empty) by the server, unless it never got there.
    if let Ok(assignments) = polled {
        assert!(assignments.is_empty());
    }
}

#[tokio::test]
async fn per_user_limit_of_two_holds_with_five_jobs() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(8).await;
        let jobs: Vec<String> = (0..5).map(|_| new_job_id()).collect();
        for (i, j) in jobs.iter().enumerate() {
            h.enqueue_at(j, "alice", spec(1), Some(1_700_000_000 + i as i64))
                .await;
        }
        let got = h.acquire_n(&runner, 2).await;
        let mut ids: Vec<&str> = got.iter().map(|a| a.job_id.as_str()).collect();
        ids.sort();
        let mut first_two = vec![jobs[0].as_str(), jobs[1].as_str()];
        first_two.sort();
        assert_eq!(ids, first_two, "{}: oldest two first", h.label);
        let mut gpus: Vec<i32> = got.iter().flat_map(|a| a.gpu_indexes.clone()).collect();
        gpus.sort();
        gpus.dedup();
        assert_eq!(gpus.len(), 2, "{}: distinct GPUs", h.label);

        // The plan keeps the other three waiting for alice's limit.
        let q = h
            .public(test_tokens().alice)
            .get_queue(GetQueueRequest::default())
            .await
            .unwrap()
            .into_inner();
        let waiting: Vec<_> = q
            .entries
            .iter()
            .filter(|e| e.state == JobState::Queued as i32)
            .collect();
        assert_eq!(waiting.len(), 3, "{}", h.label);
        for (i, e) in waiting.iter().enumerate() {
            assert_eq!(e.job_id, jobs[i + 2]);
            assert_eq!(e.position, i as i32 + 1);
            assert_eq!(e.reason, PendingReason::UserRunningLimit as i32);
            assert_eq!(
                e.reason_detail,
                "user limit max_running_jobs=2 from USER_DEFAULT; alice has 2 running"
            );
        }
        let stats = h
            .public(test_tokens().alice)
            .get_queue_stats(GetQueueStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!((stats.queued, stats.running), (3, 2), "{}", h.label);
        assert_eq!(
            (stats.runners, stats.gpus_total, stats.gpus_in_use),
            (1, 8, 2)
        );

        // Alice at her limit does not block bob.
        let bob_job = new_job_id();
        h.enqueue(&bob_job, "bob", spec(1)).await;
        let b = h.acquire_n(&runner, 1).await;
        assert_eq!(b[0].job_id, bob_job, "{}", h.label);

        // A finish frees a slot: the next of alice's jobs is dispatched.
        let done = &got[0];
        h.report(&runner, &done.job_id, 1, AttemptState::Running, None)
            .await
            .unwrap();
        h.report(&runner, &done.job_id, 1, AttemptState::Succeeded, Some(0))
            .await
            .unwrap();
        let next = h.acquire_n(&runner, 1).await;
        assert_eq!(next[0].job_id, jobs[2], "{}", h.label);
        let stats = h
            .public(test_tokens().admin)
            .get_queue_stats(GetQueueStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!((stats.queued, stats.running), (2, 3), "{}", h.label);
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn gpus_are_allocated_by_index_and_type() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(2).await;
        let mut h100 = spec(1);
        h100.resources.as_mut().unwrap().gpu_type = "h100".into();
        let mut a100 = spec(1);
        a100.resources.as_mut().unwrap().gpu_type = "A100".into();
        let (j1, j2, j3) = (new_job_id(), new_job_id(), new_job_id());
        h.enqueue_at(&j1, "alice", h100, Some(1)).await;
        h.enqueue_at(&j2, "bob", spec(1), Some(2)).await;
        h.enqueue_at(&j3, "carol", a100, Some(3)).await;
        let got = h.acquire_n(&runner, 2).await;
        let mut gpus: Vec<i32> = got.iter().flat_map(|a| a.gpu_indexes.clone()).collect();
        gpus.sort();
        assert_eq!(gpus, vec![0, 1], "{}", h.label);
        let q = h
            .public(test_tokens().admin)
            .get_queue(GetQueueRequest::default())
            .await
            .unwrap()
            .into_inner();
        let e = q.entries.iter().find(|e| e.job_id == j3).unwrap();
        assert_eq!(e.reason, PendingReason::NoRunnerCapacity as i32);
        assert!(
            e.reason_detail.contains("no registered runner"),
            "{}",
            e.reason_detail
        );
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn report_from_another_runner_is_refused() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let holder = h.register(1).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(1)).await;
        h.acquire_n(&holder, 1).await;
        let other = h.register(1).await;
        let err = h
            .report(&other, &job, 1, AttemptState::Running, None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", h.label);
        let err = h
            .report(&holder, &job, 2, AttemptState::Running, None)
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::FailedPrecondition,
            "{}: no attempt 2",
            h.label
        );

        assert!(h
            .report(&holder, &job, 1, AttemptState::Running, None)
            .await
            .unwrap());
        assert!(
            !h.report(&holder, &job, 1, AttemptState::Running, None)
                .await
                .unwrap(),
            "{}: duplicate is unchanged",
            h.label
        );
        assert!(h
            .report(&holder, &job, 1, AttemptState::Failed, Some(3))
            .await
            .unwrap());
        let failed = h.wait_status(&job, JobState::Failed).await;
        assert_eq!(failed.failure_cause, FailureCause::UserCode as i32);
        assert_eq!(failed.exit_code, Some(3));
        assert!(
            !h.report(&holder, &job, 1, AttemptState::Running, None)
                .await
                .unwrap(),
            "{}: a late RUNNING retry is ignored",
            h.label
        );
        let err = h
            .report(&holder, &job, 1, AttemptState::Succeeded, Some(0))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::FailedPrecondition,
            "{}: already ended",
            h.label
        );
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn lease_expiry_requeues_the_attempt() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let old = h.register(1).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(1)).await;
        h.acquire_n(&old, 1).await;
        h.report(&old, &job, 1, AttemptState::Running, None)
            .await
            .unwrap();

        h.clock.advance(Duration::from_secs(20));
        let requeued = h.wait_status_n(&job, JobState::Queued, 2).await;
        assert_eq!(
            requeued.reason, "retrying after runner lost (attempt 1 of 3)",
            "{}",
            h.label
        );
        assert_eq!(requeued.attempt, 1);
        assert_eq!(requeued.attempt_state, AttemptState::Lost as i32);
        assert_eq!(requeued.runner_id, old);

        let err = h.heartbeat(&old, &[]).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{}: re-register", h.label);
        let err = h
            .report(&old, &job, 1, AttemptState::Succeeded, Some(0))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::FailedPrecondition,
            "{}: late report",
            h.label
        );

        let new = h.register(1).await;
        let a = h.acquire_n(&new, 1).await;
        assert_eq!((a[0].job_id.as_str(), a[0].attempt), (job.as_str(), 2));
        let scheduled = h.wait_status_n(&job, JobState::Scheduled, 2).await;
        assert_eq!(scheduled.runner_id, new);
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn lease_expiry_fails_the_job_when_no_attempts_remain() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(1).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec_with_attempts(1, 1)).await;
        h.acquire_n(&runner, 1).await;
        // Only a started attempt uses the budget.
        h.report(&runner, &job, 1, AttemptState::Running, None)
            .await
            .unwrap();
        h.clock.advance(Duration::from_secs(20));
        let failed = h.wait_status(&job, JobState::Failed).await;
        assert_eq!(
            failed.reason,
            "runner lost; no attempts left (1 of 1 started)"
        );
        assert_eq!(
            failed.failure_cause,
            FailureCause::Platform as i32,
            "{}",
            h.label
        );
        assert_eq!(failed.error.as_ref().unwrap().r#type, "RunnerLost");
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn heartbeat_keeps_the_lease() {
    let h = Harness::start(trainmesh_common::testing::sqlite_db()).await;
    let runner = h.register(1).await;
    for _ in 0..3 {
        h.clock.advance(Duration::from_secs(10));
        assert!(h.heartbeat(&runner, &[]).await.unwrap().is_empty());
    }
    // Still live: a job is dispatched to it.
    let job = new_job_id();
    h.enqueue(&job, "alice", spec(1)).await;
    assert_eq!(h.acquire_n(&runner, 1).await[0].job_id, job);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn cancel_of_queued_job_is_immediate() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(1)).await;
        assert_eq!(h.cancel(&job).await, JobState::Cancelled, "{}", h.label);
        let c = h.wait_status(&job, JobState::Cancelled).await;
        assert_eq!(c.failure_cause, FailureCause::Cancelled as i32);
        assert_eq!(c.reason, "user asked");
        assert_eq!(
            h.cancel(&job).await,
            JobState::Cancelled,
            "{}: again",
            h.label
        );

        // A cancelled job is never dispatched.
        let runner = h.register(1).await;
        let other = new_job_id();
        h.enqueue(&other, "alice", spec(1)).await;
        assert_eq!(h.acquire_n(&runner, 1).await[0].job_id, other);

        // Cancelled before its enqueue arrived: the late enqueue queues nothing.
        let early = new_job_id();
        assert_eq!(h.cancel(&early).await, JobState::Cancelled);
        let late = h.enqueue(&early, "alice", spec(1)).await;
        assert!(!late.created);
        assert_eq!(late.state, JobState::Cancelled as i32, "{}", h.label);
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn cancel_of_dispatched_job_appears_in_heartbeat() {
    for db in all_dbs().await {
        let h = Harness::start(db).await;
        let runner = h.register(1).await;
        let job = new_job_id();
        h.enqueue(&job, "alice", spec(1)).await;
        h.acquire_n(&runner, 1).await;
        h.report(&runner, &job, 1, AttemptState::Running, None)
            .await
            .unwrap();
        assert_eq!(h.cancel(&job).await, JobState::Running, "{}", h.label);
        let cancel = h.heartbeat(&runner, &[(&job, 1)]).await.unwrap();
        assert_eq!(cancel.len(), 1, "{}", h.label);
        assert_eq!(
            (cancel[0].job_id.as_str(), cancel[0].attempt),
            (job.as_str(), 1)
        );
        h.report(&runner, &job, 1, AttemptState::Cancelled, Some(143))
            .await
            .unwrap();
        let c = h.wait_status(&job, JobState::Cancelled).await;
        assert_eq!(c.failure_cause, FailureCause::Cancelled as i32);
        assert_eq!(c.reason, "user asked");
        assert!(h.heartbeat(&runner, &[]).await.unwrap().is_empty());
        h.stop().await.unwrap();
    }
}

#[tokio::test]
async fn cancel_of_undelivered_assignment_frees_it_at_once() {
    let h = Harness::start(trainmesh_common::testing::sqlite_db()).await;
    let runner = h.register(1).await;
    let job = new_job_id();
    h.enqueue(&job, "alice", spec(1)).await;
    h.wait_status(&job, JobState::Scheduled).await;
    assert_eq!(h.cancel(&job).await, JobState::Cancelled);
    h.wait_status(&job, JobState::Cancelled).await;
    // The GPU is free for the next job, and the cancelled one never shows up.
    let next = new_job_id();
    h.enqueue(&next, "alice", spec(1)).await;
    let got = h.acquire_n(&runner, 1).await;
    assert_eq!(got[0].job_id, next);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn heartbeat_tells_runner_to_stop_attempts_it_does_not_hold() {
    let h = Harness::start(trainmesh_common::testing::sqlite_db()).await;
    let runner = h.register(1).await;
    let stray = new_job_id();
    let cancel = h.heartbeat(&runner, &[(&stray, 1)]).await.unwrap();
    assert_eq!(cancel.len(), 1);
    assert_eq!(cancel[0].job_id, stray);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn internal_rpcs_need_the_service_role() {
    let h = Harness::start(trainmesh_common::testing::sqlite_db()).await;
    let err = h
        .internal_as(test_tokens().alice)
        .enqueue_job(EnqueueJobRequest {
            job_id: new_job_id(),
            owner: "alice".into(),
            spec: Some(spec(0)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .internal_as("not-a-token")
        .enqueue_job(EnqueueJobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let h = Harness::start(trainmesh_common::testing::sqlite_db()).await;
    let mut c = h.internal();
    let err = c
        .enqueue_job(EnqueueJobRequest {
            job_id: "nope".into(),
            owner: "alice".into(),
            spec: Some(spec(0)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("job_id"), "{}", err.message());
    let err = c
        .enqueue_job(EnqueueJobRequest {
            job_id: new_job_id(),
            owner: "alice".into(),
            spec: Some(spec(-1)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("spec.resources.gpus"),
        "{}",
        err.message()
    );
    let runner = h.register(0).await;
    let err = h
        .report(&runner, &new_job_id(), 1, AttemptState::Lost, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("state"), "{}", err.message());
    h.stop().await.unwrap();
}

#[tokio::test]
async fn users_see_only_their_own_queue_entries() {
    let h = Harness::start(trainmesh_common::testing::sqlite_db()).await;
    let (a, b) = (new_job_id(), new_job_id());
    h.enqueue(&a, "alice", spec(1)).await;
    h.enqueue(&b, "bob", spec(1)).await;
    let q = |token: &'static str, owner: &str| {
        let mut c = h.public(token);
        let owner = owner.to_owned();
        async move {
            c.get_queue(GetQueueRequest {
                owner,
                ..Default::default()
            })
            .await
        }
    };
    let mine = q(test_tokens().alice, "").await.unwrap().into_inner();
    assert_eq!(mine.entries.len(), 1);
    assert_eq!(mine.entries[0].job_id, a);
    assert_eq!(
        mine.entries[0].reason,
        PendingReason::NoRunnerCapacity as i32
    );
    let err = q(test_tokens().bob, "alice").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let all = q(test_tokens().admin, "").await.unwrap().into_inner();
    assert_eq!(all.entries.len(), 2);
    let alices = q(test_tokens().admin, "alice").await.unwrap().into_inner();
    assert_eq!(alices.entries.len(), 1);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn get_limits_returns_the_configured_default() {
    let h = Harness::start_with(trainmesh_common::testing::sqlite_db(), |c| {
        c.max_running_per_user = 3;
    })
    .await;
    let r = h
        .public(test_tokens().alice)
        .get_limits(GetLimitsRequest {
            user: "alice".into(),
            org: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.limits[0].scope, LimitScope::UserDefault as i32);
    assert_eq!(r.limits[0].max_running_jobs, Some(3));
    assert_eq!(r.effective[0].value, 3);
    let err = h
        .public(test_tokens().admin)
        .explain_job(trainmesh_common::proto::scheduler::v1::ExplainJobRequest {
            job_id: new_job_id(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    h.stop().await.unwrap();
}

#[tokio::test]
async fn success_without_a_running_report_still_passes_through_running() {
    let h = Harness::start(trainmesh_common::testing::sqlite_db()).await;
    let runner = h.register(1).await;
    let job = new_job_id();
    h.enqueue(&job, "alice", spec(1)).await;
    h.acquire_n(&runner, 1).await;
    assert!(h
        .report(&runner, &job, 1, AttemptState::Succeeded, Some(0))
        .await
        .unwrap());
    h.wait_status(&job, JobState::Succeeded).await;
    let states: Vec<(i32, i64)> = h
        .statuses(&job)
        .iter()
        .map(|s| (s.state, s.scheduler_sequence))
        .collect();
    assert_eq!(
        states,
        vec![
            (JobState::Queued as i32, 1),
            (JobState::Scheduled as i32, 2),
            (JobState::Running as i32, 3),
            (JobState::Succeeded as i32, 4)
        ]
    );
    h.stop().await.unwrap();
}

/// A refused enqueue leaves the job FAILED in the queue with the reason: a
/// redelivery of the same job does not queue it, and nothing is dispatched.
#[tokio::test]
async fn a_refused_enqueue_leaves_the_job_failed() {
    let h = Harness::start(trainmesh_common::testing::sqlite_db()).await;
    let job = new_job_id();
    let err = h
        .internal()
        .enqueue_job(EnqueueJobRequest {
            job_id: job.clone(),
            owner: "alice".into(),
            spec: Some(spec(5000)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("spec.resources.gpus"),
        "{}",
        err.message()
    );
    let again = h.enqueue(&job, "alice", spec(1)).await;
    assert!(!again.created);
    assert_eq!(again.state, JobState::Failed as i32);
    let runner = h.register(1).await;
    let got = h
        .runners()
        .acquire_assignments(
            trainmesh_common::proto::runner::v1::AcquireAssignmentsRequest {
                runner_id: runner,
                max_assignments: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .into_inner();
    assert!(got.assignments.is_empty(), "{got:?}");
    h.stop().await.unwrap();
}
