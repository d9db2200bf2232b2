//! A job whose log is far longer than job-service stores is still
//! diagnosed from its end: the stored log keeps the tail, where the final
//! traceback is.

use std::time::Duration;

use trainmesh_common::testing::wait_for;
use trainmesh_proto::diagnosis::v1::GetDiagnosisRequest;
use trainmesh_proto::job::v1::{CreateJobRequest, JobSpec, StreamJobLogsRequest};
use trainmesh_tests::{Mesh, ALICE_TOKEN};

const DEADLINE: Duration = Duration::from_secs(240);
const LINES: u32 = 500_000;

/// Prints `LINES` lines of training chatter, then fails with a CUDA
/// illegal-memory-access traceback.
const SCRIPT: &str = r#"
import sys
out = sys.stdout
for i in range(1, 500001):
    out.write(f"step {i} loss 0.5\n")
out.flush()
def forward():
    raise RuntimeError("CUDA error: an illegal memory access was encountered")
forward()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_half_a_million_lines_is_diagnosed_from_its_last_lines() {
    let mesh = Mesh::start().await;
    let mut jobs = mesh.jobs(ALICE_TOKEN);
    let job = jobs
        .create_job(CreateJobRequest {
            spec: Some(JobSpec {
                name: "chatty".into(),
                image: "python:3.11-slim".into(),
                command: vec!["python3".into(), "-c".into(), SCRIPT.into()],
                ..Default::default()
            }),
            idempotency_key: String::new(),
        })
        .await
        .expect("create job")
        .into_inner()
        .job
        .expect("job");

    let diagnosis = wait_for("the chatty job's diagnosis", DEADLINE, || {
        let mut d = mesh.diagnosis(ALICE_TOKEN);
        let id = job.id.clone();
        async move {
            d.get_diagnosis(GetDiagnosisRequest {
                diagnosis_id: String::new(),
                job_id: id,
            })
            .await
            .ok()?
            .into_inner()
            .diagnosis
        }
    })
    .await;
    assert!(!diagnosis.healthy, "{diagnosis:?}");
    assert_eq!(diagnosis.category, "cuda-error", "{}", diagnosis.text);
    assert!(
        diagnosis.evidence.iter().any(|e| e.line_number > i64::from(LINES)
            && e.text.contains("illegal memory access")),
        "the evidence cites the traceback at the log's end: {:?}",
        diagnosis.evidence
    );

    // The stored log: its first lines, one marker, and its end.
    let mut stream = jobs
        .stream_job_logs(StreamJobLogsRequest {
            job_id: job.id.clone(),
            tail_lines: 3,
            ..Default::default()
        })
        .await
        .expect("tail")
        .into_inner();
    let mut tail = Vec::new();
    while let Some(msg) = stream.message().await.expect("tail message") {
        tail.extend(msg.lines);
    }
    assert!(
        tail.last()
            .is_some_and(|l| l.text.contains("illegal memory access")),
        "{tail:?}"
    );
    let mut stream = jobs
        .stream_job_logs(StreamJobLogsRequest {
            job_id: job.id.clone(),
            ..Default::default()
        })
        .await
        .expect("whole log")
        .into_inner();
    let (mut count, mut markers, mut first) = (0usize, 0usize, None);
    while let Some(msg) = stream.message().await.expect("log message") {
        for l in msg.lines {
            first.get_or_insert(l.text.clone());
            markers += usize::from(l.text.contains("were dropped"));
            count += 1;
        }
    }
    assert_eq!(first.as_deref(), Some("step 1 loss 0.5"));
    assert_eq!(markers, 1);
    assert!(count <= 200_000, "{count} lines stored");
}
