//! The state machine through UpdateJobStatus, errors, cancel, delete,
//! retry and diagnosis.

use tonic::Code;
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::testing::all_dbs;

use crate::support::*;
use pb::JobState::*;

#[tokio::test]
async fn scheduler_updates_walk_the_state_machine() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("walk")).await;
        let j = apply(&app, update(&job.id, Queued, 1)).await.unwrap();
        assert_eq!(state(&j), Queued, "{}", app.label);
        let j = apply(&app, update(&job.id, AwaitingApproval, 2))
            .await
            .unwrap();
        assert_eq!(state(&j), AwaitingApproval);
        let mut s = update(&job.id, Scheduled, 3);
        s.attempt = 1;
        s.runner_id = "runner-a".into();
        let j = apply(&app, s).await.unwrap();
        assert_eq!(state(&j), Scheduled);
        assert_eq!(j.attempts.len(), 1);
        assert_eq!(j.attempts[0].runner_id, "runner-a");
        assert_eq!(j.attempts[0].state, pb::AttemptState::Scheduled as i32);
        assert!(j.start_time.is_none());

        let mut r = update(&job.id, Running, 4);
        r.attempt = 1;
        let j = apply(&app, r).await.unwrap();
        assert_eq!(state(&j), Running);
        assert!(j.start_time.is_some());
        assert_eq!(j.attempts[0].state, pb::AttemptState::Running as i32);
        assert!(j.attempts[0].start_time.is_some());

        let mut done = update(&job.id, Succeeded, 5);
        done.attempt = 1;
        done.exit_code = Some(0);
        let j = apply(&app, done).await.unwrap();
        assert_eq!(state(&j), Succeeded);
        assert!(j.end_time.is_some());
        let a = &j.attempts[0];
        assert_eq!(a.state, pb::AttemptState::Succeeded as i32);
        assert_eq!(a.exit_code, Some(0));
        assert!(a.end_time.is_some());
        assert!(j.error.is_none());
        assert_eq!(get(&mut app.alice(), &job.id).await.unwrap(), j);
    }
}

#[tokio::test]
async fn illegal_transitions_are_refused() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("illegal")).await;
        let st = assert_code(
            apply(&app, update(&job.id, Running, 1)).await,
            Code::FailedPrecondition,
        );
        assert!(
            st.message().contains("PENDING") && st.message().contains("RUNNING"),
            "{st:?}"
        );
        assert_code(
            apply(&app, update(&job.id, Succeeded, 1)).await,
            Code::FailedPrecondition,
        );
        apply(&app, update(&job.id, Queued, 1)).await.unwrap();
        assert_code(
            apply(&app, update(&job.id, Succeeded, 2)).await,
            Code::FailedPrecondition,
        );
        assert_code(
            apply(&app, update(&job.id, Running, 2)).await,
            Code::FailedPrecondition,
        );
        // The refused updates changed nothing; a legal one still applies.
        let j = get(&mut app.alice(), &job.id).await.unwrap();
        assert_eq!(state(&j), Queued, "{}", app.label);
        apply(&app, update(&job.id, Scheduled, 2)).await.unwrap();

        assert_invalid(apply(&app, update(&job.id, Unspecified, 3)).await, "state");
        assert_invalid(
            apply(&app, update(&job.id, Running, 0)).await,
            "scheduler_sequence",
        );
        let missing = uuid::Uuid::now_v7().to_string();
        assert_code(
            apply(&app, update(&missing, Queued, 1)).await,
            Code::NotFound,
        );
    }
}

#[tokio::test]
async fn stale_and_late_updates_are_acknowledged_and_ignored() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("stale")).await;
        apply(&app, update(&job.id, Queued, 5)).await.unwrap();
        // Older sequence: OK, nothing changes (even though it is legal).
        let j = apply(&app, update(&job.id, Scheduled, 4)).await.unwrap();
        assert_eq!(state(&j), Queued, "{}", app.label);
        // Duplicate of the applied one.
        let j = apply(&app, update(&job.id, Queued, 5)).await.unwrap();
        assert_eq!(state(&j), Queued);
        make_running_from(&app, &job.id, 6).await;
        apply(&app, update(&job.id, Succeeded, 8)).await.unwrap();
        // Anything after the end is ignored, whatever its sequence.
        let j = apply(&app, update(&job.id, Failed, 100)).await.unwrap();
        assert_eq!(state(&j), Succeeded);
        let j = apply(&app, update(&job.id, Queued, 101)).await.unwrap();
        assert_eq!(state(&j), Succeeded);
        assert!(j.error.is_none());
    }
}

