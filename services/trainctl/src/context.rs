//! What every client command needs: endpoints, the token, clients, and the
//! mapping of failed calls to errors a user can act on.

use std::io::Write as _;

use anyhow::Context as _;
use tonic::{Code, Status};
use trainmesh_common::client::{self, Channel};
use trainmesh_common::proto::audit::v1::audit_service_client::AuditServiceClient;
use trainmesh_common::proto::auth::v1::token_service_client::TokenServiceClient;
use trainmesh_common::proto::diagnosis::v1::diagnosis_service_client::DiagnosisServiceClient;
use trainmesh_common::proto::job::v1::job_service_client::JobServiceClient;
use trainmesh_common::proto::metrics::v1::metrics_service_client::MetricsServiceClient;
use trainmesh_common::proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use trainmesh_common::tls::ClientTls;

use crate::cli::{GlobalArgs, OutputFormat};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Job,
    Scheduler,
    Metrics,
    Diagnosis,
}

impl Service {
    pub fn binary(self) -> &'static str {
        match self {
            Service::Job => "job-service",
            Service::Scheduler => "scheduler-service",
            Service::Metrics => "metrics-service",
            Service::Diagnosis => "diagnosis-service",
        }
    }

    /// The flag prefix and env infix: `job` → `--job-endpoint`, `TRAINMESH_JOB_ENDPOINT`.
    pub fn short(self) -> &'static str {
        match self {
            Service::Job => "job",
            Service::Scheduler => "scheduler",
            Service::Metrics => "metrics",
            Service::Diagnosis => "diagnosis",
        }
    }

    fn endpoint(self, g: &GlobalArgs) -> &str {
        match self {
            Service::Job => &g.job_endpoint,
            Service::Scheduler => &g.scheduler_endpoint,
            Service::Metrics => &g.metrics_endpoint,
            Service::Diagnosis => &g.diagnosis_endpoint,
        }
    }
}

