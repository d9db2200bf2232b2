//! The mesh of `deploy/compose/docker-compose.yml`, in containers on the
//! real engine, for tests that kill, restart or cut off one of its parts.
//!
//! Each [`Compose`] is its own compose project (own network, volumes and
//! database), with every published port chosen by the engine. The images
//! come from `scripts/images.sh` (CI builds them before the tests); without
//! them, or without an engine, a test is skipped with the reason printed,
//! except under CI, where it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use trainmesh_common::client::Channel;
use trainmesh_common::testing::wait_for;

use crate::{bin_dir, workspace_root};

/// The services of the compose file that keep running (init-secrets exits).
pub const SERVICES: [&str; 8] = [
    "postgres",
    "job-service",
    "scheduler-1",
    "scheduler-2",
    "metrics-service",
    "diagnosis-service",
    "runner-1",
    "runner-2",
];

/// The image every service image is checked against.
const PROBE_IMAGE: &str = "trainmesh/job-service:latest";

pub struct Compose {
    project: String,
    containers: std::sync::Mutex<std::collections::HashMap<String, String>>,
    dir: tempfile::TempDir,
    password: String,
    pub admin_token: String,
    started: std::time::SystemTime,
}

/// Why the compose tests cannot run here, when they cannot.
fn missing_prerequisite() -> Option<String> {
    let ok = |mut c: Command| c.output().map(|o| o.status.success()).unwrap_or(false);
    let mut docker = Command::new("docker");
    docker.args(["version", "--format", "{{.Server.Version}}"]);
    if !ok(docker) {
        return Some("no Docker engine answers".into());
    }
    let mut compose = Command::new("docker-compose");
    compose.arg("version");
    if !ok(compose) {
        return Some("docker-compose is not installed".into());
    }
    let mut image = Command::new("docker");
    image.args(["image", "inspect", PROBE_IMAGE]);
    if !ok(image) {
        return Some(format!(
            "{PROBE_IMAGE} is missing: run scripts/images.sh --profile dev"
        ));
    }
    warn_if_stale();
    None
}

/// The images carry the revision they were built from; tests of other
/// code than the images hold would mislead: a warning here, a failure in
/// CI.
fn warn_if_stale() {
    let label = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            "{{index .Config.Labels \"org.opencontainers.image.revision\"}}",
            PROBE_IMAGE,
        ])
        .output();
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(workspace_root())
        .output();
    if let (Ok(label), Ok(head)) = (label, head) {
        let label = String::from_utf8_lossy(&label.stdout).trim().to_owned();
        let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
        if label != head {
            let why = format!(
                "the images were built from {label}, not {head}: \
                 run scripts/images.sh --profile dev to test this code"
            );
            // CI builds the images from the very clone it tests.
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("WARNING: {why}");
        }
    }
}

impl Compose {
    /// Brings the mesh up with `overrides` (a compose file fragment under
    /// `services:`, may be empty) and waits until every service is
    /// healthy. `None` when skipped.
    pub async fn up(overrides: &str) -> Option<Compose> {
        if let Some(why) = missing_prerequisite() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI must run the compose tests: {why}");
            }
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("trainmesh-compose-")
            .tempdir()
            .expect("temp dir");
        for runner in ["runner-1", "runner-2"] {
            let d = dir.path().join("runners").join(runner);
            std::fs::create_dir_all(&d).unwrap();
            // The runners run as 65532; the test may not be root.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let over = dir.path().join("override.yml");
        let services = if overrides.trim().is_empty() {
            "services: {}\n".to_owned()
        } else {
            format!("services:\n{overrides}\n")
        };
        std::fs::write(&over, format!("version: \"2.4\"\n{services}")).unwrap();
        let project = format!("tm{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let compose = Compose {
            project,
            containers: Default::default(),
            dir,
            password: uuid::Uuid::new_v4().simple().to_string(),
            admin_token: String::new(),
            started: std::time::SystemTime::now(),
        };
        compose.run(&["up", "-d"]);
        let mut compose = compose;
        compose.wait_healthy(&SERVICES).await;
        compose.admin_token = compose.read_admin_token();
        Some(compose)
    }

