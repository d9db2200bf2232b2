//! TLS for every server and client, through tonic's rustls support (ring
//! is the one crypto provider in the tree).
//!
//! A server given `--tls-cert`/`--tls-key` serves TLS only; with
//! `--tls-client-ca` it also requires a client certificate signed by that
//! CA (mutual TLS). A server without TLS listens on loopback only, unless
//! `--insecure`: plaintext off the machine must be a decision, not a default.
//!
//! A client given `--tls-ca` trusts that root and connects with TLS to
//! every endpoint not written `http://`; `--tls-client-cert` and
//! `--tls-client-key` are the identity it shows a server that asks for one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};

/// A peer that opens a connection and never finishes its handshake must
/// not hold the connection for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a server accepts connections: its flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerTlsArgs {
    /// PEM certificate (chain) this server presents; with --tls-key it
    /// serves TLS only.
    #[arg(long, env = "TRAINMESH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "TRAINMESH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): clients must present a certificate signed by
    /// one of them (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "TRAINMESH_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Serve plaintext on a non-loopback address (without TLS a server
    /// otherwise listens on 127.0.0.0/8 or ::1 only).
    #[arg(
        long,
        env = "TRAINMESH_INSECURE",
        value_parser = clap::builder::BoolishValueParser::new(),
        default_value_t = false
    )]
    pub insecure: bool,
}

/// How a client connects: its flags. Global, so that a CLI with
/// subcommands (trainctl) takes them after any subcommand too.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// PEM CA certificate(s) to trust: with it, endpoints without a scheme
    /// are reached over TLS (https).
    #[arg(long, global = true, env = "TRAINMESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate shown to servers that require one (mutual
    /// TLS).
    #[arg(
        long,
        global = true,
        env = "TRAINMESH_TLS_CLIENT_CERT",
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,

    /// PEM private key of --tls-client-cert.
    #[arg(
        long,
        global = true,
        env = "TRAINMESH_TLS_CLIENT_KEY",
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,
}

/// How a server accepts connections.
#[derive(Clone, Debug, Default)]
pub enum ServerTls {
    /// Plaintext, on a loopback address only.
    #[default]
    LoopbackOnly,
    /// Plaintext on any address (`--insecure`).
    Insecure,
    /// TLS; mutual when the config names a client CA.
    Tls(Box<ServerTlsConfig>),
}

impl ServerTls {
    /// TLS with this identity; `client_ca`: require client certificates
    /// signed by it.
    pub fn from_pem(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> anyhow::Result<Self> {
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = client_ca {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        // Built once here so that a bad file stops the process at start,
        // not at its first connection.
        Server::builder().tls_config(config.clone())?;
        Ok(ServerTls::Tls(Box::new(config)))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ServerTls::Tls(_))
    }

    /// Refuses plaintext on an address other machines can reach, unless
    /// `--insecure`.
    pub fn check_listen(&self, addr: SocketAddr) -> anyhow::Result<()> {
        if matches!(self, ServerTls::LoopbackOnly) && !addr.ip().to_canonical().is_loopback() {
            anyhow::bail!(
                "refusing to serve plaintext gRPC on {addr}, which is not a loopback address: \
                 serve TLS with --tls-cert and --tls-key (TRAINMESH_TLS_CERT, TRAINMESH_TLS_KEY), \
                 listen on 127.0.0.1, or pass --insecure (TRAINMESH_INSECURE=1) to serve \
                 plaintext anyway"
            );
        }
        Ok(())
    }

    /// A server builder for `addr`: TLS when configured, after
    /// [`ServerTls::check_listen`].
    pub fn server_builder(&self, addr: SocketAddr) -> anyhow::Result<Server> {
        self.check_listen(addr)?;
        Ok(match self {
            ServerTls::Tls(config) => Server::builder().tls_config((**config).clone())?,
            _ => Server::builder(),
        })
    }
}

impl ServerTlsArgs {
    pub fn load(&self) -> anyhow::Result<ServerTls> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let client_ca = self
                    .tls_client_ca
                    .as_deref()
                    .map(|p| read(p, "--tls-client-ca"))
                    .transpose()?;
                ServerTls::from_pem(
                    &read(cert, "--tls-cert")?,
                    &read(key, "--tls-key")?,
                    client_ca.as_deref(),
                )
                .map_err(|e| {
                    anyhow::anyhow!(
                        "invalid TLS identity {} / {}: {e:#}",
                        cert.display(),
                        key.display()
                    )
                })
            }
            (None, None) if self.tls_client_ca.is_some() => {
                anyhow::bail!("--tls-client-ca needs --tls-cert and --tls-key")
            }
            (None, None) if self.insecure => Ok(ServerTls::Insecure),
            (None, None) => Ok(ServerTls::LoopbackOnly),
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        }
    }
}

