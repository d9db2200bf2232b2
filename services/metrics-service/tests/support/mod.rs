//! Starting metrics-service for a test, and small helpers.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use metrics_service::{run, Config};
use pb::metrics_service_client::MetricsServiceClient;
use tonic_types::StatusExt;
use trainmesh_common::client::{self, Channel};
use trainmesh_common::proto::metrics::v1 as pb;
use trainmesh_common::testing::{self, TestDb};

pub struct Server {
    pub addr: SocketAddr,
    served: testing::Served,
}

impl Server {
    pub async fn start(db: &TestDb) -> Self {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: &TestDb, tweak: impl FnOnce(&mut Config)) -> Self {
        testing::init_test_logging();
        let mut config = Config::new(testing::test_tokens().store, db.url.clone());
        config.watch_poll_interval = Duration::from_millis(50);
        tweak(&mut config);
        let served = testing::Served::start(|l, stop| run(config, l, stop)).await;
        Self {
            addr: served.addr,
            served,
        }
    }

    pub fn client(&self, token: &str) -> MetricsServiceClient<Channel> {
        MetricsServiceClient::new(client::channel(&self.addr.to_string(), Some(token)).unwrap())
    }

    pub async fn stop(self) {
        self.served.stop().await;
    }
}

pub fn job() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn point(key: &str, step: i64, value: f64) -> pb::MetricPoint {
    pb::MetricPoint {
        key: key.into(),
        step,
        value,
        ..Default::default()
    }
}

pub fn records(job_id: &str, lines: &[&str]) -> pb::WriteMetricsRequest {
    pb::WriteMetricsRequest {
        attempt: 0,
        job_id: job_id.into(),
        points: vec![],
        json_records: lines.iter().map(|s| s.to_string()).collect(),
    }
}

pub async fn latest(c: &mut MetricsServiceClient<Channel>, job_id: &str) -> Vec<pb::MetricPoint> {
    c.get_latest_metrics(pb::GetLatestMetricsRequest {
        job_id: job_id.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .points
}

pub fn find<'a>(points: &'a [pb::MetricPoint], key: &str) -> &'a pb::MetricPoint {
    points
        .iter()
        .find(|p| p.key == key)
        .unwrap_or_else(|| panic!("no `{key}` in {points:?}"))
}

pub fn field_of(status: &tonic::Status) -> String {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations[0].field.clone())
        .unwrap_or_default()
}
