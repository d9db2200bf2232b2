//! Command-line interface (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// trainctl: run ML training jobs on a trainmesh.
///
/// Start a mesh on this machine with `trainctl up`, then submit a job with
/// `trainctl submit examples/jobs/ok.yaml --wait`.
#[derive(Debug, Parser)]
#[command(name = "trainctl", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// job-service address (`host:port`, `http://host:port` or `file:PATH`).
    #[arg(
        long,
        global = true,
        env = "TRAINMESH_JOB_ENDPOINT",
        default_value = "127.0.0.1:50051"
    )]
    pub job_endpoint: String,

    /// scheduler-service address.
    #[arg(
        long,
        global = true,
        env = "TRAINMESH_SCHEDULER_ENDPOINT",
        default_value = "127.0.0.1:50052"
    )]
    pub scheduler_endpoint: String,

    /// metrics-service address.
    #[arg(
        long,
        global = true,
        env = "TRAINMESH_METRICS_ENDPOINT",
        default_value = "127.0.0.1:50053"
    )]
    pub metrics_endpoint: String,

    /// diagnosis-service address.
    #[arg(
        long,
        global = true,
        env = "TRAINMESH_DIAGNOSIS_ENDPOINT",
        default_value = "127.0.0.1:50054"
    )]
    pub diagnosis_endpoint: String,

    /// Bearer token. Default: the contents of DATA_DIR/admin.token.
    #[arg(long, global = true, env = "TRAINMESH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Data directory (`trainctl up` keeps databases, logs and tokens there).
    #[arg(
        long,
        global = true,
        env = "TRAINMESH_DATA_DIR",
        default_value = ".trainmesh"
    )]
    pub data_dir: PathBuf,

    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// Correlation id sent with every call of this command (default: a new
    /// one). Quote it when reporting a problem: every service logs it.
    #[arg(long, global = true)]
    pub correlation_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the whole mesh on this machine (every service and a runner) and
    /// keep it running until Ctrl-C or SIGTERM.
    Up(UpArgs),
    /// Submit a job from a YAML spec (fields mirror trainmesh.job.v1.JobSpec).
    Submit(SubmitArgs),
    /// Show one job.
    Get(JobArg),
    /// List jobs.
    List(ListArgs),
    /// Print a job's log.
    Logs(LogsArgs),
    /// Cancel a job.
    Cancel(CancelArgs),
    /// Print job events as they happen.
    Watch(WatchArgs),
    /// Latest metric values of a job.
    Metrics(MetricsArgs),
    /// Diagnose a job: Healthy / Error / Analysis / Solution, with evidence.
    Diagnose(DiagnoseArgs),
    /// Show the scheduler's queue.
    Queue(QueueArgs),
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Runner backend.
    #[arg(long, default_value = "process")]
    pub backend: String,
    /// Address the services listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_host: String,
    /// job-service port on the bind host.
    #[arg(long, default_value_t = 50051)]
    pub job_port: u16,
    /// scheduler-service port on the bind host.
    #[arg(long, default_value_t = 50052)]
    pub scheduler_port: u16,
    /// metrics-service port on the bind host.
    #[arg(long, default_value_t = 50053)]
    pub metrics_port: u16,
    /// diagnosis-service port on the bind host.
    #[arg(long, default_value_t = 50054)]
    pub diagnosis_port: u16,
    /// Listen on free ports chosen by the OS (services find each other
    /// through DATA_DIR/run/<name>.addr); lets two meshes run side by side.
    #[arg(long)]
    pub ports_from_zero: bool,
    /// How long to wait for every service to answer its health check.
    #[arg(long, default_value_t = 30)]
    pub startup_timeout_secs: u64,
    /// How long each child gets after SIGTERM before it is killed.
    #[arg(long, default_value_t = 15)]
    pub stop_timeout_secs: u64,
}

#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Job spec (YAML).
    pub file: PathBuf,
    /// A retry with the same key returns the job created the first time.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Follow the job until it ends; exit 0 if it succeeded, 1 otherwise.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Clone, Args)]
pub struct JobArg {
    /// Job id.
    pub job: String,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only jobs in this state (repeatable): pending, queued, running, failed, …
    #[arg(long = "state", value_parser = parse_state)]
    pub states: Vec<i32>,
    /// Only jobs with this label (`key=value`, repeatable; all must match).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<String>,
    /// Only this user's jobs (admins may list anyone's).
    #[arg(long)]
    pub owner: Option<String>,
    /// Page size.
    #[arg(long)]
    pub limit: Option<u32>,
    /// Continue from a previous listing's next page token.
    #[arg(long)]
    pub page_token: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// Job id.
    pub job: String,
    /// Attempt number (default: the latest).
    #[arg(long)]
    pub attempt: Option<u32>,
    /// Start with the last N lines.
    #[arg(long)]
    pub tail: Option<u32>,
    /// Keep printing new lines until the job ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    /// Job id.
    pub job: String,
    /// Why (kept on the job).
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Only this job (default: every job you may see).
    pub job: Option<String>,
    /// Replay past events first.
    #[arg(long)]
    pub from_start: bool,
    /// Resume after this cursor (printed with each event in `-o json`).
    #[arg(long)]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Job id.
    pub job: String,
    /// Only this key (repeatable).
    #[arg(long = "key")]
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct DiagnoseArgs {
    /// Job id.
    pub job: String,
    /// Ask the LLM too, when diagnosis-service has one configured.
    #[arg(long)]
    pub llm: bool,
}

#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    /// Only this user's entries.
    #[arg(long)]
    pub owner: Option<String>,
    /// Page size.
    #[arg(long)]
    pub limit: Option<u32>,
    /// Continue from a previous listing's next page token.
    #[arg(long)]
    pub page_token: Option<String>,
}

fn parse_state(s: &str) -> Result<i32, String> {
    crate::output::parse_state(s).map(|s| s as i32)
}

fn parse_label(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((k, _)) if !k.trim().is_empty() => Ok(s.to_owned()),
        _ => Err(format!("label selector `{s}` must be `key=value`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "trainctl",
            "list",
            "--state",
            "running",
            "--state",
            "FAILED",
            "--label",
            "team=ml",
            "-o",
            "json",
            "--job-endpoint",
            "10.0.0.1:1",
        ])
        .unwrap();
        assert_eq!(cli.global.output, OutputFormat::Json);
        assert_eq!(cli.global.job_endpoint, "10.0.0.1:1");
        let Command::List(l) = cli.command else {
            panic!("expected list");
        };
        assert_eq!(l.states, [5, 7]);
        assert_eq!(l.labels, ["team=ml"]);
    }

    #[test]
    fn bad_state_and_label_are_refused_by_the_parser() {
        assert!(Cli::try_parse_from(["trainctl", "list", "--state", "done"]).is_err());
        assert!(Cli::try_parse_from(["trainctl", "list", "--label", "team"]).is_err());
    }

    #[test]
    fn up_accepts_data_dir_and_ports() {
        let cli = Cli::try_parse_from([
            "trainctl",
            "up",
            "--data-dir",
            "/tmp/x",
            "--job-port",
            "6000",
            "--ports-from-zero",
        ])
        .unwrap();
        assert_eq!(cli.global.data_dir, PathBuf::from("/tmp/x"));
        let Command::Up(up) = cli.command else {
            panic!("expected up");
        };
        assert_eq!(up.job_port, 6000);
        assert!(up.ports_from_zero);
        assert_eq!(up.backend, "process");
    }
}
