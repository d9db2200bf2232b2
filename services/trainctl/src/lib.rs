//! trainctl, the trainmesh CLI: submit and inspect jobs over gRPC, and
//! `trainctl up` to run the whole mesh on this machine.
//!
//! - [`cli`]: flags and subcommands (clap);
//! - [`commands`]: one function per client command ([`scheduling`]: the
//!   queue, explanations, approvals and limits; [`runners`]: runners and
//!   their cordons; [`admin`]: tokens and the audit log);
//! - [`up`]: `trainctl up`, the local mesh as supervised child processes;
//! - [`spec`]: job spec YAML → `JobSpec`;
//! - [`output`] and [`json`]: tables and `-o json`.

pub mod admin;
pub mod certs;
pub mod cli;
pub mod commands;
pub mod context;
pub mod json;
pub mod output;
pub mod resume;
pub mod runners;
pub mod scheduling;
pub mod spec;
pub mod up;

use cli::{Cli, Command};
use context::Context;
use trainmesh_common::correlation;

/// Runs one invocation and returns the process exit code. Every call it
/// makes carries one correlation id (`--correlation-id` or a new one), which
/// is printed with any error so the user can quote it.
pub async fn run(cli: Cli) -> u8 {
    let correlation_id = match &cli.global.correlation_id {
        Some(id) if correlation::accept(Some(id)) == *id => id.clone(),
        Some(id) => {
            eprintln!(
                "error: invalid --correlation-id `{id}`: use up to 128 letters, digits and -_.:/"
            );
            return 2;
        }
        None => correlation::generate(),
    };
    let cid = correlation_id.clone();
    let result = correlation::scope(correlation_id.clone(), async move {
        let ctx = Context::new(cli.global, correlation_id);
        dispatch(&ctx, &cli.command).await
    })
    .await;
    match result {
        Ok(code) => code,
        Err(e) => context::report(&e, &cid),
    }
}

async fn dispatch(ctx: &Context, command: &Command) -> anyhow::Result<u8> {
    match command {
        Command::Up(a) => up::run(&ctx.global, a).await,
        Command::Submit(a) => commands::submit(ctx, a).await,
        Command::Get(a) => commands::get(ctx, a).await,
        Command::List(a) => commands::list(ctx, a).await,
        Command::Logs(a) => commands::logs(ctx, a).await,
        Command::Cancel(a) => commands::cancel(ctx, a).await,
        Command::Watch(a) => commands::watch(ctx, a).await,
        Command::Metrics(a) => commands::metrics(ctx, a).await,
        Command::Diagnose(a) => commands::diagnose(ctx, a).await,
        Command::Queue(a) => scheduling::queue(ctx, a).await,
        Command::Explain(a) => scheduling::explain(ctx, a).await,
        Command::Approve(a) => scheduling::approve(ctx, a).await,
        Command::Reject(a) => scheduling::reject(ctx, a).await,
        Command::Approvals(a) => scheduling::approvals(ctx, a).await,
        Command::Limits(a) => scheduling::limits(ctx, a).await,
        Command::Runners(a) => runners::runners(ctx, a).await,
        Command::Tokens(a) => admin::tokens(ctx, a).await,
        Command::Audit(a) => admin::audit(ctx, a).await,
        Command::Certs(a) => certs::command(a),
    }
}
