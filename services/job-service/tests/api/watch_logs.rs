//! WatchJobs (ordered, resumable, per-user, heartbeats) and StreamJobLogs
//! (tail, follow, cap).

use std::time::Duration;

use tonic::Streaming;
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::testing::all_dbs;

use crate::support::*;
use pb::watch_jobs_response::Kind;
use pb::JobState::*;

async fn next(stream: &mut Streaming<pb::WatchJobsResponse>) -> Kind {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a watch message in time")
        .expect("stream ok")
        .expect("stream open")
        .kind
        .expect("kind")
}

async fn next_event(stream: &mut Streaming<pb::WatchJobsResponse>) -> pb::JobEvent {
    loop {
        if let Kind::Event(e) = next(stream).await {
            return e;
        }
    }
}

async fn watch(
    app: &App,
    token: &str,
    req: pb::WatchJobsRequest,
) -> Streaming<pb::WatchJobsResponse> {
    app.jobs(token).watch_jobs(req).await.unwrap().into_inner()
}

#[tokio::test]
async fn watch_delivers_events_in_order_and_resumes_from_a_cursor() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let mut stream = watch(&app, app.tokens.alice, pb::WatchJobsRequest::default()).await;
        // The first message says the watch is established.
        let Kind::Heartbeat(hb) = next(&mut stream).await else {
            panic!("first message should be a heartbeat");
        };
        assert!(!hb.cursor.is_empty());

        let job = create(&mut app.alice(), spec("watched")).await;
        make_running(&app, &job.id).await;
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(next_event(&mut stream).await);
        }
        let states: Vec<_> = got.iter().map(|e| e.state).collect();
        assert_eq!(
            states,
            vec![
                Pending as i32,
                Queued as i32,
                Scheduled as i32,
                Running as i32
            ],
            "{}",
            app.label
        );
        assert_eq!(
            got.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(got[0].r#type, "created");
        assert_eq!(got[2].previous_state, Queued as i32);
        assert_eq!(got[2].attempt, 1);
        assert!(got.iter().all(|e| e.job_id == job.id));
        let resume_at = got[1].cursor.clone();
        drop(stream);

        // Meanwhile the job finishes.
        apply(&app, update(&job.id, Succeeded, 4)).await.unwrap();
        let mut resumed = watch(
            &app,
            app.tokens.alice,
            pb::WatchJobsRequest {
                cursor: resume_at,
                ..Default::default()
            },
        )
        .await;
        let mut after = Vec::new();
        for _ in 0..3 {
            after.push(next_event(&mut resumed).await);
        }
        assert_eq!(
            after.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(after[2].state, Succeeded as i32);
        // Nothing more (no duplicates): the next message is a heartbeat
        // once the stream is idle... only after an event would follow; make one.
        let other = create(&mut app.alice(), spec("other")).await;
        let e = next_event(&mut resumed).await;
        assert_eq!((e.job_id.as_str(), e.sequence), (other.id.as_str(), 1));

        // From the start, filtered to one job.
        let mut one = watch(
            &app,
            app.tokens.alice,
            pb::WatchJobsRequest {
                job_id: job.id.clone(),
                from_start: true,
                ..Default::default()
            },
        )
        .await;
        for seq in 1..=5 {
            let e = next_event(&mut one).await;
            assert_eq!((e.job_id.as_str(), e.sequence), (job.id.as_str(), seq));
        }
        let res = app
            .alice()
            .watch_jobs(pb::WatchJobsRequest {
                cursor: "not-a-cursor".into(),
                ..Default::default()
            })
            .await;
        assert_invalid(res, "cursor");
    }
}

#[tokio::test]
async fn watch_keeps_up_with_many_events_without_loss() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let mut stream = watch(&app, app.tokens.admin, pb::WatchJobsRequest::default()).await;
        let writer = {
            let mut alice = app.alice();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..300 {
                    ids.push(create(&mut alice, spec(&format!("bulk-{i}"))).await.id);
                }
                ids
            })
        };
        let mut seen = Vec::new();
        let mut last_cursor = 0i64;
        while seen.len() < 300 {
            let e = next_event(&mut stream).await;
            let c: i64 = e.cursor.parse().unwrap();
            assert!(c > last_cursor, "{}: cursors increase", app.label);
            last_cursor = c;
            seen.push(e.job_id);
        }
        let ids = writer.await.unwrap();
        assert_eq!(
            seen, ids,
            "{}: every creation once, in commit order",
            app.label
        );
    }
}

