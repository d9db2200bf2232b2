//! Storage faults for tests: a filesystem that can be filled (SQLite) and
//! a PostgreSQL database that can be made read-only with its connections
//! cut (PostgreSQL), behind one [`StorageFault`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A small tmpfs mounted on a temp dir, unmounted when dropped. Mounting
/// needs CAP_SYS_ADMIN (root in CI).
pub struct SmallFs {
    dir: tempfile::TempDir,
    filler: PathBuf,
}

impl SmallFs {
    /// Mounts a tmpfs of `bytes`; `None` (with the reason on stderr) when
    /// this process may not mount.
    pub fn mount(bytes: u64) -> Option<SmallFs> {
        let dir = tempfile::Builder::new()
            .prefix("trainmesh-smallfs-")
            .tempdir()
            .expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0755"))
            .arg("tmpfs")
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                eprintln!(
                    "cannot mount a tmpfs ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return None;
            }
            Err(e) => {
                eprintln!("cannot run mount: {e}");
                return None;
            }
        }
        let filler = dir.path().join("filler");
        Some(SmallFs { dir, filler })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the filesystem has no byte left.
    pub fn fill(&self) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)
            .expect("open filler");
        for chunk in [1 << 20, 4096, 1] {
            let buf = vec![0u8; chunk];
            loop {
                match f.write(&buf) {
                    Ok(n) if n == chunk => continue,
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                    Err(e) => panic!("fill {}: {e}", self.filler.display()),
                }
            }
        }
    }

    /// Gives the space back.
    pub fn free(&self) {
        std::fs::remove_file(&self.filler).expect("remove filler");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy: processes still closing their files must not keep it busy.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A PostgreSQL database that can be made read-only: new transactions
/// refuse writes, and the connections open now are cut, so a service meets
/// both a broken connection and a database that takes no writes.
pub struct PgReadOnly {
    admin_url: String,
    database: String,
}

impl PgReadOnly {
    /// For `url`, a database on the server of `TRAINMESH_TEST_POSTGRES_URL`.
    pub fn new(url: &str) -> PgReadOnly {
        let admin_url = std::env::var(trainmesh_common::testing::POSTGRES_ENV)
            .expect("TRAINMESH_TEST_POSTGRES_URL");
        let database = url
            .rsplit_once('/')
            .map(|(_, d)| d.split('?').next().unwrap_or(d).to_string())
            .expect("database name in url");
        assert!(
            database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "unexpected database name `{database}`"
        );
        PgReadOnly {
            admin_url,
            database,
        }
    }

    pub async fn set(&self, read_only: bool) {
        let db =
            trainmesh_common::db::connect(&self.admin_url, trainmesh_common::db::Durability::Full)
                .await
                .expect("connect as admin");
        let on = if read_only { "on" } else { "off" };
        sqlx_exec(
            &db,
            &format!(
                "ALTER DATABASE {} SET default_transaction_read_only = {on}",
                self.database
            ),
        )
        .await;
        sqlx_exec(
            &db,
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = '{}' AND pid <> pg_backend_pid()",
                self.database
            ),
        )
        .await;
        db.write.close().await;
        db.read.close().await;
    }
}

async fn sqlx_exec(db: &trainmesh_common::db::Db, sql: &str) {
    sqlx::query(sql)
        .execute(&db.write)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// One way to make a service's database refuse writes, and to undo it.
pub enum StorageFault {
    DiskFull(SmallFs),
    ReadOnly(PgReadOnly),
}

impl StorageFault {
    pub async fn inject(&self) {
        match self {
            StorageFault::DiskFull(fs) => fs.fill(),
            StorageFault::ReadOnly(pg) => pg.set(true).await,
        }
    }

    pub async fn clear(&self) {
        match self {
            StorageFault::DiskFull(fs) => fs.free(),
            StorageFault::ReadOnly(pg) => pg.set(false).await,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            StorageFault::DiskFull(_) => "sqlite, disk full",
            StorageFault::ReadOnly(_) => "postgres, read-only",
        }
    }
}
