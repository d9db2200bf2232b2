//! [`TokenStore`]: token hash → caller, from tokens files (read once) and
//! at most one token database (reloaded when it changes).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use super::managed::{self, TokenRow};
use super::{hash_token, Caller, Role, TokenEntry, TokensFile};
use crate::db::{Db, Durability};
use crate::time::{Clock, SystemClock};

/// How often every service asks the token database whether tokens
/// changed: a created or revoked token takes effect everywhere this late
/// (plus one small read).
pub const RELOAD_INTERVAL: Duration = Duration::from_millis(250);

/// How often a service writes when tokens were last used. Rare, since
/// several services write to one database and the time is only a hint.
const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// Why a token was refused; the message is what the caller sees.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("invalid or revoked token")]
    Unknown,
    #[error("token `{id}` expired at {at}; ask an admin for a new one")]
    Expired { id: String, at: String },
    #[error("token `{id}` was revoked; ask an admin for a new one")]
    Revoked { id: String },
}

/// Token hash → caller. Cheap to share: clones see the same database
/// tokens.
#[derive(Debug, Default, Clone)]
pub struct TokenStore {
    /// From tokens files (and tests): fixed for the process's life.
    fixed: HashMap<String, Caller>,
    managed: Option<Arc<Managed>>,
}

#[derive(Debug)]
struct Managed {
    db: Db,
    clock: Arc<dyn Clock>,
    state: RwLock<State>,
    /// Held across a reload's reads and its swap, and by [`TokenStore::apply`],
    /// so that a reload that read the rows before a change cannot undo the
    /// change applied after it.
    reloading: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    /// The version the tokens were read at (-1: never read).
    version: i64,
    tokens: HashMap<String, Arc<Entry>>,
    legacy: HashMap<String, Caller>,
}

#[derive(Debug)]
struct Entry {
    id: String,
    caller: Caller,
    expires_at: Option<i64>,
    revoked: bool,
    /// Last accepted (µs), and the last time written to the database.
    used_at: AtomicI64,
    flushed_at: AtomicI64,
}

impl Entry {
    fn of(row: &TokenRow, before: Option<&Entry>) -> Option<Self> {
        // A role this build does not know grants nothing here.
        let roles: Vec<Role> = row.roles.iter().filter_map(|r| Role::parse(r)).collect();
        if roles.is_empty() {
            tracing::warn!(token = %row.id, roles = ?row.roles, "token has no known role; ignored");
            return None;
        }
        let used = row.last_used_at.unwrap_or(0);
        let (used_at, flushed_at) = match before {
            Some(b) => (
                b.used_at.load(Ordering::Relaxed).max(used),
                b.flushed_at.load(Ordering::Relaxed).max(used),
            ),
            None => (used, used),
        };
        Some(Entry {
            id: row.id.clone(),
            caller: Caller {
                user: row.user.clone(),
                org: row.org.clone(),
                roles,
            },
            expires_at: row.expires_at,
            revoked: row.revoked_at.is_some(),
            used_at: AtomicI64::new(used_at),
            flushed_at: AtomicI64::new(flushed_at),
        })
    }
}

fn micros_to_text(at: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_micros(at)
        .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| at.to_string())
}

fn callers(
    entries: impl IntoIterator<Item = TokenEntry>,
) -> anyhow::Result<HashMap<String, Caller>> {
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
    Ok(by_hash)
}

fn is_database(source: &str) -> bool {
    source.starts_with("sqlite:") || source.starts_with("postgres")
}

impl TokenStore {
    pub fn from_entries(entries: impl IntoIterator<Item = TokenEntry>) -> anyhow::Result<Self> {
        Ok(Self {
            fixed: callers(entries)?,
            managed: None,
        })
    }

