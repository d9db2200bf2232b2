//! The local mesh's credentials: an admin token for people and a service
//! token for the services, stored in the data dir. Created once, reused on
//! every later `trainctl up`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use trainmesh_common::auth::{generate_token, Role, TokenStore, TokensFile};

#[derive(Debug, Clone)]
pub struct TokenFiles {
    pub admin: PathBuf,
    pub service: PathBuf,
    pub tokens: PathBuf,
    /// True when this call generated them.
    pub created: bool,
    /// False when admin.token is not listed in tokens.yaml (edited by hand):
    /// the mesh starts, but that token will be refused.
    pub admin_listed: bool,
}

/// Creates `admin.token`, `service.token` and `tokens.yaml` in `dir` unless
/// `tokens.yaml` exists, in which case the existing files are reused.
/// `tokens.yaml` is written last, so a run interrupted half-way starts over
/// on the next call instead of leaving hashes whose tokens were lost.
pub fn ensure(dir: &Path) -> anyhow::Result<TokenFiles> {
    let mut files = TokenFiles {
        admin: dir.join("admin.token"),
        service: dir.join("service.token"),
        tokens: dir.join("tokens.yaml"),
        created: false,
        admin_listed: true,
    };
    if files.tokens.exists() {
        for path in [&files.admin, &files.service] {
            if !path.exists() {
                anyhow::bail!(
                    "{} exists but {} is missing, and a token cannot be recovered from its hash; \
                     remove {} to generate new tokens",
                    files.tokens.display(),
                    path.display(),
                    files.tokens.display()
                );
            }
        }
        let store = TokenStore::load_file(&files.tokens)?;
        let admin = read_token(&files.admin)?;
        files.admin_listed = store.authenticate(&admin).is_ok();
        return Ok(files);
    }
    let admin = generate_token();
    let service = generate_token();
    write_secret(&files.admin, &admin)?;
    write_secret(&files.service, &service)?;
    let tmp = dir.join("tokens.yaml.tmp");
    TokensFile::default()
        .with(&admin, "admin", "default", &[Role::Admin])
        .with(&service, "trainmesh", "system", &[Role::Service])
        .write(&tmp)?;
    std::fs::rename(&tmp, &files.tokens)?;
    files.created = true;
    Ok(files)
}

/// `trainctl tokens init DIR`.
pub fn init(dir: &Path) -> anyhow::Result<u8> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let files = ensure(dir)?;
    let verb = if files.created { "wrote" } else { "kept" };
    for path in [&files.admin, &files.service, &files.tokens] {
        println!("{verb} {}", path.display());
    }
    Ok(0)
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    Ok(text.trim().to_owned())
}

/// Writes `contents` readable by the owner only, atomically: the file is
/// never visible with other permissions or half written.
pub fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    // `mode` applies only when the file is created; a leftover temp file
    // keeps its old mode otherwise.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn tokens_are_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path()).unwrap();
        assert!(first.created && first.admin_listed);
        let admin = std::fs::read_to_string(&first.admin).unwrap();
        let service = std::fs::read_to_string(&first.service).unwrap();
        assert!(admin.trim().starts_with("tm_"));
        assert_ne!(admin, service);

        let second = ensure(dir.path()).unwrap();
        assert!(!second.created && second.admin_listed);
        assert_eq!(std::fs::read_to_string(&second.admin).unwrap(), admin);
        assert_eq!(std::fs::read_to_string(&second.service).unwrap(), service);
    }

    #[test]
    fn token_files_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = ensure(dir.path()).unwrap();
        for p in [&f.admin, &f.service, &f.tokens] {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        }
    }

    #[test]
    fn tokens_file_maps_admin_and_service_roles() {
        let dir = tempfile::tempdir().unwrap();
        let f = ensure(dir.path()).unwrap();
        let store = TokenStore::load_file(&f.tokens).unwrap();
        let admin = store.authenticate(&read_token(&f.admin).unwrap()).unwrap();
        assert_eq!(
            (admin.user.as_str(), admin.org.as_str()),
            ("admin", "default")
        );
        assert_eq!(admin.roles, [Role::Admin]);
        let svc = store
            .authenticate(&read_token(&f.service).unwrap())
            .unwrap();
        assert_eq!(
            (svc.user.as_str(), svc.org.as_str()),
            ("trainmesh", "system")
        );
        assert_eq!(svc.roles, [Role::Service]);
    }

    #[test]
    fn a_lost_token_file_is_an_error_not_a_silent_regeneration() {
        let dir = tempfile::tempdir().unwrap();
        let f = ensure(dir.path()).unwrap();
        std::fs::remove_file(&f.service).unwrap();
        let err = ensure(dir.path()).unwrap_err().to_string();
        assert!(err.contains("service.token is missing"), "{err}");
        assert!(err.contains("remove"), "{err}");
    }

    #[test]
    fn half_written_state_without_tokens_yaml_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.token"), "stale").unwrap();
        let f = ensure(dir.path()).unwrap();
        assert!(f.created);
        assert_ne!(std::fs::read_to_string(&f.admin).unwrap().trim(), "stale");
        assert_eq!(mode(&f.admin), 0o600);
    }

    #[test]
    fn an_admin_token_missing_from_tokens_yaml_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let f = ensure(dir.path()).unwrap();
        write_secret(&f.admin, "tm_other").unwrap();
        assert!(!ensure(dir.path()).unwrap().admin_listed);
    }
}
