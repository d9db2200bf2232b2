//! Requests that are not what their method expects, against the real
//! binaries: bytes that are not protobuf, strings that are not UTF-8 and
//! messages over the size limit get a caller's-mistake status on every
//! service (never INTERNAL), and one caller cannot hold streams open without
//! bound.

use std::time::Duration;

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use trainmesh_common::testing::wait_for;
use trainmesh_proto::job::v1::{CreateJobRequest, JobSpec, WatchJobsRequest};
use trainmesh_tests::{Mesh, MeshOptions, ALICE_TOKEN, BOB_TOKEN};

/// Sends raw bytes as the request and reads nothing back.
#[derive(Clone, Default)]
struct RawCodec;

#[derive(Clone, Default)]
struct RawEncoder;

#[derive(Clone, Default)]
struct NoDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for NoDecoder {
    type Item = ();
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = NoDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> NoDecoder {
        NoDecoder
    }
}

async fn raw_call(mesh: &Mesh, instance: &str, path: &'static str, body: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(mesh.channel(instance, Some(ALICE_TOKEN)));
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .expect_err("a malformed request is refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_are_the_callers_mistake_on_every_service() {
    let mesh = Mesh::start_with(MeshOptions {
        no_runner: true,
        ..Default::default()
    })
    .await;
    // A length that runs past the end of the message, on each service.
    let truncated = vec![0x0a, 0x7f, 0x01];
    for (instance, path) in [
        ("job-service", "/trainmesh.job.v1.JobService/CreateJob"),
        (
            "scheduler-service",
            "/trainmesh.scheduler.v1.SchedulerService/GetQueue",
        ),
        (
            "metrics-service",
            "/trainmesh.metrics.v1.MetricsService/WriteMetrics",
        ),
        (
            "diagnosis-service",
            "/trainmesh.diagnosis.v1.DiagnosisService/GetDiagnosis",
        ),
    ] {
        let st = raw_call(&mesh, instance, path, truncated.clone()).await;
        assert_eq!(st.code(), Code::InvalidArgument, "{instance}: {st:?}");
        assert!(st.message().contains("not valid protobuf"), "{st:?}");
    }
    // CreateJobRequest { spec { name: <not UTF-8> } }.
    let bad_utf8 = vec![0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe];
    let st = raw_call(
        &mesh,
        "job-service",
        "/trainmesh.job.v1.JobService/CreateJob",
        bad_utf8,
    )
    .await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");

    // Over the 4 MiB default: RESOURCE_EXHAUSTED naming the limit.
    let mut spec = JobSpec {
        image: "i".into(),
        command: vec!["true".into()],
        ..Default::default()
    };
    for i in 0..80 {
        spec.env.insert(format!("V{i}"), "x".repeat(60 * 1024));
    }
    let st = mesh
        .jobs(ALICE_TOKEN)
        .create_job(CreateJobRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("oversized");
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert!(st.message().contains("max-message-bytes"), "{st:?}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_may_hold_only_so_many_streams_open() {
    let mesh = Mesh::start_with(
        MeshOptions {
            no_runner: true,
            ..Default::default()
        }
        .arg("job-service", &["--max-streams-per-caller", "2"]),
    )
    .await;
    let watch = |token: &'static str| {
        let mut client = mesh.jobs(token);
        async move {
            client
                .watch_jobs(WatchJobsRequest::default())
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let first = watch(ALICE_TOKEN).await.expect("first stream");
    let _second = watch(ALICE_TOKEN).await.expect("second stream");
    let st = watch(ALICE_TOKEN).await.expect_err("a third stream");
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert!(st.message().contains("alice"), "{st:?}");
    // Per caller: bob is not held back by alice's streams.
    let _bobs = watch(BOB_TOKEN).await.expect("bob's stream");
    drop(first);
    // The server notices the closed stream when the client resets it.
    let _third = wait_for(
        "alice's slot to come back",
        Duration::from_secs(20),
        || async { watch(ALICE_TOKEN).await.ok() },
    )
    .await;
    mesh.stop().await;
}
