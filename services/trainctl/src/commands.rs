//! One function per client command. Each returns the process exit code.

use std::time::Duration;

use anyhow::anyhow;
use serde_json::json;
use tonic::Code;
use trainmesh_common::proto::diagnosis::v1 as diag;
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::proto::metrics::v1 as metrics;

use crate::cli::{
    CancelArgs, DiagnoseArgs, JobArg, ListArgs, LogsArgs, MetricsArgs, SubmitArgs, WatchArgs,
};
use crate::context::{print, print_json, print_json_line, Context, Service};
use crate::resume::{self, Flow};
use crate::{json, output, spec};

pub(crate) fn now_secs() -> i64 {
    trainmesh_common::time::now_micros() / 1_000_000
}

pub(crate) fn clamp_i32(v: Option<u32>) -> i32 {
    v.map(|v| i32::try_from(v).unwrap_or(i32::MAX))
        .unwrap_or_default()
}

async fn get_job(ctx: &Context, job_id: &str) -> anyhow::Result<pb::Job> {
    let resp = ctx
        .jobs()?
        .get_job(pb::GetJobRequest {
            job_id: job_id.to_owned(),
        })
        .await
        .map_err(ctx.err(Service::Job))?;
    resp.into_inner()
        .job
        .ok_or_else(|| anyhow!("job-service returned no job for `{job_id}`"))
}

pub async fn submit(ctx: &Context, args: &SubmitArgs) -> anyhow::Result<u8> {
    let spec = spec::load(&args.file)?;
    let resp = ctx
        .jobs()?
        .create_job(pb::CreateJobRequest {
            spec: Some(spec),
            idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        })
        .await
        .map_err(ctx.err(Service::Job))?
        .into_inner();
    let job = resp
        .job
        .ok_or_else(|| anyhow!("job-service accepted the job but returned none"))?;
    if resp.existing {
        eprintln!(
            "note: the idempotency key matched job `{}` submitted earlier; no new job was created",
            job.id
        );
    }
    if !args.wait {
        return if ctx.json() {
            print_json(&json::job(&job)).map(|_| 0)
        } else {
            print(&job.id).map(|_| 0)
        };
    }
    if !ctx.json() {
        print(&job.id)?;
    }
    let done = wait_for_job(ctx, &job.id, !ctx.json()).await?;
    if ctx.json() {
        print_json(&json::job(&done))?;
    } else {
        print(&format!(
            "job {} {}",
            done.id,
            output::state(done.state).to_ascii_lowercase()
        ))?;
        if done.state != pb::JobState::Succeeded as i32 {
            print(&output::job_detail(&done))?;
        }
    }
    Ok(if done.state == pb::JobState::Succeeded as i32 {
        0
    } else {
        1
    })
}

