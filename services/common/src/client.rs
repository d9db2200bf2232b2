//! Outgoing gRPC channels. Every call carries the bearer token, the current
//! correlation id and trace context, so logs and traces join across services.

use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;
use tonic::{Request, Status};

use crate::correlation;

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

/// Normalises `host:port` to `http://host:port`.
pub fn endpoint_uri(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}

/// A lazily connecting channel to `endpoint` with the interceptor applied.
/// Lazy so that services start in any order.
///
/// `endpoint` is `host:port`, `http://host:port`, or `file:PATH`: a file
/// holding `host:port`, read at every (re)connect. The last form lets
/// services that listen on port 0 (tests, ad-hoc meshes) find each other:
/// each writes its bound address with `--addr-file`.
pub fn channel(endpoint: &str, token: Option<&str>) -> anyhow::Result<Channel> {
    let interceptor = ClientInterceptor::new(token)?;
    if let Some(path) = endpoint.strip_prefix("file:") {
        let path = std::path::PathBuf::from(path);
        let ep = configure(Endpoint::from_static("http://addr-file.invalid"));
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
    let ep = configure(Endpoint::from_shared(endpoint_uri(endpoint))?);
    Ok(InterceptedService::new(ep.connect_lazy(), interceptor))
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
