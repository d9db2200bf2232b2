//! The audit log: append-only records of who changed what, kept by the
//! service that owns the change, in the same transaction as the change
//! (a change is never committed without its record, nor a record without
//! its change).
//!
//! Every service's audit table has the one schema made here, and
//! [`AuditApi`] serves `trainmesh.audit.v1.AuditService` over one or more
//! such tables (job-service has two: its own database's and the token
//! database's). Listing is newest first, paged by a keyset on (time, id),
//! so pages stay stable while records are added and merge across tables.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use sqlx::{AnyConnection, Row};
use tonic::{Request, Response, Status};

use crate::auth::{caller, Role};
use crate::db::{Db, StartupLock};
use crate::error::FieldError;
use crate::proto::audit::v1 as pb;
use crate::time::{from_timestamp, to_timestamp};

/// What an audit record says was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditAction {
    ApproveJob,
    RejectJob,
    SetLimits,
    HoldQueue,
    ReleaseQueue,
    /// An admin cancelling another user's job.
    CancelJob,
    CreateToken,
    RevokeToken,
    /// A cordoned runner let take work again.
    UncordonRunner,
}

impl AuditAction {
    pub const ALL: [AuditAction; 9] = [
        AuditAction::ApproveJob,
        AuditAction::RejectJob,
        AuditAction::SetLimits,
        AuditAction::HoldQueue,
        AuditAction::ReleaseQueue,
        AuditAction::CancelJob,
        AuditAction::CreateToken,
        AuditAction::RevokeToken,
        AuditAction::UncordonRunner,
    ];

    /// The name stored and shown: the RPC's name in snake case.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::ApproveJob => "approve_job",
            AuditAction::RejectJob => "reject_job",
            AuditAction::SetLimits => "set_limits",
            AuditAction::HoldQueue => "hold_queue",
            AuditAction::ReleaseQueue => "release_queue",
            AuditAction::CancelJob => "cancel_job",
            AuditAction::CreateToken => "create_token",
            AuditAction::RevokeToken => "revoke_token",
            AuditAction::UncordonRunner => "uncordon_runner",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// An audit table. The names are fixed so that two tables never meet in
/// one database (the token database may be a service's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditTable(&'static str);

impl AuditTable {
    /// A service's own database.
    pub const SERVICE: AuditTable = AuditTable("audit_events");
    /// The token database (token changes).
    pub const TOKENS: AuditTable = AuditTable("auth_audit_events");

    /// Creates the table if missing, under the start-up lock (replicas
    /// starting together would race on the DDL).
    pub async fn prepare(self, db: &Db) -> anyhow::Result<()> {
        let mut lock = StartupLock::acquire(db).await?;
        self.create(lock.conn()).await?;
        lock.release().await
    }

    /// The DDL alone, for callers that already hold the start-up lock.
    pub(crate) async fn create(self, conn: &mut AnyConnection) -> anyhow::Result<()> {
        let t = self.0;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (id TEXT PRIMARY KEY, event_time BIGINT NOT NULL, \
             actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, \
             details TEXT NOT NULL, correlation_id TEXT NOT NULL)"
        ))
        .execute(&mut *conn)
        .await?;
        sqlx::query(&format!(
            "CREATE INDEX IF NOT EXISTS {t}_time ON {t} (event_time, id)"
        ))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// One record to write.
#[derive(Clone, Debug)]
pub struct AuditRecord<'a> {
    pub actor: &'a str,
    pub action: AuditAction,
    pub target: &'a str,
    pub details: BTreeMap<&'static str, String>,
}

impl<'a> AuditRecord<'a> {
    pub fn new(actor: &'a str, action: AuditAction, target: &'a str) -> Self {
        Self {
            actor,
            action,
            target,
            details: BTreeMap::new(),
        }
    }

    /// Adds a detail; empty values are left out.
    pub fn detail(mut self, key: &'static str, value: impl Into<String>) -> Self {
        let value = value.into();
        if !value.is_empty() {
            self.details.insert(key, value);
        }
        self
    }

    /// Inserts the record on `conn`, inside the caller's transaction, at
    /// `now` (µs), under the current request's correlation id.
    pub async fn write(
        &self,
        conn: &mut AnyConnection,
        table: AuditTable,
        now: i64,
    ) -> sqlx::Result<()> {
        let details = serde_json::to_string(&self.details).unwrap_or_else(|_| "{}".into());
        sqlx::query(&format!(
            "INSERT INTO {} (id, event_time, actor, action, target, details, correlation_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            table.0
        ))
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(now)
        .bind(self.actor)
        .bind(self.action.as_str())
        .bind(self.target)
        .bind(details)
        .bind(crate::correlation::current().unwrap_or_default())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// A stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub id: String,
    pub time: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub details: BTreeMap<String, String>,
    pub correlation_id: String,
}

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// A validated ListAuditEvents request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub since: Option<i64>,
    pub actor: Option<String>,
    pub action: Option<AuditAction>,
    pub limit: usize,
    /// Only records before this (time, id): the page token.
    pub before: Option<(i64, String)>,
}