/// Follows the job's events until it is terminal and returns the final job.
/// Falls back to polling when WatchJobs is not served.
async fn wait_for_job(ctx: &Context, job_id: &str, print_events: bool) -> anyhow::Result<pb::Job> {
    let job = get_job(ctx, job_id).await?;
    if output::is_terminal(job.state) {
        return Ok(job);
    }
    let result = follow_events(ctx, Some(job_id), None, true, |e| {
        if print_events {
            print(&output::event_line(e))?;
        }
        Ok(output::is_terminal(e.state))
    })
    .await;
    match result {
        Ok(()) => get_job(ctx, job_id).await,
        Err(e) if is_code(&e, Code::Unimplemented) => loop {
            let job = get_job(ctx, job_id).await?;
            if output::is_terminal(job.state) {
                return Ok(job);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
        Err(e) => Err(e),
    }
}

fn is_code(err: &anyhow::Error, code: Code) -> bool {
    err.chain()
        .find_map(|e| e.downcast_ref::<crate::context::RpcError>())
        .is_some_and(|r| r.status.code() == code)
}

/// Calls `on_event` for each event (each once, in order) until it returns
/// `true`, resuming the stream from the last cursor when it breaks.
async fn follow_events(
    ctx: &Context,
    job_id: Option<&str>,
    cursor: Option<String>,
    from_start: bool,
    mut on_event: impl FnMut(&pb::JobEvent) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    use pb::watch_jobs_response::Kind;
    let client = ctx.jobs()?;
    let job_id = job_id.unwrap_or_default().to_owned();
    resume::follow(
        ctx,
        Service::Job,
        cursor.unwrap_or_default(),
        |cursor: String| {
            let mut client = client.clone();
            let req = pb::WatchJobsRequest {
                job_id: job_id.clone(),
                // Once a cursor is known (the first heartbeat carries one)
                // it says where to go on from.
                from_start: from_start && cursor.is_empty(),
                cursor,
            };
            async move { client.watch_jobs(req).await }
        },
        |m: &pb::WatchJobsResponse| match &m.kind {
            Some(Kind::Event(e)) => e.cursor.as_str(),
            Some(Kind::Heartbeat(h)) => h.cursor.as_str(),
            None => "",
        },
        |m| match m.kind {
            Some(Kind::Event(e)) if on_event(&e)? => Ok(Flow::Stop),
            _ => Ok(Flow::Continue),
        },
    )
    .await
}

pub async fn get(ctx: &Context, args: &JobArg) -> anyhow::Result<u8> {
    let job = get_job(ctx, &args.job).await?;
    if ctx.json() {
        print_json(&json::job(&job))?;
    } else {
        print(&output::job_detail(&job))?;
    }
    Ok(0)
}

pub async fn list(ctx: &Context, args: &ListArgs) -> anyhow::Result<u8> {
    let resp = ctx
        .jobs()?
        .list_jobs(pb::ListJobsRequest {
            states: args.states.clone(),
            label_selector: args.labels.clone(),
            owner: args.owner.clone().unwrap_or_default(),
            page_size: clamp_i32(args.limit),
            page_token: args.page_token.clone().unwrap_or_default(),
        })
        .await
        .map_err(ctx.err(Service::Job))?
        .into_inner();
    if ctx.json() {
        print_json(&json!({
            "jobs": resp.jobs.iter().map(json::job).collect::<Vec<_>>(),
            "next_page_token": resp.next_page_token,
        }))?;
    } else if resp.jobs.is_empty() {
        eprintln!("no jobs found");
    } else {
        print(&output::job_list(&resp.jobs, now_secs()))?;
        if !resp.next_page_token.is_empty() {
            eprintln!("more jobs: add --page-token {}", resp.next_page_token);
        }
    }
    Ok(0)
}

pub async fn logs(ctx: &Context, args: &LogsArgs) -> anyhow::Result<u8> {
    let client = ctx.jobs()?;
    let json_out = ctx.json();
    let mut any = false;
    resume::follow(
        ctx,
        Service::Job,
        String::new(),
        |cursor: String| {
            let mut client = client.clone();
            let req = pb::StreamJobLogsRequest {
                job_id: args.job.clone(),
                attempt: clamp_i32(args.attempt),
                tail_lines: clamp_i32(args.tail),
                follow: args.follow,
                cursor,
            };
            async move { client.stream_job_logs(req).await }
        },
        |m: &pb::StreamJobLogsResponse| m.cursor.as_str(),
        |batch| {
            any |= !batch.lines.is_empty();
            for line in &batch.lines {
                if json_out {
                    print_json_line(&json::log_line(line))?;
                } else {
                    print(&line.text)?;
                }
            }
            Ok(Flow::Continue)
        },
    )
    .await?;
    if !any && !json_out {
        eprintln!("no log lines for job `{}` yet", args.job);
    }
    Ok(0)
}

pub async fn cancel(ctx: &Context, args: &CancelArgs) -> anyhow::Result<u8> {
    let job = ctx
        .jobs()?
        .cancel_job(pb::CancelJobRequest {
            job_id: args.job.clone(),
            reason: args.reason.clone().unwrap_or_default(),
        })
        .await
        .map_err(ctx.err(Service::Job))?
        .into_inner()
        .job
        .ok_or_else(|| anyhow!("job-service returned no job"))?;
    if ctx.json() {
        print_json(&json::job(&job))?;
    } else if output::is_terminal(job.state) {
        print(&format!(
            "job {} {}",
            job.id,
            output::state(job.state).to_ascii_lowercase()
        ))?;
    } else {
        print(&format!(
            "job {}: cancel requested (state {}); `trainctl watch {}` shows when it stops",
            job.id,
            output::state(job.state),
            job.id
        ))?;
    }
    Ok(0)
}

pub async fn watch(ctx: &Context, args: &WatchArgs) -> anyhow::Result<u8> {
    let json_out = ctx.json();
    follow_events(
        ctx,
        args.job.as_deref(),
        args.cursor.clone(),
        args.from_start,
        |e| {
            if json_out {
                print_json_line(&json::job_event(e))?;
            } else {
                print(&output::event_line(e))?;
            }
            Ok(false)
        },
    )
    .await?;
    Ok(0)
}

pub async fn metrics(ctx: &Context, args: &MetricsArgs) -> anyhow::Result<u8> {
    // The service answers in pages of at most 1000 keys: read them all.
    let mut client = ctx.metrics()?;
    let mut points = Vec::new();
    let mut page_token = String::new();
    loop {
        let resp = client
            .get_latest_metrics(metrics::GetLatestMetricsRequest {
                job_id: args.job.clone(),
                keys: args.keys.clone(),
                key_prefix: args.prefix.clone().unwrap_or_default(),
                page_size: 0,
                page_token,
            })
            .await
            .map_err(ctx.err(Service::Metrics))?
            .into_inner();
        points.extend(resp.points);
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    if ctx.json() {
        print_json(&json!({
            "points": points.iter().map(json::metric_point).collect::<Vec<_>>(),
        }))?;
    } else if points.is_empty() {
        eprintln!("no metrics recorded for job `{}`", args.job);
    } else {
        print(&output::metrics_table(&points))?;
    }
    Ok(0)
}

pub async fn diagnose(ctx: &Context, args: &DiagnoseArgs) -> anyhow::Result<u8> {
    let d = ctx
        .diagnosis()?
        .diagnose_job(diag::DiagnoseJobRequest {
            job_id: args.job.clone(),
            use_llm: args.llm,
        })
        .await
        .map_err(ctx.err(Service::Diagnosis))?
        .into_inner()
        .diagnosis
        .ok_or_else(|| anyhow!("diagnosis-service returned no diagnosis"))?;
    if ctx.json() {
        print_json(&json::diagnosis(&d))?;
    } else {
        print(&output::diagnosis(&d))?;
        if args.llm && d.llm_analyses.is_empty() && d.llm_text.is_empty() {
            eprintln!("note: diagnosis-service has no LLM configured; the rules alone answered");
        }
    }
    Ok(0)
}
