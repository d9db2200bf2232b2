//! The tower layer that authenticates every call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;

use super::TokenStore;

fn is_public(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

/// Tower layer that authenticates every call and puts the [`super::Caller`] in the
/// request's extensions.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    tokens: Arc<TokenStore>,
}

impl AuthLayer {
    pub fn new(tokens: Arc<TokenStore>) -> Self {
        Self { tokens }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    tokens: Arc<TokenStore>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
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

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if is_public(req.uri().path()) {
            return Box::pin(inner.call(req));
        }
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = match header {
            None => return reject("missing credentials: send `authorization: Bearer <token>`"),
            Some(h) => match h
                .strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
            {
                Some(t) => t.trim(),
                None => return reject("authorization must be `Bearer <token>`"),
            },
        };
        let caller = match self.tokens.authenticate(token) {
            Ok(c) => c,
            Err(refused) => return reject(&refused.to_string()),
        };
        tracing::Span::current().record("user", caller.user.as_str());
        req.extensions_mut().insert(caller);
        Box::pin(inner.call(req))
    }
}

fn reject<E: Send + 'static>(msg: &str) -> BoxFuture<Result<http::Response<tonic::body::Body>, E>> {
    let resp = Status::unauthenticated(msg).into_http();
    Box::pin(async move { Ok(resp) })
}