async fn make_running_from(app: &App, job: &str, seq: i64) {
    let mut s = update(job, Scheduled, seq);
    s.attempt = 1;
    apply(app, s).await.unwrap();
    let mut r = update(job, Running, seq + 1);
    r.attempt = 1;
    apply(app, r).await.unwrap();
}

#[tokio::test]
async fn failed_job_carries_its_error_and_error_message() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("fails")).await;
        make_running(&app, &job.id).await;
        let err = pb::JobError {
            r#type: "RuntimeError".into(),
            message: "CUDA error: device-side assert triggered".into(),
            traceback: "Traceback (most recent call last):\n  File \"train.py\", line 3, in <module>\nRuntimeError: CUDA error".into(),
            exit_code: 1,
            category: "user-code".into(),
            ..Default::default()
        };
        let mut f = update(&job.id, Failed, 4);
        f.attempt = 1;
        f.exit_code = Some(1);
        f.error = Some(err.clone());
        let j = apply(&app, f).await.unwrap();
        assert_eq!(state(&j), Failed, "{}", app.label);
        assert_eq!(j.error.as_ref(), Some(&err));
        assert_eq!(
            j.error_message,
            format!(
                "Error Type: RuntimeError\nError Message: CUDA error: device-side assert triggered\nFull Traceback:\n{}",
                err.traceback
            )
        );
        assert_eq!(j.failure_cause, pb::FailureCause::UserCode as i32);
        assert!(j.end_time.is_some());
        let a = &j.attempts[0];
        assert_eq!(a.state, pb::AttemptState::Failed as i32);
        assert_eq!(a.exit_code, Some(1));
        assert_eq!(a.error.as_ref(), Some(&err));

        // A list shows the first line, GetJob the whole message.
        let listed = app
            .alice()
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.jobs[0].error_message, "Error Type: RuntimeError");
        assert_eq!(
            get(&mut app.alice(), &job.id).await.unwrap().error_message,
            j.error_message
        );

        // Killed by a signal, no cause given: derived from the exit code.
        let oom = create(&mut app.alice(), spec("oom")).await;
        make_running(&app, &oom.id).await;
        let mut f = update(&oom.id, Failed, 4);
        f.attempt = 1;
        f.exit_code = Some(137);
        f.error = Some(pb::JobError {
            r#type: "OOMKilled".into(),
            message: "the container was killed by the OOM killer".into(),
            exit_code: 137,
            signal: 9,
            ..Default::default()
        });
        let j = apply(&app, f).await.unwrap();
        assert_eq!(j.failure_cause, pb::FailureCause::Signal as i32);
        assert!(j
            .error_message
            .starts_with("Error Type: OOMKilled\nError Message: the container"));

        // Runner lost, named cause, no structured error: one is made up.
        let lost = create(&mut app.alice(), spec("lost")).await;
        make_running(&app, &lost.id).await;
        let mut f = update(&lost.id, Failed, 4);
        f.failure_cause = pb::FailureCause::Platform as i32;
        f.reason = "runner lost its lease".into();
        let j = apply(&app, f).await.unwrap();
        assert_eq!(j.failure_cause, pb::FailureCause::Platform as i32);
        assert_eq!(j.error.as_ref().unwrap().message, "runner lost its lease");
        assert!(j.error_message.starts_with("Error Type: UnknownError\n"));
        assert_eq!(j.state_reason, "runner lost its lease");
    }
}

#[tokio::test]
async fn requeue_ends_the_attempt_and_a_new_one_follows() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("requeue")).await;
        make_running(&app, &job.id).await;
        let mut q = update(&job.id, Queued, 4);
        q.attempt = 1;
        q.attempt_state = pb::AttemptState::Lost as i32;
        q.reason = "runner-1 lost its lease".into();
        let j = apply(&app, q).await.unwrap();
        assert_eq!(state(&j), Queued, "{}", app.label);
        assert_eq!(j.attempts[0].state, pb::AttemptState::Lost as i32);
        assert_eq!(j.state_reason, "runner-1 lost its lease");
        let mut s = update(&job.id, Scheduled, 5);
        s.attempt = 2;
        s.runner_id = "runner-2".into();
        let j = apply(&app, s).await.unwrap();
        assert_eq!(j.attempts.len(), 2);
        assert_eq!(j.attempts[1].number, 2);
        assert_eq!(j.attempts[1].runner_id, "runner-2");
        assert_eq!(j.attempts[0].state, pb::AttemptState::Lost as i32);
    }
}

