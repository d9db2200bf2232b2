//! What job-service records for the scheduler's approval and retry
//! decisions (ISSUE 3 "Approvals", "Retries"): its own event types for an
//! approval asked for and one that expired, the decision as the job's
//! reason, and a failed attempt kept on the job that goes back to QUEUED.

use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::testing::all_dbs;

use crate::support::*;
use pb::JobState::*;

/// The job's events so far, from the start of its history.
async fn events(app: &App, job: &str, n: usize) -> Vec<pb::JobEvent> {
    let mut stream = app
        .alice()
        .watch_jobs(pb::WatchJobsRequest {
            job_id: job.into(),
            from_start: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while out.len() < n {
        let msg = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("stream open");
        if let Some(pb::watch_jobs_response::Kind::Event(e)) = msg.kind {
            out.push(e);
        }
    }
    out
}

fn awaiting(job: &str, seq: i64) -> pb::UpdateJobStatusRequest {
    let mut u = update(job, AwaitingApproval, seq);
    u.reason = "approval required by rule `big-gpu-jobs`".into();
    u
}

#[tokio::test]
async fn approval_requested_then_approved_runs_on() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("big")).await;
        let j = apply(&app, awaiting(&job.id, 1)).await.unwrap();
        assert_eq!(state(&j), AwaitingApproval, "{}", app.label);
        assert_eq!(j.state_reason, "approval required by rule `big-gpu-jobs`");
        let mut ok = update(&job.id, Queued, 2);
        ok.reason = "approved by carol: fine".into();
        let j = apply(&app, ok).await.unwrap();
        assert_eq!(state(&j), Queued);
        assert_eq!(j.state_reason, "approved by carol: fine");
        let ev = events(&app, &job.id, 3).await;
        let kinds: Vec<_> = ev.iter().map(|e| e.r#type.as_str()).collect();
        assert_eq!(
            kinds,
            ["created", "approval_requested", "state_changed"],
            "{}",
            app.label
        );
        assert_eq!(ev[1].state, AwaitingApproval as i32);
        assert_eq!(ev[1].previous_state, Pending as i32);
        assert_eq!(ev[1].message, "approval required by rule `big-gpu-jobs`");
        // Also when the scheduler passes through QUEUED first.
        let other = create(&mut app.alice(), spec("big-2")).await;
        apply(&app, update(&other.id, Queued, 1)).await.unwrap();
        apply(&app, awaiting(&other.id, 2)).await.unwrap();
        let ev = events(&app, &other.id, 3).await;
        assert_eq!(ev[2].r#type, "approval_requested");
        assert_eq!(ev[2].previous_state, Queued as i32);
    }
}

#[tokio::test]
async fn expired_approval_cancels_the_job_with_its_own_event() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("big")).await;
        apply(&app, awaiting(&job.id, 1)).await.unwrap();
        let mut exp = update(&job.id, Cancelled, 2);
        exp.failure_cause = pb::FailureCause::ApprovalExpired as i32;
        exp.reason = "approval-expired".into();
        let j = apply(&app, exp).await.unwrap();
        assert_eq!(state(&j), Cancelled, "{}", app.label);
        assert_eq!(j.failure_cause, pb::FailureCause::ApprovalExpired as i32);
        assert_eq!(j.state_reason, "approval-expired");
        assert!(j.end_time.is_some());
        assert!(j.attempts.is_empty());
        let ev = events(&app, &job.id, 3).await;
        assert_eq!(ev[2].r#type, "approval_expired", "{}", app.label);
        assert_eq!(ev[2].state, Cancelled as i32);
        assert_eq!(ev[2].previous_state, AwaitingApproval as i32);
        assert_eq!(ev[2].message, "approval-expired");
        // A late approval from the scheduler changes nothing.
        let mut late = update(&job.id, Queued, 3);
        late.reason = "approved by carol".into();
        let j = apply(&app, late).await.unwrap();
        assert_eq!(state(&j), Cancelled);
        assert_eq!(j.state_reason, "approval-expired");
    }
}

#[tokio::test]
async fn expiry_reason_is_the_same_whatever_the_scheduler_adds() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("big")).await;
        apply(&app, awaiting(&job.id, 1)).await.unwrap();
        let mut exp = update(&job.id, Cancelled, 2);
        exp.failure_cause = pb::FailureCause::ApprovalExpired as i32;
        let j = apply(&app, exp).await.unwrap();
        assert_eq!(j.state_reason, "approval-expired", "{}", app.label);
        let ev = events(&app, &job.id, 3).await;
        assert_eq!(
            (ev[2].r#type.as_str(), ev[2].message.as_str()),
            ("approval_expired", "approval-expired")
        );
    }
}

