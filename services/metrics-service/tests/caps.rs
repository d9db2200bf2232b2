//! Per-job caps on points and keys, paged latest values, and how streams
//! end at shutdown; on SQLite and (when `TRAINMESH_TEST_POSTGRES_URL` is
//! set) PostgreSQL.

mod support;

use metrics_service::caps::Caps;
use pb::metrics_service_client::MetricsServiceClient;
use support::*;
use tonic::Code;
use tonic_types::StatusExt;
use trainmesh_common::client::Channel;
use trainmesh_common::proto::metrics::v1 as pb;
use trainmesh_common::testing::{self, wait_for};

const WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn batch(job: &str, points: Vec<pb::MetricPoint>) -> pb::WriteMetricsRequest {
    pb::WriteMetricsRequest {
        attempt: 0,
        job_id: job.into(),
        points,
        json_records: vec![],
    }
}

fn steps(key: &str, range: std::ops::Range<i64>) -> Vec<pb::MetricPoint> {
    range.map(|s| point(key, s, s as f64)).collect()
}

async fn write(
    c: &mut MetricsServiceClient<Channel>,
    req: pb::WriteMetricsRequest,
) -> Result<(i32, i32), tonic::Status> {
    let r = c.write_metrics(req).await?.into_inner();
    Ok((r.accepted, r.duplicates))
}