#[tokio::test]
async fn users_watch_only_their_own_jobs_and_heartbeats_carry_the_cursor() {
    for db in all_dbs().await {
        let app = App::start_with(&db, |c| c.watch_heartbeat = Duration::from_millis(200)).await;
        let alices = create(&mut app.alice(), spec("alice's")).await;
        let mut bob = watch(
            &app,
            app.tokens.bob,
            pb::WatchJobsRequest {
                from_start: true,
                ..Default::default()
            },
        )
        .await;
        let bobs = create(&mut app.jobs(app.tokens.bob), spec("bob's")).await;
        let e = next_event(&mut bob).await;
        assert_eq!(
            e.job_id, bobs.id,
            "{}: alice's event is not shown to bob",
            app.label
        );
        // Heartbeats move the cursor past events bob may not see.
        apply(&app, update(&alices.id, Queued, 1)).await.unwrap();
        let want: i64 = e.cursor.parse::<i64>().unwrap() + 1;
        let mut heartbeats = 0;
        loop {
            match next(&mut bob).await {
                Kind::Heartbeat(hb) => {
                    heartbeats += 1;
                    assert!(hb.time.is_some());
                    if hb.cursor.parse::<i64>().unwrap() >= want && heartbeats >= 2 {
                        break;
                    }
                }
                Kind::Event(ev) => panic!("bob saw {ev:?}"),
            }
        }
        let mut admin = watch(
            &app,
            app.tokens.admin,
            pb::WatchJobsRequest {
                from_start: true,
                ..Default::default()
            },
        )
        .await;
        let mut jobs = Vec::new();
        for _ in 0..3 {
            jobs.push(next_event(&mut admin).await.job_id);
        }
        assert_eq!(
            jobs,
            vec![alices.id.clone(), bobs.id.clone(), alices.id.clone()]
        );
    }
}