    /// `docker-compose` for this project, with its settings in the
    /// environment (they win over a developer's deploy/compose/.env).
    pub fn command(&self) -> Command {
        let compose_dir = workspace_root().join("deploy/compose");
        let mut c = Command::new("docker-compose");
        c.arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(compose_dir.join("docker-compose.yml"))
            .arg("-f")
            .arg(self.dir.path().join("override.yml"))
            .arg("--project-directory")
            .arg(&compose_dir)
            .env("POSTGRES_PASSWORD", &self.password)
            .env("DOCKER_GID", docker_gid())
            .env("TRAINMESH_RUNNER_WORK", self.dir.path().join("runners"))
            .env("TRAINMESH_BIND", "127.0.0.1");
        for port in [
            "TRAINMESH_JOB_PORT",
            "TRAINMESH_SCHEDULER_PORT",
            "TRAINMESH_SCHEDULER_2_PORT",
            "TRAINMESH_METRICS_PORT",
            "TRAINMESH_DIAGNOSIS_PORT",
        ] {
            c.env(port, "");
        }
        c
    }

    /// Runs `docker-compose ARGS`, failing the test if it fails.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self
            .command()
            .args(args)
            .output()
            .expect("run docker-compose");
        assert!(
            out.status.success(),
            "docker-compose {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The container id of `service`. A service keeps its container
    /// through kills and restarts, so it is asked for once.
    pub fn container(&self, service: &str) -> String {
        let mut ids = self.containers.lock().unwrap();
        if let Some(id) = ids.get(service) {
            return id.clone();
        }
        let out = self.run(&["ps", "-q", service]);
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(!id.is_empty(), "{service} has no container");
        ids.insert(service.to_owned(), id.clone());
        id
    }

    /// `127.0.0.1:PORT` where `service`'s container `port` is published.
    pub fn addr(&self, service: &str, port: u16) -> String {
        published(&self.container(service), port)
            .unwrap_or_else(|| panic!("{service}:{port} is not published"))
    }

    pub fn job_addr(&self) -> String {
        self.addr("job-service", 50051)
    }

    /// A channel to a published service port.
    pub fn channel(&self, service: &str, port: u16) -> Channel {
        trainmesh_common::client::channel(&self.addr(service, port), Some(&self.admin_token))
            .expect("channel")
    }

    /// The health status docker reports for `service` (`healthy`,
    /// `starting`, `unhealthy`), or its state when it has no health check.
    pub fn health(&self, service: &str) -> String {
        let id = self.container(service);
        docker_out(&[
            "inspect",
            "--format",
            "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}",
            &id,
        ])
    }

    pub async fn wait_healthy(&self, services: &[&str]) {
        wait_for(
            &format!("{} to be healthy", services.join(", ")),
            Duration::from_secs(180),
            || async {
                let not: Vec<String> = services
                    .iter()
                    .map(|s| (s, self.health(s)))
                    .filter(|(_, h)| h != "healthy")
                    .map(|(s, h)| format!("{s}: {h}"))
                    .collect();
                not.is_empty().then_some(())
            },
        )
        .await;
    }

    fn read_admin_token(&self) -> String {
        let init = self.container("init-secrets");
        let out = Command::new("docker")
            .args(["cp", &format!("{init}:/var/lib/trainmesh/admin.token"), "-"])
            .output()
            .expect("docker cp");
        assert!(out.status.success(), "docker cp of the admin token failed");
        // `docker cp ... -` writes a tar archive of the one file.
        let mut archive = tar::Archive::new(out.stdout.as_slice());
        let mut entry = archive
            .entries()
            .unwrap()
            .next()
            .expect("one file")
            .unwrap();
        let mut token = String::new();
        std::io::Read::read_to_string(&mut entry, &mut token).unwrap();
        token.trim().to_owned()
    }

    /// `trainctl` on this machine, pointed at the published ports with the
    /// admin token.
    pub fn trainctl(&self) -> Command {
        let mut c = Command::new(bin_dir().join("trainctl"));
        c.env("TRAINMESH_JOB_ENDPOINT", self.job_addr())
            .env(
                "TRAINMESH_SCHEDULER_ENDPOINT",
                self.addr("scheduler-1", 50052),
            )
            .env(
                "TRAINMESH_METRICS_ENDPOINT",
                self.addr("metrics-service", 50053),
            )
            .env(
                "TRAINMESH_DIAGNOSIS_ENDPOINT",
                self.addr("diagnosis-service", 50054),
            )
            .env("TRAINMESH_TOKEN", &self.admin_token)
            .env("TRAINMESH_DATA_DIR", self.dir.path());
        c
    }

    /// A file in this mesh's temp dir (for job specs).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `docker kill` of a service's container: no chance to clean up.
    pub fn kill(&self, service: &str) {
        docker_out(&["kill", &self.container(service)]);
    }

    pub fn start(&self, service: &str) {
        docker_out(&["start", &self.container(service)]);
    }

    /// `docker stop`: the service's stop signal, then a kill after 10 s.
    pub fn stop(&self, service: &str) {
        docker_out(&["stop", "--time", "10", &self.container(service)]);
    }

    /// Cuts `service` off the project's network (it keeps running).
    pub fn disconnect(&self, service: &str) {
        docker_out(&[
            "network",
            "disconnect",
            &self.network(),
            &self.container(service),
        ]);
    }

    /// Puts `service` back on the network under its name.
    pub fn connect(&self, service: &str) {
        docker_out(&[
            "network",
            "connect",
            "--alias",
            service,
            &self.network(),
            &self.container(service),
        ]);
    }

    fn network(&self) -> String {
        format!("{}_default", self.project)
    }

    /// The combined log of `service`.
    pub fn logs(&self, service: &str) -> String {
        let out = self.run(&["logs", "--no-color", service]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in SERVICES {
                if let Ok(out) = self
                    .command()
                    .args(["logs", "--no-color", "--tail", "40", s])
                    .output()
                {
                    eprintln!("--- {s} ---\n{}", String::from_utf8_lossy(&out.stdout));
                }
            }
        }
        let _ = self
            .command()
            .args(["down", "-v", "--remove-orphans", "--timeout", "5"])
            .output();
        remove_job_containers(self.started);
    }
}

/// Where `container`'s `port` is published now (a restarted container gets
/// a new port), or `None` while it is not running.
pub fn published(container: &str, port: u16) -> Option<String> {
    let out = Command::new("docker")
        .args(["port", container, &format!("{port}/tcp")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let addr = text.lines().next()?.trim();
    (out.status.success() && !addr.is_empty()).then(|| addr.to_owned())
}

/// The group owning the engine's socket, which the runners join.
fn docker_gid() -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/var/run/docker.sock")
        .map(|m| m.gid().to_string())
        .unwrap_or_else(|_| "0".into())
}

/// `docker ARGS`, failing the test if it fails; its trimmed stdout.
pub fn docker_out(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Job containers the compose runners started since `since`; they belong
/// to no compose project, so `down` leaves them.
fn remove_job_containers(since: std::time::SystemTime) {
    let since = since
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for runner in ["runner-1", "runner-2"] {
        let Ok(out) = Command::new("docker")
            .args([
                "ps",
                "-a",
                "--filter",
                &format!("label=trainmesh.runner={runner}"),
                "--format",
                "{{.ID}} {{.CreatedAt}}",
            ])
            .output()
        else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, created)| created_after(created, since))
            .map(|(id, _)| id.to_owned())
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
    }
}

/// `docker ps`' CreatedAt ("2026-12-07 16:01:02 +0000 UTC") is at or
/// after `since` (seconds since the epoch); an unparsable time counts as
/// after, so a leftover is removed rather than kept.
fn created_after(created: &str, since: u64) -> bool {
    let n = |s: &str| s.parse::<i64>().ok();
    let mut parts = created.split(' ');
    let (Some(date), Some(time)) = (parts.next(), parts.next()) else {
        return true;
    };
    let d: Vec<Option<i64>> = date.split('-').map(n).collect();
    let t: Vec<Option<i64>> = time.split(':').map(n).collect();
    let (&[Some(y), Some(m), Some(day)], &[Some(h), Some(min), Some(sec)]) =
        (d.as_slice(), t.as_slice())
    else {
        return true;
    };
    // Days since 1970-01-01 of a proleptic Gregorian date.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = days * 86_400 + h * 3600 + min * 60 + sec;
    t + 1 >= since as i64
}

/// Writes `text` to `path` (for job specs handed to trainctl).
pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}
