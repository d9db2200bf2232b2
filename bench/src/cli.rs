//! Command-line flags.

use std::time::Duration;

/// Database the services run on.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendArg {
    Sqlite,
    Postgres,
    /// SQLite, then PostgreSQL when a server is named (else PostgreSQL is
    /// skipped and the results say so).
    Both,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScenarioArg {
    /// Submit → runner assignment latency, p50/p99 (targets ≤ 5 ms / ≤ 25 ms).
    Latency,
    /// Dispatch decisions per second over 10,000 queued jobs with limits (≥ 1,000/s).
    Dispatch,
    /// CreateJob per second with concurrent clients (≥ 2,000/s SQLite, ≥ 1,000/s PostgreSQL).
    Create,
    /// Jobs submitted during a scheduler outage, queued after it returns (≤ 1 s).
    Recovery,
    /// The diagnosis rule set over a 100 MB log (≤ 1 s); no services.
    Diagnosis,
    All,
}

/// trainmesh benchmark: runs job-service and scheduler-service in this
/// process on 127.0.0.1 (port 0) and measures the performance targets.
/// Results go to stdout; service logs go to stderr at `warn` unless
/// TRAINMESH_LOG_LEVEL (an EnvFilter directive) or TEST_LOG is set.
/// Build with `--release`: debug figures mean nothing.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "trainmesh-bench", version)]
pub struct Args {
    #[arg(long, value_enum, default_value_t = BackendArg::Both)]
    pub backend: BackendArg,

    #[arg(long, value_enum, default_value_t = ScenarioArg::All)]
    pub scenario: ScenarioArg,

    /// Jobs to measure: latency samples (default 500, after 50 warm-up
    /// jobs) and queued jobs for dispatch (default 10000).
    #[arg(long)]
    pub jobs: Option<usize>,

    /// Concurrent clients of the create scenario.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,

    /// Length of the create scenario's measured run.
    #[arg(long, default_value_t = 5)]
    pub duration_secs: u64,

    /// Users owning the dispatch scenario's jobs.
    #[arg(long, default_value_t = 100)]
    pub users: usize,

    /// Per-user running-jobs limit in the dispatch scenario.
    #[arg(long, default_value_t = 2)]
    pub user_limit: u32,

    /// Give up on a scenario phase after this long (the figure is then
    /// computed from what completed and marked as a miss).
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,

    /// PostgreSQL server for `--backend postgres|both`; the benchmark creates
    /// (and afterwards drops) fresh databases on it, so the role needs
    /// CREATEDB.
    #[arg(long, env = "TRAINMESH_TEST_POSTGRES_URL")]
    pub postgres_url: Option<String>,

    /// Length of the recovery scenario's scheduler outage.
    #[arg(long, default_value_t = 20)]
    pub outage_secs: u64,

    /// Jobs submitted during the recovery scenario's outage.
    #[arg(long, default_value_t = 50)]
    pub outage_jobs: usize,

    /// Print the results as one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Exit with status 2 when a target is missed.
    #[arg(long)]
    pub check: bool,
}

impl Args {
    pub fn latency_jobs(&self) -> usize {
        self.jobs.unwrap_or(500).max(1)
    }

    pub fn dispatch_jobs(&self) -> usize {
        self.jobs.unwrap_or(10_000).max(1)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs.max(1))
    }

    pub fn runs(&self, s: ScenarioArg) -> bool {
        self.scenario == ScenarioArg::All || self.scenario == s
    }
}
