//! Bearer-token authentication.
//!
//! Tokens map to a [`Caller`] (user, org, roles). Only SHA-256 hashes of
//! tokens are stored: in a YAML tokens file (what `trainctl up` writes) or in
//! an `auth_tokens` table. The [`AuthLayer`] rejects calls without a valid
//! token, except health checks and reflection, which probes and `grpcurl
//! list` need without credentials.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::Status;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Approver,
    Admin,
    /// Other trainmesh services and runners: internal RPCs only accept this.
    Service,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s.trim() {
            "user" => Some(Role::User),
            "approver" => Some(Role::Approver),
            "admin" => Some(Role::Admin),
            "service" => Some(Role::Service),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Approver => "approver",
            Role::Admin => "admin",
            Role::Service => "service",
        }
    }
}

/// The authenticated identity of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub user: String,
    pub org: String,
    pub roles: Vec<Role>,
}

impl Caller {
    /// Admins hold every human role; `service` is never implied.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role) || (role != Role::Service && self.roles.contains(&Role::Admin))
    }

    /// May read and change any user's jobs.
    pub fn sees_everything(&self) -> bool {
        self.has(Role::Admin) || self.has(Role::Service)
    }

    pub fn require(&self, role: Role) -> Result<(), Status> {
        if self.has(role) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "this call needs the `{}` role; `{}` does not have it",
                role.as_str(),
                self.user
            )))
        }
    }
}

/// The caller of a request that passed the [`AuthLayer`].
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// A new random token (256 bits), prefixed so it is recognisable in leaks.
pub fn generate_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("tm_{}", hex::encode(bytes))
}

/// One entry of a tokens file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenEntry {
    pub user: String,
    #[serde(default = "default_org")]
    pub org: String,
    pub roles: Vec<Role>,
    /// Hex SHA-256 of the token.
    pub sha256: String,
}

