//! `trainctl runners`: the scheduler's runners (admin), and `runners
//! uncordon NAME` for one cordoned after node faults.

use serde_json::json;
use trainmesh_common::proto::scheduler::v1 as sched;

use crate::cli::{RunnersAction, RunnersArgs, UncordonArgs};
use crate::context::{print, print_json, Context, Service};
use crate::output;

pub async fn runners(ctx: &Context, args: &RunnersArgs) -> anyhow::Result<u8> {
    if let Some(RunnersAction::Uncordon(u)) = &args.action {
        return uncordon(ctx, u).await;
    }
    let resp = ctx
        .scheduler()?
        .list_runners(sched::ListRunnersRequest {})
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner();
    if ctx.json() {
        print_json(&json!({
            "runners": resp.runners.iter().map(output::runner_json).collect::<Vec<_>>(),
        }))?;
    } else if resp.runners.is_empty() {
        eprintln!("no runner is registered");
    } else {
        print(&output::runners_table(&resp.runners))?;
    }
    Ok(0)
}

async fn uncordon(ctx: &Context, args: &UncordonArgs) -> anyhow::Result<u8> {
    let resp = ctx
        .scheduler()?
        .uncordon_runner(sched::UncordonRunnerRequest {
            name: args.name.clone(),
            note: args.note.clone().unwrap_or_default(),
        })
        .await
        .map_err(ctx.err(Service::Scheduler))?
        .into_inner();
    if ctx.json() {
        print_json(&json!({
            "was_cordoned": resp.was_cordoned,
            "runner": resp.runner.as_ref().map(output::runner_json),
        }))?;
    } else {
        print(&output::uncordoned(&resp))?;
    }
    Ok(0)
}
