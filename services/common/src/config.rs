//! Flags and environment shared by every service binary. Each service adds
//! its own (listen address, database URL, peers) next to these.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::TokenStore;
use crate::server::ServerOptions;
use crate::tls::{ClientTls, ClientTlsArgs, ServerTlsArgs};

#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Directory for SQLite files, logs and tokens.
    #[arg(long, env = "TRAINMESH_DATA_DIR", default_value = ".trainmesh")]
    pub data_dir: PathBuf,

    /// Where tokens come from: tokens files (YAML with SHA-256 hashes, read
    /// at start) and at most one token database (`sqlite:PATH` or
    /// `postgres://…`: tokens created with `trainctl tokens create`,
    /// reloaded within a second of a change). Repeatable; the environment
    /// variable takes a comma-separated list. Default: DATA_DIR/tokens.yaml
    /// and the SQLite database DATA_DIR/auth.db.
    #[arg(long, env = "TRAINMESH_TOKENS", value_delimiter = ',')]
    pub tokens: Vec<String>,

    /// File holding this process's own token for calls to other services:
    /// each service has its own (user = the service's name, role
    /// `service`), each runner too (user = the runner's name, role
    /// `runner`). Default: DATA_DIR/NAME.token, e.g. job-service.token or
    /// runner.token.
    #[arg(long, env = "TRAINMESH_SERVICE_TOKEN_FILE")]
    pub service_token_file: Option<PathBuf>,

    /// The mesh's secrets key (64 hex characters), with which job-service
    /// seals the env values a job marks secret and runners open them. Only
    /// job-service and the runners use it. Default: DATA_DIR/secrets.key
    /// when that file exists.
    #[arg(long, env = "TRAINMESH_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<PathBuf>,

    /// Calls in flight before new ones are refused with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "TRAINMESH_MAX_CONCURRENT_REQUESTS",
        default_value_t = 1024
    )]
    pub max_concurrent_requests: usize,

    /// Per-call timeout in seconds (streams are not cut by it).
    #[arg(long, env = "TRAINMESH_REQUEST_TIMEOUT_SECS", default_value_t = 60)]
    pub request_timeout_secs: u64,

    /// After binding, write the listening address here (for `--listen
    /// 127.0.0.1:0`; peers can then use `file:PATH` as this service's
    /// endpoint).
    #[arg(long, env = "TRAINMESH_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,

    /// Largest request or response message in bytes.
    #[arg(long, env = "TRAINMESH_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Streaming calls (watches, log follows, metric streams) one caller may
    /// hold open at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "TRAINMESH_MAX_STREAMS_PER_CALLER",
        default_value_t = crate::inbound::DEFAULT_MAX_STREAMS_PER_CALLER
    )]
    pub max_streams_per_caller: usize,

    #[command(flatten)]
    pub server_tls: ServerTlsArgs,

    #[command(flatten)]
    pub client_tls: ClientTlsArgs,
}

/// Makes every file and directory this process creates private to its user
/// (umask 077): databases, tokens, logs and data directories hold what a
/// job or another local user must not read. Called first by every binary.
pub fn private_files() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

impl CommonArgs {
    pub async fn token_store(&self) -> anyhow::Result<Arc<TokenStore>> {
        Ok(Arc::new(
            TokenStore::load_sources(&self.token_sources()).await?,
        ))
    }

    /// `--tokens`, or the data dir's tokens file and token database.
    pub fn token_sources(&self) -> Vec<String> {
        let given: Vec<String> = self
            .tokens
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if !given.is_empty() {
            return given;
        }
        vec![
            self.data_dir.join("tokens.yaml").display().to_string(),
            crate::db::sqlite_url(&self.data_dir, "auth.db"),
        ]
    }

    /// The secrets key: a file named with `--secrets-key-file` must be
    /// readable; without one, `DATA_DIR/secrets.key` if it exists.
    pub fn secrets_key(&self) -> anyhow::Result<Option<Arc<crate::sealed::SecretsKey>>> {
        let key = match &self.secrets_key_file {
            Some(path) => Some(crate::sealed::SecretsKey::load(path)?),
            None => crate::sealed::SecretsKey::load_optional(&self.data_dir.join("secrets.key"))?,
        };
        Ok(key.map(Arc::new))
    }

    /// Where the token of `name` (a service's or `runner`) is read from.
    pub fn service_token_path(&self, name: &str) -> PathBuf {
        self.service_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(format!("{name}.token")))
    }

    /// The token `name` (a service's or `runner`) presents to its peers.
    pub fn service_token(&self, name: &str) -> anyhow::Result<String> {
        let path = self.service_token_path(name);
        let t = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!("cannot read the token of {name} {}: {e}", path.display())
        })?;
        Ok(t.trim().to_owned())
    }

    /// This service's token for calls to peers, when it has one. A file
    /// named with `--service-token-file` must be readable; the default file
    /// may be missing: the service then starts, calls to peers are refused
    /// (`what` says which), and outboxes keep their messages until a token
    /// is configured.
    pub fn optional_service_token(&self, name: &str, what: &str) -> anyhow::Result<Option<String>> {
        match self.service_token(name) {
            Ok(t) => Ok(Some(t)),
            Err(e) if self.service_token_file.is_some() => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "no service token; {what}");
                Ok(None)
            }
        }
    }

    /// Reads the TLS files, so a bad one stops the service at start.
    pub fn server_options(&self) -> anyhow::Result<ServerOptions> {
        Ok(ServerOptions {
            max_concurrent_requests: self.max_concurrent_requests,
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            max_message_bytes: self.max_message_bytes,
            max_streams_per_caller: self.max_streams_per_caller,
            tls: self.server_tls.load()?,
            ..ServerOptions::default()
        })
    }

    /// How this service's calls to its peers connect.
    pub fn client_tls(&self) -> anyhow::Result<ClientTls> {
        self.client_tls.load()
    }

    /// Binds `listen` and writes the bound address to `--addr-file`.
    /// Plaintext on a non-loopback address is refused here, before the
    /// service opens its database, and not only when it starts serving.
    pub async fn bind(&self, listen: &str) -> anyhow::Result<tokio::net::TcpListener> {
        let l = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        self.server_tls.load()?.check_listen(l.local_addr()?)?;
        if let Some(path) = &self.addr_file {
            crate::client::write_addr_file(path, l.local_addr()?)?;
        }
        Ok(l)
    }

    /// `explicit`, or the SQLite file `file` under the data dir.
    pub fn database_url(&self, explicit: Option<&str>, file: &str) -> String {
        explicit
            .map(str::to_owned)
            .unwrap_or_else(|| crate::db::sqlite_url(&self.data_dir, file))
    }
}
