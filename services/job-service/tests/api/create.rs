//! CreateJob, GetJob, ListJobs, idempotency and who may see what.

use std::collections::HashSet;

use tonic::Code;
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::testing::all_dbs;

use crate::support::*;

async fn list(
    client: &mut trainmesh_common::proto::job::v1::job_service_client::JobServiceClient<
        trainmesh_common::client::Channel,
    >,
    req: pb::ListJobsRequest,
) -> Result<pb::ListJobsResponse, tonic::Status> {
    Ok(client.list_jobs(req).await?.into_inner())
}

#[tokio::test]
async fn create_then_get_returns_the_stored_job() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let mut alice = app.alice();
        let mut s = spec("sft-run");
        s.labels.insert("team".into(), "nlp".into());
        s.env.insert("HF_HOME".into(), "/cache".into());
        let created = trainmesh_common::correlation::scope("cid-create-1", async {
            create(&mut alice, s.clone()).await
        })
        .await;
        assert_eq!(state(&created), pb::JobState::Pending, "{}", app.label);
        assert_eq!(created.owner, "alice");
        assert_eq!(created.org, "ml");
        assert_eq!(created.correlation_id, "cid-create-1");
        assert!(created.create_time.is_some());
        let got = get(&mut alice, &created.id).await.unwrap();
        assert_eq!(got.spec.as_ref(), Some(&s));
        assert_eq!(got.id, created.id);

        let missing = get(&mut alice, &uuid::Uuid::now_v7().to_string()).await;
        assert_code(missing, Code::NotFound);
        assert_invalid(get(&mut alice, "not-an-id").await, "job_id");
    }
}

