//! Commands against the scheduler: the queue and its management, why a job
//! waits, approvals and limits.

use anyhow::anyhow;
use serde_json::json;
use trainmesh_common::proto::scheduler::v1 as sched;

use crate::cli::{
    ApprovalFilter, ApprovalsArgs, DecideArgs, JobArg, LimitValue, LimitsAction, LimitsArgs,
    QueueAction, QueueArgs, ScopeArg, SetLimitsArgs,
};
use crate::commands::{clamp_i32, now_secs};
use crate::context::{print, print_json, Context, Service};
use crate::{json, output};

pub async fn queue(ctx: &Context, args: &QueueArgs) -> anyhow::Result<u8> {
    match &args.action {
        Some(QueueAction::Hold(h)) => return hold(ctx, h.reason.as_deref()).await,
        Some(QueueAction::Release) => return release(ctx).await,
        Some(QueueAction::Stats) => return queue_stats(ctx).await,
        None => {}
    }
    let resp = ctx
        .scheduler()?
        .get_queue(sched::GetQueueRequest {
            owner: args.owner.clone().unwrap_or_default(),
            page_size: clamp_i32(args.limit),
            page_token: args.page_token.clone().unwrap_or_default(),
        })
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner();
    if ctx.json() {
        print_json(&json!({
            "entries": resp.entries.iter().map(json::queue_entry).collect::<Vec<_>>(),
            "next_page_token": resp.next_page_token,
            "held": resp.held,
        }))?;
        return Ok(0);
    }
    if resp.held {
        eprintln!("the queue is held: nothing new is dispatched until it is released");
    }
    if resp.entries.is_empty() {
        eprintln!("the queue is empty");
    } else {
        print(&output::queue_table(&resp.entries, now_secs()))?;
    }
    if !resp.next_page_token.is_empty() {
        eprintln!("more entries: add --page-token {}", resp.next_page_token);
    }
    Ok(0)
}

