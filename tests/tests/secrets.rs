//! A job's secret variables: the spec names a secret, the runner reads its
//! value where the job runs, and the value is stored nowhere in the mesh;
//! or the spec gives the value, marked secret, and the mesh keeps it only
//! sealed. Against the real binaries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest;
use tokio_stream::StreamExt;
use trainmesh_proto::job::v1::{JobSpec, JobState, StreamJobLogsRequest};
use trainmesh_tests::jobs::{submit, wait_state};
use trainmesh_tests::{Mesh, MeshOptions, ALICE_TOKEN, BOB_TOKEN};

const VALUE: &str = "tm-secret-3f9a1c77e2d4";

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

async fn job_log(mesh: &Mesh, job_id: &str) -> Vec<String> {
    let mut stream = mesh
        .jobs(ALICE_TOKEN)
        .stream_job_logs(StreamJobLogsRequest {
            job_id: job_id.to_owned(),
            tail_lines: 100,
            ..Default::default()
        })
        .await
        .expect("logs")
        .into_inner();
    let mut lines = Vec::new();
    while let Some(msg) = stream.next().await {
        lines.extend(msg.expect("log batch").lines.into_iter().map(|l| l.text));
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_variable_reaches_the_job_and_no_file_of_the_mesh() {
    let secrets = tempfile::tempdir().expect("tempdir");
    std::fs::write(secrets.path().join("wandb"), VALUE).expect("secret");
    let dir = secrets.path().display().to_string();
    let mesh =
        Mesh::start_with(MeshOptions::default().arg("runner", &["--secrets-dir", &dir])).await;
    let mut spec = JobSpec {
        name: "with-a-secret".into(),
        image: "python:3.11-slim".into(),
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            // The job proves it got the value without the spec or its log
            // holding it: its hash is compared.
            // Printing it anyway: the runner redacts it from the log.
            r#"printf %s "$WANDB_API_KEY" | sha256sum; echo "key: $WANDB_API_KEY""#.into(),
        ],
        ..Default::default()
    };
    spec.secret_env
        .insert("WANDB_API_KEY".into(), "wandb".into());
    let job = submit(&mesh, ALICE_TOKEN, spec).await;
    let done = wait_state(&mesh, &job.id, JobState::Succeeded, Duration::from_secs(60)).await;
    let want = hex::encode(sha2::Sha256::digest(VALUE.as_bytes()));
    let log = job_log(&mesh, &job.id).await;
    assert!(log.iter().any(|l| l.starts_with(&want)), "{log:?}");
    assert!(log.iter().any(|l| l == "key: [secret wandb]"), "{log:?}");
    // What job-service shows of the spec is the secret's name.
    let shown = done.spec.expect("spec");
    assert_eq!(shown.secret_env["WANDB_API_KEY"], "wandb");
    let files = files_under(mesh.dir.path());
    assert!(
        files.iter().any(|f| f.to_string_lossy().contains(".db")),
        "{files:?}"
    );
    assert_in_no_file(&files, VALUE);
    mesh.stop().await;
}

#[track_caller]
fn assert_in_no_file(files: &[PathBuf], value: &str) {
    for file in files {
        let bytes = std::fs::read(file).unwrap_or_default();
        assert!(
            !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
            "the secret's value is in {}",
            file.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_value_marked_secret_is_kept_only_sealed() {
    const GIVEN: &str = "sk-given-9b7e5d3c1a";
    let mesh = Mesh::start().await;
    let mut spec = JobSpec {
        name: "with-a-given-secret".into(),
        image: "python:3.11-slim".into(),
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            r#"printf %s "$API_KEY" | sha256sum; echo "key: $API_KEY""#.into(),
        ],
        secret_env_keys: vec!["API_KEY".into()],
        ..Default::default()
    };
    spec.env.insert("API_KEY".into(), GIVEN.into());
    let job = submit(&mesh, ALICE_TOKEN, spec).await;
    // What every answer shows is the sealed value.
    let shown = job.spec.clone().expect("spec");
    assert!(
        shown.env["API_KEY"].starts_with("tmsealed:v1:"),
        "{:?}",
        shown.env
    );
    let done = wait_state(&mesh, &job.id, JobState::Succeeded, Duration::from_secs(60)).await;
    let want = hex::encode(sha2::Sha256::digest(GIVEN.as_bytes()));
    let log = job_log(&mesh, &job.id).await;
    assert!(
        log.iter().any(|l| l.starts_with(&want)),
        "the job got the value: {log:?}"
    );
    assert!(log.iter().any(|l| l == "key: [secret API_KEY]"), "{log:?}");
    assert_eq!(
        done.spec.expect("spec").env["API_KEY"],
        shown.env["API_KEY"]
    );

    // Copied into another user's job, the sealed value does not open: that
    // job fails before it runs, as a setup error.
    let mut copied = JobSpec {
        name: "copied".into(),
        image: "python:3.11-slim".into(),
        command: vec!["/bin/sh".into(), "-c".into(), "echo ran".into()],
        secret_env_keys: vec!["API_KEY".into()],
        ..Default::default()
    };
    copied
        .env
        .insert("API_KEY".into(), shown.env["API_KEY"].clone());
    let theirs = submit(&mesh, BOB_TOKEN, copied).await;
    let failed = wait_state(&mesh, &theirs.id, JobState::Failed, Duration::from_secs(60)).await;
    let error = failed.error.expect("error");
    assert!(error.message.contains("does not open"), "{error:?}");

    let files = files_under(mesh.dir.path());
    assert!(
        files.iter().any(|f| f.to_string_lossy().contains(".db")),
        "{files:?}"
    );
    assert_in_no_file(&files, GIVEN);
    mesh.stop().await;
}