#[tokio::test]
async fn rejection_cancels_with_the_decision_as_reason() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("big")).await;
        apply(&app, awaiting(&job.id, 1)).await.unwrap();
        let mut rej = update(&job.id, Cancelled, 2);
        rej.failure_cause = pb::FailureCause::Cancelled as i32;
        rej.reason = "rejected by carol: too big".into();
        let j = apply(&app, rej).await.unwrap();
        assert_eq!(state(&j), Cancelled, "{}", app.label);
        assert_eq!(j.failure_cause, pb::FailureCause::Cancelled as i32);
        assert_eq!(j.state_reason, "rejected by carol: too big");
        let ev = events(&app, &job.id, 3).await;
        assert_eq!(ev[2].r#type, "state_changed");
        assert_eq!(ev[2].message, "rejected by carol: too big");
    }
}

#[tokio::test]
async fn requeue_for_retry_keeps_the_failed_attempt() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("oom")).await;
        make_running(&app, &job.id).await;
        let err = pb::JobError {
            r#type: "OOMKilled".into(),
            message: "killed by signal 9".into(),
            category: "oom-killed".into(),
            exit_code: 137,
            retryable: true,
            ..Default::default()
        };
        let mut q = update(&job.id, Queued, 4);
        q.attempt = 1;
        q.attempt_state = pb::AttemptState::Failed as i32;
        q.exit_code = Some(137);
        q.error = Some(err.clone());
        q.reason = "retrying after exit 137 (attempt 1 of 3) in 10s".into();
        let j = apply(&app, q).await.unwrap();
        assert_eq!(state(&j), Queued, "{}", app.label);
        assert_eq!(
            j.state_reason,
            "retrying after exit 137 (attempt 1 of 3) in 10s"
        );
        // The job is not failed: no job-level error or cause.
        assert!(j.error.is_none() && j.error_message.is_empty());
        assert_eq!(j.failure_cause, pb::FailureCause::Unspecified as i32);
        assert!(j.end_time.is_none());
        let a = &j.attempts[0];
        assert_eq!(a.state, pb::AttemptState::Failed as i32);
        assert_eq!(a.exit_code, Some(137));
        assert_eq!(a.error.as_ref(), Some(&err));
        assert!(a.end_time.is_some());

        // The backoff ends (another QUEUED naming the attempt but not its
        // state): the failed attempt stays as it was.
        let mut again = update(&job.id, Queued, 5);
        again.attempt = 1;
        let j = apply(&app, again).await.unwrap();
        assert_eq!(j.attempts[0].state, pb::AttemptState::Failed as i32);
        assert_eq!(j.attempts[0].exit_code, Some(137));
        assert!(j.state_reason.is_empty());

        // Attempt 2 runs and succeeds; attempt 1 keeps its failure.
        let mut s = update(&job.id, Scheduled, 6);
        s.attempt = 2;
        s.runner_id = "runner-2".into();
        apply(&app, s).await.unwrap();
        let mut r = update(&job.id, Running, 7);
        r.attempt = 2;
        apply(&app, r).await.unwrap();
        let mut done = update(&job.id, Succeeded, 8);
        done.attempt = 2;
        done.exit_code = Some(0);
        let j = apply(&app, done).await.unwrap();
        assert_eq!(state(&j), Succeeded);
        assert_eq!(j.attempts.len(), 2);
        assert_eq!(j.attempts[0].state, pb::AttemptState::Failed as i32);
        assert_eq!(j.attempts[0].exit_code, Some(137));
        assert_eq!(j.attempts[1].state, pb::AttemptState::Succeeded as i32);
        assert_eq!(j.attempts[1].exit_code, Some(0));
        let ev = events(&app, &job.id, 8).await;
        assert_eq!(ev[4].r#type, "state_changed");
        assert_eq!(ev[4].state, Queued as i32);
        assert_eq!(ev[4].previous_state, Running as i32);
        assert_eq!(ev[4].attempt, 1);
    }
}

#[tokio::test]
async fn lost_before_start_is_requeued_with_a_lost_attempt() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("lost")).await;
        apply(&app, update(&job.id, Queued, 1)).await.unwrap();
        let mut s = update(&job.id, Scheduled, 2);
        s.attempt = 1;
        s.runner_id = "runner-1".into();
        apply(&app, s).await.unwrap();
        let mut q = update(&job.id, Queued, 3);
        q.attempt = 1;
        q.attempt_state = pb::AttemptState::Lost as i32;
        q.reason = "runner `runner-1` lost its lease; retrying".into();
        let j = apply(&app, q).await.unwrap();
        assert_eq!(state(&j), Queued, "{}", app.label);
        assert_eq!(j.attempts[0].state, pb::AttemptState::Lost as i32);
        assert_eq!(j.attempts[0].exit_code, None);
        assert_eq!(j.state_reason, "runner `runner-1` lost its lease; retrying");
    }
}
