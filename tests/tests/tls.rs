//! TLS between the real binaries: what a TLS server refuses, a whole job
//! over mutual TLS, and the refusal of plaintext off loopback.

use std::process::Stdio;
use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use trainmesh_common::auth::{Role, TokensFile};
use trainmesh_common::client::{channel, channel_with, Channel};
use trainmesh_common::testing::wait_for;
use trainmesh_common::tls::ClientTls;
use trainmesh_proto::job::v1::JobState;
use trainmesh_tests::jobs::{python_job, submit, wait_job};
use trainmesh_tests::{bin_dir, Mesh, MeshOptions, ALICE_TOKEN};

const WAIT: Duration = Duration::from_secs(60);

async fn tls_mesh(runner: bool) -> Mesh {
    Mesh::start_with(MeshOptions {
        tls: true,
        no_runner: !runner,
        ..MeshOptions::default()
    })
    .await
}

async fn health(channel: Channel) -> Result<ServingStatus, tonic::Status> {
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(resp.into_inner().status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_refuses_plaintext_and_clients_without_a_certificate() {
    let mesh = tls_mesh(false).await;
    let tls = mesh.tls().expect("a TLS mesh").clone();
    for service in trainmesh_tests::SERVICES {
        let addr = mesh.addr(service);
        assert_eq!(
            health(mesh.channel(service, None)).await.unwrap(),
            ServingStatus::Serving,
            "{service}: the mesh's own client (CA and identity) is served"
        );
        let plain = health(channel(&addr, None).unwrap()).await;
        assert!(plain.is_err(), "{service}: plaintext answered: {plain:?}");
        // Trusts the server, shows no certificate: mutual TLS refuses it.
        let ca_only = ClientTls::from_pem(&std::fs::read(&tls.ca).unwrap(), None);
        let anonymous = health(channel_with(&addr, None, &ca_only).unwrap()).await;
        assert!(
            anonymous.is_err(),
            "{service}: a client without a certificate answered: {anonymous:?}"
        );
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_end_to_end_over_mutual_tls() {
    let mesh = tls_mesh(true).await;
    let job = submit(
        &mesh,
        ALICE_TOKEN,
        python_job("over-tls", "print('hello over tls')", &[]),
    )
    .await;
    let done = wait_job(&mesh, &job.id, "the job to succeed", WAIT, |j| {
        j.state == JobState::Succeeded as i32
    })
    .await;
    assert_eq!(done.attempts.len(), 1, "{:#?}", done.attempts);
    for instance in trainmesh_tests::SERVICES {
        assert!(
            mesh.log_text(instance).contains("\"tls\":true"),
            "{instance} says it serves TLS"
        );
    }
    mesh.stop().await;
}

/// Runs `binary ARGS` in a fresh data dir (with a tokens file and a service
/// token) and returns its exit code and stderr once it exits.
async fn run_to_exit(binary: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(bin_dir().join(binary))
        .args(args)
        .current_dir(dir.path())
        .env("TRAINMESH_DATA_DIR", dir.path())
        .env("TRAINMESH_SERVICE_TOKEN_FILE", write_tokens(dir.path()))
        .envs(env.iter().copied())
        .env_remove("TRAINMESH_INSECURE")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .unwrap_or_else(|_| panic!("{binary} did not exit"))
        .expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_tokens(dir: &std::path::Path) -> std::path::PathBuf {
    TokensFile::default()
        .with("tm_tls_service", "trainmesh", "system", &[Role::Service])
        .write(&dir.join("tokens.yaml"))
        .unwrap();
    let path = dir.join("service.token");
    std::fs::write(&path, "tm_tls_service").unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_off_loopback_is_refused_naming_the_flag() {
    for (binary, args) in [
        ("job-service", vec!["--listen", "0.0.0.0:0"]),
        ("metrics-service", vec!["--listen", "[::]:0"]),
        (
            "runner",
            vec![
                "--health-listen",
                "0.0.0.0:0",
                "--gpus",
                "none",
                "--allow-root-jobs",
            ],
        ),
    ] {
        let (code, stderr) = run_to_exit(binary, &args, &[]).await;
        assert_eq!(code, Some(1), "{binary} {args:?}: {stderr}");
        assert!(
            stderr.contains("not a loopback address") && stderr.contains("--insecure"),
            "{binary} {args:?}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_lets_plaintext_listen_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    write_tokens(dir.path());
    let addr_file = dir.path().join("metrics.addr");
    let mut child = tokio::process::Command::new(bin_dir().join("metrics-service"))
        .args(["--listen", "0.0.0.0:0", "--addr-file"])
        .arg(&addr_file)
        .env("TRAINMESH_DATA_DIR", dir.path())
        .env("TRAINMESH_INSECURE", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start metrics-service");
    let endpoint = format!("file:{}", addr_file.display());
    wait_for("metrics-service to serve on 0.0.0.0", WAIT, || {
        let endpoint = endpoint.clone();
        async move {
            let status = health(channel(&endpoint, None).ok()?).await.ok()?;
            (status == ServingStatus::Serving).then_some(())
        }
    })
    .await;
    child.start_kill().unwrap();
    let _ = child.wait().await;
}
