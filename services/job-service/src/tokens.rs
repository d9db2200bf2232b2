//! `trainmesh.auth.v1.TokenService`: tokens created, listed and revoked
//! (admin only) in the token database that every service reads, and
//! runners' credentials traded for a join token. Each
//! change is written with its audit record in one transaction of that
//! database, and takes effect in this service at once (the others reload
//! within a second).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use trainmesh_common::audit::{AuditAction, AuditRecord, AuditTable};
use trainmesh_common::auth::managed::{self, NewToken, Revoked, TokenRow};
use trainmesh_common::auth::{caller, Caller, Role, TokenStore};
use trainmesh_common::db::Db;
use trainmesh_common::error::FieldError;
use trainmesh_common::proto::auth::v1 as pb;
use trainmesh_common::time::{now_micros, to_timestamp};

use crate::error::{Error, Result};

const DEFAULT_PAGE_SIZE: i64 = 100;
const MAX_PAGE_SIZE: i64 = 1000;

#[derive(Clone)]
pub struct TokenApi {
    pub tokens: Arc<TokenStore>,
}

impl TokenApi {
    fn db(&self) -> Result<&Db> {
        self.tokens.database().ok_or_else(|| {
            Error::FailedPrecondition(
                "this mesh reads tokens from files only; to create and revoke tokens, give \
                 every service a token database in --tokens (sqlite:PATH or postgres://…)"
                    .into(),
            )
        })
    }

    async fn create(
        &self,
        who: &Caller,
        r: &pb::CreateTokenRequest,
    ) -> Result<pb::CreateTokenResponse> {
        let now = now_micros();
        let new = NewToken::parse(r, now)?;
        let (row, secret) = self.store_new(who, &new, now).await?;
        tracing::info!(token = %row.id, user = %row.user, by = %who.user, "token created");
        Ok(pb::CreateTokenResponse {
            token: Some(row.proto()),
            secret,
        })
    }

    /// Stores a new token with its audit record, in one transaction, and
    /// makes it work here at once.
    async fn store_new(
        &self,
        who: &Caller,
        new: &NewToken,
        now: i64,
    ) -> Result<(TokenRow, String)> {
        let mut tx = self.db()?.begin_write().await?;
        let (row, secret) = managed::create(&mut tx, new, &who.user, now).await?;
        AuditRecord::new(&who.user, AuditAction::CreateToken, &row.id)
            .detail("user", &row.user)
            .detail("org", &row.org)
            .detail("roles", row.roles.join(","))
            .detail(
                "expires",
                row.expires_at
                    .map(|at| to_timestamp(at).to_string())
                    .unwrap_or_default(),
            )
            .detail("description", &row.description)
            .write(&mut tx, AuditTable::TOKENS, now)
            .await?;
        tx.commit().await?;
        self.tokens.apply(&row).await;
        Ok((row, secret))
    }

    /// A runner's own credential for `name`, once per name.
    async fn join(&self, who: &Caller, name: &str) -> Result<pb::JoinRunnerResponse> {
        let now = now_micros();
        let ask = pb::CreateTokenRequest {
            user: name.to_owned(),
            org: who.org.clone(),
            roles: vec![Role::Runner.as_str().to_owned()],
            description: format!("runner credential, joined with a token of `{}`", who.user),
            ..Default::default()
        };
        let new = NewToken::parse(&ask, now).map_err(|e| FieldError::new("name", e.description))?;
        let db = self.db()?;
        let live = managed::list(db, &new.user, None, MAX_PAGE_SIZE)
            .await?
            .into_iter()
            .find(|t| {
                t.roles.iter().any(|r| r == Role::Runner.as_str())
                    && t.revoked_at.is_none()
                    && t.expires_at.is_none_or(|at| at > now)
            });
        if let Some(t) = live {
            return Err(Error::AlreadyExists(format!(
                "runner `{}` has already joined (credential `{}`); a name has one credential \
                 at a time: revoke it (`trainctl tokens revoke {}`) to let another machine \
                 take the name",
                new.user, t.id, t.id
            )));
        }
        let (row, secret) = self.store_new(who, &new, now).await?;
        tracing::info!(token = %row.id, runner = %row.user, by = %who.user, "runner joined");
        Ok(pb::JoinRunnerResponse {
            token: Some(row.proto()),
            secret,
        })
    }

    async fn list(&self, r: &pb::ListTokensRequest) -> Result<pb::ListTokensResponse> {
        let limit = match i64::from(r.page_size) {
            n if n < 0 => return Err(FieldError::new("page_size", "must not be negative").into()),
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = managed::decode_page_token(&r.page_token)?;
        let mut rows = managed::list(self.db()?, r.user.trim(), after, limit + 1).await?;
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        Ok(pb::ListTokensResponse {
            next_page_token: match rows.last() {
                Some(last) if more => managed::encode_page_token(last),
                _ => String::new(),
            },
            tokens: rows.iter().map(TokenRow::proto).collect(),
        })
    }

    async fn revoke(&self, who: &Caller, id: &str) -> Result<pb::RevokeTokenResponse> {
        let id = id.trim();
        if id.is_empty() {
            return Err(FieldError::new("id", "is required").into());
        }
        let now = now_micros();
        let mut tx = self.db()?.begin_write().await?;
        let row = match managed::revoke(&mut tx, id, &who.user, now).await? {
            Revoked::NotFound => return Err(Error::TokenNotFound(id.to_owned())),
            // Nothing changed: nothing to record.
            Revoked::Already(row) => row,
            Revoked::Now(row) => {
                AuditRecord::new(&who.user, AuditAction::RevokeToken, &row.id)
                    .detail("user", &row.user)
                    .detail("org", &row.org)
                    .write(&mut tx, AuditTable::TOKENS, now)
                    .await?;
                tx.commit().await?;
                self.tokens.apply(&row).await;
                tracing::info!(token = %row.id, user = %row.user, by = %who.user, "token revoked");
                row
            }
        };
        Ok(pb::RevokeTokenResponse {
            token: Some(row.proto()),
        })
    }
}

#[tonic::async_trait]
impl pb::token_service_server::TokenService for TokenApi {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let who = caller(&req)?;
        who.require(Role::Admin)?;
        Ok(Response::new(self.create(&who, req.get_ref()).await?))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        caller(&req)?.require(Role::Admin)?;
        Ok(Response::new(self.list(req.get_ref()).await?))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let who = caller(&req)?;
        who.require(Role::Admin)?;
        Ok(Response::new(self.revoke(&who, &req.get_ref().id).await?))
    }

    async fn join_runner(
        &self,
        req: Request<pb::JoinRunnerRequest>,
    ) -> Result<Response<pb::JoinRunnerResponse>, Status> {
        let who = caller(&req)?;
        who.require(Role::Join)?;
        Ok(Response::new(self.join(&who, &req.get_ref().name).await?))
    }
}