#[tokio::test]
async fn cancel_of_pending_job_is_immediate() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("c")).await;
        let j = app
            .alice()
            .cancel_job(pb::CancelJobRequest {
                job_id: job.id.clone(),
                reason: "wrong dataset".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert_eq!(state(&j), Cancelled, "{}", app.label);
        assert_eq!(j.state_reason, "wrong dataset");
        assert_eq!(j.failure_cause, pb::FailureCause::Cancelled as i32);
        assert!(j.end_time.is_some());
        // The scheduler's late QUEUED for it is ignored.
        let j = apply(&app, update(&job.id, Queued, 1)).await.unwrap();
        assert_eq!(state(&j), Cancelled);
    }
}

#[tokio::test]
async fn cancel_of_running_job_waits_for_the_scheduler() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("c")).await;
        make_running(&app, &job.id).await;
        let req = pb::CancelJobRequest {
            job_id: job.id.clone(),
            reason: "no longer needed".into(),
        };
        let j = app
            .alice()
            .cancel_job(req.clone())
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert_eq!(state(&j), Running, "{}", app.label);
        assert!(j.cancel_requested);
        // Twice is harmless.
        let j = app
            .alice()
            .cancel_job(req)
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert!(j.cancel_requested);
        let mut c = update(&job.id, Cancelled, 4);
        c.attempt = 1;
        c.exit_code = Some(143);
        let j = apply(&app, c).await.unwrap();
        assert_eq!(state(&j), Cancelled);
        assert_eq!(j.attempts[0].state, pb::AttemptState::Cancelled as i32);
        assert_eq!(j.failure_cause, pb::FailureCause::Cancelled as i32);
        assert_eq!(
            j.state_reason, "no longer needed",
            "the user's reason is kept"
        );
    }
}

#[tokio::test]
async fn cancel_of_finished_job_is_refused() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("done")).await;
        make_running(&app, &job.id).await;
        apply(&app, update(&job.id, Succeeded, 4)).await.unwrap();
        let res = app
            .alice()
            .cancel_job(pb::CancelJobRequest {
                job_id: job.id.clone(),
                reason: String::new(),
            })
            .await;
        let st = assert_code(res, Code::FailedPrecondition);
        assert!(st.message().contains(&job.id), "{}", app.label);
    }
}

#[tokio::test]
async fn delete_only_removes_finished_or_unstarted_jobs() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let mut alice = app.alice();
        let running = create(&mut alice, spec("running")).await;
        make_running(&app, &running.id).await;
        let res = alice
            .delete_job(pb::DeleteJobRequest {
                job_id: running.id.clone(),
            })
            .await;
        assert_code(res, Code::FailedPrecondition);
        assert_eq!(state(&get(&mut alice, &running.id).await.unwrap()), Running);

        let pending = create(&mut alice, spec("pending")).await;
        alice
            .delete_job(pb::DeleteJobRequest {
                job_id: pending.id.clone(),
            })
            .await
            .unwrap();
        assert_code(get(&mut alice, &pending.id).await, Code::NotFound);

        apply(&app, update(&running.id, Succeeded, 4))
            .await
            .unwrap();
        alice
            .delete_job(pb::DeleteJobRequest {
                job_id: running.id.clone(),
            })
            .await
            .unwrap();
        assert_code(get(&mut alice, &running.id).await, Code::NotFound);
        let left = alice
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap();
        assert!(left.into_inner().jobs.is_empty(), "{}", app.label);
        // Updates for a deleted job are NOT_FOUND.
        assert_code(
            apply(&app, update(&running.id, Failed, 9)).await,
            Code::NotFound,
        );
    }
}