#[tokio::test]
async fn list_pages_are_stable_and_filters_apply() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let mut alice = app.alice();
        let mut bob = app.jobs(app.tokens.bob);
        let mut ids = Vec::new();
        for i in 0..7 {
            let mut s = spec(&format!("job-{i}"));
            s.labels
                .insert("team".into(), if i % 2 == 0 { "a" } else { "b" }.into());
            ids.push(create(&mut alice, s).await.id);
        }
        for i in 0..2 {
            create(&mut bob, spec(&format!("bob-{i}"))).await;
        }

        // Pages of 3, newest first; a job created between pages does not
        // shift later pages.
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = list(
                &mut alice,
                pb::ListJobsRequest {
                    page_size: 3,
                    page_token: token.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            pages += 1;
            assert!(page.jobs.len() <= 3);
            seen.extend(page.jobs.iter().map(|j| j.id.clone()));
            if pages == 1 {
                create(&mut alice, spec("inserted-meanwhile")).await;
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let mut expected = ids.clone();
        expected.reverse();
        assert_eq!(
            seen, expected,
            "{}: every job once, newest first",
            app.label
        );
        assert_eq!(pages, 3);

        // Label selector.
        let team_a = list(
            &mut alice,
            pb::ListJobsRequest {
                label_selector: vec!["team=a".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(team_a.jobs.len(), 4);
        assert!(team_a
            .jobs
            .iter()
            .all(|j| j.spec.as_ref().unwrap().labels["team"] == "a"));

        // State filter.
        apply(&app, update(&ids[0], pb::JobState::Queued, 1))
            .await
            .unwrap();
        let queued = list(
            &mut alice,
            pb::ListJobsRequest {
                states: vec![pb::JobState::Queued as i32],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(
            queued.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
            vec![ids[0].clone()]
        );
        let pending = list(
            &mut alice,
            pb::ListJobsRequest {
                states: vec![pb::JobState::Pending as i32, pb::JobState::Running as i32],
                label_selector: vec!["team=a".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(pending.jobs.len(), 3);

        // Owner: users only themselves; admin anyone.
        let all_for_admin = list(
            &mut app.jobs(app.tokens.admin),
            pb::ListJobsRequest::default(),
        )
        .await
        .unwrap();
        assert_eq!(all_for_admin.jobs.len(), 10);
        let bobs = list(
            &mut app.jobs(app.tokens.admin),
            pb::ListJobsRequest {
                owner: "bob".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(bobs.jobs.len(), 2);
        assert!(bobs.jobs.iter().all(|j| j.owner == "bob"));
        let own = list(
            &mut alice,
            pb::ListJobsRequest {
                owner: "alice".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(own.jobs.len(), 8);
        assert_code(
            list(
                &mut alice,
                pb::ListJobsRequest {
                    owner: "bob".into(),
                    ..Default::default()
                },
            )
            .await,
            Code::PermissionDenied,
        );

        // Bad arguments.
        let bad_token = pb::ListJobsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        };
        assert_invalid(list(&mut alice, bad_token).await, "page_token");
        let bad_size = pb::ListJobsRequest {
            page_size: -1,
            ..Default::default()
        };
        assert_invalid(list(&mut alice, bad_size).await, "page_size");
        let bad_state = pb::ListJobsRequest {
            states: vec![42],
            ..Default::default()
        };
        assert_invalid(list(&mut alice, bad_state).await, "states[0]");
        let bad_selector = pb::ListJobsRequest {
            label_selector: vec!["team".into()],
            ..Default::default()
        };
        assert_invalid(list(&mut alice, bad_selector).await, "label_selector[0]");
        let huge = pb::ListJobsRequest {
            page_size: 10_000,
            ..Default::default()
        };
        assert_eq!(list(&mut alice, huge).await.unwrap().jobs.len(), 8);
    }
}

#[tokio::test]
async fn idempotent_create_returns_the_original_job() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let mut alice = app.alice();
        let req = |name: &str| pb::CreateJobRequest {
            spec: Some(spec(name)),
            idempotency_key: "submit-42".into(),
        };
        let first = alice.create_job(req("first")).await.unwrap().into_inner();
        assert!(!first.existing, "{}", app.label);
        let again = alice.create_job(req("first")).await.unwrap().into_inner();
        assert!(again.existing);
        assert_eq!(
            again.job.as_ref().unwrap().id,
            first.job.as_ref().unwrap().id
        );
        // Same key, different spec: refused, naming the key and the job.
        let changed = alice.create_job(req("second")).await.unwrap_err();
        assert_eq!(
            changed.code(),
            tonic::Code::InvalidArgument,
            "{}",
            app.label
        );
        assert!(
            changed.message().contains("idempotency_key")
                && changed.message().contains(&first.job.as_ref().unwrap().id),
            "{}",
            changed.message()
        );
        // Keys are per owner.
        let bobs = app
            .jobs(app.tokens.bob)
            .create_job(req("bob"))
            .await
            .unwrap()
            .into_inner();
        assert!(!bobs.existing);
        assert_ne!(bobs.job.unwrap().id, first.job.as_ref().unwrap().id);

        let listed = alice
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.jobs.len(), 1);

        // Concurrent retries of one submission make one job.
        let mut handles = Vec::new();
        for _ in 0..8 {
            let mut c = app.alice();
            handles.push(tokio::spawn(async move {
                c.create_job(pb::CreateJobRequest {
                    spec: Some(spec("race")),
                    idempotency_key: "race-key".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .job
                .unwrap()
                .id
            }));
        }
        let mut ids = HashSet::new();
        for h in handles {
            ids.insert(h.await.unwrap());
        }
        assert_eq!(ids.len(), 1, "{}: one job per key", app.label);
    }
}

#[tokio::test]
async fn calls_without_a_valid_token_are_unauthenticated() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let anon = trainmesh_common::client::channel(&app.addr.to_string(), None).unwrap();
        let mut anon = pb::job_service_client::JobServiceClient::new(anon);
        let res = anon
            .create_job(pb::CreateJobRequest {
                spec: Some(spec("x")),
                idempotency_key: String::new(),
            })
            .await;
        assert_code(res, Code::Unauthenticated);
        let res = anon.list_jobs(pb::ListJobsRequest::default()).await;
        assert_code(res, Code::Unauthenticated);
        let res = app
            .jobs("wrong-token")
            .list_jobs(pb::ListJobsRequest::default())
            .await;
        assert_code(res, Code::Unauthenticated);
    }
}

#[tokio::test]
async fn bob_cannot_see_or_touch_alices_job() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("private")).await;
        let mut bob = app.jobs(app.tokens.bob);
        let nf = assert_code(get(&mut bob, &job.id).await, Code::NotFound);
        let random = uuid::Uuid::now_v7().to_string();
        let nf_random = assert_code(get(&mut bob, &random).await, Code::NotFound);
        // Indistinguishable from a missing id apart from the id itself.
        assert_eq!(
            nf.message().replace(&job.id, "ID"),
            nf_random.message().replace(&random, "ID")
        );
        let res = bob
            .cancel_job(pb::CancelJobRequest {
                job_id: job.id.clone(),
                reason: String::new(),
            })
            .await;
        assert_code(res, Code::NotFound);
        let res = bob
            .delete_job(pb::DeleteJobRequest {
                job_id: job.id.clone(),
            })
            .await;
        assert_code(res, Code::NotFound);
        let res = bob
            .retry_job(pb::RetryJobRequest {
                job_id: job.id.clone(),
            })
            .await;
        assert_code(res, Code::NotFound);
        let res = bob
            .stream_job_logs(pb::StreamJobLogsRequest {
                job_id: job.id.clone(),
                ..Default::default()
            })
            .await;
        assert_code(res, Code::NotFound);
        let res = bob
            .watch_jobs(pb::WatchJobsRequest {
                job_id: job.id.clone(),
                ..Default::default()
            })
            .await;
        assert_code(res, Code::NotFound);
        let bobs = bob.list_jobs(pb::ListJobsRequest::default()).await.unwrap();
        assert!(bobs.into_inner().jobs.is_empty());

        // Alice's job is untouched; admin and service see it.
        assert_eq!(
            state(&get(&mut app.alice(), &job.id).await.unwrap()),
            pb::JobState::Pending
        );
        get(&mut app.jobs(app.tokens.admin), &job.id).await.unwrap();
        get(&mut app.jobs(app.tokens.metrics), &job.id)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn internal_rpcs_need_the_service_or_runner_that_owns_them() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("x")).await;
        // People, and the services and runners that do not own the call.
        for token in [
            app.tokens.alice,
            app.tokens.admin,
            app.tokens.job_service,
            app.tokens.metrics,
            app.tokens.runner,
        ] {
            let mut c = app.internal_as(token);
            let res = c
                .update_job_status(update(&job.id, pb::JobState::Queued, 1))
                .await;
            assert_code(res, Code::PermissionDenied);
        }
        for token in [
            app.tokens.alice,
            app.tokens.admin,
            app.tokens.scheduler,
            app.tokens.diagnosis,
        ] {
            let res = app
                .internal_as(token)
                .append_job_logs(pb::AppendJobLogsRequest {
                    job_id: job.id.clone(),
                    attempt: 1,
                    lines: lines(1..=1),
                })
                .await;
            assert_code(res, Code::PermissionDenied);
        }
        for token in [
            app.tokens.alice,
            app.tokens.admin,
            app.tokens.scheduler,
            app.tokens.runner,
        ] {
            let res = app
                .internal_as(token)
                .attach_diagnosis(pb::AttachDiagnosisRequest {
                    job_id: job.id.clone(),
                    diagnosis: Some(Default::default()),
                })
                .await;
            assert_code(res, Code::PermissionDenied);
        }
        assert_eq!(
            state(&get(&mut app.alice(), &job.id).await.unwrap()),
            pb::JobState::Pending
        );
    }
}

#[tokio::test]
async fn a_runner_ships_logs_only_for_attempts_placed_on_it() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("x")).await;
        let ship = |token: &'static str| {
            let mut c = app.internal_as(token);
            let job = job.id.clone();
            async move {
                c.append_job_logs(pb::AppendJobLogsRequest {
                    job_id: job,
                    attempt: 1,
                    lines: lines(1..=2),
                })
                .await
            }
        };
        // Not placed yet: the scheduler's word may still be on its way.
        let err = assert_code(ship(app.tokens.runner).await, Code::Unavailable);
        assert!(err.message().contains("not known here yet"), "{err:?}");
        make_running(&app, &job.id).await;
        let err = assert_code(ship(app.tokens.runner_b).await, Code::PermissionDenied);
        assert!(
            err.message()
                .contains("not placed on runner `node-2` but on `node-1`"),
            "{err:?}"
        );
        ship(app.tokens.runner).await.unwrap();
        let j = get(&mut app.alice(), &job.id).await.unwrap();
        assert_eq!(j.attempts[0].runner_name, "node-1", "{}", app.label);
    }
}

#[tokio::test]
async fn pipelines_are_unimplemented_for_now() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let res = app
            .alice()
            .create_pipeline(pb::CreatePipelineRequest::default())
            .await;
        let st = assert_code(res, Code::Unimplemented);
        assert!(st.message().contains("later release"));
    }
}

