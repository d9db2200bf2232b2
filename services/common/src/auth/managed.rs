//! The token database: tokens created, listed and revoked at run time.
//!
//! Tables (made at start by whichever service comes first, under the
//! start-up lock):
//! - `managed_tokens`: one row per token, with only the SHA-256 of its
//!   secret; revoked tokens stay, marked, so that their users are told so;
//! - `managed_tokens_version`: one counter, raised in every transaction
//!   that changes a token, which every service polls to know when to
//!   reload (a cheap read, whatever the number of tokens);
//! - `auth_tokens`: the older hand-filled table (hash, user, org, roles),
//!   still read;
//! - the token changes' audit table ([`crate::audit::AuditTable::TOKENS`]),
//!   written in the same transaction as the change.

use sqlx::{AnyConnection, Row};

use super::{generate_token, hash_token, Role};
use crate::db::{Db, StartupLock};
use crate::error::FieldError;
use crate::proto::auth::v1 as pb;
use crate::time::{from_duration, from_timestamp, to_opt_timestamp, to_timestamp};

const COLUMNS: &str = "id, token_sha256, user_name, org, roles, description, created_by, \
                       created_at, expires_at, last_used_at, revoked_at, revoked_by";

/// Longest user or org name.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest description.
pub const MAX_DESCRIPTION_CHARS: usize = 1024;
/// The longest lifetime a token can be given (beyond it: no expiry).
const MAX_TTL_SECS: u64 = 100 * 366 * 86_400;

/// Creates the token database's tables if missing.
pub async fn prepare(db: &Db) -> anyhow::Result<()> {
    let mut lock = StartupLock::acquire(db).await?;
    let conn = lock.conn();
    for ddl in [
        "CREATE TABLE IF NOT EXISTS managed_tokens (id TEXT PRIMARY KEY, \
         token_sha256 TEXT NOT NULL UNIQUE, user_name TEXT NOT NULL, org TEXT NOT NULL, \
         roles TEXT NOT NULL, description TEXT NOT NULL, created_by TEXT NOT NULL, \
         created_at BIGINT NOT NULL, expires_at BIGINT, last_used_at BIGINT, \
         revoked_at BIGINT, revoked_by TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS managed_tokens_version (id BIGINT PRIMARY KEY, \
         version BIGINT NOT NULL)",
        "INSERT INTO managed_tokens_version (id, version) VALUES (1, 0) \
         ON CONFLICT (id) DO NOTHING",
        "CREATE TABLE IF NOT EXISTS auth_tokens (token_sha256 TEXT PRIMARY KEY, \
         user_name TEXT NOT NULL, org TEXT NOT NULL, roles TEXT NOT NULL)",
    ] {
        sqlx::query(ddl).execute(&mut *conn).await?;
    }
    crate::audit::AuditTable::TOKENS.create(conn).await?;
    lock.release().await
}

/// One stored token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub sha256: String,
    pub user: String,
    pub org: String,
    /// As stored; names this build does not know are kept, and skipped
    /// when authenticating.
    pub roles: Vec<String>,
    pub description: String,
    pub created_by: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub revoked_by: String,
}

impl TokenRow {
    fn from_row(r: &sqlx::any::AnyRow) -> sqlx::Result<Self> {
        let roles: String = r.try_get(4)?;
        Ok(TokenRow {
            id: r.try_get(0)?,
            sha256: r.try_get(1)?,
            user: r.try_get(2)?,
            org: r.try_get(3)?,
            roles: roles
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().to_owned())
                .collect(),
            description: r.try_get(5)?,
            created_by: r.try_get(6)?,
            created_at: r.try_get(7)?,
            expires_at: r.try_get(8)?,
            last_used_at: r.try_get(9)?,
            revoked_at: r.try_get(10)?,
            revoked_by: r.try_get(11)?,
        })
    }

    /// The proto form: never the hash.
    pub fn proto(&self) -> pb::Token {
        pb::Token {
            id: self.id.clone(),
            user: self.user.clone(),
            org: self.org.clone(),
            roles: self.roles.clone(),
            description: self.description.clone(),
            create_time: Some(to_timestamp(self.created_at)),
            expire_time: self.expires_at.map(to_timestamp),
            last_use_time: self.last_used_at.and_then(to_opt_timestamp),
            revoked: self.revoked_at.is_some(),
            revoke_time: self.revoked_at.map(to_timestamp),
            created_by: self.created_by.clone(),
            revoked_by: self.revoked_by.clone(),
        }
    }
}

