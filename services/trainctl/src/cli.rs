//! Command-line interface (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use trainmesh_common::tls::ClientTlsArgs;

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

    /// TLS: without --tls-ca, DATA_DIR/tls/ca.crt is trusted when it exists
    /// (`trainctl up --tls` writes it).
    #[command(flatten)]
    pub tls: ClientTlsArgs,
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
    /// Show the scheduler's queue (position, reason, estimated wait);
    /// `queue hold`, `queue release` and `queue stats` manage it.
    Queue(QueueArgs),
    /// Why a job is not running: every blocking cause, the limit or rule
    /// behind it, and what would unblock it.
    Explain(JobArg),
    /// Approve a job awaiting approval (role approver or admin).
    Approve(DecideArgs),
    /// Reject a job awaiting approval (role approver or admin); the job is
    /// cancelled.
    Reject(DecideArgs),
    /// List approvals (approvers see all; others see their own jobs').
    Approvals(ApprovalsArgs),
    /// Show limits and, with --user/--org, the effective ones; `limits set`
    /// changes them (admin).
    Limits(LimitsArgs),
    /// Runners (admin): state (ready, draining, cordoned), capacity and
    /// node faults; `runners uncordon NAME` lets a cordoned runner take
    /// work again.
    Runners(RunnersArgs),
    /// Tokens: `create`, `list` and `revoke` manage them at run time
    /// (admin); `init DIR` writes the bootstrap credentials of a deployed
    /// mesh (an admin token, one token per service and per runner, a join
    /// token, and the tokens file that lists their hashes).
    Tokens(TokensArgs),
    /// The audit log (admin): approvals, rejections, limit changes, queue
    /// holds, admins' cancels of other users' jobs and token changes, from
    /// job-service and the scheduler, oldest first.
    Audit(AuditArgs),
    /// TLS for a deployed mesh: `certs init DIR` writes a CA and a
    /// certificate for each service.
    Certs(CertsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub action: CertsAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CertsAction {
    /// Write DIR/ca.crt and DIR/ca.key, and DIR/NAME.crt and DIR/NAME.key
    /// for each NAME (default: the five binaries' names), each valid for
    /// NAME, every --san, localhost, 127.0.0.1 and ::1, for servers and
    /// clients alike (mutual TLS); unless DIR/ca.crt exists: then they are
    /// kept. Keys are readable by their owner only.
    Init {
        /// Directory to write to; created if missing.
        dir: PathBuf,
        /// Names to issue certificates for (compose service names,
        /// Kubernetes Service names); `NAME,ALIAS...` makes NAME's
        /// certificate valid for the aliases too (`scheduler-1,scheduler`).
        names: Vec<String>,
        /// Another DNS name or IP address every certificate is valid for
        /// (repeatable), e.g. `job-service.trainmesh.svc`.
        #[arg(long = "san")]
        sans: Vec<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct TokensArgs {
    #[command(subcommand)]
    pub action: TokensAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TokensAction {
    /// Write, each readable by its owner only: DIR/admin.token (user
    /// admin, for people), DIR/SERVICE.token for job-service,
    /// scheduler-service, metrics-service and diagnosis-service (user =
    /// the service), DIR/runner-NAME.token for each --runner (user NAME,
    /// role runner), DIR/runner-join.token (role join: a runner without a
    /// credential trades its name for its own with it), and DIR/tokens.yaml
    /// listing their hashes. When DIR/tokens.yaml exists, every file and
    /// entry is kept and only missing tokens are added (this also upgrades
    /// a DIR with the single service.token of earlier versions). Services
    /// read tokens.yaml (--tokens) and their own token
    /// (--service-token-file); runners theirs (--service-token-file);
    /// people use admin.token.
    Init {
        /// Directory to write to; created if missing.
        dir: std::path::PathBuf,
        /// A runner to write a credential for (repeatable): its --name, of
        /// ASCII letters, digits and `._-`.
        #[arg(long = "runner", value_name = "NAME", value_parser = parse_runner_name)]
        runners: Vec<String>,
    },
    /// Create a token (admin) and print it, once: only its hash is kept.
    /// Example: `trainctl tokens create --user alice --org ml --role user
    /// --ttl 30d --description laptop`
    Create(CreateTokenArgs),
    /// List tokens (admin): never their secrets.
    List(ListTokensArgs),
    /// Revoke a token (admin): refused by job-service at once, by every
    /// other service within a second.
    Revoke {
        /// Token id (`tok_…`, from `tokens list`).
        id: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct CreateTokenArgs {
    /// Who the token authenticates as.
    #[arg(long)]
    pub user: String,
    /// The user's org (for org limits).
    #[arg(long)]
    pub org: String,
    /// A role: user, approver, admin, service, runner or join
    /// (repeatable). A runner's credential: `--user NAME --org system
    /// --role runner` (NAME is its --name); a join token: `--user
    /// runner-join --org system --role join`.
    #[arg(long = "role", required = true)]
    pub roles: Vec<String>,
    /// Lifetime, like 30d, 12h, 90m or 3600s; without it the token does
    /// not expire.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<std::time::Duration>,
    /// What the token is for (shown by `tokens list`).
    #[arg(long)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ListTokensArgs {
    /// Only this user's tokens.
    #[arg(long)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Only events since then: a duration ago (30m, 1h, 7d) or a time
    /// (2026-12-01T09:00:00Z).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<prost_types::Timestamp>,
    /// Only this user's actions.
    #[arg(long)]
    pub actor: Option<String>,
    /// Only this action: approve_job, reject_job, set_limits, hold_queue,
    /// release_queue, cancel_job, create_token, revoke_token,
    /// uncordon_runner.
    #[arg(long)]
    pub action: Option<String>,
    /// Show at most this many events (the newest).
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
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
    /// Serve TLS: a new CA and a certificate for localhost, 127.0.0.1 and
    /// ::1 (and the bind host) in DATA_DIR/tls at every start; trainctl
    /// trusts DATA_DIR/tls/ca.crt by itself.
    #[arg(long)]
    pub tls: bool,
    /// Without --tls, serve plaintext on a --bind-host other than loopback.
    #[arg(long, conflicts_with = "tls")]
    pub insecure: bool,
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
    /// Only keys that start with this (e.g. `reward.`).
    #[arg(long)]
    pub prefix: Option<String>,
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
#[command(args_conflicts_with_subcommands = true)]
pub struct QueueArgs {
    #[command(subcommand)]
    pub action: Option<QueueAction>,
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

#[derive(Debug, Clone, Subcommand)]
pub enum QueueAction {
    /// Stop dispatching (admin): waiting jobs show the reason HELD.
    Hold(HoldArgs),
    /// Resume dispatching (admin).
    Release,
    /// Queue depth, running jobs, per-user counts, average wait, GPUs.
    Stats,
}

#[derive(Debug, Clone, Args)]
pub struct RunnersArgs {
    #[command(subcommand)]
    pub action: Option<RunnersAction>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum RunnersAction {
    /// Let a cordoned runner take work again and forget its node faults
    /// (admin; audited). Jobs that avoided it may run there again.
    Uncordon(UncordonArgs),
}

#[derive(Debug, Clone, Args)]
pub struct UncordonArgs {
    /// The runner's name.
    pub name: String,
    /// Why (kept in the audit log).
    #[arg(long)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct HoldArgs {
    /// Why (shown to users whose jobs wait).
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct DecideArgs {
    /// Job id.
    pub job: String,
    /// A note kept with the decision and shown in the job's reason.
    #[arg(long)]
    pub note: Option<String>,
}

/// Which approvals to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ApprovalFilter {
    Pending,
    Approved,
    Rejected,
    Expired,
    All,
}

#[derive(Debug, Clone, Args)]
pub struct ApprovalsArgs {
    /// Only approvals in this state.
    #[arg(long, value_enum, default_value_t = ApprovalFilter::Pending)]
    pub state: ApprovalFilter,
    /// Page size.
    #[arg(long)]
    pub limit: Option<u32>,
    /// Continue from a previous listing's next page token.
    #[arg(long)]
    pub page_token: Option<String>,
}

#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LimitsArgs {
    #[command(subcommand)]
    pub action: Option<LimitsAction>,
    /// Also show the effective limits of this user (and which scope binds).
    #[arg(long)]
    pub user: Option<String>,
    /// The user's org, for the org's ceiling.
    #[arg(long)]
    pub org: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum LimitsAction {
    /// Set the limits of one scope (admin). Limits not named keep their
    /// current value; `none` removes one. Example:
    /// `trainctl limits set --scope user --subject alice --max-running 4 --max-gpus none`
    Set(SetLimitsArgs),
}

/// The scope a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    User,
    Org,
    Global,
    /// The default of every user without a limit of their own.
    UserDefault,
}

/// One limit value on the command line: a number, or `none` to remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitValue {
    Set(i32),
    Clear,
}

#[derive(Debug, Clone, Args)]
pub struct SetLimitsArgs {
    /// Which scope.
    #[arg(long, value_enum)]
    pub scope: ScopeArg,
    /// The user (scope user) or org (scope org); not allowed otherwise.
    #[arg(long)]
    pub subject: Option<String>,
    /// Running jobs (SCHEDULED or RUNNING) at once, or `none`.
    #[arg(long, value_parser = parse_limit, allow_negative_numbers = true)]
    pub max_running: Option<LimitValue>,
    /// GPUs in use at once, or `none`.
    #[arg(long, value_parser = parse_limit, allow_negative_numbers = true)]
    pub max_gpus: Option<LimitValue>,
    /// Submitted jobs not yet running (refused at submit beyond it), or `none`.
    #[arg(long, value_parser = parse_limit, allow_negative_numbers = true)]
    pub max_queued: Option<LimitValue>,
}

/// `4` → a limit of 4; `none` (or `unlimited`) → no limit.
pub fn parse_limit(s: &str) -> Result<LimitValue, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") || t.eq_ignore_ascii_case("unlimited") {
        return Ok(LimitValue::Clear);
    }
    match t.parse::<i64>() {
        Ok(n) if n < 0 => Err(format!(
            "`{s}` is negative; a limit is 0 or more, or `none`"
        )),
        Ok(n) => i32::try_from(n)
            .map(LimitValue::Set)
            .map_err(|_| format!("`{s}` is too large")),
        Err(_) => Err(format!("`{s}` is not a number or `none`")),
    }
}

/// `90s`, `30m`, `12h`, `30d`, `2w`, or plain seconds; more than zero.
/// `tokens init --runner NAME`: refused while parsing, so a bad name
/// writes nothing.
fn parse_runner_name(s: &str) -> Result<String, String> {
    crate::up::tokens::check_runner_name(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let mult: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("`{s}` is not like 90s, 30m, 12h, 30d or 2w")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not like 90s, 30m, 12h, 30d or 2w"))?;
    match n.checked_mul(mult) {
        Some(0) => Err(format!("`{s}` is zero; give a positive duration")),
        Some(secs) => Ok(std::time::Duration::from_secs(secs)),
        None => Err(format!("`{s}` is too long")),
    }
}

/// A duration ago, or an RFC 3339 time.
pub fn parse_since(s: &str) -> Result<prost_types::Timestamp, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
        });
    }
    let ago = parse_duration(s).map_err(|_| {
        format!("`{s}` is neither a duration (30m, 1h, 7d) nor a time (2026-12-01T09:00:00Z)")
    })?;
    let now = trainmesh_common::time::now_micros();
    let ago = i64::try_from(ago.as_micros()).unwrap_or(i64::MAX);
    Ok(trainmesh_common::time::to_timestamp(
        now.saturating_sub(ago),
    ))
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
    fn queue_has_subcommands_and_still_lists_without_one() {
        let cli = Cli::try_parse_from(["trainctl", "queue", "--owner", "bob"]).unwrap();
        let Command::Queue(q) = cli.command else {
            panic!("expected queue");
        };
        assert!(q.action.is_none());
        assert_eq!(q.owner.as_deref(), Some("bob"));
        let cli =
            Cli::try_parse_from(["trainctl", "queue", "hold", "--reason", "upgrade"]).unwrap();
        let Command::Queue(QueueArgs {
            action: Some(QueueAction::Hold(h)),
            ..
        }) = cli.command
        else {
            panic!("expected queue hold");
        };
        assert_eq!(h.reason.as_deref(), Some("upgrade"));
        for sub in ["release", "stats"] {
            let cli = Cli::try_parse_from(["trainctl", "queue", sub, "-o", "json"]).unwrap();
            assert!(matches!(
                cli.command,
                Command::Queue(QueueArgs {
                    action: Some(_),
                    ..
                })
            ));
        }
    }

    #[test]
    fn approvals_default_to_pending() {
        let cli = Cli::try_parse_from(["trainctl", "approvals"]).unwrap();
        let Command::Approvals(a) = cli.command else {
            panic!("expected approvals");
        };
        assert_eq!(a.state, ApprovalFilter::Pending);
        let cli = Cli::try_parse_from(["trainctl", "approvals", "--state", "all"]).unwrap();
        let Command::Approvals(a) = cli.command else {
            panic!("expected approvals");
        };
        assert_eq!(a.state, ApprovalFilter::All);
        assert!(Cli::try_parse_from(["trainctl", "approvals", "--state", "done"]).is_err());
    }

    #[test]
    fn approve_and_reject_take_a_job_and_a_note() {
        let cli =
            Cli::try_parse_from(["trainctl", "reject", "job-1", "--note", "too big"]).unwrap();
        let Command::Reject(d) = cli.command else {
            panic!("expected reject");
        };
        assert_eq!(
            (d.job.as_str(), d.note.as_deref()),
            ("job-1", Some("too big"))
        );
        assert!(Cli::try_parse_from(["trainctl", "approve"]).is_err());
    }

    #[test]
    fn limits_set_parses_numbers_and_none() {
        let cli = Cli::try_parse_from([
            "trainctl",
            "limits",
            "set",
            "--scope",
            "user-default",
            "--max-running",
            "2",
            "--max-gpus",
            "none",
        ])
        .unwrap();
        let Command::Limits(LimitsArgs {
            action: Some(LimitsAction::Set(s)),
            ..
        }) = cli.command
        else {
            panic!("expected limits set");
        };
        assert_eq!(s.scope, ScopeArg::UserDefault);
        assert_eq!(s.max_running, Some(LimitValue::Set(2)));
        assert_eq!(s.max_gpus, Some(LimitValue::Clear));
        assert_eq!(s.max_queued, None);
        let neg = Cli::try_parse_from([
            "trainctl",
            "limits",
            "set",
            "--scope",
            "global",
            "--max-queued",
            "-1",
        ]);
        assert!(neg.unwrap_err().to_string().contains("negative"));
        assert!(parse_limit("-1").unwrap_err().contains("negative"));
        assert!(parse_limit("x").is_err());
        assert!(parse_limit("99999999999").is_err());
        assert_eq!(parse_limit("Unlimited"), Ok(LimitValue::Clear));
        let show = Cli::try_parse_from(["trainctl", "limits", "--user", "alice"]).unwrap();
        let Command::Limits(l) = show.command else {
            panic!("expected limits");
        };
        assert!(l.action.is_none());
        assert_eq!(l.user.as_deref(), Some("alice"));
    }

    #[test]
    fn tokens_and_audit_parse_their_flags() {
        let cli = Cli::try_parse_from([
            "trainctl",
            "tokens",
            "create",
            "--user",
            "u",
            "--org",
            "o",
            "--role",
            "user",
            "--role",
            "approver",
            "--ttl",
            "30d",
            "--description",
            "ci",
        ])
        .unwrap();
        let Command::Tokens(TokensArgs {
            action: TokensAction::Create(c),
        }) = cli.command
        else {
            panic!("expected tokens create");
        };
        assert_eq!(c.roles, ["user", "approver"]);
        assert_eq!(c.ttl, Some(std::time::Duration::from_secs(30 * 86_400)));
        assert!(
            Cli::try_parse_from(["trainctl", "tokens", "create", "--user", "u", "--org", "o"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["trainctl", "tokens", "revoke", "tok_1"]).is_ok());
        assert!(Cli::try_parse_from(["trainctl", "tokens", "init", "/tmp/x"]).is_ok());
        let cli = Cli::try_parse_from([
            "trainctl", "tokens", "init", "/tmp/x", "--runner", "gpu-1", "--runner", "gpu-2",
        ])
        .unwrap();
        let Command::Tokens(TokensArgs {
            action: TokensAction::Init { runners, .. },
        }) = cli.command
        else {
            panic!("expected tokens init");
        };
        assert_eq!(runners, ["gpu-1", "gpu-2"]);
        let err = Cli::try_parse_from(["trainctl", "tokens", "init", "/tmp/x", "--runner", "a/b"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("runner name `a/b`"), "{err}");
        let cli = Cli::try_parse_from([
            "trainctl",
            "audit",
            "--since",
            "1h",
            "--action",
            "hold_queue",
        ])
        .unwrap();
        let Command::Audit(a) = cli.command else {
            panic!("expected audit");
        };
        let ago = trainmesh_common::time::now_micros() / 1_000_000 - a.since.unwrap().seconds;
        assert!((3599..=3601).contains(&ago), "{ago}");
        assert_eq!(
            parse_since("2026-12-01T09:00:00Z").unwrap().seconds,
            1_796_115_600
        );
        for bad in ["0s", "soon", "5y", "-1h", ""] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration("2w").unwrap().as_secs(), 14 * 86_400);
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
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