async fn read_all(app: &App, req: pb::StreamJobLogsRequest) -> Vec<pb::LogLine> {
    let mut s = app.alice().stream_job_logs(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(m) = tokio::time::timeout(WAIT, s.message())
        .await
        .unwrap()
        .unwrap()
    {
        out.extend(m.lines);
    }
    out
}

#[tokio::test]
async fn logs_tail_whole_and_follow() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("logs")).await;
        make_running(&app, &job.id).await;
        assert_eq!(append(&app, &job.id, lines(1..=10)).await, 10);
        // Re-sent lines are ignored.
        assert_eq!(append(&app, &job.id, lines(5..=10)).await, 10);

        let tail = read_all(
            &app,
            pb::StreamJobLogsRequest {
                job_id: job.id.clone(),
                tail_lines: 3,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            tail.iter().map(|l| l.number).collect::<Vec<_>>(),
            vec![8, 9, 10],
            "{}",
            app.label
        );
        assert_eq!(tail[0].text, "step 8 loss 0.8");
        assert!(tail.iter().all(|l| l.attempt == 1));
        let whole = read_all(
            &app,
            pb::StreamJobLogsRequest {
                job_id: job.id.clone(),
                attempt: 1,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(whole, lines(1..=10));

        // Follow: the tail, then new lines, then the end with the job.
        let mut s = app
            .alice()
            .stream_job_logs(pb::StreamJobLogsRequest {
                job_id: job.id.clone(),
                tail_lines: 2,
                follow: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while got.len() < 2 {
            let m = tokio::time::timeout(WAIT, s.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            got.extend(m.lines.into_iter().map(|l| l.number));
        }
        assert_eq!(got, vec![9, 10]);
        append(&app, &job.id, lines(11..=12)).await;
        while got.len() < 4 {
            let m = tokio::time::timeout(WAIT, s.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            got.extend(m.lines.into_iter().map(|l| l.number));
        }
        assert_eq!(got, vec![9, 10, 11, 12]);
        // The runner flushes its last lines, then reports the end.
        append(&app, &job.id, lines(13..=13)).await;
        apply(&app, update(&job.id, Succeeded, 4)).await.unwrap();
        while let Some(m) = tokio::time::timeout(WAIT, s.message())
            .await
            .unwrap()
            .unwrap()
        {
            got.extend(m.lines.into_iter().map(|l| l.number));
        }
        assert_eq!(
            got,
            vec![9, 10, 11, 12, 13],
            "{}: ends after the last line",
            app.label
        );

        let res = app
            .alice()
            .stream_job_logs(pb::StreamJobLogsRequest {
                job_id: job.id.clone(),
                tail_lines: -1,
                ..Default::default()
            })
            .await;
        assert_invalid(res, "tail_lines");
        let res = app
            .as_runner()
            .append_job_logs(pb::AppendJobLogsRequest {
                job_id: job.id.clone(),
                attempt: 0,
                lines: lines(1..=1),
            })
            .await;
        assert_invalid(res, "attempt");
    }
}

#[tokio::test]
async fn follow_waits_for_the_first_attempt() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("early")).await;
        let mut s = app
            .alice()
            .stream_job_logs(pb::StreamJobLogsRequest {
                job_id: job.id.clone(),
                follow: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        make_running(&app, &job.id).await;
        append(&app, &job.id, lines(1..=3)).await;
        let mut got = Vec::new();
        while got.len() < 3 {
            let m = tokio::time::timeout(WAIT, s.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            got.extend(m.lines.into_iter().map(|l| l.number));
        }
        assert_eq!(got, vec![1, 2, 3], "{}", app.label);
        apply(&app, update(&job.id, Failed, 4)).await.unwrap();
        let end = tokio::time::timeout(WAIT, s.message())
            .await
            .unwrap()
            .unwrap();
        assert!(end.is_none());
    }
}

#[tokio::test]
async fn a_long_log_keeps_its_head_its_tail_and_one_marker() {
    for db in all_dbs().await {
        // Cap 5: line 1, the marker, the last 3 lines.
        let app = App::start_with(&db, |c| c.max_log_lines_per_attempt = 5).await;
        let job = create(&mut app.alice(), spec("chatty")).await;
        make_running(&app, &job.id).await;
        assert_eq!(append(&app, &job.id, lines(1..=3)).await, 3);
        assert_eq!(append(&app, &job.id, lines(2..=8)).await, 8);
        assert_eq!(append(&app, &job.id, lines(9..=20)).await, 20);
        // A re-sent line that was dropped stays dropped.
        assert_eq!(append(&app, &job.id, lines(4..=6)).await, 20);
        let all = read_all(
            &app,
            pb::StreamJobLogsRequest {
                job_id: job.id.clone(),
                ..Default::default()
            },
        )
        .await;
        let numbers: Vec<i64> = all.iter().map(|l| l.number).collect();
        assert_eq!(numbers, [1, 2, 18, 19, 20], "{}", app.label);
        assert_eq!(all[0], lines(1..=1)[0]);
        assert_eq!(all[2..], lines(18..=20)[..]);
        assert!(all[1].text.contains("lines 2-17 were dropped"), "{}", all[1].text);
    }
}

#[tokio::test]
async fn the_middle_of_a_long_log_keeps_its_earliest_error_lines() {
    for db in all_dbs().await {
        // Cap 100: lines 1-25, the marker, 5 telling lines, the last 69.
        let app = App::start_with(&db, |c| c.max_log_lines_per_attempt = 100).await;
        let job = create(&mut app.alice(), spec("chatty")).await;
        make_running(&app, &job.id).await;
        let text = |n: i64| {
            if n % 50 == 0 {
                format!("NCCL WARN something at {n}")
            } else {
                format!("step {n} loss 0.5")
            }
        };
        for start in (1..=1000).step_by(70) {
            let batch: Vec<pb::LogLine> = (start..(start + 70).min(1001))
                .map(|n| pb::LogLine {
                    attempt: 1,
                    number: n,
                    text: text(n),
                })
                .collect();
            append(&app, &job.id, batch).await;
        }
        let all = read_all(
            &app,
            pb::StreamJobLogsRequest {
                job_id: job.id.clone(),
                ..Default::default()
            },
        )
        .await;
        let numbers: Vec<i64> = all.iter().map(|l| l.number).collect();
        let mut want: Vec<i64> = (1..=26).collect();
        want.extend([50, 100, 150, 200, 250]);
        want.extend(932..=1000);
        assert_eq!(numbers, want, "{}", app.label);
        assert!(all[25].text.contains("were dropped"), "{}", all[25].text);
        assert_eq!(all[26].text, "NCCL WARN something at 50");
        assert_eq!(all.last().map(|l| l.text.clone()), Some(text(1000)));
    }
}