#[tokio::test]
async fn retry_creates_a_new_job_labelled_with_the_original() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let mut s = spec("retry-me");
        s.labels.insert("team".into(), "nlp".into());
        let job = create(&mut app.alice(), s).await;
        make_running(&app, &job.id).await;
        let res = app
            .alice()
            .retry_job(pb::RetryJobRequest {
                job_id: job.id.clone(),
            })
            .await;
        assert_code(res, Code::FailedPrecondition);
        apply(&app, update(&job.id, Failed, 4)).await.unwrap();

        // An admin retrying keeps alice as the owner.
        let new = app
            .jobs(app.tokens.admin)
            .retry_job(pb::RetryJobRequest {
                job_id: job.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert_ne!(new.id, job.id, "{}", app.label);
        assert_eq!(new.owner, "alice");
        assert_eq!(state(&new), Pending);
        let labels = &new.spec.as_ref().unwrap().labels;
        assert_eq!(labels["trainmesh.io/retry-of"], job.id);
        assert_eq!(labels["team"], "nlp");
        assert_eq!(
            new.spec.as_ref().unwrap().command,
            job.spec.as_ref().unwrap().command
        );
        // The original is unchanged.
        assert_eq!(
            state(&get(&mut app.alice(), &job.id).await.unwrap()),
            Failed
        );
        // Users cannot set platform labels themselves.
        let mut own = spec("sneaky");
        own.labels
            .insert("trainmesh.io/retry-of".into(), job.id.clone());
        let res = app
            .alice()
            .create_job(pb::CreateJobRequest {
                spec: Some(own),
                idempotency_key: String::new(),
            })
            .await;
        assert_invalid(res, "spec.labels[\"trainmesh.io/retry-of\"]");
    }
}

#[tokio::test]
async fn attached_diagnosis_is_shown_on_the_job() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("d")).await;
        let d = pb::DiagnosisSummary {
            diagnosis_id: "diag-1".into(),
            healthy: false,
            error: "CUDA out of memory".into(),
            solution: "lower the batch size".into(),
        };
        app.internal_as(app.tokens.diagnosis)
            .attach_diagnosis(pb::AttachDiagnosisRequest {
                job_id: job.id.clone(),
                diagnosis: Some(d.clone()),
            })
            .await
            .unwrap();
        let j = get(&mut app.alice(), &job.id).await.unwrap();
        assert_eq!(j.diagnosis, Some(d), "{}", app.label);
        let res = app
            .internal_as(app.tokens.diagnosis)
            .attach_diagnosis(pb::AttachDiagnosisRequest {
                job_id: uuid::Uuid::now_v7().to_string(),
                diagnosis: Some(Default::default()),
            })
            .await;
        assert_code(res, Code::NotFound);
    }
}

#[tokio::test]
async fn concurrent_updates_apply_independently_and_refusals_stay_alone() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let mut jobs = Vec::new();
        for i in 0..24 {
            jobs.push(create(&mut app.alice(), spec(&format!("c-{i}"))).await.id);
        }
        // Many updates at once: legal ones for every job, and for every
        // third job also an illegal one (PENDING cannot become RUNNING).
        let mut tasks = Vec::new();
        for (i, id) in jobs.iter().enumerate() {
            let mut client = app.internal();
            let job = id.clone();
            tasks.push(tokio::spawn(async move {
                let mut u = update(&job, Queued, 1);
                u.reason = format!("queued {i}");
                client.update_job_status(u).await.map(|_| ())
            }));
            if i % 3 == 0 {
                let mut client = app.internal();
                let job = id.clone();
                tasks.push(tokio::spawn(async move {
                    let mut r = update(&job, Succeeded, 9);
                    r.attempt = 1;
                    client.update_job_status(r).await.map(|_| ())
                }));
            }
        }
        let (mut ok, mut refused) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => ok += 1,
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
                    refused += 1;
                }
            }
        }
        assert_eq!((ok, refused), (24, 8), "{}", app.label);
        for (i, id) in jobs.iter().enumerate() {
            let j = get(&mut app.alice(), id).await.unwrap();
            assert_eq!(state(&j), Queued, "{}", app.label);
            assert_eq!(j.state_reason, format!("queued {i}"));
            assert!(j.attempts.is_empty());
        }
        // The next legal step still applies to each.
        for id in &jobs {
            let mut s = update(id, Scheduled, 2);
            s.attempt = 1;
            apply(&app, s).await.unwrap();
        }
    }
}
