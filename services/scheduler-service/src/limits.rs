//! Limits: global, per org, per user and the user default, on running jobs,
//! GPUs in use and queued jobs. Stored in the `limits` table so every
//! replica enforces the same values; the flags only seed USER_DEFAULT when
//! no row exists yet (SetLimits wins afterwards).
//!
//! Effective per-user limit = min(the user's own limit, else USER_DEFAULT;
//! the org's ceiling). The org's and the global rows also cap the sums over
//! the org's users and over everyone; [`LimitTable::effective`] folds the
//! global row in too, for `GetLimits`.

use std::collections::HashMap;

use sqlx::{AnyConnection, Row};
use trainmesh_common::db::Db;
use trainmesh_common::error::FieldError;
use trainmesh_common::proto::scheduler::v1 as pb;

use crate::domain::Demand;
use crate::error::{Error, Result};
use crate::plan::Usage;

/// Where a limit row applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    User,
    UserDefault,
    Org,
    Global,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Global => "GLOBAL",
            Scope::Org => "ORG",
            Scope::User => "USER",
            Scope::UserDefault => "USER_DEFAULT",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "GLOBAL" => Scope::Global,
            "ORG" => Scope::Org,
            "USER" => Scope::User,
            "USER_DEFAULT" => Scope::UserDefault,
            _ => return None,
        })
    }

    pub fn proto(self) -> pb::LimitScope {
        match self {
            Scope::Global => pb::LimitScope::Global,
            Scope::Org => pb::LimitScope::Org,
            Scope::User => pb::LimitScope::User,
            Scope::UserDefault => pb::LimitScope::UserDefault,
        }
    }

    /// Whether rows of this scope name a user or org.
    pub fn has_subject(self) -> bool {
        matches!(self, Scope::Org | Scope::User)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    RunningJobs,
    Gpus,
    QueuedJobs,
}

impl LimitKind {
    pub const ALL: [LimitKind; 3] = [
        LimitKind::RunningJobs,
        LimitKind::Gpus,
        LimitKind::QueuedJobs,
    ];

    /// The name used in `GetLimits.effective` and in explanations.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::RunningJobs => "max_running_jobs",
            LimitKind::Gpus => "max_gpus",
            LimitKind::QueuedJobs => "max_queued_jobs",
        }
    }

    pub fn current(self, u: Usage) -> u32 {
        match self {
            LimitKind::RunningJobs => u.running,
            LimitKind::Gpus => u.gpus,
            LimitKind::QueuedJobs => 0,
        }
    }

    pub fn describe(self, current: u32) -> String {
        match self {
            LimitKind::Gpus => format!("{current} GPU(s) in use"),
            _ => format!("{current} running"),
        }
    }

    pub fn needs(self, d: &Demand) -> String {
        match self {
            LimitKind::Gpus => format!(", the job needs {}", d.gpus),
            _ => String::new(),
        }
    }

    /// Whether starting a job with demand `d` on top of `u` would exceed
    /// `limit`. Queued-jobs limits are enforced at submit, not here.
    pub fn blocks(self, u: Usage, limit: u32, d: &Demand) -> bool {
        match self {
            LimitKind::RunningJobs => u.running >= limit,
            LimitKind::Gpus => u.gpus.saturating_add(d.gpus) > limit,
            LimitKind::QueuedJobs => false,
        }
    }
}

/// The three limits of one scope; `None` is "no limit here".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitValues {
    pub max_running_jobs: Option<u32>,
    pub max_gpus: Option<u32>,
    pub max_queued_jobs: Option<u32>,
}

impl LimitValues {
    pub fn get(&self, kind: LimitKind) -> Option<u32> {
        match kind {
            LimitKind::RunningJobs => self.max_running_jobs,
            LimitKind::Gpus => self.max_gpus,
            LimitKind::QueuedJobs => self.max_queued_jobs,
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == LimitValues::default()
    }
}

/// A limit value and the scope it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    pub value: u32,
    pub scope: Scope,
}

/// Every configured limit, as the planner reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitTable {
    pub global: LimitValues,
    pub user_default: LimitValues,
    pub orgs: HashMap<String, LimitValues>,
    pub users: HashMap<String, LimitValues>,
}

/// The smaller bound; on a tie the more specific scope (user first) binds.
fn tighter(a: Option<Bound>, b: Option<Bound>) -> Option<Bound> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if (y.value, y.scope) < (x.value, x.scope) {
            y
        } else {
            x
        }),
        (x, None) => x,
        (None, y) => y,
    }
}

