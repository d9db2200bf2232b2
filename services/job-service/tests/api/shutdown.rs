//! Streams at shutdown: they end with UNAVAILABLE (never a silent OK), and
//! a client that resumes from its last cursor on the restarted service gets
//! every event and line exactly once.

use tonic::{Code, Streaming};
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::testing::all_dbs;

use crate::support::*;
use pb::watch_jobs_response::Kind;

async fn next<T>(stream: &mut Streaming<T>) -> Result<Option<T>, tonic::Status> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a stream message in time")
}

fn watch_cursor(m: &pb::WatchJobsResponse) -> &str {
    match m.kind.as_ref().expect("kind") {
        Kind::Event(e) => &e.cursor,
        Kind::Heartbeat(h) => &h.cursor,
    }
}

/// Events of `stream` until `n` events of `job` arrived; returns their
/// sequences and the last cursor seen.
async fn events_of(
    stream: &mut Streaming<pb::WatchJobsResponse>,
    job: &str,
    n: usize,
    cursor: &mut String,
) -> Vec<i64> {
    let mut seqs = Vec::new();
    while seqs.len() < n {
        let m = next(stream).await.expect("stream ok").expect("stream open");
        *cursor = watch_cursor(&m).to_owned();
        if let Some(Kind::Event(e)) = m.kind {
            assert_eq!(e.job_id, job);
            seqs.push(e.sequence);
        }
    }
    seqs
}

#[track_caller]
fn assert_shutting_down<T: std::fmt::Debug>(end: Result<Option<T>, tonic::Status>, what: &str) {
    let status = end.expect_err(&format!("{what}: a shutdown is not the end of the stream"));
    assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
    assert!(
        status.message().contains("job-service is shutting down"),
        "{what}: {status:?}"
    );
}

#[tokio::test]
async fn streams_end_unavailable_at_shutdown_and_resume_exactly_once_after_a_restart() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let label = app.label;
        let job = create(&mut app.alice(), spec("restarted")).await;
        make_running(&app, &job.id).await;
        append(&app, &job.id, lines(1..=3)).await;

        let mut watch = app
            .alice()
            .watch_jobs(pb::WatchJobsRequest {
                job_id: job.id.clone(),
                from_start: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut watch_at = String::new();
        let mut seqs = events_of(&mut watch, &job.id, 4, &mut watch_at).await;
        assert_eq!(seqs, [1, 2, 3, 4], "{label}");

        let mut logs = app
            .alice()
            .stream_job_logs(pb::StreamJobLogsRequest {
                job_id: job.id.clone(),
                follow: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut numbers = Vec::new();
        let mut logs_at = String::new();
        while numbers.len() < 3 {
            let m = next(&mut logs).await.unwrap().unwrap();
            assert!(!m.cursor.is_empty(), "{label}: every message has a cursor");
            logs_at = m.cursor;
            numbers.extend(m.lines.iter().map(|l| l.number));
        }

        let stopping = tokio::spawn(app.stop());
        assert_shutting_down(next(&mut watch).await, "WatchJobs");
        assert_shutting_down(next(&mut logs).await, "StreamJobLogs");
        let dir = stopping.await.unwrap();

        // While nobody watches, the restarted service gets more lines and
        // the job's end.
        let app = App::start_in(&db, dir, |_| {}).await;
        append(&app, &job.id, lines(4..=6)).await;
        apply(&app, update(&job.id, pb::JobState::Succeeded, 4))
            .await
            .unwrap();

        let mut logs = app
            .alice()
            .stream_job_logs(pb::StreamJobLogsRequest {
                job_id: job.id.clone(),
                follow: true,
                // Ignored on a resume: the cursor decides.
                tail_lines: 1,
                cursor: logs_at,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(m) = next(&mut logs).await.expect("a real end is OK") {
            numbers.extend(m.lines.iter().map(|l| l.number));
        }
        assert_eq!(numbers, [1, 2, 3, 4, 5, 6], "{label}: each line once");

        let mut watch = app
            .alice()
            .watch_jobs(pb::WatchJobsRequest {
                cursor: watch_at,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seqs.extend(events_of(&mut watch, &job.id, 1, &mut String::new()).await);
        assert_eq!(seqs, [1, 2, 3, 4, 5], "{label}: each event once");
        // Nothing of the job is replayed after its end: the next event is
        // another job's first.
        let other = create(&mut app.alice(), spec("other")).await;
        let e = loop {
            if let Some(Kind::Event(e)) = next(&mut watch).await.unwrap().unwrap().kind {
                break e;
            }
        };
        assert_eq!((e.job_id.as_str(), e.sequence), (other.id.as_str(), 1));
    }
}

#[tokio::test]
async fn a_log_cursor_is_validated() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let job = create(&mut app.alice(), spec("cursor")).await;
        for bad in ["x", "1", "1:-2", "-1:3", "99999999999:1"] {
            let res = app
                .alice()
                .stream_job_logs(pb::StreamJobLogsRequest {
                    job_id: job.id.clone(),
                    cursor: bad.into(),
                    ..Default::default()
                })
                .await;
            assert_invalid(res, "cursor");
        }
        let res = app
            .alice()
            .stream_job_logs(pb::StreamJobLogsRequest {
                job_id: job.id.clone(),
                attempt: 2,
                cursor: "1:5".into(),
                ..Default::default()
            })
            .await;
        assert_invalid(res, "cursor");
    }
}
