//! The mesh's bootstrap credentials, in one directory: an admin token for
//! people, one token per service and per named runner (each names its
//! holder, so a service or a runner can act only as itself), a join token
//! with which a runner that has no credential obtains its own, and
//! `tokens.yaml`, which lists their hashes. Created once; later calls keep
//! every file and add the identities that are missing.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use trainmesh_common::auth::{
    generate_token, hash_token, service, Role, TokenEntry, TokenStore, TokensFile,
};

/// The user of the bootstrap admin token.
pub const ADMIN_USER: &str = "admin";
/// The user of the join token.
pub const JOIN_USER: &str = "runner-join";
/// The org of every credential that is not a person's.
pub const SYSTEM_ORG: &str = "system";
/// Longest runner name: the token database refuses longer users, and a
/// runner that joins becomes one.
const MAX_RUNNER_NAME: usize = 128;

/// One credential of the directory: its file and whom it authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub file: PathBuf,
    pub user: String,
    pub org: &'static str,
    pub role: Role,
}

/// `DIR/runner-NAME.token`, the credential of the runner named NAME.
pub fn runner_token_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("runner-{name}.token"))
}

/// `DIR/SERVICE.token`, where a service looks for its own credential when
/// its data dir is DIR.
pub fn service_token_file(dir: &Path, service: &str) -> PathBuf {
    dir.join(format!("{service}.token"))
}

/// `DIR/runner-join.token`.
pub fn join_token_file(dir: &Path) -> PathBuf {
    dir.join(format!("{JOIN_USER}.token"))
}

/// Every credential `ensure(dir, runners)` keeps, admin first.
pub fn identities(dir: &Path, runners: &[&str]) -> Vec<Identity> {
    let mut ids = vec![Identity {
        file: dir.join("admin.token"),
        user: ADMIN_USER.into(),
        org: "default",
        role: Role::Admin,
    }];
    ids.extend(service::ALL.iter().map(|s| Identity {
        file: service_token_file(dir, s),
        user: (*s).into(),
        org: SYSTEM_ORG,
        role: Role::Service,
    }));
    ids.push(Identity {
        file: join_token_file(dir),
        user: JOIN_USER.into(),
        org: SYSTEM_ORG,
        role: Role::Join,
    });
    for name in runners {
        let id = Identity {
            file: runner_token_file(dir, name),
            user: (*name).into(),
            org: SYSTEM_ORG,
            role: Role::Runner,
        };
        // `--runner a --runner a` is one runner.
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// A runner name `ensure` can write a credential for. The name becomes part
/// of a file name and a token's user, so it is a plain word: ASCII letters,
/// digits and `._-`, starting with a letter or digit (hostnames and
/// Kubernetes node names are such words).
pub fn check_runner_name(name: &str) -> anyhow::Result<()> {
    let problem = if name.is_empty() {
        Some("is empty".to_owned())
    } else if name.len() > MAX_RUNNER_NAME {
        Some(format!("is longer than {MAX_RUNNER_NAME} characters"))
    } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        Some("must start with a letter or a digit".to_owned())
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        Some(format!("contains {c:?}; use ASCII letters, digits and ._-"))
    } else if name == "join" {
        // runner-join.token is the join token's file.
        Some(format!(
            "is reserved: runner-join.token holds the join token (user {JOIN_USER})"
        ))
    } else {
        None
    };
    match problem {
        Some(p) => anyhow::bail!("runner name `{}` {p}", name.escape_debug()),
        None => Ok(()),
    }
}

/// What a call did to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Wrote,
    Kept,
}