/// A failed call, with where it went so the hint can name it.
#[derive(Debug)]
pub struct RpcError {
    pub status: Status,
    pub service: Service,
    pub endpoint: String,
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", code_name(self.status.code()))?;
        if !self.status.message().is_empty() {
            write!(f, ": {}", self.status.message())?;
        }
        // A transport failure's message is generic ("tcp connect error");
        // the root cause (e.g. "Connection refused") is in its sources.
        if let Some(root) = root_cause(&self.status) {
            if !self.status.message().contains(&root) {
                write!(f, ": {root}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for RpcError {}

fn root_cause(status: &Status) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut last = None;
    while let Some(err) = source {
        last = Some(err.to_string());
        source = err.source();
    }
    last
}

impl RpcError {
    /// A line telling the user what to do, for the errors that have an
    /// obvious next step.
    pub fn hint(&self) -> Option<String> {
        if mentions(&self.status, "invalid peer certificate") {
            return Some(format!(
                "{} shows a certificate the CA trainctl trusts did not sign: name its CA with \
                 --tls-ca / TRAINMESH_TLS_CA (`trainctl up --tls` writes DATA_DIR/tls/ca.crt)",
                self.endpoint
            ));
        }
        // A TLS client reading plaintext.
        if mentions(&self.status, "InvalidContentType") {
            return Some(format!(
                "{} answers without TLS: write the endpoint as http://{} or trust no CA",
                self.endpoint,
                self.endpoint.trim_start_matches("https://")
            ));
        }
        // A plaintext client reading TLS.
        if mentions(&self.status, "frame with invalid size") {
            return Some(format!(
                "{} may answer with TLS: write it as host:port (not http://) and name its CA \
                 with --tls-ca / TRAINMESH_TLS_CA (`trainctl up --tls` writes \
                 DATA_DIR/tls/ca.crt)",
                self.endpoint
            ));
        }
        match self.status.code() {
            Code::Unavailable if is_connect_failure(&self.status) => Some(format!(
                "nothing answers at {} ({}); start the mesh with `trainctl up`, or point \
                 trainctl at it with --{}-endpoint / TRAINMESH_{}_ENDPOINT",
                self.endpoint,
                self.service.binary(),
                self.service.short(),
                self.service.short().to_ascii_uppercase(),
            )),
            Code::Unauthenticated => Some(
                "check the token: --token, TRAINMESH_TOKEN, or DATA_DIR/admin.token \
                 (written by `trainctl up --data-dir DATA_DIR`)"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// Whether the status's message or any of its sources says `needle`.
fn mentions(status: &Status, needle: &str) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut found = status.message().contains(needle);
    while let (false, Some(err)) = (found, source) {
        found = err.to_string().contains(needle);
        source = err.source();
    }
    found
}

fn is_connect_failure(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) {
                return true;
            }
        }
        source = err.source();
    }
    let msg = status.message().to_ascii_lowercase();
    msg.contains("connection refused")
        || msg.contains("tcp connect error")
        || msg.contains("error trying to connect")
        || msg.contains("address file")
}

/// `Code::NotFound` → `NOT_FOUND`, the name users see in grpcurl and docs.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pub struct Context {
    pub global: GlobalArgs,
    pub correlation_id: String,
}

impl Context {
    pub fn new(global: GlobalArgs, correlation_id: String) -> Self {
        Self {
            global,
            correlation_id,
        }
    }

    pub fn json(&self) -> bool {
        self.global.output == OutputFormat::Json
    }

    /// `--token` / `TRAINMESH_TOKEN`, else `DATA_DIR/admin.token`.
    pub fn token(&self) -> anyhow::Result<String> {
        if let Some(t) = &self.global.token {
            let t = t.trim();
            if t.is_empty() {
                anyhow::bail!("the token given with --token / TRAINMESH_TOKEN is empty");
            }
            return Ok(t.to_owned());
        }
        let path = self.global.data_dir.join("admin.token");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "no token: pass --token or set TRAINMESH_TOKEN, or start the mesh with \
                 `trainctl up` (which writes DATA_DIR/admin.token); could not read {}: {e}",
                path.display()
            )
        })?;
        let t = text.trim();
        if t.is_empty() {
            anyhow::bail!("token file {} is empty", path.display());
        }
        Ok(t.to_owned())
    }

    fn channel(&self, service: Service) -> anyhow::Result<Channel> {
        let token = self.token()?;
        let endpoint = service.endpoint(&self.global);
        client::channel_with(endpoint, Some(&token), &client_tls(&self.global)?)
            .with_context(|| format!("invalid {} endpoint `{endpoint}`", service.binary()))
    }

    pub fn jobs(&self) -> anyhow::Result<JobServiceClient<Channel>> {
        Ok(JobServiceClient::new(self.channel(Service::Job)?).max_decoding_message_size(MAX_MSG))
    }

    pub fn scheduler(&self) -> anyhow::Result<SchedulerServiceClient<Channel>> {
        Ok(
            SchedulerServiceClient::new(self.channel(Service::Scheduler)?)
                .max_decoding_message_size(MAX_MSG),
        )
    }

    pub fn metrics(&self) -> anyhow::Result<MetricsServiceClient<Channel>> {
        Ok(MetricsServiceClient::new(self.channel(Service::Metrics)?)
            .max_decoding_message_size(MAX_MSG))
    }

    pub fn diagnosis(&self) -> anyhow::Result<DiagnosisServiceClient<Channel>> {
        Ok(
            DiagnosisServiceClient::new(self.channel(Service::Diagnosis)?)
                .max_decoding_message_size(MAX_MSG),
        )
    }

    /// TokenService, which job-service serves.
    pub fn tokens(&self) -> anyhow::Result<TokenServiceClient<Channel>> {
        Ok(TokenServiceClient::new(self.channel(Service::Job)?))
    }

    /// The audit log of one service.
    pub fn audit(&self, service: Service) -> anyhow::Result<AuditServiceClient<Channel>> {
        Ok(AuditServiceClient::new(self.channel(service)?).max_decoding_message_size(MAX_MSG))
    }

    /// For `.map_err(ctx.err(Service::Job))` on a call.
    pub fn err(&self, service: Service) -> impl Fn(Status) -> RpcError + '_ {
        move |status| RpcError {
            status,
            service,
            endpoint: service.endpoint(&self.global).to_owned(),
        }
    }
}

