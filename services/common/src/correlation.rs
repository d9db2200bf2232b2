//! Correlation ids and trace context.
//!
//! The server layer accepts `x-correlation-id` (or generates one), echoes it
//! in the response, opens the request's span with it (so it is on every log
//! line) and keeps it in a task-local so that [`crate::client`] puts it on
//! every outgoing call. `traceparent` is honoured the same way: with OTLP
//! export on, the span joins the caller's trace; without it the header is
//! passed through unchanged.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue};
use tracing::Instrument;

pub const HEADER: &str = "x-correlation-id";
pub const TRACEPARENT: &str = "traceparent";

/// What a request carries to the calls it makes.
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub correlation_id: String,
    pub traceparent: Option<String>,
}

tokio::task_local! {
    static CURRENT: RequestContext;
}

/// The correlation id of the request (or background unit of work) being
/// served by this task, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(|c| c.correlation_id.clone()).ok()
}

pub(crate) fn current_context() -> Option<RequestContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Runs `fut` with `correlation_id` as the current one, for background work
/// done on behalf of a request (outbox delivery, dispatch, a job's attempt).
pub async fn scope<F: Future>(correlation_id: impl Into<String>, fut: F) -> F::Output {
    let ctx = RequestContext {
        correlation_id: correlation_id.into(),
        traceparent: None,
    };
    CURRENT.scope(ctx, fut).await
}

/// Runs `fut` as background work for a request that happened earlier
/// (an outbox delivery): under its correlation id, in a span `name` that
/// joins the request's trace when `traceparent` is known.
pub async fn scope_traced<F: Future>(
    correlation_id: String,
    traceparent: Option<String>,
    name: &'static str,
    fut: F,
) -> F::Output {
    let span = tracing::info_span!("work", otel.name = name, correlation_id = %correlation_id);
    if let Some(tp) = &traceparent {
        crate::telemetry::set_parent_from_traceparent(&span, tp);
    }
    let ctx = RequestContext {
        correlation_id,
        traceparent,
    };
    CURRENT.scope(ctx, fut.instrument(span)).await
}

/// The trace context to store with work that outlives this request: the
/// current span's when tracing is on, else the caller's `traceparent`.
pub fn traceparent() -> Option<String> {
    crate::telemetry::current_traceparent()
        .or_else(|| CURRENT.try_with(|c| c.traceparent.clone()).ok().flatten())
}

pub fn generate() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Accepts a caller's id only if it is short and printable, so it cannot
/// break log lines or headers; otherwise a new one is generated.
pub fn accept(value: Option<&str>) -> String {
    match value {
        Some(v)
            if !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b)) =>
        {
            v.to_owned()
        }
        _ => generate(),
    }
}

/// Request extension with the request's correlation id.
#[derive(Clone, Debug)]
pub struct CorrelationId(pub String);

/// Tower layer: correlation id, span, trace parent. Outermost in the stack.
#[derive(Clone, Debug, Default)]
pub struct CorrelationLayer;

impl<S> tower::Layer<S> for CorrelationLayer {
    type Service = CorrelationService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CorrelationService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct CorrelationService<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for CorrelationService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone that was driven to readiness must serve this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);

        let headers = req.headers();
        let id = accept(headers.get(HEADER).and_then(|v| v.to_str().ok()));
        let traceparent = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let path = req.uri().path().to_owned();
        let quiet = path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.");
        let span = tracing::info_span!(
            "rpc",
            rpc = %path,
            correlation_id = %id,
            user = tracing::field::Empty,
            otel.name = %path,
        );
        crate::telemetry::set_parent_from_headers(&span, req.headers());
        req.extensions_mut().insert(CorrelationId(id.clone()));
        let header_value = HeaderValue::from_str(&id).ok();
        let ctx = RequestContext {
            correlation_id: id,
            traceparent,
        };
        let started = std::time::Instant::now();
        let fut = async move {
            let result = inner.call(req).await;
            match result {
                Ok(mut resp) => {
                    let code = grpc_code(resp.headers());
                    if !quiet {
                        let ms = started.elapsed().as_secs_f64() * 1000.0;
                        match code {
                            Some(c) if c != "0" => {
                                tracing::info!(grpc_code = c, elapsed_ms = ms, "rpc failed")
                            }
                            _ => tracing::info!(elapsed_ms = ms, "rpc served"),
                        }
                    }
                    if let Some(v) = header_value {
                        resp.headers_mut().insert(HEADER, v);
                    }
                    Ok(resp)
                }
                Err(e) => Err(e),
            }
        };
        Box::pin(CURRENT.scope(ctx, fut.instrument(span)))
    }
}

fn grpc_code(headers: &HeaderMap) -> Option<&str> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_printable_ids_and_replaces_others() {
        assert_eq!(accept(Some("abc-123")), "abc-123");
        assert_ne!(accept(Some("bad\nid")), "bad\nid");
        assert_ne!(accept(Some("")), "");
        assert_eq!(accept(None).len(), 36);
        let long = "a".repeat(129);
        assert_ne!(accept(Some(&long)), long);
    }

    #[tokio::test]
    async fn scope_sets_current() {
        assert_eq!(current(), None);
        let seen = scope("cid-1", async { current() }).await;
        assert_eq!(seen.as_deref(), Some("cid-1"));
    }
}
