//! Limits on what a caller sends and holds open, as server layers.
//!
//! - [`oversize_layer`]: tonic answers a request larger than the server's
//!   message limit with OUT_OF_RANGE; a caller cannot tell that from a
//!   value out of range, so it becomes RESOURCE_EXHAUSTED naming the limit.
//!   (Malformed protobuf is INVALID_ARGUMENT through the generated code's
//!   codec.)
//! - [`StreamCapLayer`]: each caller may hold a bounded number of streaming
//!   calls open at once; beyond it, RESOURCE_EXHAUSTED (other services
//!   are not counted). Which methods stream
//!   comes from the service descriptors, so a new streaming RPC is covered
//!   without a list to keep up to date.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::{Code, Status};

use crate::auth::{Caller, Role};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Streaming calls one caller may hold open at once, by default.
pub const DEFAULT_MAX_STREAMS_PER_CALLER: usize = 64;

const TOO_LARGE: &str = "Error, decoded message length too large";

/// See the module documentation: a response mapping, nothing more.
pub fn oversize_layer(
    limit: usize,
) -> tower::util::MapResponseLayer<impl Fn(http::Response<Body>) -> http::Response<Body> + Clone> {
    tower::util::MapResponseLayer::new(move |resp: http::Response<Body>| {
        // A request refused before its handler ran is answered with the
        // status in the headers ("trailers only"); every other response
        // is passed on after one header comparison.
        if resp.headers().get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
            return resp;
        }
        match Status::from_header_map(resp.headers()) {
            Some(s) if is_too_large(&s) => oversized(limit, &s).into_http(),
            _ => resp,
        }
    })
}

fn is_too_large(s: &Status) -> bool {
    s.code() == Code::OutOfRange && s.message().starts_with(TOO_LARGE)
}

fn oversized(limit: usize, s: &Status) -> Status {
    Status::resource_exhausted(format!(
        "the request is larger than this server accepts ({limit} bytes; \
         --max-message-bytes): {}",
        s.message()
    ))
}

/// For a message of a client stream that tonic refused as too large (the
/// layer only sees refusals made before the handler ran).
pub fn stream_message_status(limit: usize, s: Status) -> Status {
    if is_too_large(&s) {
        oversized(limit, &s)
    } else {
        s
    }
}

/// Paths (`/package.Service/Method`) of every streaming method in the
/// encoded file descriptor sets.
pub fn streaming_methods(sets: &[&[u8]]) -> HashSet<String> {
    use prost::Message;
    let mut paths = HashSet::new();
    for bytes in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*bytes) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = service.name.unwrap_or_default();
                for m in service.method {
                    if m.client_streaming() || m.server_streaming() {
                        paths.insert(format!("/{package}.{name}/{}", m.name.unwrap_or_default()));
                    }
                }
            }
        }
    }
    paths
}

/// See the module documentation. Must sit inside the authentication layer:
/// it counts by the authenticated user.
#[derive(Clone, Debug)]
pub struct StreamCapLayer {
    max: usize,
    streaming: Arc<HashSet<String>>,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl StreamCapLayer {
    pub fn new(max: usize, streaming: HashSet<String>) -> Self {
        Self {
            max: max.max(1),
            streaming: Arc::new(streaming),
            open: Arc::default(),
        }
    }
}

impl<S> tower::Layer<S> for StreamCapLayer {
    type Service = StreamCap<S>;
    fn layer(&self, inner: S) -> Self::Service {
        StreamCap {
            inner,
            cap: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct StreamCap<S> {
    inner: S,
    cap: StreamCapLayer,
}

/// One open stream of a caller; gives its place back when the response
/// body is dropped (the stream ended or the client went away).
struct Slot {
    user: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

impl StreamCapLayer {
    fn take(&self, user: &str) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(user.to_owned()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            user: user.to_owned(),
            open: self.open.clone(),
        })
    }
}

struct Held {
    body: Body,
    _slot: Slot,
}

impl http_body::Body for Held {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<S, B> tower::Service<http::Request<B>> for StreamCap<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Services (diagnosis reading logs, say) stream on behalf of many
        // users and are trusted not to leak streams.
        let user = match req.extensions().get::<Caller>() {
            Some(c)
                if !(c.has(Role::Service) || c.has(Role::Runner))
                    && self.cap.streaming.contains(req.uri().path()) =>
            {
                c.user.clone()
            }
            _ => return Box::pin(inner.call(req)),
        };
        let Some(slot) = self.cap.take(&user) else {
            let max = self.cap.max;
            let resp = Status::resource_exhausted(format!(
                "`{user}` already holds {max} streams open on this server, the most \
                 one caller may; close some first"
            ))
            .into_http();
            return Box::pin(async move { Ok(resp) });
        };
        Box::pin(async move {
            let resp = inner.call(req).await?;
            Ok(resp.map(|body| Body::new(Held { body, _slot: slot })))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_methods_come_from_the_descriptors() {
        let paths = streaming_methods(&[trainmesh_proto::FILE_DESCRIPTOR_SET]);
        assert!(paths.contains("/trainmesh.job.v1.JobService/WatchJobs"));
        assert!(paths.contains("/trainmesh.job.v1.JobService/StreamJobLogs"));
        assert!(paths.contains("/trainmesh.metrics.v1.MetricsService/StreamWriteMetrics"));
        assert!(!paths.contains("/trainmesh.job.v1.JobService/CreateJob"));
    }

    #[test]
    fn a_callers_slots_are_counted_and_given_back() {
        let cap = StreamCapLayer::new(2, HashSet::new());
        let a = cap.take("alice").unwrap();
        let _b = cap.take("alice").unwrap();
        assert!(cap.take("alice").is_none());
        assert!(cap.take("bob").is_some(), "the cap is per caller");
        drop(a);
        assert!(cap.take("alice").is_some());
    }
}