impl LimitTable {
    /// Only a USER_DEFAULT running-jobs limit (0: none), as the skeleton had.
    pub fn per_user_running(max: u32) -> Self {
        LimitTable {
            user_default: LimitValues {
                max_running_jobs: (max > 0).then_some(max),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    pub fn from_rows(rows: &[LimitRow]) -> Self {
        let mut t = LimitTable::default();
        for r in rows {
            match r.scope {
                Scope::Global => t.global = r.values,
                Scope::UserDefault => t.user_default = r.values,
                Scope::Org => {
                    t.orgs.insert(r.subject.clone(), r.values);
                }
                Scope::User => {
                    t.users.insert(r.subject.clone(), r.values);
                }
            }
        }
        t
    }

    fn own(&self, user: &str, kind: LimitKind) -> Option<Bound> {
        match self.users.get(user).and_then(|v| v.get(kind)) {
            Some(value) => Some(Bound {
                value,
                scope: Scope::User,
            }),
            None => self.user_default.get(kind).map(|value| Bound {
                value,
                scope: Scope::UserDefault,
            }),
        }
    }

    fn org(&self, org: &str, kind: LimitKind) -> Option<Bound> {
        if org.is_empty() {
            return None;
        }
        self.orgs
            .get(org)
            .and_then(|v| v.get(kind))
            .map(|value| Bound {
                value,
                scope: Scope::Org,
            })
    }

    /// The per-user limit: min(user's own else USER_DEFAULT; org ceiling).
    pub fn user_limit(&self, user: &str, org: &str, kind: LimitKind) -> Option<Bound> {
        tighter(self.own(user, kind), self.org(org, kind))
    }

    /// What binds a user (and/or org): the per-user limit, the org's and
    /// the global ceiling, whichever is smallest.
    pub fn effective(
        &self,
        user: Option<&str>,
        org: Option<&str>,
        kind: LimitKind,
    ) -> Option<Bound> {
        let user_part = user.and_then(|u| self.own(u, kind));
        let org_part = org.and_then(|o| self.org(o, kind));
        let global = self.global.get(kind).map(|value| Bound {
            value,
            scope: Scope::Global,
        });
        tighter(tighter(user_part, org_part), global)
    }
}

/// One stored row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitRow {
    pub scope: Scope,
    pub subject: String,
    pub values: LimitValues,
}

fn opt_u32(field: &str, v: Option<i32>) -> Result<Option<u32>, FieldError> {
    match v {
        None => Ok(None),
        Some(n) if n < 0 => Err(FieldError::new(field, "must not be negative")),
        Some(n) => Ok(Some(n as u32)),
    }
}

impl TryFrom<Option<pb::Limits>> for LimitRow {
    type Error = FieldError;

    fn try_from(l: Option<pb::Limits>) -> Result<Self, FieldError> {
        let l = l.ok_or_else(|| FieldError::new("limits", "is required"))?;
        let scope = match pb::LimitScope::try_from(l.scope) {
            Ok(pb::LimitScope::Global) => Scope::Global,
            Ok(pb::LimitScope::Org) => Scope::Org,
            Ok(pb::LimitScope::User) => Scope::User,
            Ok(pb::LimitScope::UserDefault) => Scope::UserDefault,
            _ => {
                return Err(FieldError::new(
                    "limits.scope",
                    "must be GLOBAL, ORG, USER or USER_DEFAULT",
                ))
            }
        };
        let subject = l.subject.trim().to_owned();
        if scope.has_subject() && subject.is_empty() {
            return Err(FieldError::new(
                "limits.subject",
                format!("is required for scope {}", scope.name()),
            ));
        }
        if !scope.has_subject() && !subject.is_empty() {
            return Err(FieldError::new(
                "limits.subject",
                format!("must be empty for scope {}", scope.name()),
            ));
        }
        Ok(LimitRow {
            scope,
            subject,
            values: LimitValues {
                max_running_jobs: opt_u32("limits.max_running_jobs", l.max_running_jobs)?,
                max_gpus: opt_u32("limits.max_gpus", l.max_gpus)?,
                max_queued_jobs: opt_u32("limits.max_queued_jobs", l.max_queued_jobs)?,
            },
        })
    }
}

impl LimitRow {
    pub fn proto(&self) -> pb::Limits {
        let i = |v: Option<u32>| v.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
        pb::Limits {
            scope: self.scope.proto() as i32,
            subject: self.subject.clone(),
            max_running_jobs: i(self.values.max_running_jobs),
            max_gpus: i(self.values.max_gpus),
            max_queued_jobs: i(self.values.max_queued_jobs),
        }
    }
}

fn to_u32(v: Option<i64>) -> Option<u32> {
    v.map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

pub async fn load(db: &Db) -> Result<Vec<LimitRow>> {
    let rows = sqlx::query(
        "SELECT scope, subject, max_running_jobs, max_gpus, max_queued_jobs FROM limits \
         ORDER BY scope, subject",
    )
    .fetch_all(&db.read)
    .await?;
    rows.iter()
        .map(|r| {
            let scope: String = r.try_get(0)?;
            Ok(LimitRow {
                scope: Scope::parse(&scope)
                    .ok_or_else(|| Error::Corrupt(format!("limit scope `{scope}`")))?,
                subject: r.try_get(1)?,
                values: LimitValues {
                    max_running_jobs: to_u32(r.try_get(2)?),
                    max_gpus: to_u32(r.try_get(3)?),
                    max_queued_jobs: to_u32(r.try_get(4)?),
                },
            })
        })
        .collect()
}

/// Stores a row, in the caller's transaction; a row with no limit at all
/// is deleted.
pub async fn store(conn: &mut AnyConnection, row: &LimitRow, now: i64) -> Result<()> {
    if row.values.is_empty() {
        sqlx::query("DELETE FROM limits WHERE scope = $1 AND subject = $2")
            .bind(row.scope.name())
            .bind(&row.subject)
            .execute(&mut *conn)
            .await?;
        return Ok(());
    }
    let v = |n: Option<u32>| n.map(i64::from);
    sqlx::query(
        "INSERT INTO limits (scope, subject, max_running_jobs, max_gpus, max_queued_jobs, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (scope, subject) DO UPDATE SET \
         max_running_jobs = excluded.max_running_jobs, max_gpus = excluded.max_gpus, \
         max_queued_jobs = excluded.max_queued_jobs, updated_at = excluded.updated_at",
    )
    .bind(row.scope.name())
    .bind(&row.subject)
    .bind(v(row.values.max_running_jobs))
    .bind(v(row.values.max_gpus))
    .bind(v(row.values.max_queued_jobs))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Seeds USER_DEFAULT from the flags unless a row exists (then the stored
/// row, set by an admin, wins). Nothing is stored for "no limits at all".
pub async fn seed_user_default(db: &Db, values: LimitValues, now: i64) -> Result<()> {
    if values.is_empty() {
        return Ok(());
    }
    let v = |n: Option<u32>| n.map(i64::from);
    sqlx::query(
        "INSERT INTO limits (scope, subject, max_running_jobs, max_gpus, max_queued_jobs, updated_at) \
         VALUES ('USER_DEFAULT', '', $1, $2, $3, $4) ON CONFLICT (scope, subject) DO NOTHING",
    )
    .bind(v(values.max_running_jobs))
    .bind(v(values.max_gpus))
    .bind(v(values.max_queued_jobs))
    .bind(now)
    .execute(&db.write)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_limit_is_the_tightest_with_its_scope() {
        let mut t = LimitTable::per_user_running(2);
        t.orgs.insert(
            "ml".into(),
            LimitValues {
                max_running_jobs: Some(1),
                max_gpus: Some(8),
                ..Default::default()
            },
        );
        t.users.insert(
            "alice".into(),
            LimitValues {
                max_gpus: Some(4),
                ..Default::default()
            },
        );
        let b = t.user_limit("alice", "ml", LimitKind::RunningJobs).unwrap();
        assert_eq!((b.value, b.scope), (1, Scope::Org));
        let b = t.user_limit("alice", "ml", LimitKind::Gpus).unwrap();
        assert_eq!((b.value, b.scope), (4, Scope::User));
        let b = t
            .user_limit("bob", "other", LimitKind::RunningJobs)
            .unwrap();
        assert_eq!((b.value, b.scope), (2, Scope::UserDefault));
        assert!(t.user_limit("bob", "", LimitKind::QueuedJobs).is_none());
        t.global.max_gpus = Some(3);
        let b = t
            .effective(Some("alice"), Some("ml"), LimitKind::Gpus)
            .unwrap();
        assert_eq!((b.value, b.scope), (3, Scope::Global));
    }

    #[test]
    fn limit_rows_name_the_bad_field() {
        let bad = pb::Limits {
            scope: pb::LimitScope::User as i32,
            subject: "alice".into(),
            max_gpus: Some(-1),
            ..Default::default()
        };
        assert_eq!(
            LimitRow::try_from(Some(bad)).unwrap_err().field,
            "limits.max_gpus"
        );
        let no_subject = pb::Limits {
            scope: pb::LimitScope::Org as i32,
            ..Default::default()
        };
        assert_eq!(
            LimitRow::try_from(Some(no_subject)).unwrap_err().field,
            "limits.subject"
        );
        assert_eq!(
            LimitRow::try_from(Some(pb::Limits::default()))
                .unwrap_err()
                .field,
            "limits.scope"
        );
    }
}
