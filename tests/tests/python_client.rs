//! A client generated from `proto/` in another language (Python, grpcio)
//! submits a job and watches it to the end against the real mesh.
//!
//! Needs a Python with `grpcio-tools` (examples/python/requirements.txt):
//! `TRAINMESH_TEST_PYTHON` names it, else `python3`. CI installs it; on a
//! machine without it the test says so and passes only outside CI.

use std::process::Command;

use trainmesh_tests::{workspace_root, Mesh, ALICE_TOKEN};

fn python() -> String {
    std::env::var("TRAINMESH_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_python_client_submits_and_watches_a_job() {
    let py = python();
    let has_tools = Command::new(&py)
        .args(["-c", "import grpc_tools.protoc, grpc"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_tools {
        assert!(
            std::env::var("CI").is_err(),
            "CI must provide grpcio-tools for {py} (set TRAINMESH_TEST_PYTHON)"
        );
        eprintln!(
            "skipped: {py} lacks grpcio-tools; pip install -r examples/python/requirements.txt"
        );
        return;
    }
    let root = workspace_root();
    let gen = Command::new("bash")
        .arg(root.join("examples/python/gen.sh"))
        .env("PYTHON", &py)
        .output()
        .expect("run gen.sh");
    assert!(
        gen.status.success(),
        "gen.sh: {}",
        String::from_utf8_lossy(&gen.stderr)
    );

    let mesh = Mesh::start().await;
    let out = tokio::process::Command::new(&py)
        .arg(root.join("examples/python/submit_and_watch.py"))
        .args([
            "--endpoint",
            &mesh.addr("job-service"),
            "--token",
            ALICE_TOKEN,
        ])
        .args([
            "--timeout",
            "90",
            "--steps",
            "3",
            "--correlation-id",
            "py-client-1",
        ])
        .envs(mesh.client_env())
        .current_dir(&root)
        .output()
        .await
        .expect("run the python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("SUCCEEDED"), "{stdout}");
    mesh.stop().await;
}
