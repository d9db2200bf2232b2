//! Outgoing gRPC channels. Every call carries the bearer token, the current
//! correlation id and trace context, so logs and traces join across services.

use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;
use tonic::{Request, Status};

use crate::correlation;
use crate::tls::ClientTls;

#[derive(Clone, Debug, Default)]
pub struct ClientInterceptor {
    authorization: Option<AsciiMetadataValue>,
}

impl ClientInterceptor {
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        let authorization = token
            .map(|t| AsciiMetadataValue::try_from(format!("Bearer {}", t.trim())))
            .transpose()
            .map_err(|_| anyhow::anyhow!("token contains characters not allowed in a header"))?;
        Ok(Self { authorization })
    }
}

impl tonic::service::Interceptor for ClientInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let md = req.metadata_mut();
        if let Some(auth) = &self.authorization {
            md.insert("authorization", auth.clone());
        }
        if let Some(ctx) = correlation::current_context() {
            insert(md, correlation::HEADER, &ctx.correlation_id);
            if !crate::telemetry::inject_current(md) {
                if let Some(tp) = &ctx.traceparent {
                    insert(md, correlation::TRACEPARENT, tp);
                }
            }
        } else {
            crate::telemetry::inject_current(md);
        }
        Ok(req)
    }
}

fn insert(md: &mut MetadataMap, key: &'static str, value: &str) {
    if let Ok(v) = AsciiMetadataValue::try_from(value) {
        md.insert(key, v);
    }
}

pub type Channel = InterceptedService<tonic::transport::Channel, ClientInterceptor>;

/// `endpoint` as a URI: `host:port` becomes `https://host:port` with TLS,
/// `http://host:port` without; a scheme given is kept.
fn endpoint_uri(endpoint: &str, tls: bool) -> String {
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

/// A plaintext [`channel_with`], for tests and tools on loopback.
pub fn channel(endpoint: &str, token: Option<&str>) -> anyhow::Result<Channel> {
    channel_with(endpoint, token, &ClientTls::default())
}

/// A lazily connecting channel to `endpoint` with the interceptor applied,
/// over TLS when `tls` says so. Lazy so that services start in any order.
///
/// `endpoint` is `host:port`, `http(s)://host:port`, or `file:PATH`: a file
/// holding `host:port`, read at every (re)connect. The last form lets
/// services that listen on port 0 (tests, ad-hoc meshes) find each other:
/// each writes its bound address with `--addr-file`. Such a server is on
/// this machine, so over TLS its certificate must name `localhost`.
pub fn channel_with(
    endpoint: &str,
    token: Option<&str>,
    tls: &ClientTls,
) -> anyhow::Result<Channel> {
    let interceptor = ClientInterceptor::new(token)?;
    if let Some(path) = endpoint.strip_prefix("file:") {
        let path = std::path::PathBuf::from(path);
        let host = if tls.is_tls() {
            "https://localhost"
        } else {
            "http://addr-file.invalid"
        };
        let ep = endpoint_with(host, tls)?;
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let path = path.clone();
            async move {
                let addr = tokio::fs::read_to_string(&path).await.map_err(|e| {
                    std::io::Error::new(e.kind(), format!("address file {}: {e}", path.display()))
                })?;
                let stream = tokio::net::TcpStream::connect(addr.trim()).await?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        return Ok(InterceptedService::new(
            ep.connect_with_connector_lazy(connector),
            interceptor,
        ));
    }
    let ep = endpoint_with(&endpoint_uri(endpoint, tls.is_tls()), tls)?;
    Ok(InterceptedService::new(ep.connect_lazy(), interceptor))
}

fn endpoint_with(uri: &str, tls: &ClientTls) -> anyhow::Result<Endpoint> {
    let ep = configure(Endpoint::from_shared(uri.to_owned())?);
    match tls.config() {
        Some(config) => Ok(ep.tls_config(config.clone())?),
        None if uri.starts_with("https://") => anyhow::bail!(
            "`{uri}` needs TLS, but no CA to trust is given: set --tls-ca (TRAINMESH_TLS_CA)"
        ),
        None => Ok(ep),
    }
}

fn configure(ep: Endpoint) -> Endpoint {
    ep.connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
}

/// Writes `addr` to `path` atomically (temp file + rename), so a reader
/// never sees half an address.
pub fn write_addr_file(path: &std::path::Path, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, addr.to_string())?;
    std::fs::rename(tmp, path)
}