#[tokio::test]
async fn concurrent_creates_are_each_stored_with_labels_event_and_outbox_message() {
    use std::collections::HashMap;
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let mut handles = Vec::new();
        for i in 0..64 {
            let mut c = if i % 2 == 0 {
                app.alice()
            } else {
                app.jobs(app.tokens.bob)
            };
            handles.push(tokio::spawn(async move {
                let mut s = spec(&format!("burst-{i}"));
                s.labels.insert("n".into(), i.to_string());
                s.labels.insert("team".into(), "ml".into());
                c.create_job(pb::CreateJobRequest {
                    spec: Some(s),
                    idempotency_key: format!("burst-{i}"),
                })
                .await
                .unwrap()
                .into_inner()
                .job
                .unwrap()
            }));
        }
        let mut acked = HashMap::new();
        for h in handles {
            let j = h.await.unwrap();
            acked.insert(j.id.clone(), j);
        }
        assert_eq!(acked.len(), 64, "{}", app.label);
        let mut admin = app.jobs(app.tokens.admin);
        for (id, j) in &acked {
            let n = &j.spec.as_ref().unwrap().labels["n"];
            let found = list(
                &mut admin,
                pb::ListJobsRequest {
                    label_selector: vec![format!("n={n}"), "team=ml".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let ids: Vec<_> = found.jobs.iter().map(|j| j.id.as_str()).collect();
            assert_eq!(ids, [id.as_str()], "{}", app.label);
        }
        // One `created` event (sequence 1) per job, and later events follow on.
        let mut stream = admin
            .watch_jobs(pb::WatchJobsRequest {
                from_start: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut created = 0;
        while created < 64 {
            let msg = tokio::time::timeout(WAIT, stream.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Some(pb::watch_jobs_response::Kind::Event(e)) = msg.kind {
                assert_eq!((e.r#type.as_str(), e.sequence), ("created", 1));
                assert!(acked.contains_key(&e.job_id));
                created += 1;
            }
        }
        let some = acked.keys().next().unwrap();
        apply(&app, update(some, pb::JobState::Queued, 1))
            .await
            .unwrap();
        let msg = loop {
            let msg = tokio::time::timeout(WAIT, stream.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Some(pb::watch_jobs_response::Kind::Event(e)) = msg.kind {
                break e;
            }
        };
        assert_eq!((msg.job_id.as_str(), msg.sequence), (some.as_str(), 2));
        // Every job has its enqueue message waiting for the scheduler.
        let db = trainmesh_common::db::connect(&db.url, trainmesh_common::db::Durability::Full)
            .await
            .unwrap();
        let row: (i64,) = sqlx::query_as(
            "SELECT CAST(COUNT(DISTINCT msg_key) AS BIGINT) FROM outbox WHERE topic = 'enqueue'",
        )
        .fetch_one(&db.read)
        .await
        .unwrap();
        assert_eq!(row.0, 64, "{}", app.label);
    }
}
