//! A client of an OpenAI-compatible chat-completions endpoint (OpenAI,
//! vLLM, Ollama, LiteLLM, …): one user message per prompt, the answer
//! read from `choices[0].message.content`.
//!
//! Each request has its own timeout. Connection errors, 429 and 5xx are
//! retried a bounded number of times with exponential backoff; a 429's
//! `Retry-After` is honoured when it is short, and ends the retries when it
//! is not. A request that timed out is not retried: the caller's wait is
//! already spent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Largest answer body read, in bytes.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// The longest `Retry-After` waited for; a longer one ends the retries.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// The longest pause between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the endpoint.
#[derive(Clone, Debug)]
pub struct LlmSettings {
    /// `https://api.openai.com/v1`, `http://127.0.0.1:8000/v1`, …
    pub base_url: String,
    pub model: String,
    /// A file holding the API key (a Kubernetes secret); none for an
    /// endpoint without authentication.
    pub api_key_file: Option<PathBuf>,
    /// Limit for one request, answer included.
    pub timeout: Duration,
    /// Tries after the first, on connection errors, 429 and 5xx.
    pub retries: u32,
    /// The first pause between tries; it doubles each time.
    pub backoff: Duration,
}

impl LlmSettings {
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key_file: None,
            timeout: Duration::from_secs(60),
            retries: 2,
            backoff: Duration::from_millis(500),
        }
    }
}

/// Why there is no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LlmError {
    #[error("cannot reach the LLM endpoint: {0}")]
    Connect(String),
    #[error("the LLM endpoint gave no answer within {0:?}")]
    Timeout(Duration),
    #[error("the LLM endpoint answered HTTP {code}: {message}")]
    Status { code: u16, message: String },
    #[error("the LLM endpoint asked to wait {0:?} (429 Retry-After); not waiting that long")]
    RetryLater(Duration),
    #[error("the LLM endpoint's answer is not a chat completion: {0}")]
    BadAnswer(String),
}

impl LlmError {
    fn retryable(&self) -> bool {
        match self {
            LlmError::Connect(_) => true,
            LlmError::Status { code, .. } => *code == 429 || *code >= 500,
            _ => false,
        }
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Clone)]
pub struct LlmClient {
    http: HttpClient,
    endpoint: Uri,
    model: String,
    /// `Bearer …`, marked sensitive so that it is never logged.
    authorization: Option<HeaderValue>,
    settings: Arc<LlmSettings>,
}

impl std::fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmClient")
            .field("endpoint", &self.endpoint)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// The message of `e` and of every error beneath it.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(&format!(": {inner}"));
        cur = inner.source();
    }
    s
}

