//! metrics-service over real gRPC on loopback, on SQLite and (when
//! `TRAINMESH_TEST_POSTGRES_URL` is set) PostgreSQL.

mod support;

use std::time::Duration;

use pb::metrics_service_client::MetricsServiceClient;
use support::*;
use tonic::Code;
use trainmesh_common::client;
use trainmesh_common::proto::metrics::v1 as pb;
use trainmesh_common::testing;

#[tokio::test]
async fn flat_and_nested_records_are_flattened_and_latest_follows() {
    for db in testing::all_dbs().await {
        let server = Server::start(&db).await;
        let mut c = server.client(testing::test_tokens().admin);
        let j = job();
        let resp = c
            .write_metrics(records(
                &j,
                &[
                    r#"{"step": 1, "loss": 0.9, "timestamp": 1700000000.5}"#,
                    r#"{"step": 2, "loss": 0.5, "timestamp": 1700000001.0}"#,
                    r#"{"step": 2, "reward": {"mean": 1, "std": 0.1}, "loss_detail": {"policy": 0.2}, "phase": "rl", "ok": true}"#,
                ],
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((resp.accepted, resp.duplicates), (5, 0), "{}", db.label);

        let pts = latest(&mut c, &j).await;
        let keys: Vec<_> = pts.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["loss", "loss_detail.policy", "reward.mean", "reward.std"]
        );
        let loss = find(&pts, "loss");
        assert_eq!((loss.step, loss.value), (2, 0.5));
        assert_eq!(loss.time.unwrap().seconds, 1_700_000_001);
        assert_eq!(find(&pts, "reward.mean").value, 1.0);
        assert!(!loss.non_finite);

        let only = c
            .get_latest_metrics(pb::GetLatestMetricsRequest {
                job_id: j.clone(),
                keys: vec!["reward.std".into(), "absent".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .points;
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].key, "reward.std");

        let keys = c
            .list_metric_keys(pb::ListMetricKeysRequest { job_id: j.clone() })
            .await
            .unwrap()
            .into_inner()
            .keys;
        assert_eq!(keys.len(), 4);
        server.stop().await;
    }
}

#[tokio::test]
async fn a_retried_batch_changes_nothing() {
    for db in testing::all_dbs().await {
        let server = Server::start(&db).await;
        let mut c = server.client(testing::test_tokens().alice);
        let j = job();
        // 1000 points: more than one multi-row statement.
        let batch = pb::WriteMetricsRequest {
            attempt: 0,
            job_id: j.clone(),
            points: (0..1000)
                .map(|s| point("loss", s, 1.0 / (s + 1) as f64))
                .collect(),
            json_records: vec![],
        };
        let first = c.write_metrics(batch.clone()).await.unwrap().into_inner();
        assert_eq!(
            (first.accepted, first.duplicates),
            (1000, 0),
            "{}",
            db.label
        );
        let before = latest(&mut c, &j).await;

        let mut retry = batch.clone();
        // Same (key, step) with other values must not overwrite anything.
        for p in &mut retry.points {
            p.value = 42.0;
        }
        let again = c.write_metrics(retry).await.unwrap().into_inner();
        assert_eq!((again.accepted, again.duplicates), (0, 1000));
        assert_eq!(latest(&mut c, &j).await, before);

        let series = c
            .query_metrics(pb::QueryMetricsRequest {
                job_id: j.clone(),
                keys: vec!["loss".into()],
                max_points: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .series;
        assert_eq!(series[0].points.len(), 1000);
        assert!(series[0].points.iter().all(|p| p.value != 42.0));

        // Repeats inside one batch count as duplicates too.
        let inner = c
            .write_metrics(records(
                &j,
                &[r#"{"step": 5000, "x": 1}"#, r#"{"step": 5000, "x": 2}"#],
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((inner.accepted, inner.duplicates), (1, 1));
        server.stop().await;
    }
}

#[tokio::test]
async fn latest_keeps_the_greatest_step_when_an_older_step_arrives_later() {
    for db in testing::all_dbs().await {
        let server = Server::start(&db).await;
        let mut c = server.client(testing::test_tokens().alice);
        let j = job();
        c.write_metrics(records(&j, &[r#"{"step": 10, "loss": 0.1}"#]))
            .await
            .unwrap();
        c.write_metrics(records(
            &j,
            &[r#"{"step": 3, "loss": 9.0}"#, r#"{"step": 4, "loss": 8.0}"#],
        ))
        .await
        .unwrap();
        let l = latest(&mut c, &j).await;
        assert_eq!((l[0].step, l[0].value), (10, 0.1), "{}", db.label);

        // Within one batch too, whatever the order.
        c.write_metrics(records(
            &j,
            &[
                r#"{"step": 12, "loss": 0.3}"#,
                r#"{"step": 11, "loss": 0.2}"#,
            ],
        ))
        .await
        .unwrap();
        let l = latest(&mut c, &j).await;
        assert_eq!((l[0].step, l[0].value), (12, 0.3));
        server.stop().await;
    }
}

#[tokio::test]
async fn nan_and_inf_round_trip_flagged_non_finite() {
    for db in testing::all_dbs().await {
        let server = Server::start(&db).await;
        let mut c = server.client(testing::test_tokens().alice);
        let j = job();
        c.write_metrics(pb::WriteMetricsRequest {
            attempt: 0,
            job_id: j.clone(),
            points: vec![
                point("p.nan", 1, f64::NAN),
                point("p.inf", 1, f64::INFINITY),
                point("p.ninf", 1, f64::NEG_INFINITY),
            ],
            json_records: vec![
                r#"{"step": 1, "loss": NaN, "grad_norm": Infinity}"#.into(),
                r#"{"step": 1, "kl": "-Infinity", "ok": 0.25}"#.into(),
            ],
        })
        .await
        .unwrap();
        let pts = latest(&mut c, &j).await;
        assert!(find(&pts, "p.nan").value.is_nan(), "{}", db.label);
        assert!(find(&pts, "loss").value.is_nan());
        assert_eq!(find(&pts, "p.inf").value, f64::INFINITY);
        assert_eq!(find(&pts, "grad_norm").value, f64::INFINITY);
        assert_eq!(find(&pts, "p.ninf").value, f64::NEG_INFINITY);
        assert_eq!(find(&pts, "kl").value, f64::NEG_INFINITY);
        for p in &pts {
            assert_eq!(p.non_finite, p.key != "ok", "{p:?}");
        }
        let q = c
            .query_metrics(pb::QueryMetricsRequest {
                job_id: j.clone(),
                keys: vec!["loss".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(q.series[0].points[0].value.is_nan());
        assert!(q.series[0].points[0].non_finite);

        // A finite point at a later step replaces a NaN as latest.
        c.write_metrics(records(&j, &[r#"{"step": 2, "loss": 0.5}"#]))
            .await
            .unwrap();
        let pts = latest(&mut c, &j).await;
        assert_eq!(find(&pts, "loss").value, 0.5);
        server.stop().await;
    }
}

#[tokio::test]
async fn bad_batches_are_refused_naming_the_field_and_store_nothing() {
    for db in testing::all_dbs().await {
        let server = Server::start(&db).await;
        let mut c = server.client(testing::test_tokens().alice);
        let j = job();
        let good = r#"{"step": 1, "loss": 1.0}"#;

        let cases: Vec<(pb::WriteMetricsRequest, &str)> = vec![
            (records("not-a-uuid", &[good]), "job_id"),
            (
                pb::WriteMetricsRequest {
                    attempt: 0,
                    job_id: j.clone(),
                    points: (0..1001).map(|s| point("loss", s, 1.0)).collect(),
                    json_records: vec![],
                },
                "points",
            ),
            (
                pb::WriteMetricsRequest {
                    attempt: 0,
                    job_id: j.clone(),
                    points: vec![point("ok", 1, 1.0), point(&"k".repeat(251), 1, 1.0)],
                    json_records: vec![],
                },
                "points[1].key",
            ),
            (
                records(&j, &[good, r#"{"step": 2, "loss": }"#]),
                "json_records[1]",
            ),
            (records(&j, &[good, r#"{"loss": 2}"#]), "json_records[1]"),
            (
                records(
                    &j,
                    &[good, &format!(r#"{{"step": 2, "{}": 1}}"#, "n".repeat(260))],
                ),
                "json_records[1]",
            ),
            (
                pb::WriteMetricsRequest {
                    attempt: 0,
                    job_id: j.clone(),
                    points: vec![],
                    json_records: (0..20)
                        .map(|s| format!(r#"{{"step": {s}, "pad": "{}"}}"#, "x".repeat(60_000)))
                        .collect(),
                },
                "json_records",
            ),
        ];
        for (req, field) in cases {
            let err = c.write_metrics(req).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
            assert_eq!(field_of(&err), field, "{}: {}", db.label, err.message());
            assert!(err.message().contains(field), "{}", err.message());
        }
        let long = c
            .write_metrics(pb::WriteMetricsRequest {
                attempt: 0,
                job_id: j.clone(),
                points: vec![point(&format!("verylongkey{}", "k".repeat(250)), 1, 1.0)],
                json_records: vec![],
            })
            .await
            .unwrap_err();
        assert!(long.message().contains("verylongkey"), "{}", long.message());
        assert!(latest(&mut c, &j).await.is_empty(), "{}", db.label);
        server.stop().await;
    }
}

#[tokio::test]
async fn query_downsampling_keeps_min_and_max() {
    for db in testing::all_dbs().await {
        let server = Server::start(&db).await;
        let mut c = server.client(testing::test_tokens().alice);
        let j = job();
        for chunk in 0..5 {
            let points = (chunk * 1000..(chunk + 1) * 1000)
                .map(|s| {
                    let v = match s {
                        1234 => 1e6,
                        3777 => -1e6,
                        _ => (s % 10) as f64,
                    };
                    point("loss", s, v)
                })
                .collect();
            c.write_metrics(pb::WriteMetricsRequest {
                attempt: 0,
                job_id: j.clone(),
                points,
                json_records: vec![],
            })
            .await
            .unwrap();
        }
        let q = |max_points: i32, start_step: i64, end_step: i64| pb::QueryMetricsRequest {
            job_id: j.clone(),
            keys: vec![],
            start_step,
            end_step,
            max_points,
        };
        let s = c
            .query_metrics(q(50, 0, 0))
            .await
            .unwrap()
            .into_inner()
            .series;
        assert_eq!(s.len(), 1);
        let s = &s[0];
        assert!(s.downsampled, "{}", db.label);
        assert!(
            s.points.len() <= 50 && s.points.len() >= 40,
            "{}",
            s.points.len()
        );
        assert!(s.points.windows(2).all(|w| w[0].step < w[1].step));
        assert!(s.points.iter().any(|p| p.step == 1234 && p.value == 1e6));
        assert!(s.points.iter().any(|p| p.step == 3777 && p.value == -1e6));

        // A range small enough is returned whole.
        let s = c
            .query_metrics(q(0, 100, 199))
            .await
            .unwrap()
            .into_inner()
            .series;
        assert!(!s[0].downsampled);
        assert_eq!(s[0].points.len(), 100);
        assert_eq!((s[0].points[0].step, s[0].points[99].step), (100, 199));

        for (bad, field) in [(q(10_001, 0, 0), "max_points"), (q(10, 5, 4), "end_step")] {
            let err = c.query_metrics(bad).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert_eq!(field_of(&err), field);
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn stream_write_metrics_stores_every_batch() {
    let db = testing::sqlite_db();
    let server = Server::start(&db).await;
    let mut c = server.client(testing::test_tokens().alice);
    let j = job();
    let msgs: Vec<pb::StreamWriteMetricsRequest> = (0..3)
        .map(|i| pb::StreamWriteMetricsRequest {
            batch: Some(records(&j, &[&format!(r#"{{"step": {i}, "loss": {i}}}"#)])),
        })
        .chain(std::iter::once(pb::StreamWriteMetricsRequest {
            batch: Some(records(&j, &[r#"{"step": 0, "loss": 0}"#])),
        }))
        .collect();
    let resp = c
        .stream_write_metrics(futures::stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.accepted, resp.duplicates, resp.batches), (3, 1, 4));
    assert_eq!(latest(&mut c, &j).await[0].step, 2);

    let bad = vec![pb::StreamWriteMetricsRequest {
        batch: Some(records(&j, &["{"])),
    }];
    let err = c
        .stream_write_metrics(futures::stream::iter(bad))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(field_of(&err), "batch.json_records[0]");
    server.stop().await;
}

#[tokio::test]
async fn watch_streams_new_points_and_resumes_from_a_cursor() {
    use futures::StreamExt;
    for db in testing::all_dbs().await {
        let server = Server::start(&db).await;
        let mut c = server.client(testing::test_tokens().alice);
        let j = job();
        c.write_metrics(records(&j, &[r#"{"step": 1, "loss": 1, "acc": 0.1}"#]))
            .await
            .unwrap();
        let mut stream = c
            .watch_metrics(pb::WatchMetricsRequest {
                job_id: j.clone(),
                keys: vec!["loss".into()],
                cursor: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert!(first.points.is_empty() && !first.resync, "{}", db.label);
        let start = first.cursor.clone();

        c.write_metrics(records(&j, &[r#"{"step": 2, "loss": 0.5, "acc": 0.2}"#]))
            .await
            .unwrap();
        let update = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an update")
            .unwrap()
            .unwrap();
        assert_eq!(update.points.len(), 1);
        assert_eq!(
            (update.points[0].key.as_str(), update.points[0].step),
            ("loss", 2)
        );
        drop(stream);

        // Resuming from the first cursor replays what came after it.
        let mut again = c
            .watch_metrics(pb::WatchMetricsRequest {
                job_id: j.clone(),
                keys: vec![],
                cursor: start,
            })
            .await
            .unwrap()
            .into_inner();
        let _ = again.next().await.unwrap().unwrap();
        let replay = tokio::time::timeout(Duration::from_secs(10), again.next())
            .await
            .expect("a replay")
            .unwrap()
            .unwrap();
        let mut keys: Vec<_> = replay
            .points
            .iter()
            .map(|p| (p.key.clone(), p.step))
            .collect();
        keys.sort();
        assert_eq!(keys, [("acc".to_string(), 2), ("loss".to_string(), 2)]);

        let err = c
            .watch_metrics(pb::WatchMetricsRequest {
                job_id: j.clone(),
                keys: vec![],
                cursor: "bogus".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(field_of(&err), "cursor");
        drop(again);
        server.stop().await;
    }
}

#[tokio::test]
async fn calls_without_a_token_are_unauthenticated_and_anomalies_are_not_yet_served() {
    let db = testing::sqlite_db();
    let server = Server::start(&db).await;
    let mut anon =
        MetricsServiceClient::new(client::channel(&server.addr.to_string(), None).unwrap());
    let err = anon
        .write_metrics(records(&job(), &[r#"{"step": 1, "x": 1}"#]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut c = server.client(testing::test_tokens().alice);
    let err = c
        .list_anomalies(pb::ListAnomaliesRequest { job_id: job() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    server.stop().await;
}