fn default_org() -> String {
    "default".into()
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TokensFile {
    pub tokens: Vec<TokenEntry>,
}

impl TokensFile {
    /// Adds `token` for the caller (hashing it) and returns `self`.
    pub fn with(mut self, token: &str, user: &str, org: &str, roles: &[Role]) -> Self {
        self.tokens.push(TokenEntry {
            user: user.into(),
            org: org.into(),
            roles: roles.to_vec(),
            sha256: hash_token(token),
        });
        self
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_yaml::to_string(self)?;
        std::fs::write(path, text)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }
}

/// Token hash → caller.
#[derive(Debug, Default, Clone)]
pub struct TokenStore {
    by_hash: HashMap<String, Caller>,
}

impl TokenStore {
    pub fn from_entries(entries: impl IntoIterator<Item = TokenEntry>) -> anyhow::Result<Self> {
        let mut by_hash = HashMap::new();
        for e in entries {
            if e.sha256.len() != 64 || !e.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                anyhow::bail!("token entry for `{}`: sha256 must be 64 hex digits", e.user);
            }
            if e.user.is_empty() || e.roles.is_empty() {
                anyhow::bail!("token entry needs a user and at least one role");
            }
            by_hash.insert(
                e.sha256.to_ascii_lowercase(),
                Caller {
                    user: e.user,
                    org: e.org,
                    roles: e.roles,
                },
            );
        }
        Ok(Self { by_hash })
    }

    pub fn load_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read tokens file {}: {e}", path.display()))?;
        let file: TokensFile = serde_yaml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("tokens file {}: {e}", path.display()))?;
        Self::from_entries(file.tokens)
    }

    /// Loads from the `auth_tokens` table of a database
    /// (`token_sha256, user_name, org, roles` with roles comma-separated).
    pub async fn load_db(url: &str) -> anyhow::Result<Self> {
        use sqlx::Row;
        let db = crate::db::connect(url, crate::db::Durability::Full).await?;
        // Replicas of every service may load from one database at once.
        let mut lock = crate::db::StartupLock::acquire(&db).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS auth_tokens (token_sha256 TEXT PRIMARY KEY, \
             user_name TEXT NOT NULL, org TEXT NOT NULL, roles TEXT NOT NULL)",
        )
        .execute(lock.conn())
        .await?;
        lock.release().await?;
        let rows = sqlx::query("SELECT token_sha256, user_name, org, roles FROM auth_tokens")
            .fetch_all(&db.read)
            .await?;
        let mut entries = Vec::new();
        for r in rows {
            let user: String = r.try_get(1)?;
            let roles: String = r.try_get(3)?;
            let roles = roles
                .split(',')
                .map(|s| {
                    Role::parse(s).ok_or_else(|| {
                        anyhow::anyhow!("auth_tokens row for `{user}`: unknown role `{}`", s.trim())
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            entries.push(TokenEntry {
                sha256: r.try_get(0)?,
                user,
                org: r.try_get(2)?,
                roles,
            });
        }
        Self::from_entries(entries)
    }

    /// A file path, or a `sqlite:`/`postgres:` URL.
    pub async fn load(source: &str) -> anyhow::Result<Self> {
        if source.starts_with("sqlite:") || source.starts_with("postgres") {
            Self::load_db(source).await
        } else {
            Self::load_file(Path::new(source))
        }
    }

    pub fn insert(&mut self, token: &str, caller: Caller) {
        self.by_hash.insert(hash_token(token), caller);
    }

    pub fn authenticate(&self, token: &str) -> Option<&Caller> {
        self.by_hash.get(&hash_token(token))
    }
}

fn is_public(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

/// Tower layer that authenticates every call and puts the [`Caller`] in the
/// request's extensions.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    tokens: Arc<TokenStore>,
}

impl AuthLayer {
    pub fn new(tokens: Arc<TokenStore>) -> Self {
        Self { tokens }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    tokens: Arc<TokenStore>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if is_public(req.uri().path()) {
            return Box::pin(inner.call(req));
        }
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = match header {
            None => return reject("missing credentials: send `authorization: Bearer <token>`"),
            Some(h) => match h
                .strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
            {
                Some(t) => t.trim(),
                None => return reject("authorization must be `Bearer <token>`"),
            },
        };
        let Some(caller) = self.tokens.authenticate(token).cloned() else {
            return reject("invalid or revoked token");
        };
        tracing::Span::current().record("user", caller.user.as_str());
        req.extensions_mut().insert(caller);
        Box::pin(inner.call(req))
    }
}

fn reject<E: Send + 'static>(msg: &str) -> BoxFuture<Result<http::Response<tonic::body::Body>, E>> {
    let resp = Status::unauthenticated(msg).into_http();
    Box::pin(async move { Ok(resp) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_looked_up_by_hash() {
        let file = TokensFile::default().with("secret", "alice", "ml", &[Role::User]);
        assert_ne!(file.tokens[0].sha256, "secret");
        let store = TokenStore::from_entries(file.tokens).unwrap();
        assert_eq!(store.authenticate("secret").unwrap().user, "alice");
        assert!(store.authenticate("other").is_none());
    }

    #[test]
    fn admin_implies_human_roles_not_service() {
        let admin = Caller {
            user: "a".into(),
            org: "o".into(),
            roles: vec![Role::Admin],
        };
        assert!(admin.has(Role::Approver));
        assert!(!admin.has(Role::Service));
        assert!(admin.require(Role::Service).is_err());
    }
}

#[cfg(test)]
mod db_tests {
    use super::*;

    #[tokio::test]
    async fn tokens_load_from_a_database_table() {
        for db in crate::testing::all_dbs().await {
            let store = TokenStore::load(&db.url).await.expect("empty table loads");
            assert!(store.authenticate("t1").is_none(), "{}", db.label);
            let pool = crate::db::connect(&db.url, crate::db::Durability::Full)
                .await
                .unwrap();
            sqlx::query("INSERT INTO auth_tokens VALUES ($1, $2, $3, $4)")
                .bind(hash_token("t1"))
                .bind("dana")
                .bind("vision")
                .bind("user, approver")
                .execute(&pool.write)
                .await
                .unwrap();
            let store = TokenStore::load(&db.url).await.expect("loads");
            let caller = store.authenticate("t1").expect("known token");
            assert_eq!(caller.user, "dana", "{}", db.label);
            assert_eq!(caller.roles, vec![Role::User, Role::Approver]);
            sqlx::query("UPDATE auth_tokens SET roles = 'superuser'")
                .execute(&pool.write)
                .await
                .unwrap();
            let err = TokenStore::load(&db.url).await.expect_err("unknown role");
            assert!(err.to_string().contains("superuser"), "{err}");
        }
    }

    /// Every replica of every service loads its tokens at start, possibly
    /// from one shared database that none of them has created the table in.
    /// A lost race is not certain in one round, so the table is dropped
    /// and the replicas race again, many times.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_loading_tokens_together_from_a_fresh_database_all_load() {
        for db in crate::testing::all_dbs().await {
            let admin = crate::db::connect(&db.url, crate::db::Durability::Full)
                .await
                .unwrap();
            for round in 0..20 {
                sqlx::query("DROP TABLE IF EXISTS auth_tokens")
                    .execute(&admin.write)
                    .await
                    .unwrap();
                let loads = (0..8).map(|_| {
                    let url = db.url.clone();
                    tokio::spawn(async move { TokenStore::load(&url).await })
                });
                let failed: Vec<String> = futures::future::join_all(loads)
                    .await
                    .into_iter()
                    .filter_map(|r| r.expect("load task").err().map(|e| format!("{e:#}")))
                    .collect();
                assert!(failed.is_empty(), "{} round {round}: {failed:#?}", db.label);
            }
        }
    }
}