/// A validated CreateToken request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewToken {
    pub user: String,
    pub org: String,
    pub roles: Vec<Role>,
    pub description: String,
    pub expires_at: Option<i64>,
}

fn name(field: &str, value: &str) -> Result<String, FieldError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if v.chars().count() > MAX_NAME_CHARS {
        return Err(FieldError::new(
            field,
            format!("is longer than {MAX_NAME_CHARS} characters"),
        ));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_alphanumeric() || "._@+-".contains(*c)))
    {
        return Err(FieldError::new(
            field,
            format!("contains {c:?}; use letters, digits and ._@+-"),
        ));
    }
    Ok(v.to_owned())
}

impl NewToken {
    /// Validates a request at `now` (µs); errors name the field.
    pub fn parse(r: &pb::CreateTokenRequest, now: i64) -> Result<Self, FieldError> {
        let user = name("user", &r.user)?;
        let org = name("org", &r.org)?;
        if r.roles.is_empty() {
            return Err(FieldError::new(
                "roles",
                format!("needs at least one of {}", Role::names()),
            ));
        }
        let mut roles = Vec::new();
        for (i, s) in r.roles.iter().enumerate() {
            let role = Role::parse(s).ok_or_else(|| {
                FieldError::new(
                    format!("roles[{i}]"),
                    format!("`{s}` is not a role ({})", Role::names()),
                )
            })?;
            if !roles.contains(&role) {
                roles.push(role);
            }
        }
        let description = r.description.trim().to_owned();
        if description.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err(FieldError::new(
                "description",
                format!("is longer than {MAX_DESCRIPTION_CHARS} characters"),
            ));
        }
        if description.chars().any(char::is_control) {
            return Err(FieldError::new(
                "description",
                "must be one line without control characters",
            ));
        }
        let expires_at = match (&r.expire_time, &r.ttl) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new("ttl", "give expire_time or ttl, not both"))
            }
            (Some(t), None) => {
                let at = from_timestamp(t);
                if at <= now {
                    return Err(FieldError::new("expire_time", "must be in the future"));
                }
                Some(at)
            }
            (None, Some(d)) => {
                let ttl = from_duration(d)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| FieldError::new("ttl", "must be positive"))?;
                if ttl.as_secs() > MAX_TTL_SECS {
                    return Err(FieldError::new(
                        "ttl",
                        "is longer than 100 years; leave it out for a token that does not expire",
                    ));
                }
                Some(now.saturating_add(ttl.as_micros() as i64))
            }
            (None, None) => None,
        };
        Ok(NewToken {
            user,
            org,
            roles,
            description,
            expires_at,
        })
    }
}

fn new_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("tok_{}", hex::encode(bytes))
}

/// Every service reloads when this changes.
async fn bump_version(conn: &mut AnyConnection) -> sqlx::Result<()> {
    sqlx::query("UPDATE managed_tokens_version SET version = version + 1 WHERE id = 1")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Stores a new token in the caller's transaction; returns it and its
/// secret (the only time the secret exists outside the caller's hands).
pub async fn create(
    conn: &mut AnyConnection,
    t: &NewToken,
    by: &str,
    now: i64,
) -> sqlx::Result<(TokenRow, String)> {
    let secret = generate_token();
    let roles: Vec<&str> = t.roles.iter().map(|r| r.as_str()).collect();
    let row = TokenRow {
        id: new_id(),
        sha256: hash_token(&secret),
        user: t.user.clone(),
        org: t.org.clone(),
        roles: roles.iter().map(|s| s.to_string()).collect(),
        description: t.description.clone(),
        created_by: by.to_owned(),
        created_at: now,
        expires_at: t.expires_at,
        last_used_at: None,
        revoked_at: None,
        revoked_by: String::new(),
    };
    sqlx::query(&format!(
        "INSERT INTO managed_tokens ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, '')"
    ))
    .bind(&row.id)
    .bind(&row.sha256)
    .bind(&row.user)
    .bind(&row.org)
    .bind(roles.join(","))
    .bind(&row.description)
    .bind(&row.created_by)
    .bind(row.created_at)
    .bind(row.expires_at)
    .execute(&mut *conn)
    .await?;
    bump_version(conn).await?;
    Ok((row, secret))
}

/// What [`revoke`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revoked {
    NotFound,
    /// Revoked earlier; nothing changed.
    Already(TokenRow),
    Now(TokenRow),
}