/// Every stored point of `job`, counted through QueryMetrics.
async fn stored(c: &mut MetricsServiceClient<Channel>, job: &str) -> usize {
    let resp = c
        .query_metrics(pb::QueryMetricsRequest {
            job_id: job.into(),
            max_points: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    resp.series.iter().map(|s| s.points.len()).sum()
}

async fn keys(c: &mut MetricsServiceClient<Channel>, job: &str) -> Vec<String> {
    c.list_metric_keys(pb::ListMetricKeysRequest { job_id: job.into() })
        .await
        .unwrap()
        .into_inner()
        .keys
}

#[track_caller]
fn assert_cap(res: Result<(i32, i32), tonic::Status>, flag: &str) {
    let status = res.expect_err("past the cap");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(flag), "{status:?}");
    assert!(status.message().contains("none of the batch"), "{status:?}");
    let quota = status.get_details_quota_failure().expect("QuotaFailure");
    assert!(quota.violations[0].description.contains(flag), "{quota:?}");
}

#[tokio::test]
async fn a_batch_past_the_points_cap_is_refused_whole_and_stored_points_retry_fine() {
    for db in testing::all_dbs().await {
        let server = Server::start_with(&db, |c| {
            c.caps = Caps {
                points: 10,
                keys: 100,
            }
        })
        .await;
        let mut c = server.client(testing::test_tokens().admin);
        let j = job();
        assert_eq!(
            write(&mut c, batch(&j, steps("loss", 0..6))).await.unwrap(),
            (6, 0)
        );
        // Three already stored, three new: 9 in all.
        assert_eq!(
            write(&mut c, batch(&j, steps("loss", 3..9))).await.unwrap(),
            (3, 3)
        );
        // Two new would make 11: nothing of it is stored.
        assert_cap(
            write(&mut c, batch(&j, steps("loss", 9..11))).await,
            "--max-points-per-job",
        );
        assert_eq!(stored(&mut c, &j).await, 9, "{}", db.label);
        // A retry of what is stored adds nothing, so the cap does not refuse it.
        assert_eq!(
            write(&mut c, batch(&j, steps("loss", 0..6))).await.unwrap(),
            (0, 6)
        );
        assert_eq!(
            write(&mut c, batch(&j, steps("loss", 9..10)))
                .await
                .unwrap(),
            (1, 0)
        );
        assert_cap(
            write(&mut c, batch(&j, steps("loss", 10..11))).await,
            "--max-points-per-job",
        );
        assert_eq!(stored(&mut c, &j).await, 10, "{}", db.label);
        // Another job has its own count.
        let other = job();
        assert_eq!(
            write(&mut c, batch(&other, steps("loss", 0..10)))
                .await
                .unwrap(),
            (10, 0)
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn a_batch_with_keys_past_the_keys_cap_is_refused_whole() {
    for db in testing::all_dbs().await {
        let server = Server::start_with(&db, |c| {
            c.caps = Caps {
                points: 1000,
                keys: 3,
            }
        })
        .await;
        let mut c = server.client(testing::test_tokens().admin);
        let j = job();
        let pts = |keys: &[&str], step| keys.iter().map(|k| point(k, step, 1.0)).collect();
        assert_eq!(
            write(&mut c, batch(&j, pts(&["a", "b"], 1))).await.unwrap(),
            (2, 0)
        );
        assert_cap(
            write(&mut c, batch(&j, pts(&["a", "c", "d"], 2))).await,
            "--max-keys-per-job",
        );
        assert_eq!(keys(&mut c, &j).await, ["a", "b"], "{}", db.label);
        assert_eq!(
            write(&mut c, batch(&j, pts(&["a", "c"], 2))).await.unwrap(),
            (2, 0)
        );
        assert_cap(
            write(&mut c, batch(&j, pts(&["d"], 3))).await,
            "--max-keys-per-job",
        );
        // Known keys go on being written at the cap.
        assert_eq!(
            write(&mut c, batch(&j, pts(&["a", "b", "c"], 3)))
                .await
                .unwrap(),
            (3, 0)
        );
        assert_eq!(keys(&mut c, &j).await, ["a", "b", "c"], "{}", db.label);
        server.stop().await;
    }
}

#[tokio::test]
async fn concurrent_writers_of_one_job_never_pass_the_caps() {
    const WRITERS: i64 = 8;
    const BATCHES: i64 = 20;
    for db in testing::all_dbs().await {
        let server = Server::start_with(&db, |c| {
            c.caps = Caps {
                points: 100,
                keys: 10,
            }
        })
        .await;
        // One job gets batches of three new points of one key, the other
        // batches of one point of a key nobody else writes.
        let (by_points, by_keys) = (job(), job());
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let mut c = server.client(testing::test_tokens().admin);
            let (p, k) = (by_points.clone(), by_keys.clone());
            tasks.push(tokio::spawn(async move {
                let mut accepted = (0, 0);
                for b in 0..BATCHES {
                    let step = (w * BATCHES + b) * 3;
                    match write(&mut c, batch(&p, steps("loss", step..step + 3))).await {
                        Ok((n, _)) => accepted.0 += n,
                        Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
                    }
                    let one = vec![point(&format!("k{w}-{b}"), 0, 1.0)];
                    match write(&mut c, batch(&k, one)).await {
                        Ok((n, _)) => accepted.1 += n,
                        Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
                    }
                }
                accepted
            }));
        }
        let mut accepted = (0, 0);
        for t in tasks {
            let (p, k) = t.await.unwrap();
            accepted = (accepted.0 + p, accepted.1 + k);
        }
        let mut c = server.client(testing::test_tokens().admin);
        // Whole batches of three stop at the last multiple of three under
        // the cap, whoever wrote them.
        assert_eq!(stored(&mut c, &by_points).await, 99, "{}", db.label);
        assert_eq!(accepted.0, 99, "{}", db.label);
        assert_eq!(keys(&mut c, &by_keys).await.len(), 10, "{}", db.label);
        assert_eq!(accepted.1, 10, "{}", db.label);
        server.stop().await;
    }
}

#[tokio::test]
async fn stream_write_metrics_obeys_the_caps_and_keeps_earlier_batches() {
    for db in testing::all_dbs().await {
        let server = Server::start_with(&db, |c| {
            c.caps = Caps {
                points: 5,
                keys: 10,
            }
        })
        .await;
        let mut c = server.client(testing::test_tokens().admin);
        let j = job();
        let msgs: Vec<_> = [0..3, 3..6, 6..7]
            .into_iter()
            .map(|r| pb::StreamWriteMetricsRequest {
                batch: Some(batch(&j, steps("loss", r))),
            })
            .collect();
        let err = c
            .stream_write_metrics(futures::stream::iter(msgs))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(
            err.message()
                .contains("message 2 of the stream; the 1 before it were stored"),
            "{err:?}"
        );
        assert!(err.get_details_quota_failure().is_some(), "{err:?}");
        assert_eq!(stored(&mut c, &j).await, 3, "{}", db.label);
        server.stop().await;
    }
}

async fn latest_page(
    c: &mut MetricsServiceClient<Channel>,
    req: pb::GetLatestMetricsRequest,
) -> (Vec<String>, String) {
    let r = c.get_latest_metrics(req).await.unwrap().into_inner();
    (
        r.points.into_iter().map(|p| p.key).collect(),
        r.next_page_token,
    )
}

#[tokio::test]
async fn latest_values_come_in_pages_and_filter_by_prefix() {
    for db in testing::all_dbs().await {
        let server = Server::start(&db).await;
        let mut c = server.client(testing::test_tokens().admin);
        let j = job();
        let mut all: Vec<String> = (0..25).map(|i| format!("k{i:03}")).collect();
        all.extend(["a_b".to_string(), "axb".to_string()]);
        let points = all.iter().map(|k| point(k, 1, 1.0)).collect();
        write(&mut c, batch(&j, points)).await.unwrap();
        all.sort();

        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let (keys, next) = latest_page(
                &mut c,
                pb::GetLatestMetricsRequest {
                    job_id: j.clone(),
                    page_size: 10,
                    page_token: token,
                    ..Default::default()
                },
            )
            .await;
            assert!(keys.len() <= 10);
            seen.extend(keys);
            pages += 1;
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, all, "{}", db.label);
        assert_eq!(pages, 3, "{}", db.label);

        let (keys, next) = latest_page(
            &mut c,
            pb::GetLatestMetricsRequest {
                job_id: j.clone(),
                key_prefix: "k01".into(),
                ..Default::default()
            },
        )
        .await;
        let want: Vec<String> = (10..20).map(|i| format!("k{i:03}")).collect();
        assert_eq!((keys, next.as_str()), (want, ""), "{}", db.label);
        // `_` is a character like any other, not a wildcard.
        let (keys, _) = latest_page(
            &mut c,
            pb::GetLatestMetricsRequest {
                job_id: j.clone(),
                key_prefix: "a_".into(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(keys, ["a_b"], "{}", db.label);
        // Named keys, a prefix and pages together.
        let (keys, next) = latest_page(
            &mut c,
            pb::GetLatestMetricsRequest {
                job_id: j.clone(),
                keys: vec!["k001".into(), "k002".into(), "k011".into(), "k012".into()],
                key_prefix: "k0".into(),
                page_size: 3,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(keys, ["k001", "k002", "k011"], "{}", db.label);
        assert!(!next.is_empty());

        for (req, field) in [
            (
                pb::GetLatestMetricsRequest {
                    page_token: "zz".into(),
                    ..Default::default()
                },
                "page_token",
            ),
            (
                pb::GetLatestMetricsRequest {
                    page_size: -1,
                    ..Default::default()
                },
                "page_size",
            ),
        ] {
            let req = pb::GetLatestMetricsRequest {
                job_id: j.clone(),
                ..req
            };
            let err = c.get_latest_metrics(req).await.unwrap_err();
            assert_eq!(field_of(&err), field);
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn watches_and_streamed_writes_end_unavailable_at_shutdown() {
    use futures::StreamExt;
    for db in testing::all_dbs().await {
        let server = Server::start(&db).await;
        let mut c = server.client(testing::test_tokens().admin);
        let j = job();
        let mut watch = c
            .watch_metrics(pb::WatchMetricsRequest {
                job_id: j.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.next().await.unwrap().unwrap();

        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::StreamWriteMetricsRequest {
            batch: Some(batch(&j, steps("loss", 0..2))),
        })
        .await
        .unwrap();
        let mut writer = server.client(testing::test_tokens().admin);
        let call = tokio::spawn(async move {
            writer
                .stream_write_metrics(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let update = tokio::time::timeout(WAIT, watch.next())
            .await
            .expect("the streamed batch is stored and watched")
            .unwrap()
            .unwrap();
        assert_eq!(update.points.len(), 2);
        wait_for("the write to be visible", WAIT, || {
            let mut c = c.clone();
            let j = j.clone();
            async move { (latest(&mut c, &j).await.len() == 1).then_some(()) }
        })
        .await;

        let stopping = tokio::spawn(server.stop());
        let end = tokio::time::timeout(WAIT, watch.next())
            .await
            .expect("the watch ends")
            .expect("with a status");
        let status = end.expect_err("a shutdown is not the end of a watch");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status
                .message()
                .contains(&format!("resume from cursor `{}`", update.cursor)),
            "{status:?} (first cursor {})",
            first.cursor
        );
        let status = tokio::time::timeout(WAIT, call)
            .await
            .expect("the streamed write ends")
            .unwrap()
            .expect_err("a shutdown is not the end of a streamed write");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("first 1 batches"), "{status:?}");
        drop(tx);
        stopping.await.unwrap();
    }
}
