//! The real Docker Engine for tests: finding it (skip only when none
//! answers, fail in CI), a tiny local image built from Debian's
//! busybox-static (the engine here has no images and can pull none), and
//! removing what a test created.

use std::collections::HashMap;
use std::path::Path;

use bollard::query_parameters::{
    CreateImageOptions, ListContainersOptions, RemoveContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;

/// Shared by every test and test process; building it is idempotent. Its
/// ENTRYPOINT fails on purpose: jobs run their argv, not the image's
/// entrypoint. Change the tag when the image's content changes.
pub const TEST_IMAGE: &str = "trainmesh-test-busybox:1";
const BUSYBOX: &str = "/bin/busybox";

/// The engine, or `None` (with the reason printed) when none answers
/// outside CI. In CI (CI=true) a missing engine fails the test.
pub async fn engine() -> Option<Docker> {
    let result = async {
        let docker = Docker::connect_with_defaults().map_err(|e| e.to_string())?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| e.to_string())?;
        docker.ping().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(docker)
    }
    .await;
    match result {
        Ok(d) => Some(d),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI must have a Docker engine for the docker backend tests: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: no Docker engine answers ({e}); the docker backend is not tested");
            None
        }
    }
}

/// Imports [`TEST_IMAGE`] unless the engine has it: a root file system of
/// busybox with a link per applet and a /tmp.
pub async fn ensure_test_image(docker: &Docker) {
    if docker.inspect_image(TEST_IMAGE).await.is_ok() {
        return;
    }
    let tar = rootfs_tar().await;
    let (repo, tag) = TEST_IMAGE.split_once(':').unwrap();
    let options = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(repo.into()),
        tag: Some(tag.into()),
        changes: vec![r#"ENTRYPOINT ["/bin/busybox", "false"]"#.into()],
        ..CreateImageOptions::default()
    };
    let mut progress =
        docker.create_image(Some(options), Some(bollard::body_full(tar.into())), None);
    while let Some(item) = progress.next().await {
        item.expect("importing the test image");
    }
}

async fn rootfs_tar() -> Vec<u8> {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: install Debian's busybox-static (apt-get install busybox-static)"
    );
    let list = tokio::process::Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .await
        .expect("busybox --list");
    let applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_owned)
        .collect();
    let binary = std::fs::read(BUSYBOX).unwrap();
    tokio::task::spawn_blocking(move || {
        let mut tar = tar::Builder::new(Vec::new());
        let dir = |tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(mode);
            h.set_size(0);
            tar.append_data(&mut h, path, std::io::empty()).unwrap();
        };
        dir(&mut tar, "bin", 0o755);
        dir(&mut tar, "tmp", 0o1777);
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(binary.len() as u64);
        tar.append_data(&mut h, "bin/busybox", binary.as_slice())
            .unwrap();
        for applet in applets {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
                .unwrap();
        }
        tar.into_inner().unwrap()
    })
    .await
    .unwrap()
}

/// Every container of job `job_id`, by the backend's label.
pub async fn containers_of(docker: &Docker, job_id: &str) -> Vec<String> {
    let options = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([(
            "label".to_owned(),
            vec![format!("trainmesh.job={job_id}")],
        )])),
        ..ListContainersOptions::default()
    };
    docker
        .list_containers(Some(options))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// Removes the containers of `job_id` when dropped, also when the test
/// failed.
pub struct Cleanup {
    pub job_id: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let job_id = self.job_id.clone();
        // Drop cannot await; a thread with its own runtime can.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Some(docker) = Docker::connect_with_defaults().ok() else {
                    return;
                };
                let Ok(docker) = docker.negotiate_version().await else {
                    return;
                };
                for id in containers_of(&docker, &job_id).await {
                    let options = RemoveContainerOptions {
                        force: true,
                        ..RemoveContainerOptions::default()
                    };
                    let _ = docker.remove_container(&id, Some(options)).await;
                }
            })
        });
        let _ = done.join();
    }
}
