//! Admin commands: tokens (`tokens create|list|revoke`) and the audit log.

use anyhow::anyhow;
use serde_json::json;
use trainmesh_common::proto::audit::v1 as audit;
use trainmesh_common::proto::auth::v1 as auth;
use trainmesh_common::time::to_duration;

use crate::cli::{AuditArgs, CreateTokenArgs, ListTokensArgs, TokensAction, TokensArgs};
use crate::commands::now_secs;
use crate::context::{print, print_json, Context, Service};
use crate::{json, output};

pub async fn tokens(ctx: &Context, args: &TokensArgs) -> anyhow::Result<u8> {
    match &args.action {
        TokensAction::Init { dir, runners } => crate::up::tokens::init(dir, runners),
        TokensAction::Create(a) => create(ctx, a).await,
        TokensAction::List(a) => list(ctx, a).await,
        TokensAction::Revoke { id } => revoke(ctx, id).await,
    }
}

async fn create(ctx: &Context, args: &CreateTokenArgs) -> anyhow::Result<u8> {
    let resp = ctx
        .tokens()?
        .create_token(auth::CreateTokenRequest {
            user: args.user.clone(),
            org: args.org.clone(),
            roles: args.roles.clone(),
            expire_time: None,
            ttl: args.ttl.map(to_duration),
            description: args.description.clone().unwrap_or_default(),
        })
        .await
        .map_err(ctx.err(Service::Job))?
        .into_inner();
    let token = resp
        .token
        .ok_or_else(|| anyhow!("job-service created a token but did not describe it"))?;
    if ctx.json() {
        print_json(&json!({ "token": json::token(&token), "secret": resp.secret }))?;
    } else {
        // The secret alone on stdout, so `$(trainctl tokens create …)` is it.
        let expires = match &token.expire_time {
            Some(t) => format!("expires {}", output::time(Some(t))),
            None => "does not expire".into(),
        };
        eprintln!(
            "created token {} for {} (org {}, roles {}); it {expires}. It is shown only \
             now: keep it safe.",
            token.id,
            token.user,
            token.org,
            token.roles.join(", ")
        );
        print(&resp.secret)?;
    }
    Ok(0)
}

async fn list(ctx: &Context, args: &ListTokensArgs) -> anyhow::Result<u8> {
    let mut client = ctx.tokens()?;
    let mut tokens = Vec::new();
    let mut page_token = String::new();
    loop {
        let resp = client
            .list_tokens(auth::ListTokensRequest {
                user: args.user.clone().unwrap_or_default(),
                page_size: 0,
                page_token,
            })
            .await
            .map_err(ctx.err(Service::Job))?
            .into_inner();
        tokens.extend(resp.tokens);
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    if ctx.json() {
        print_json(&json!({ "tokens": tokens.iter().map(json::token).collect::<Vec<_>>() }))?;
    } else if tokens.is_empty() {
        eprintln!("no tokens (tokens from tokens files are not listed)");
    } else {
        print(&output::tokens_table(&tokens, now_secs()))?;
    }
    Ok(0)
}

async fn revoke(ctx: &Context, id: &str) -> anyhow::Result<u8> {
    let token = ctx
        .tokens()?
        .revoke_token(auth::RevokeTokenRequest { id: id.to_owned() })
        .await
        .map_err(ctx.err(Service::Job))?
        .into_inner()
        .token
        .ok_or_else(|| anyhow!("job-service revoked the token but did not describe it"))?;
    if ctx.json() {
        print_json(&json::token(&token))?;
    } else {
        print(&format!(
            "revoked token {} of {} (by {}): refused by job-service now, by every other \
             service within a second",
            token.id, token.user, token.revoked_by
        ))?;
    }
    Ok(0)
}

/// The newest `limit` events of one service that match `args`, newest
/// first.
async fn events_of(
    ctx: &Context,
    service: Service,
    args: &AuditArgs,
) -> anyhow::Result<Vec<audit::AuditEvent>> {
    let mut client = ctx.audit(service)?;
    let mut events = Vec::new();
    let mut page_token = String::new();
    while events.len() < args.limit {
        let resp = client
            .list_audit_events(audit::ListAuditEventsRequest {
                since: args.since,
                actor: args.actor.clone().unwrap_or_default(),
                action: args.action.clone().unwrap_or_default(),
                page_size: i32::try_from(args.limit - events.len())
                    .unwrap_or(i32::MAX)
                    .min(1000),
                page_token,
            })
            .await
            .map_err(ctx.err(service))?
            .into_inner();
        events.extend(resp.events);
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    Ok(events)
}

/// Both services' audit logs, merged by time, oldest first. A service
/// that cannot answer is reported; what the other has is still shown.
pub async fn audit(ctx: &Context, args: &AuditArgs) -> anyhow::Result<u8> {
    let (jobs, sched) = tokio::join!(
        events_of(ctx, Service::Job, args),
        events_of(ctx, Service::Scheduler, args)
    );
    let mut events = Vec::new();
    let mut failed = Vec::new();
    for result in [jobs, sched] {
        match result {
            Ok(e) => events.extend(e),
            Err(e) => failed.push(e),
        }
    }
    if failed.len() == 2 {
        return Err(failed.remove(0));
    }
    // Newest first to keep the newest `limit`, then oldest first to read.
    events.sort_by(|a, b| key(b).cmp(&key(a)));
    let truncated = events.len() > args.limit;
    events.truncate(args.limit);
    events.reverse();
    if ctx.json() {
        print_json(&json!({ "events": events.iter().map(json::audit_event).collect::<Vec<_>>() }))?;
    } else if events.is_empty() {
        eprintln!("no audit events match");
    } else {
        print(&output::audit_table(&events))?;
    }
    if truncated {
        eprintln!(
            "showing the newest {} events; narrow with --since, --actor or --action, or raise --limit",
            args.limit
        );
    }
    for e in &failed {
        eprintln!("error: {e:#}; its events are missing above");
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}

fn key(e: &audit::AuditEvent) -> (i64, i32, &str) {
    let t = e.time.unwrap_or_default();
    (t.seconds, t.nanos, e.id.as_str())
}
