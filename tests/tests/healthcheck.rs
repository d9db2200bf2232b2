//! `<binary> healthcheck ADDR`, which container health checks run: exit 0
//! and SERVING for a serving service, exit 1 for an address nobody serves,
//! exit 2 for a malformed call.

use std::process::Command;

use trainmesh_tests::{bin_dir, Mesh};

fn healthcheck(binary: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin_dir().join(binary))
        .arg("healthcheck")
        .args(args)
        .output()
        .expect("run the health check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_binary_checks_its_service_health() {
    let mesh = Mesh::start().await;
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