    pub fn load_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read tokens file {}: {e}", path.display()))?;
        let file: TokensFile = serde_yaml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("tokens file {}: {e}", path.display()))?;
        Self::from_entries(file.tokens)
    }

    /// A token database, reloaded every [`RELOAD_INTERVAL`] while this
    /// store (or a clone) lives.
    pub async fn load_db(url: &str) -> anyhow::Result<Self> {
        Self::load_db_with(url, Arc::new(SystemClock)).await
    }

    /// [`load_db`](Self::load_db) with a clock for expiry (tests move it).
    pub async fn load_db_with(url: &str, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let db = crate::db::connect(url, Durability::Full).await?;
        // Replicas of every service may prepare one database at once.
        managed::prepare(&db).await?;
        let m = Arc::new(Managed {
            db,
            clock,
            state: RwLock::new(State {
                version: -1,
                ..Default::default()
            }),
            reloading: tokio::sync::Mutex::new(()),
        });
        m.reload(true).await?;
        tokio::spawn(poll(Arc::downgrade(&m)));
        Ok(Self {
            fixed: HashMap::new(),
            managed: Some(m),
        })
    }

    /// A file path, or a `sqlite:`/`postgres:` URL.
    pub async fn load(source: &str) -> anyhow::Result<Self> {
        Self::load_sources(&[source.to_owned()]).await
    }

    /// Tokens from every source: files, and at most one database (where
    /// job-service also writes the tokens it creates).
    pub async fn load_sources(sources: &[String]) -> anyhow::Result<Self> {
        let dbs: Vec<&String> = sources.iter().filter(|s| is_database(s)).collect();
        if dbs.len() > 1 {
            anyhow::bail!("--tokens names more than one token database; name one");
        }
        let mut store = match dbs.first() {
            Some(url) => Self::load_db(url).await?,
            None => Self::default(),
        };
        for file in sources.iter().filter(|s| !is_database(s)) {
            store.fixed.extend(Self::load_file(Path::new(file))?.fixed);
        }
        Ok(store)
    }

    pub fn insert(&mut self, token: &str, caller: Caller) {
        self.fixed.insert(hash_token(token), caller);
    }

    /// The caller a token stands for, or why it is refused. Expiry is
    /// checked here, at every call.
    pub fn authenticate(&self, token: &str) -> Result<Caller, Refusal> {
        let hash = hash_token(token);
        if let Some(c) = self.fixed.get(&hash) {
            return Ok(c.clone());
        }
        let Some(m) = &self.managed else {
            return Err(Refusal::Unknown);
        };
        let state = m.state.read().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = state.tokens.get(&hash) {
            if e.revoked {
                return Err(Refusal::Revoked { id: e.id.clone() });
            }
            let now = m.clock.now_micros();
            if let Some(at) = e.expires_at.filter(|at| *at <= now) {
                return Err(Refusal::Expired {
                    id: e.id.clone(),
                    at: micros_to_text(at),
                });
            }
            e.used_at.fetch_max(now, Ordering::Relaxed);
            return Ok(e.caller.clone());
        }
        state.legacy.get(&hash).cloned().ok_or(Refusal::Unknown)
    }

    /// The token database, where tokens can be created and revoked.
    pub fn database(&self) -> Option<&Db> {
        self.managed.as_ref().map(|m| &m.db)
    }

    /// Makes a committed change of `row` effective in this process now,
    /// before the next reload.
    pub async fn apply(&self, row: &TokenRow) {
        let Some(m) = &self.managed else { return };
        let _guard = m.reloading.lock().await;
        let mut state = m.state.write().unwrap_or_else(|e| e.into_inner());
        let before = state.tokens.get(&row.sha256).cloned();
        match Entry::of(row, before.as_deref()) {
            Some(e) => state.tokens.insert(row.sha256.clone(), Arc::new(e)),
            None => state.tokens.remove(&row.sha256),
        };
    }

    /// Reloads the database's tokens if they changed since the last read;
    /// true when it did. The poll does this on its own; tests call it.
    pub async fn reload(&self) -> anyhow::Result<bool> {
        match &self.managed {
            Some(m) => m.reload(false).await,
            None => Ok(false),
        }
    }

    /// Writes when tokens were last used; the poll does this now and then.
    pub async fn flush_usage(&self) {
        if let Some(m) = &self.managed {
            m.flush_usage().await;
        }
    }
}

impl Managed {
    async fn reload(&self, force: bool) -> anyhow::Result<bool> {
        let _guard = self.reloading.lock().await;
        // The version is read before the rows: rows newer than it only
        // cause one reload too many, never a missed one.
        let version = managed::version(&self.db).await?;
        let known = self.state.read().unwrap_or_else(|e| e.into_inner()).version;
        if !force && version == known {
            return Ok(false);
        }
        let rows = managed::all(&self.db).await?;
        let legacy = callers(managed::legacy(&self.db).await?)?;
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let tokens = rows
            .iter()
            .filter_map(|r| {
                let before = state.tokens.get(&r.sha256).map(Arc::as_ref);
                Entry::of(r, before).map(|e| (r.sha256.clone(), Arc::new(e)))
            })
            .collect();
        *state = State {
            version,
            tokens,
            legacy,
        };
        Ok(true)
    }

    async fn flush_usage(&self) {
        let used: Vec<(Arc<Entry>, i64)> = {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            state
                .tokens
                .values()
                .filter_map(|e| {
                    let at = e.used_at.load(Ordering::Relaxed);
                    (at > e.flushed_at.load(Ordering::Relaxed)).then(|| (e.clone(), at))
                })
                .collect()
        };
        for (e, at) in used {
            match managed::record_use(&self.db, &e.id, at).await {
                Ok(()) => e.flushed_at.fetch_max(at, Ordering::Relaxed),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot record when tokens were last used");
                    return;
                }
            };
        }
    }
}

/// Reloads changed tokens every [`RELOAD_INTERVAL`] until the store is
/// dropped. While the database cannot be read the tokens last read stay in
/// force (logged once per outage).
async fn poll(store: Weak<Managed>) {
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flushed = tokio::time::Instant::now();
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(m) = store.upgrade() else { return };
        match m.reload(false).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("the token database can be read again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %format!("{e:#}"),
                    "cannot read the token database; the tokens read last stay in force");
            }
            Err(_) => {}
        }
        if flushed.elapsed() >= USAGE_FLUSH_INTERVAL {
            m.flush_usage().await;
            flushed = tokio::time::Instant::now();
        }
    }
}