impl Outcome {
    pub fn verb(self) -> &'static str {
        match self {
            Outcome::Wrote => "wrote",
            Outcome::Kept => "kept",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenFiles {
    pub admin: PathBuf,
    pub tokens: PathBuf,
    /// Every identity's file and what this call did to it, admin first.
    pub files: Vec<(PathBuf, Outcome)>,
    /// `Wrote` when tokens.yaml is new or gained entries.
    pub tokens_outcome: Outcome,
    /// True when tokens.yaml did not exist before this call.
    pub created: bool,
    /// Kept token files that tokens.yaml does not list as their identity
    /// (edited by hand): the mesh starts, but those tokens will be refused.
    pub unlisted: Vec<PathBuf>,
    /// Users of `service` entries named after no service: the one token
    /// earlier versions shared (`trainmesh`, in service.token). No internal
    /// call accepts them any more, but the role still reads every user's
    /// jobs, so whoever runs this is told.
    pub stray_services: Vec<String>,
    /// The secrets key's file and what this call did to it.
    pub secrets_key: (PathBuf, Outcome),
}

impl TokenFiles {
    /// The files this call generated a token into.
    pub fn written(&self) -> impl Iterator<Item = &Path> {
        self.files
            .iter()
            .filter(|(_, o)| *o == Outcome::Wrote)
            .map(|(p, _)| p.as_path())
    }

    pub fn admin_listed(&self) -> bool {
        !self.unlisted.contains(&self.admin)
    }
}

/// Makes `dir` hold a token for every identity of [`identities`] and a
/// `tokens.yaml` listing them.
///
/// Without `tokens.yaml`, every token is generated afresh and `tokens.yaml`
/// is written last, so a run interrupted half-way starts over on the next
/// call instead of leaving hashes whose tokens were lost.
///
/// With `tokens.yaml`, every existing token file and entry is kept, and
/// each identity whose file is missing gets a new token and an entry (this
/// also completes a directory written by an older trainctl, which had only
/// `admin.token` and `service.token`). Runner names are checked before
/// anything is written.
pub fn ensure(dir: &Path, runners: &[&str]) -> anyhow::Result<TokenFiles> {
    for name in runners {
        check_runner_name(name)?;
    }
    let ids = identities(dir, runners);
    let tokens = dir.join("tokens.yaml");
    let exists = tokens
        .try_exists()
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", tokens.display()))?;
    let mut files = if exists {
        complete(&tokens, &ids)?
    } else {
        create(&tokens, &ids)?
    };
    // The key job-service seals secret env values with and runners open
    // them with; made once, like the tokens.
    let key = dir.join(SECRETS_KEY);
    let outcome = if key.exists() {
        Outcome::Kept
    } else {
        write_secret(&key, &trainmesh_common::sealed::SecretsKey::generate_hex())?;
        Outcome::Wrote
    };
    files.secrets_key = (key, outcome);
    Ok(files)
}

/// The secrets key's file (`--secrets-key-file`'s default in a data dir).
pub const SECRETS_KEY: &str = "secrets.key";

fn create(tokens: &Path, ids: &[Identity]) -> anyhow::Result<TokenFiles> {
    let mut file = TokensFile::default();
    for id in ids {
        let token = generate_token();
        write_secret(&id.file, &token)?;
        file = file.with(&token, &id.user, id.org, &[id.role]);
    }
    write_private(tokens, serde_yaml::to_string(&file)?.as_bytes())?;
    Ok(TokenFiles {
        admin: ids[0].file.clone(),
        tokens: tokens.to_owned(),
        files: ids
            .iter()
            .map(|id| (id.file.clone(), Outcome::Wrote))
            .collect(),
        tokens_outcome: Outcome::Wrote,
        created: true,
        unlisted: Vec::new(),
        stray_services: Vec::new(),
        secrets_key: (PathBuf::new(), Outcome::Kept),
    })
}

fn complete(tokens: &Path, ids: &[Identity]) -> anyhow::Result<TokenFiles> {
    let text = std::fs::read_to_string(tokens)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", tokens.display()))?;
    let listed: TokensFile = serde_yaml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("tokens file {}: {e}", tokens.display()))?;
    let store = TokenStore::from_entries(listed.tokens.iter().cloned())
        .map_err(|e| anyhow::anyhow!("tokens file {}: {e}", tokens.display()))?;
    let mut files = Vec::new();
    let mut unlisted = Vec::new();
    let mut added: Vec<(&Identity, String)> = Vec::new();
    for id in ids {
        match read_token(&id.file)? {
            Some(token) => {
                let is_it = store.authenticate(&token).is_ok_and(|c| {
                    c.user == id.user && c.org == id.org && c.roles.contains(&id.role)
                });
                if !is_it {
                    unlisted.push(id.file.clone());
                }
                files.push((id.file.clone(), Outcome::Kept));
            }
            None => {
                added.push((id, generate_token()));
                files.push((id.file.clone(), Outcome::Wrote));
            }
        }
    }
    let mut result = TokenFiles {
        admin: ids[0].file.clone(),
        tokens: tokens.to_owned(),
        files,
        tokens_outcome: Outcome::Kept,
        created: false,
        unlisted,
        stray_services: listed
            .tokens
            .iter()
            .filter(|e| {
                e.roles.contains(&Role::Service) && !service::ALL.contains(&e.user.as_str())
            })
            .map(|e| e.user.clone())
            .collect(),
        secrets_key: (PathBuf::new(), Outcome::Kept),
    };
    if added.is_empty() {
        return Ok(result);
    }
    let new: Vec<TokenEntry> = added
        .iter()
        .map(|(id, token)| TokenEntry {
            user: id.user.clone(),
            org: id.org.into(),
            roles: vec![id.role],
            sha256: hash_token(token),
        })
        .collect();
    // tokens.yaml before the token files: a run cut short in between leaves
    // hashes of tokens nobody has (harmless; the next call generates those
    // files again), never a token file that no entry lists, which later
    // calls would keep and the services refuse.
    write_private(tokens, appended(&text, &listed, new)?.as_bytes())?;
    for (id, token) in &added {
        write_secret(&id.file, token)?;
    }
    result.tokens_outcome = Outcome::Wrote;
    Ok(result)
}

/// `text` (the tokens file, parsed as `listed`) with `new` entries at the
/// end. Appended as text when that parses to the old entries followed by
/// the new ones, so comments and layout written by hand survive; otherwise
/// the whole file is written out again.
fn appended(text: &str, listed: &TokensFile, new: Vec<TokenEntry>) -> anyhow::Result<String> {
    let key = |e: &TokenEntry| {
        (
            e.user.clone(),
            e.org.clone(),
            e.roles.clone(),
            e.sha256.clone(),
        )
    };
    let mut all = TokensFile {
        tokens: listed.tokens.clone(),
    };
    all.tokens.extend(new.iter().cloned());
    let want: Vec<_> = all.tokens.iter().map(key).collect();
    let mut joined = text.to_owned();
    if !joined.is_empty() && !joined.ends_with('\n') {
        joined.push('\n');
    }
    joined.push_str(&serde_yaml::to_string(&new)?);
    let same = serde_yaml::from_str::<TokensFile>(&joined)
        .is_ok_and(|f| f.tokens.iter().map(key).collect::<Vec<_>>() == want);
    if same {
        Ok(joined)
    } else {
        Ok(serde_yaml::to_string(&all)?)
    }
}

/// `trainctl tokens init DIR [--runner NAME]...`.
pub fn init(dir: &Path, runners: &[String]) -> anyhow::Result<u8> {
    let runners: Vec<&str> = runners.iter().map(String::as_str).collect();
    // Before creating DIR: a bad name changes nothing.
    for name in &runners {
        check_runner_name(name)?;
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let files = ensure(dir, &runners)?;
    for (path, outcome) in &files.files {
        println!("{} {}", outcome.verb(), path.display());
    }
    println!("{} {}", files.tokens_outcome.verb(), files.tokens.display());
    let (key, outcome) = &files.secrets_key;
    println!("{} {}", outcome.verb(), key.display());
    warn(&files);
    Ok(0)
}

/// Says what in the directory is not as `ensure` would have made it.
pub fn warn(files: &TokenFiles) {
    for path in &files.unlisted {
        eprintln!(
            "warning: the token in {} is not listed in {} as its identity; calls with it will \
             be refused",
            path.display(),
            files.tokens.display()
        );
    }
    for user in &files.stray_services {
        eprintln!(
            "warning: {} lists a `service` token for `{user}`, which is no service's name \
             (earlier versions shared one, service.token): no internal call accepts it now, \
             but it can still read every user's jobs; remove that entry (and the file holding \
             the token) once nothing of an earlier version uses it",
            files.tokens.display()
        );
    }
}

/// The token in `path`, or `None` when there is no such file.
fn read_token(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `contents` and a newline readable by the owner only, atomically:
/// the file is never visible with other permissions or half written.
pub fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    write_private(path, format!("{contents}\n").as_bytes())
}

/// Writes `contents` readable by the owner only, atomically.
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{} names no file", path.display()))?
        .to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
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
    f.write_all(contents)?;
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

    fn token(p: &Path) -> String {
        read_token(p).unwrap().expect("token file")
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn every_identity_gets_its_own_token_listed_as_itself() {
        let dir = tempfile::tempdir().unwrap();
        let f = ensure(dir.path(), &["gpu-1", "node.example.com"]).unwrap();
        assert!(f.created && f.admin_listed() && f.unlisted.is_empty());
        assert_eq!(f.tokens_outcome, Outcome::Wrote);
        assert_eq!(
            names(dir.path()),
            [
                "admin.token",
                "diagnosis-service.token",
                "job-service.token",
                "metrics-service.token",
                "runner-gpu-1.token",
                "runner-join.token",
                "runner-node.example.com.token",
                "scheduler-service.token",
                "secrets.key",
                "tokens.yaml",
            ]
        );
        let store = TokenStore::load_file(&f.tokens).unwrap();
        let who = |file: &str| {
            let c = store.authenticate(&token(&dir.path().join(file))).unwrap();
            (c.user, c.org, c.roles)
        };
        let sys = |u: &str, r| (u.to_owned(), "system".to_owned(), vec![r]);
        assert_eq!(
            who("admin.token"),
            ("admin".into(), "default".into(), vec![Role::Admin])
        );
        for s in service::ALL {
            assert_eq!(who(&format!("{s}.token")), sys(s, Role::Service));
        }
        assert_eq!(who("runner-join.token"), sys("runner-join", Role::Join));
        assert_eq!(who("runner-gpu-1.token"), sys("gpu-1", Role::Runner));
        assert_eq!(
            who("runner-node.example.com.token"),
            sys("node.example.com", Role::Runner)
        );
        let all: Vec<String> = f.files.iter().map(|(p, _)| token(p)).collect();
        let distinct: std::collections::BTreeSet<&String> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "tokens repeat: {all:?}");
        assert!(all.iter().all(|t| t.starts_with("tm_")));
    }

    #[test]
    fn token_files_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = ensure(dir.path(), &["r"]).unwrap();
        assert_eq!(f.files.len(), 7);
        assert_eq!(f.secrets_key.1, Outcome::Wrote);
        let key = std::fs::read_to_string(&f.secrets_key.0).unwrap();
        trainmesh_common::sealed::SecretsKey::from_hex(&key).unwrap();
        let again = ensure(dir.path(), &["r"]).unwrap();
        assert_eq!(again.secrets_key.1, Outcome::Kept);
        assert_eq!(std::fs::read_to_string(&f.secrets_key.0).unwrap(), key);
        for p in f
            .files
            .iter()
            .map(|(p, _)| p)
            .chain([&f.tokens, &f.secrets_key.0])
        {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        }
    }

