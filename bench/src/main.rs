//! trainmesh-bench: see the library docs and `--help`.

use std::process::ExitCode;

use clap::Parser as _;
use trainmesh_bench::cli::{Args, BackendArg, ScenarioArg};
use trainmesh_bench::env::Backend;
use trainmesh_bench::report::{Machine, Report, Row};
use trainmesh_bench::scenario;

fn init_logging() -> anyhow::Result<()> {
    // Quiet by default: stdout carries only the results, and logging at
    // info per job would itself cost throughput.
    let level = std::env::var("TRAINMESH_LOG_LEVEL")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var_os("TEST_LOG").map(|_| "debug".to_owned()))
        .unwrap_or_else(|| "warn".to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .map_err(|e| anyhow::anyhow!("invalid TRAINMESH_LOG_LEVEL `{level}`: {e}"))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = init_logging() {
        eprintln!("trainmesh-bench: {e:#}");
        return ExitCode::FAILURE;
    }
    let mut report = Report {
        machine: Machine::detect(),
        results: Vec::new(),
        skipped: Vec::new(),
    };
    let has_pg = args.postgres_url.as_deref().is_some_and(|u| !u.is_empty());
    let backends: Vec<Backend> = match args.backend {
        BackendArg::Sqlite => vec![Backend::Sqlite],
        BackendArg::Postgres => {
            if !has_pg {
                eprintln!(
                    "trainmesh-bench: --backend postgres needs --postgres-url or TRAINMESH_TEST_POSTGRES_URL"
                );
                return ExitCode::FAILURE;
            }
            vec![Backend::Postgres]
        }
        BackendArg::Both => {
            if has_pg {
                vec![Backend::Sqlite, Backend::Postgres]
            } else {
                report
                    .skipped
                    .push("postgres: no --postgres-url or TRAINMESH_TEST_POSTGRES_URL".to_owned());
                vec![Backend::Sqlite]
            }
        }
    };

    for backend in backends {
        let label = backend.label();
        if args.runs(ScenarioArg::Latency) {
            progress(&args, "latency", label);
            collect(
                &mut report,
                "latency",
                label,
                scenario::latency::run(&args, backend).await,
            );
        }
        if args.runs(ScenarioArg::Dispatch) {
            progress(&args, "dispatch", label);
            collect(
                &mut report,
                "dispatch",
                label,
                scenario::dispatch::run(&args, backend).await,
            );
        }
        if args.runs(ScenarioArg::Create) {
            progress(&args, "create", label);
            collect(
                &mut report,
                "create",
                label,
                scenario::create::run(&args, backend).await,
            );
        }
        if args.runs(ScenarioArg::Recovery) {
            progress(&args, "recovery", label);
            collect(
                &mut report,
                "recovery",
                label,
                scenario::recovery::run(&args, backend).await,
            );
        }
    }
    if args.runs(ScenarioArg::Dispatch) {
        report.results.extend(scenario::plan_time::measure(
            args.dispatch_jobs(),
            args.users,
            args.user_limit,
        ));
    }

    if args.runs(ScenarioArg::Diagnosis) {
        progress(&args, "diagnosis", "none");
        report.results.extend(scenario::rules::measure());
    }

    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    if args.check && report.any_missed() {
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}

fn progress(args: &Args, scenario: &str, backend: &str) {
    if !args.json {
        eprintln!("trainmesh-bench: running {scenario} on {backend}…");
    }
}

fn collect(
    report: &mut Report,
    scenario: &'static str,
    backend: &'static str,
    result: anyhow::Result<Vec<Row>>,
) {
    match result {
        Ok(rows) => report.results.extend(rows),
        Err(e) => report.results.push(
            Row::info(scenario, backend, "scenario failed", f64::NAN, "").missed(format!("{e:#}")),
        ),
    }
}