impl LlmClient {
    /// Reads the key file and checks the URL; the endpoint itself is not
    /// contacted (the service starts without it).
    pub fn new(settings: LlmSettings) -> anyhow::Result<Self> {
        let base = settings.base_url.trim_end_matches('/');
        let endpoint: Uri = format!("{base}/chat/completions")
            .parse()
            .with_context(|| format!("LLM base URL `{}`", settings.base_url))?;
        let https = match endpoint.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => anyhow::bail!(
                "LLM base URL `{}` must start with http:// or https://",
                settings.base_url
            ),
        };
        anyhow::ensure!(
            !settings.model.trim().is_empty(),
            "an LLM model must be named"
        );
        let authorization = match &settings.api_key_file {
            Some(path) => {
                let key = std::fs::read_to_string(path)
                    .with_context(|| format!("LLM API key file `{}`", path.display()))?;
                let key = key.trim();
                anyhow::ensure!(
                    !key.is_empty(),
                    "LLM API key file `{}` is empty",
                    path.display()
                );
                let mut v = HeaderValue::from_str(&format!("Bearer {key}")).with_context(|| {
                    format!("LLM API key file `{}` holds no usable key", path.display())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        // ring, as everywhere in the tree; system roots only for https, so
        // an http endpoint works on a machine without them.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = if https {
            builder
                .with_provider_and_native_roots(provider)
                .context("system TLS roots for the LLM endpoint")?
        } else {
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            builder.with_tls_config(tls)
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = builder.https_or_http().enable_http1().wrap_connector(http);
        Ok(Self {
            http: Client::builder(TokioExecutor::new()).build(connector),
            endpoint,
            model: settings.model.clone(),
            authorization,
            settings: Arc::new(settings),
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// The model's answer to `prompt`, after the retries allowed.
    pub async fn complete(&self, prompt: &str) -> Result<String, LlmError> {
        let body = Bytes::from(
            serde_json::json!({
                "model": self.model,
                "messages": [{ "role": "user", "content": prompt }],
                "stream": false,
            })
            .to_string(),
        );
        let mut pause = self.settings.backoff;
        let mut tries = 0;
        loop {
            tries += 1;
            let (result, retry_after) = self.try_once(body.clone()).await;
            let err = match result {
                Ok(text) => return Ok(text),
                Err(e) => e,
            };
            if !err.retryable() || tries > self.settings.retries {
                return Err(err);
            }
            let wait = match retry_after {
                Some(d) if d > MAX_RETRY_AFTER => return Err(LlmError::RetryLater(d)),
                Some(d) => d.max(pause),
                None => pause,
            };
            tracing::warn!(error = %err, try_number = tries, wait_ms = wait.as_millis() as u64, "LLM request failed; trying again");
            tokio::time::sleep(wait).await;
            pause = (pause * 2).min(MAX_BACKOFF);
        }
    }

    /// One request: its outcome and the `Retry-After` it asked for.
    async fn try_once(&self, body: Bytes) -> (Result<String, LlmError>, Option<Duration>) {
        let mut req = Request::post(self.endpoint.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json");
        if let Some(auth) = &self.authorization {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        let req = match req.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => return (Err(LlmError::Connect(e.to_string())), None),
        };
        let timeout = self.settings.timeout;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| LlmError::Connect(chain(&e)))?;
            let (parts, body) = resp.into_parts();
            let bytes = Limited::new(body, MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| LlmError::Connect(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, LlmError>((parts, bytes))
        };
        let (parts, bytes) = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => return (Err(LlmError::Timeout(timeout)), None),
            Ok(Err(e)) => return (Err(e), None),
            Ok(Ok(x)) => x,
        };
        let retry_after = parts
            .headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if parts.status != StatusCode::OK {
            let message = error_message(&bytes);
            let code = parts.status.as_u16();
            return (Err(LlmError::Status { code, message }), retry_after);
        }
        (content(&bytes), None)
    }
}

/// `error.message` of an OpenAI-style error body, else the body's start.
fn error_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if let Some(m) = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message").or_else(|| v.get("error")))
        .and_then(|m| m.as_str())
    {
        return m.chars().take(300).collect();
    }
    let text = String::from_utf8_lossy(body);
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        "(empty body)".into()
    } else {
        text.chars().take(300).collect()
    }
}

/// `choices[0].message.content` of a chat completion.
fn content(body: &[u8]) -> Result<String, LlmError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| LlmError::BadAnswer(format!("not JSON: {e}")))?;
    let text = v
        .pointer("/choices/0/message/content")
        .and_then(|c| c.as_str())
        .ok_or_else(|| LlmError::BadAnswer("no choices[0].message.content".into()))?;
    if text.trim().is_empty() {
        return Err(LlmError::BadAnswer("the content is empty".into()));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_and_error_bodies_are_read() {
        let ok = br#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"Healthy: No"}}]}"#;
        assert_eq!(content(ok).unwrap(), "Healthy: No");
        for bad in [
            &b"<html>"[..],
            br#"{"choices":[]}"#,
            br#"{"choices":[{"message":{"content":"  "}}]}"#,
        ] {
            assert!(matches!(content(bad), Err(LlmError::BadAnswer(_))));
        }
        assert_eq!(
            error_message(br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error"}}"#),
            "Incorrect API key provided"
        );
        assert_eq!(error_message(b"Bad\n gateway"), "Bad gateway");
        assert_eq!(error_message(b""), "(empty body)");
    }

    #[test]
    fn settings_are_checked_before_any_request() {
        let e = LlmClient::new(LlmSettings::new("ftp://x/v1", "m")).unwrap_err();
        assert!(e.to_string().contains("http:// or https://"), "{e}");
        let e = LlmClient::new(LlmSettings::new("http://127.0.0.1:1/v1", " ")).unwrap_err();
        assert!(e.to_string().contains("model"), "{e}");
        let mut s = LlmSettings::new("http://127.0.0.1:1/v1/", "m");
        s.api_key_file = Some("/nonexistent/key".into());
        let e = LlmClient::new(s.clone()).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/key"), "{e:#}");
        s.api_key_file = None;
        let c = LlmClient::new(s).unwrap();
        assert_eq!(
            c.endpoint.to_string(),
            "http://127.0.0.1:1/v1/chat/completions"
        );
    }

    #[test]
    fn only_connection_errors_429_and_5xx_are_retried() {
        let status = |code| LlmError::Status {
            code,
            message: String::new(),
        };
        assert!(LlmError::Connect("refused".into()).retryable());
        assert!(status(429).retryable());
        assert!(status(503).retryable());
        assert!(!status(401).retryable());
        assert!(!LlmError::Timeout(Duration::from_secs(1)).retryable());
        assert!(!LlmError::BadAnswer(String::new()).retryable());
    }
}