/// How a client connects: plaintext (the default) or TLS.
#[derive(Clone, Default)]
pub struct ClientTls(Option<ClientTlsConfig>);

/// Not derived: the config's Debug would print the client's private key.
impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_tls() {
            "ClientTls(tls)"
        } else {
            "ClientTls(plaintext)"
        })
    }
}

impl ClientTls {
    /// TLS trusting `ca`; `identity` (certificate, key) is shown to servers
    /// that require a client certificate.
    pub fn from_pem(ca: &[u8], identity: Option<(&[u8], &[u8])>) -> Self {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some((cert, key)) = identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        ClientTls(Some(config))
    }

    pub fn is_tls(&self) -> bool {
        self.0.is_some()
    }

    pub fn config(&self) -> Option<&ClientTlsConfig> {
        self.0.as_ref()
    }
}

impl ClientTlsArgs {
    pub fn load(&self) -> anyhow::Result<ClientTls> {
        let identity = match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(c), Some(k)) => {
                Some((read(c, "--tls-client-cert")?, read(k, "--tls-client-key")?))
            }
            (None, None) => None,
            _ => anyhow::bail!("--tls-client-cert and --tls-client-key go together"),
        };
        let Some(ca) = &self.tls_ca else {
            anyhow::ensure!(
                identity.is_none(),
                "--tls-client-cert needs --tls-ca, the CA that signed the servers' certificates"
            );
            return Ok(ClientTls::default());
        };
        let ca = read(ca, "--tls-ca")?;
        let identity = identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice()));
        Ok(ClientTls::from_pem(&ca, identity))
    }
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {flag} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerTlsArgs,
        #[command(flatten)]
        client: ClientTlsArgs,
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn plaintext_is_refused_off_loopback_unless_insecure() {
        let plain = ServerTls::LoopbackOnly;
        for ok in [
            "127.0.0.1:1",
            "127.8.9.10:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            plain.check_listen(addr(ok)).unwrap();
        }
        for refused in ["0.0.0.0:1", "[::]:1", "10.1.2.3:1"] {
            let err = plain.check_listen(addr(refused)).unwrap_err().to_string();
            assert!(
                err.contains("--insecure") && err.contains("--tls-cert"),
                "{err}"
            );
        }
        ServerTls::Insecure.check_listen(addr("0.0.0.0:1")).unwrap();
    }

    #[test]
    fn insecure_allows_plaintext_anywhere() {
        let cli = Cli::try_parse_from(["x", "--insecure"]).unwrap();
        assert!(matches!(cli.server.load().unwrap(), ServerTls::Insecure));
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert!(matches!(
            cli.server.load().unwrap(),
            ServerTls::LoopbackOnly
        ));
        assert!(!cli.client.load().unwrap().is_tls());
    }

    #[test]
    fn half_an_identity_is_refused() {
        assert!(Cli::try_parse_from(["x", "--tls-cert", "c.pem"]).is_err());
        assert!(Cli::try_parse_from(["x", "--tls-client-key", "k.pem"]).is_err());
        assert!(Cli::try_parse_from(["x", "--tls-client-ca", "ca.pem"]).is_err());
    }

    #[test]
    fn missing_files_are_named_with_their_flag() {
        let cli = Cli::try_parse_from(["x", "--tls-ca", "/nonexistent/ca.pem"]).unwrap();
        let err = cli.client.load().unwrap_err().to_string();
        assert!(err.contains("--tls-ca /nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_bad_identity_stops_the_server_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let args = ServerTlsArgs {
            tls_cert: Some(cert),
            tls_key: Some(key),
            ..ServerTlsArgs::default()
        };
        let err = args.load().unwrap_err().to_string();
        assert!(err.contains("invalid TLS identity"), "{err}");
    }
}