impl TryFrom<pb::ListAuditEventsRequest> for AuditQuery {
    type Error = FieldError;

    fn try_from(r: pb::ListAuditEventsRequest) -> Result<Self, FieldError> {
        let limit = match r.page_size {
            n if n < 0 => return Err(FieldError::new("page_size", "must not be negative")),
            0 => DEFAULT_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let action = match r.action.trim() {
            "" => None,
            a => Some(AuditAction::parse(a).ok_or_else(|| {
                let known: Vec<&str> = AuditAction::ALL.iter().map(|a| a.as_str()).collect();
                FieldError::new(
                    "action",
                    format!("`{a}` is not an audited action ({})", known.join(", ")),
                )
            })?),
        };
        let before = match r.page_token.as_str() {
            "" => None,
            t => Some(decode_token(t).ok_or_else(|| {
                FieldError::new("page_token", "is not a token this service issued")
            })?),
        };
        let actor = r.actor.trim();
        Ok(AuditQuery {
            since: r.since.as_ref().map(from_timestamp),
            actor: (!actor.is_empty()).then(|| actor.to_owned()),
            action,
            limit,
            before,
        })
    }
}

fn encode_token(time: i64, id: &str) -> String {
    format!("{time}_{id}")
}

fn decode_token(t: &str) -> Option<(i64, String)> {
    let (time, id) = t.split_once('_')?;
    (!id.is_empty()).then_some(())?;
    Some((time.parse().ok()?, id.to_owned()))
}

/// At most `q.limit + 1` records of one table matching `q`, newest first.
async fn list_table(db: &Db, table: AuditTable, q: &AuditQuery) -> sqlx::Result<Vec<AuditEvent>> {
    let (before_time, before_id) = q.before.clone().unwrap_or((i64::MAX, String::new()));
    // The placeholders are always bound; a filter that is off compares
    // with a value that lets every row through.
    let rows = sqlx::query(&format!(
        "SELECT id, event_time, actor, action, target, details, correlation_id FROM {} \
         WHERE event_time >= $1 AND ($2 = '' OR actor = $2) AND ($3 = '' OR action = $3) \
         AND (event_time < $4 OR (event_time = $4 AND ($5 = '' OR id < $5))) \
         ORDER BY event_time DESC, id DESC LIMIT $6",
        table.0
    ))
    .bind(q.since.unwrap_or(i64::MIN))
    .bind(q.actor.clone().unwrap_or_default())
    .bind(q.action.map(|a| a.as_str()).unwrap_or(""))
    .bind(before_time)
    .bind(before_id)
    .bind(i64::try_from(q.limit + 1).unwrap_or(i64::MAX))
    .fetch_all(&db.read)
    .await?;
    rows.iter()
        .map(|r| {
            let details: String = r.try_get(5)?;
            Ok(AuditEvent {
                id: r.try_get(0)?,
                time: r.try_get(1)?,
                actor: r.try_get(2)?,
                action: r.try_get(3)?,
                target: r.try_get(4)?,
                details: serde_json::from_str(&details).unwrap_or_default(),
                correlation_id: r.try_get(6)?,
            })
        })
        .collect()
}

/// One page of the records of every table in `sources`, merged newest
/// first, and the token of the next page (empty at the end).
pub async fn list(
    sources: &[(Db, AuditTable)],
    q: &AuditQuery,
) -> sqlx::Result<(Vec<AuditEvent>, String)> {
    let mut all = Vec::new();
    for (db, table) in sources {
        all.extend(list_table(db, *table, q).await?);
    }
    all.sort_by(|a, b| (b.time, &b.id).cmp(&(a.time, &a.id)));
    all.dedup_by(|a, b| a.id == b.id);
    let more = all.len() > q.limit;
    all.truncate(q.limit);
    let next = match all.last() {
        Some(last) if more => encode_token(last.time, &last.id),
        _ => String::new(),
    };
    Ok((all, next))
}

fn to_proto(e: AuditEvent, service: &str) -> pb::AuditEvent {
    pb::AuditEvent {
        id: e.id,
        time: Some(to_timestamp(e.time)),
        actor: e.actor,
        action: e.action,
        target: e.target,
        details: e.details.into_iter().collect(),
        correlation_id: e.correlation_id,
        service: service.to_owned(),
    }
}

/// `trainmesh.audit.v1.AuditService` over a service's audit tables. `E`
/// is the service's error type, so that errors reach callers through the
/// service's one mapping to `Status`.
pub struct AuditApi<E> {
    service: &'static str,
    sources: Vec<(Db, AuditTable)>,
    _error: PhantomData<fn() -> E>,
}

impl<E> AuditApi<E> {
    pub fn new(service: &'static str, sources: Vec<(Db, AuditTable)>) -> Self {
        Self {
            service,
            sources,
            _error: PhantomData,
        }
    }
}

#[tonic::async_trait]
impl<E> pb::audit_service_server::AuditService for AuditApi<E>
where
    E: From<FieldError> + From<sqlx::Error> + Into<Status> + 'static,
{
    async fn list_audit_events(
        &self,
        req: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        caller(&req)?.require(Role::Admin)?;
        let q = AuditQuery::try_from(req.into_inner()).map_err(|e| E::from(e).into())?;
        let (events, next_page_token) = list(&self.sources, &q)
            .await
            .map_err(|e| E::from(e).into())?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events
                .into_iter()
                .map(|e| to_proto(e, self.service))
                .collect(),
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{connect, Durability};
    use crate::testing::all_dbs;

    async fn db_with(url: &str, tables: &[AuditTable]) -> Db {
        let db = connect(url, Durability::Full).await.unwrap();
        for t in tables {
            t.prepare(&db).await.unwrap();
        }
        db
    }

    async fn write(db: &Db, table: AuditTable, rec: AuditRecord<'_>, now: i64) {
        let mut tx = db.begin_write().await.unwrap();
        rec.write(&mut tx, table, now).await.unwrap();
        tx.commit().await.unwrap();
    }

    #[tokio::test]
    async fn records_are_listed_newest_first_filtered_and_paged_across_tables() {
        for tdb in all_dbs().await {
            let db = db_with(&tdb.url, &[AuditTable::SERVICE, AuditTable::TOKENS]).await;
            let rec = |actor, action, target| AuditRecord::new(actor, action, target);
            write(
                &db,
                AuditTable::SERVICE,
                rec("admin", AuditAction::CancelJob, "j1").detail("owner", "alice"),
                10,
            )
            .await;
            write(
                &db,
                AuditTable::TOKENS,
                rec("admin", AuditAction::CreateToken, "tok_1"),
                20,
            )
            .await;
            write(
                &db,
                AuditTable::SERVICE,
                rec("root", AuditAction::CancelJob, "j2"),
                30,
            )
            .await;
            write(
                &db,
                AuditTable::TOKENS,
                rec("admin", AuditAction::RevokeToken, "tok_1"),
                30,
            )
            .await;
            let sources = vec![
                (db.clone(), AuditTable::SERVICE),
                (db.clone(), AuditTable::TOKENS),
            ];

            let mut q = AuditQuery {
                limit: 3,
                ..Default::default()
            };
            let (page, next) = list(&sources, &q).await.unwrap();
            let targets: Vec<_> = page.iter().map(|e| (e.time, e.target.as_str())).collect();
            assert_eq!(targets.len(), 3, "{}", tdb.label);
            assert_eq!(targets[2], (20, "tok_1"), "{}", tdb.label);
            assert!(!next.is_empty());
            q.before = decode_token(&next);
            let (rest, next) = list(&sources, &q).await.unwrap();
            assert_eq!(rest.len(), 1);
            assert_eq!(rest[0].target, "j1");
            assert_eq!(
                rest[0].details.get("owner").map(String::as_str),
                Some("alice")
            );
            assert!(next.is_empty(), "{}", tdb.label);

            let q = AuditQuery {
                limit: 10,
                actor: Some("admin".into()),
                action: Some(AuditAction::CancelJob),
                ..Default::default()
            };
            let (only, _) = list(&sources, &q).await.unwrap();
            assert_eq!(only.len(), 1);
            assert_eq!(only[0].target, "j1");

            let q = AuditQuery {
                limit: 10,
                since: Some(30),
                ..Default::default()
            };
            assert_eq!(
                list(&sources, &q).await.unwrap().0.len(),
                2,
                "{}",
                tdb.label
            );
        }
    }

    #[tokio::test]
    async fn a_rolled_back_change_leaves_no_record() {
        for tdb in all_dbs().await {
            let db = db_with(&tdb.url, &[AuditTable::SERVICE]).await;
            let mut tx = db.begin_write().await.unwrap();
            AuditRecord::new("admin", AuditAction::HoldQueue, "queue")
                .write(&mut tx, AuditTable::SERVICE, 1)
                .await
                .unwrap();
            tx.rollback().await.unwrap();
            let q = AuditQuery {
                limit: 10,
                ..Default::default()
            };
            let (events, _) = list(&[(db, AuditTable::SERVICE)], &q).await.unwrap();
            assert!(events.is_empty(), "{}", tdb.label);
        }
    }

    #[test]
    fn bad_requests_name_the_field() {
        let bad = |r: pb::ListAuditEventsRequest| AuditQuery::try_from(r).unwrap_err().field;
        assert_eq!(
            bad(pb::ListAuditEventsRequest {
                action: "drop_tables".into(),
                ..Default::default()
            }),
            "action"
        );
        assert_eq!(
            bad(pb::ListAuditEventsRequest {
                page_token: "nope".into(),
                ..Default::default()
            }),
            "page_token"
        );
        assert_eq!(
            bad(pb::ListAuditEventsRequest {
                page_size: -1,
                ..Default::default()
            }),
            "page_size"
        );
        let q = AuditQuery::try_from(pb::ListAuditEventsRequest {
            action: "hold_queue".into(),
            page_size: 5000,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (q.action, q.limit),
            (Some(AuditAction::HoldQueue), MAX_PAGE)
        );
    }
}