/// Revokes a token in the caller's transaction.
pub async fn revoke(
    conn: &mut AnyConnection,
    id: &str,
    by: &str,
    now: i64,
) -> sqlx::Result<Revoked> {
    let changed = sqlx::query(
        "UPDATE managed_tokens SET revoked_at = $1, revoked_by = $2 \
         WHERE id = $3 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(by)
    .bind(id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if changed > 0 {
        bump_version(conn).await?;
    }
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM managed_tokens WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        None => Revoked::NotFound,
        Some(r) if changed > 0 => Revoked::Now(TokenRow::from_row(&r)?),
        Some(r) => Revoked::Already(TokenRow::from_row(&r)?),
    })
}

/// One page of tokens, oldest first, after the keyset `after`
/// (created_at, id); `user` empty for everyone's.
pub async fn list(
    db: &Db,
    user: &str,
    after: Option<(i64, String)>,
    limit: i64,
) -> sqlx::Result<Vec<TokenRow>> {
    let (after_time, after_id) = after.unwrap_or((i64::MIN, String::new()));
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM managed_tokens WHERE ($1 = '' OR user_name = $1) \
         AND (created_at > $2 OR (created_at = $2 AND id > $3)) \
         ORDER BY created_at, id LIMIT $4"
    ))
    .bind(user)
    .bind(after_time)
    .bind(after_id)
    .bind(limit)
    .fetch_all(&db.read)
    .await?;
    rows.iter().map(TokenRow::from_row).collect()
}

/// The change counter.
pub(crate) async fn version(db: &Db) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT version FROM managed_tokens_version WHERE id = 1")
        .fetch_one(&db.read)
        .await
}

/// Every token, for a reload.
pub(crate) async fn all(db: &Db) -> sqlx::Result<Vec<TokenRow>> {
    let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM managed_tokens"))
        .fetch_all(&db.read)
        .await?;
    rows.iter().map(TokenRow::from_row).collect()
}

/// Records that a token was used at `at` (never moves it back). Not a
/// change the other services need to know of: the version stays.
pub(crate) async fn record_use(db: &Db, id: &str, at: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE managed_tokens SET last_used_at = $1 \
         WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)",
    )
    .bind(at)
    .bind(id)
    .execute(&db.write)
    .await?;
    Ok(())
}

/// The rows of the hand-filled `auth_tokens` table.
pub(crate) async fn legacy(db: &Db) -> anyhow::Result<Vec<super::TokenEntry>> {
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
        entries.push(super::TokenEntry {
            sha256: r.try_get(0)?,
            user,
            org: r.try_get(2)?,
            roles,
        });
    }
    Ok(entries)
}

/// A ListTokens page token: the keyset of the page's last token.
pub fn encode_page_token(row: &TokenRow) -> String {
    format!("{}_{}", row.created_at, row.id)
}

pub fn decode_page_token(token: &str) -> Result<Option<(i64, String)>, FieldError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || FieldError::new("page_token", "is not a token this service issued");
    let (time, id) = token.split_once('_').ok_or_else(bad)?;
    let time = time.parse().map_err(|_| bad())?;
    if id.is_empty() {
        return Err(bad());
    }
    Ok(Some((time, id.to_owned())))
}
