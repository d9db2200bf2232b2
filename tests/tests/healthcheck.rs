//! `<binary> healthcheck ADDR`, which container health checks run: exit 0
//! and SERVING for a serving service, exit 1 for an address nobody serves,
//! exit 2 for a malformed call; over TLS with the TLS variables a
//! container gives its service.

use std::process::Command;

use trainmesh_tests::{bin_dir, Mesh, MeshOptions};

fn healthcheck(binary: &str, args: &[&str]) -> (Option<i32>, String) {
    healthcheck_with(&[], binary, args)
}

fn healthcheck_with(
    env: &[(String, String)],
    binary: &str,
    args: &[&str],
) -> (Option<i32>, String) {
    let out = Command::new(bin_dir().join(binary))
        .arg("healthcheck")
        .args(args)
        .env_remove("TRAINMESH_TLS_CA")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run the health check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_binary_checks_its_service_health() {
    each_binary_checks(Mesh::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_binary_checks_its_service_health_over_mutual_tls() {
    let mesh = Mesh::start_with(MeshOptions {
        tls: true,
        no_runner: true,
        ..MeshOptions::default()
    })
    .await;
    let (code, out) = healthcheck("job-service", &[&mesh.addr("job-service")]);
    assert_eq!(code, Some(1), "plaintext against TLS: {out}");
    assert!(out.starts_with("unreachable"), "{out}");
    each_binary_checks(mesh).await;
}

async fn each_binary_checks(mesh: Mesh) {
    let env = mesh.client_env();
    let healthcheck = |binary: &str, args: &[&str]| healthcheck_with(&env, binary, args);
    for service in [
        "job-service",
        "scheduler-service",
        "metrics-service",
        "diagnosis-service",
    ] {
        let addr = mesh.addr(service);
        assert_eq!(
            healthcheck(service, &[&addr]),
            (Some(0), "SERVING".to_owned()),
            "{service} at {addr}"
        );
    }
    // The runner's binary checks any address too (its health port).
    let addr = mesh.addr("job-service");
    assert_eq!(healthcheck("runner", &[&addr]).0, Some(0));
    assert_eq!(
        healthcheck("job-service", &[&addr, "no.such.Service"]).0,
        Some(1),
        "an unknown service name is not SERVING"
    );
    mesh.stop().await;
}

#[test]
fn an_address_nobody_serves_fails_and_a_malformed_call_is_a_usage_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let (code, out) = healthcheck("scheduler-service", &[&addr]);
    assert_eq!(code, Some(1));
    assert!(out.starts_with("unreachable"), "{out}");
    assert_eq!(healthcheck("metrics-service", &[]).0, Some(2));
}