/// `--tls-ca` / `TRAINMESH_TLS_CA` and the client identity, else the local
/// mesh's CA when `trainctl up --tls` left one in the data dir, else
/// plaintext.
pub fn client_tls(global: &GlobalArgs) -> anyhow::Result<ClientTls> {
    let mut args = global.tls.clone();
    if args.tls_ca.is_none() {
        let local = crate::certs::local_ca(&global.data_dir);
        args.tls_ca = local.is_file().then_some(local);
    }
    args.load()
}

/// Job listings with long error messages can be large.
const MAX_MSG: usize = 64 * 1024 * 1024;

/// Writes to stdout; a closed pipe (`trainctl logs J | head`) surfaces as
/// an `io::Error` that [`report`] treats as a quiet success.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

pub fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    print(&serde_json::to_string_pretty(value)?)
}

/// One JSON document per line, for streams.
pub fn print_json_line(value: &serde_json::Value) -> anyhow::Result<()> {
    print(&serde_json::to_string(value)?)
}

/// Prints a failed command's error to stderr and returns the exit code.
pub fn report(err: &anyhow::Error, correlation_id: &str) -> u8 {
    if err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }) {
        return 0;
    }
    match err.chain().find_map(|e| e.downcast_ref::<RpcError>()) {
        Some(rpc) => {
            eprintln!("error: {rpc} (correlation id: {correlation_id})");
            if let Some(hint) = rpc.hint() {
                eprintln!("hint: {hint}");
            }
        }
        None => eprintln!("error: {err:#}"),
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(status: Status) -> RpcError {
        RpcError {
            status,
            service: Service::Job,
            endpoint: "127.0.0.1:50051".into(),
        }
    }

    #[test]
    fn rpc_errors_read_code_then_message() {
        let e = rpc(Status::invalid_argument("invalid `spec.name`: is required"));
        assert_eq!(
            e.to_string(),
            "INVALID_ARGUMENT: invalid `spec.name`: is required"
        );
        assert!(e.hint().is_none());
    }

    #[test]
    fn refused_connections_hint_at_trainctl_up() {
        let e = rpc(Status::unavailable(
            "error trying to connect: tcp connect error: Connection refused (os error 111)",
        ));
        let hint = e.hint().unwrap();
        assert!(hint.contains("trainctl up"), "{hint}");
        assert!(hint.contains("127.0.0.1:50051"), "{hint}");
        assert!(hint.contains("--job-endpoint"), "{hint}");
    }

    #[test]
    fn tls_mismatches_hint_at_the_ca() {
        let untrusted = rpc(Status::unavailable(
            "invalid peer certificate: UnknownIssuer",
        ));
        assert!(untrusted.hint().unwrap().contains("--tls-ca"));
        let plaintext_server = rpc(Status::unavailable(
            "received corrupt message of type InvalidContentType",
        ));
        let hint = plaintext_server.hint().unwrap();
        assert!(
            hint.contains("without TLS") && hint.contains("http://"),
            "{hint}"
        );
        let tls_server = rpc(Status::internal(
            "h2 protocol error: http2 error: connection error detected: frame with invalid size",
        ));
        assert!(tls_server.hint().unwrap().contains("--tls-ca"));
    }

    #[test]
    fn token_comes_from_the_data_dir_when_not_given() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.token"), "tm_abc\n").unwrap();
        let cli = crate::cli::Cli::try_parse_from([
            "trainctl",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "queue",
        ])
        .unwrap();
        let mut global = cli.global;
        global.token = None;
        let ctx = Context::new(global.clone(), "c".into());
        assert_eq!(ctx.token().unwrap(), "tm_abc");
        global.token = Some(" tm_flag ".into());
        assert_eq!(Context::new(global, "c".into()).token().unwrap(), "tm_flag");
    }

    #[test]
    fn missing_token_says_how_to_get_one() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let cli = crate::cli::Cli::try_parse_from([
            "trainctl",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "queue",
        ])
        .unwrap();
        let mut global = cli.global;
        global.token = None;
        let err = Context::new(global, "c".into())
            .token()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TRAINMESH_TOKEN") && err.contains("trainctl up"),
            "{err}"
        );
    }
}
