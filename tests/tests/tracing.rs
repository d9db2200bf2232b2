//! OTLP export and W3C trace context across services: a call with a
//! `traceparent` yields spans in that trace from job-service and, through
//! the outbox, from scheduler-service. The collector is an in-test OTLP/gRPC
//! server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use trainmesh_common::testing::{listener, wait_for};
use trainmesh_proto::job::v1::{CreateJobRequest, JobSpec};
use trainmesh_tests::{Mesh, MeshOptions, ALICE_TOKEN};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// (service name, trace id hex, span name) of every exported span.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, String, String)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let hex: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    seen.push((service.clone(), hex, span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn start_collector() -> (Collector, SocketAddr) {
    let collector = Collector::default();
    let (l, addr) = listener().await;
    let svc = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    (collector, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_joins_spans_across_services_and_the_outbox() {
    let (collector, addr) = start_collector().await;
    let otel = |_: &str| {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
                format!("http://{addr}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "50".to_string()),
        ]
    };
    let mesh = Mesh::start_with(MeshOptions {
        no_runner: true,
        extra_env: ["job-service", "scheduler-service"]
            .into_iter()
            .map(|n| (n.to_string(), otel(n)))
            .collect(),
        ..Default::default()
    })
    .await;

    let mut req = tonic::Request::new(CreateJobRequest {
        spec: Some(JobSpec {
            name: "traced".into(),
            image: "python:3.11-slim".into(),
            command: vec!["true".into()],
            ..Default::default()
        }),
        idempotency_key: String::new(),
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    mesh.jobs(ALICE_TOKEN)
        .create_job(req)
        .await
        .expect("create");

    for service in ["job-service", "scheduler-service"] {
        wait_for(
            &format!("a {service} span in trace {TRACE_ID}"),
            Duration::from_secs(30),
            || {
                let found = collector
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|(s, t, _)| s == service && t == TRACE_ID);
                async move { found.then_some(()) }
            },
        )
        .await;
    }
    mesh.stop().await;
}