    #[test]
    fn tokens_are_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path(), &["r"]).unwrap();
        let before: Vec<String> = first.files.iter().map(|(p, _)| token(p)).collect();
        let yaml = std::fs::read_to_string(&first.tokens).unwrap();

        let second = ensure(dir.path(), &["r"]).unwrap();
        assert!(!second.created && second.admin_listed() && second.unlisted.is_empty());
        assert!(second.stray_services.is_empty());
        assert_eq!(second.tokens_outcome, Outcome::Kept);
        assert!(second.files.iter().all(|(_, o)| *o == Outcome::Kept));
        let after: Vec<String> = second.files.iter().map(|(p, _)| token(p)).collect();
        assert_eq!(before, after);
        assert_eq!(std::fs::read_to_string(&second.tokens).unwrap(), yaml);
    }

    #[test]
    fn a_new_runner_is_added_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path(), &["a"]).unwrap();
        let admin = token(&first.admin);
        let a = token(&runner_token_file(dir.path(), "a"));
        let f = ensure(dir.path(), &["a", "b"]).unwrap();
        assert_eq!(
            f.written().collect::<Vec<_>>(),
            [runner_token_file(dir.path(), "b")]
        );
        assert_eq!(f.tokens_outcome, Outcome::Wrote);
        assert_eq!(mode(&f.tokens), 0o600);
        assert_eq!(token(&f.admin), admin);
        assert_eq!(token(&runner_token_file(dir.path(), "a")), a);
        let store = TokenStore::load_file(&f.tokens).unwrap();
        assert_eq!(store.authenticate(&admin).unwrap().user, "admin");
        assert_eq!(store.authenticate(&a).unwrap().user, "a");
        let b = store
            .authenticate(&token(&runner_token_file(dir.path(), "b")))
            .unwrap();
        assert_eq!(
            (b.user.as_str(), b.roles.as_slice()),
            ("b", &[Role::Runner][..])
        );
        // A runner left out later keeps its file and entry.
        let f = ensure(dir.path(), &[]).unwrap();
        assert_eq!(f.tokens_outcome, Outcome::Kept);
        assert!(runner_token_file(dir.path(), "b").exists());
    }

    /// What an older trainctl wrote: one admin token and one token shared by
    /// every service and runner.
    fn old_dir(dir: &Path) -> (String, String) {
        let admin = generate_token();
        let shared = generate_token();
        write_secret(&dir.join("admin.token"), &admin).unwrap();
        write_secret(&dir.join("service.token"), &shared).unwrap();
        TokensFile::default()
            .with(&admin, "admin", "default", &[Role::Admin])
            .with(&shared, "trainmesh", "system", &[Role::Service])
            .write(&dir.join("tokens.yaml"))
            .unwrap();
        (admin, shared)
    }

    #[test]
    fn an_old_data_dir_gains_the_new_identities_and_keeps_its_admin_token() {
        let dir = tempfile::tempdir().unwrap();
        let (admin, shared) = old_dir(dir.path());
        let f = ensure(dir.path(), &["local"]).unwrap();
        assert!(!f.created && f.admin_listed() && f.unlisted.is_empty());
        assert_eq!(f.stray_services, ["trainmesh"]);
        assert_eq!(f.files[0], (f.admin.clone(), Outcome::Kept));
        assert_eq!(f.written().count(), 6, "{:?}", f.files);
        assert_eq!(token(&f.admin), admin);
        assert_eq!(token(&dir.path().join("service.token")), shared);
        assert_eq!(mode(&f.tokens), 0o600);
        let store = TokenStore::load_file(&f.tokens).unwrap();
        assert_eq!(store.authenticate(&admin).unwrap().roles, [Role::Admin]);
        // The old entry stays (nothing accepts it for internal calls now).
        assert_eq!(store.authenticate(&shared).unwrap().user, "trainmesh");
        let job = store
            .authenticate(&token(&dir.path().join("job-service.token")))
            .unwrap();
        assert_eq!(job.user, service::JOB);
        let runner = store
            .authenticate(&token(&runner_token_file(dir.path(), "local")))
            .unwrap();
        assert_eq!(
            (runner.user.as_str(), runner.org.as_str()),
            ("local", "system")
        );
        // And that is stable.
        let again = ensure(dir.path(), &["local"]).unwrap();
        assert_eq!(again.tokens_outcome, Outcome::Kept);
        assert_eq!(again.written().count(), 0);
    }

    #[test]
    fn entries_and_comments_written_by_hand_survive_an_addition() {
        let dir = tempfile::tempdir().unwrap();
        let f = ensure(dir.path(), &[]).unwrap();
        let text = std::fs::read_to_string(&f.tokens).unwrap();
        let alice = "tm_alice";
        let edited = format!(
            "# people\n{text}- user: alice # ml team\n  org: ml\n  roles: [user]\n  sha256: {}\n",
            hash_token(alice)
        );
        std::fs::write(&f.tokens, &edited).unwrap();
        ensure(dir.path(), &["r"]).unwrap();
        let now = std::fs::read_to_string(&f.tokens).unwrap();
        assert!(now.starts_with(&edited), "{now}");
        let store = TokenStore::load_file(&f.tokens).unwrap();
        assert_eq!(store.authenticate(alice).unwrap().user, "alice");
        assert!(store
            .authenticate(&token(&runner_token_file(dir.path(), "r")))
            .is_ok());
    }

    #[test]
    fn a_tokens_file_in_flow_style_is_written_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let admin = generate_token();
        write_secret(&dir.path().join("admin.token"), &admin).unwrap();
        std::fs::write(
            dir.path().join("tokens.yaml"),
            format!(
                "tokens: [{{user: admin, org: default, roles: [admin], sha256: {}}}]\n",
                hash_token(&admin)
            ),
        )
        .unwrap();
        let f = ensure(dir.path(), &[]).unwrap();
        let store = TokenStore::load_file(&f.tokens).unwrap();
        assert!(store.authenticate(&admin).is_ok());
        assert!(store
            .authenticate(&token(&dir.path().join("runner-join.token")))
            .is_ok());
    }

    #[test]
    fn a_lost_token_file_is_replaced_with_a_new_listed_token() {
        let dir = tempfile::tempdir().unwrap();
        let f = ensure(dir.path(), &[]).unwrap();
        let path = dir.path().join("scheduler-service.token");
        let old = token(&path);
        std::fs::remove_file(&path).unwrap();
        let f2 = ensure(dir.path(), &[]).unwrap();
        assert_eq!(f2.written().collect::<Vec<_>>(), [path.as_path()]);
        let new = token(&path);
        assert_ne!(new, old);
        let store = TokenStore::load_file(&f.tokens).unwrap();
        assert_eq!(store.authenticate(&new).unwrap().user, service::SCHEDULER);
    }

    #[test]
    fn half_written_state_without_tokens_yaml_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.token"), "stale").unwrap();
        let f = ensure(dir.path(), &[]).unwrap();
        assert!(f.created);
        assert_ne!(token(&f.admin), "stale");
        assert_eq!(mode(&f.admin), 0o600);
    }

    #[test]
    fn an_admin_token_missing_from_tokens_yaml_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let f = ensure(dir.path(), &[]).unwrap();
        write_secret(&f.admin, "tm_other").unwrap();
        let f = ensure(dir.path(), &[]).unwrap();
        assert!(!f.admin_listed());
        assert_eq!(f.unlisted, std::slice::from_ref(&f.admin));
        assert_eq!(token(&f.admin), "tm_other");
    }

    #[test]
    fn a_token_listed_as_someone_else_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path(), &[]).unwrap();
        // The metrics token copied over the job token: valid, but not job-service's.
        let metrics = token(&dir.path().join("metrics-service.token"));
        let job = dir.path().join("job-service.token");
        write_secret(&job, &metrics).unwrap();
        let f = ensure(dir.path(), &[]).unwrap();
        assert_eq!(f.unlisted, [job]);
    }

    #[test]
    fn bad_runner_names_are_refused_before_anything_is_written() {
        for (name, why) in [
            ("", "is empty"),
            ("../x", "must start with"),
            ("a/b", "contains '/'"),
            ("a b", "contains ' '"),
            (".hidden", "must start with"),
            ("-flag", "must start with"),
            ("nöde", "contains 'ö'"),
            ("join", "reserved"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let err = ensure(dir.path(), &["ok", name]).unwrap_err().to_string();
            assert!(
                err.contains("runner name") && err.contains(why),
                "{name:?}: {err}"
            );
            assert!(names(dir.path()).is_empty(), "{name:?} wrote files");
            let sub = dir.path().join("new");
            assert!(init(&sub, &[name.to_owned()]).is_err());
            assert!(!sub.exists(), "{name:?} created the directory");
        }
        assert!(check_runner_name(&"a".repeat(MAX_RUNNER_NAME)).is_ok());
        assert!(check_runner_name(&"a".repeat(MAX_RUNNER_NAME + 1)).is_err());
    }

    #[test]
    fn a_repeated_runner_is_one_identity() {
        let dir = tempfile::tempdir().unwrap();
        let f = ensure(dir.path(), &["r", "r"]).unwrap();
        let listed: TokensFile =
            serde_yaml::from_str(&std::fs::read_to_string(&f.tokens).unwrap()).unwrap();
        assert_eq!(listed.tokens.iter().filter(|e| e.user == "r").count(), 1);
    }
}