async fn hold(ctx: &Context, reason: Option<&str>) -> anyhow::Result<u8> {
    let resp = ctx
        .scheduler()?
        .hold_queue(sched::HoldQueueRequest {
            reason: reason.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner();
    if ctx.json() {
        print_json(&json!({ "held": resp.held }))?;
    } else {
        print("queue held: nothing is dispatched until `trainctl queue release`")?;
    }
    Ok(0)
}

async fn release(ctx: &Context) -> anyhow::Result<u8> {
    let resp = ctx
        .scheduler()?
        .release_queue(sched::ReleaseQueueRequest {})
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner();
    if ctx.json() {
        print_json(&json!({ "held": resp.held }))?;
    } else {
        print("queue released: dispatching resumes")?;
    }
    Ok(0)
}

async fn queue_stats(ctx: &Context) -> anyhow::Result<u8> {
    let resp = ctx
        .scheduler()?
        .get_queue_stats(sched::GetQueueStatsRequest {})
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner();
    if ctx.json() {
        print_json(&json::queue_stats(&resp))?;
    } else {
        print(&output::queue_stats(&resp))?;
    }
    Ok(0)
}

pub async fn explain(ctx: &Context, args: &JobArg) -> anyhow::Result<u8> {
    let resp = ctx
        .scheduler()?
        .explain_job(sched::ExplainJobRequest {
            job_id: args.job.clone(),
        })
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner();
    if ctx.json() {
        print_json(&json::explanation(&resp))?;
    } else {
        print(&output::explanation(&resp))?;
    }
    Ok(0)
}

pub async fn approve(ctx: &Context, args: &DecideArgs) -> anyhow::Result<u8> {
    let approval = ctx
        .scheduler()?
        .approve_job(sched::ApproveJobRequest {
            job_id: args.job.clone(),
            note: args.note.clone().unwrap_or_default(),
        })
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner()
        .approval;
    print_decision(ctx, "approved", &args.job, approval.as_ref())
}

pub async fn reject(ctx: &Context, args: &DecideArgs) -> anyhow::Result<u8> {
    let approval = ctx
        .scheduler()?
        .reject_job(sched::RejectJobRequest {
            job_id: args.job.clone(),
            note: args.note.clone().unwrap_or_default(),
        })
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner()
        .approval;
    print_decision(ctx, "rejected", &args.job, approval.as_ref())
}

fn print_decision(
    ctx: &Context,
    verb: &str,
    job_id: &str,
    approval: Option<&sched::Approval>,
) -> anyhow::Result<u8> {
    if ctx.json() {
        print_json(
            &approval
                .map(json::approval)
                .unwrap_or(serde_json::Value::Null),
        )?;
    } else {
        print(&output::decision(verb, job_id, approval))?;
    }
    Ok(0)
}

/// `--state all` is the unspecified state: no filter.
pub fn approval_filter(f: ApprovalFilter) -> sched::ApprovalState {
    match f {
        ApprovalFilter::Pending => sched::ApprovalState::Pending,
        ApprovalFilter::Approved => sched::ApprovalState::Approved,
        ApprovalFilter::Rejected => sched::ApprovalState::Rejected,
        ApprovalFilter::Expired => sched::ApprovalState::Expired,
        ApprovalFilter::All => sched::ApprovalState::Unspecified,
    }
}

pub async fn approvals(ctx: &Context, args: &ApprovalsArgs) -> anyhow::Result<u8> {
    let resp = ctx
        .scheduler()?
        .list_approvals(sched::ListApprovalsRequest {
            state: approval_filter(args.state) as i32,
            page_size: clamp_i32(args.limit),
            page_token: args.page_token.clone().unwrap_or_default(),
        })
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner();
    if ctx.json() {
        print_json(&json!({
            "approvals": resp.approvals.iter().map(json::approval).collect::<Vec<_>>(),
            "next_page_token": resp.next_page_token,
        }))?;
        return Ok(0);
    }
    if resp.approvals.is_empty() {
        eprintln!("no approvals found");
    } else {
        print(&output::approvals_table(&resp.approvals))?;
    }
    if !resp.next_page_token.is_empty() {
        eprintln!("more approvals: add --page-token {}", resp.next_page_token);
    }
    Ok(0)
}

pub async fn limits(ctx: &Context, args: &LimitsArgs) -> anyhow::Result<u8> {
    if let Some(LimitsAction::Set(set)) = &args.action {
        return set_limits(ctx, set).await;
    }
    let user = args.user.clone().unwrap_or_default();
    let org = args.org.clone().unwrap_or_default();
    let resp = ctx
        .scheduler()?
        .get_limits(sched::GetLimitsRequest {
            user: user.clone(),
            org: org.clone(),
        })
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner();
    if ctx.json() {
        print_json(&json::get_limits(&resp))?;
    } else {
        print(&output::limits(&resp, &user, &org))?;
    }
    Ok(0)
}

/// The scope and subject `limits set` addresses, checked before any call.
pub fn limits_target(args: &SetLimitsArgs) -> anyhow::Result<(sched::LimitScope, String)> {
    let subject = args.subject.as_deref().map(str::trim).unwrap_or("");
    let (scope, needs_subject) = match args.scope {
        ScopeArg::User => (sched::LimitScope::User, true),
        ScopeArg::Org => (sched::LimitScope::Org, true),
        ScopeArg::Global => (sched::LimitScope::Global, false),
        ScopeArg::UserDefault => (sched::LimitScope::UserDefault, false),
    };
    match (needs_subject, subject.is_empty()) {
        (true, true) => {
            let what = if scope == sched::LimitScope::User {
                "user"
            } else {
                "org"
            };
            Err(anyhow!(
                "--scope {what} needs --subject (the {what} it applies to)"
            ))
        }
        (false, false) => Err(anyhow!(
            "--subject is only for --scope user or org, not `{}`",
            output::limit_scope(scope as i32)
                .to_ascii_lowercase()
                .replace('_', "-")
        )),
        _ => Ok((scope, subject.to_owned())),
    }
}

/// The row to send: the current one with the given flags applied (a flag
/// not given keeps its value; `none` clears it). SetLimits replaces the
/// whole row, so leaving a field unset would remove that limit.
pub fn merged_limits(
    current: Option<&sched::Limits>,
    scope: sched::LimitScope,
    subject: &str,
    args: &SetLimitsArgs,
) -> sched::Limits {
    let apply = |old: Option<i32>, flag: Option<LimitValue>| match flag {
        None => old,
        Some(LimitValue::Clear) => None,
        Some(LimitValue::Set(n)) => Some(n),
    };
    let base = current.cloned().unwrap_or_default();
    sched::Limits {
        scope: scope as i32,
        subject: subject.to_owned(),
        max_running_jobs: apply(base.max_running_jobs, args.max_running),
        max_gpus: apply(base.max_gpus, args.max_gpus),
        max_queued_jobs: apply(base.max_queued_jobs, args.max_queued),
    }
}

async fn set_limits(ctx: &Context, args: &SetLimitsArgs) -> anyhow::Result<u8> {
    let (scope, subject) = limits_target(args)?;
    if args.max_running.is_none() && args.max_gpus.is_none() && args.max_queued.is_none() {
        anyhow::bail!(
            "nothing to set: give --max-running, --max-gpus and/or --max-queued \
             (a number, or `none` to remove the limit)"
        );
    }
    let mut client = ctx.scheduler()?;
    let current = client
        .get_limits(sched::GetLimitsRequest::default())
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner();
    let row = current
        .limits
        .iter()
        .find(|l| l.scope == scope as i32 && l.subject == subject);
    let limits = merged_limits(row, scope, &subject, args);
    let stored = client
        .set_limits(sched::SetLimitsRequest {
            limits: Some(limits.clone()),
        })
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner()
        .limits
        .unwrap_or(limits);
    if ctx.json() {
        print_json(&json::limits(&stored))?;
    } else {
        print(&format!(
            "limits of {}: {}",
            output::limits_scope_text(&stored),
            output::limits_line(&stored)
        ))?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_args(scope: ScopeArg, subject: Option<&str>) -> SetLimitsArgs {
        SetLimitsArgs {
            scope,
            subject: subject.map(str::to_owned),
            max_running: None,
            max_gpus: None,
            max_queued: None,
        }
    }

    #[test]
    fn user_and_org_scopes_need_a_subject_and_the_others_refuse_one() {
        let (scope, subject) = limits_target(&set_args(ScopeArg::User, Some("alice"))).unwrap();
        assert_eq!(
            (scope, subject.as_str()),
            (sched::LimitScope::User, "alice")
        );
        let err = limits_target(&set_args(ScopeArg::Org, None)).unwrap_err();
        assert!(err.to_string().contains("--subject"), "{err}");
        let err = limits_target(&set_args(ScopeArg::UserDefault, Some("x"))).unwrap_err();
        assert!(err.to_string().contains("user-default"), "{err}");
        let (scope, subject) = limits_target(&set_args(ScopeArg::Global, None)).unwrap();
        assert_eq!((scope, subject.as_str()), (sched::LimitScope::Global, ""));
    }

    #[test]
    fn flags_not_given_keep_the_current_limit_and_none_clears() {
        let current = sched::Limits {
            scope: sched::LimitScope::User as i32,
            subject: "alice".into(),
            max_running_jobs: Some(2),
            max_gpus: Some(8),
            max_queued_jobs: Some(10),
        };
        let mut args = set_args(ScopeArg::User, Some("alice"));
        args.max_running = Some(LimitValue::Set(4));
        args.max_gpus = Some(LimitValue::Clear);
        let m = merged_limits(Some(&current), sched::LimitScope::User, "alice", &args);
        assert_eq!(m.max_running_jobs, Some(4));
        assert_eq!(m.max_gpus, None);
        assert_eq!(m.max_queued_jobs, Some(10));
        let fresh = merged_limits(None, sched::LimitScope::User, "bob", &args);
        assert_eq!(
            (
                fresh.subject.as_str(),
                fresh.max_running_jobs,
                fresh.max_queued_jobs
            ),
            ("bob", Some(4), None)
        );
    }

    #[test]
    fn all_approvals_is_the_unspecified_state() {
        assert_eq!(
            approval_filter(ApprovalFilter::All),
            sched::ApprovalState::Unspecified
        );
        assert_eq!(
            approval_filter(ApprovalFilter::Expired),
            sched::ApprovalState::Expired
        );
    }
}
