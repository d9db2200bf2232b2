//! An OpenAI-compatible chat-completions endpoint on 127.0.0.1:0 (a small
//! hyper server), recording each request it receives and answering from a
//! script: the real wire format, so that the service's own client is what
//! is tested.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use trainmesh_common::testing;

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub authorization: Option<String>,
    pub body: serde_json::Value,
}

impl Received {
    pub fn model(&self) -> &str {
        self.body["model"].as_str().unwrap_or_default()
    }

    /// The user message: the rendered prompt.
    pub fn prompt(&self) -> &str {
        self.body["messages"][0]["content"]
            .as_str()
            .unwrap_or_default()
    }
}

/// How to answer one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with this as `choices[0].message.content`.
    Answer(String),
    /// This status, with an OpenAI-style error body and maybe a
    /// `Retry-After` (seconds).
    Status(u16, Option<u64>),
    /// Never answers.
    Hang,
    /// Answers once the gate is opened (set to true).
    AfterGate(watch::Receiver<bool>, String),
}

pub const ANSWER: &str = "Here is the diagnosis.\n\n**Healthy:** No\n**Error:** Worker ddp-worker-1 was OOMKilled\n\
                          **Analysis:** The worker was killed with exit code 137 (log line 9).\n\
                          The master then lost its peer.\n**Solution:** Raise the worker's memory limit.";

#[derive(Default)]
struct State {
    received: Vec<Received>,
    script: VecDeque<Reply>,
}

#[derive(Clone)]
pub struct FakeLlm {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Used once the script is spent.
    fallback: Reply,
}

fn completion(content: &str) -> String {
    serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "served-model",
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": content },
            "finish_reason": "stop"
        }],
        "usage": { "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2 }
    })
    .to_string()
}

async fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let ok = |content: &str| {
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(completion(content))))
            .unwrap()
    };
    match reply {
        Reply::Answer(text) => ok(&text),
        Reply::Status(code, retry_after) => {
            let mut b = Response::builder()
                .status(StatusCode::from_u16(code).unwrap())
                .header("content-type", "application/json");
            if let Some(s) = retry_after {
                b = b.header("retry-after", s.to_string());
            }
            let body = serde_json::json!({ "error": { "message": format!("scripted {code}"), "type": "server_error" } });
            b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
        }
        Reply::Hang => std::future::pending().await,
        Reply::AfterGate(mut gate, text) => {
            let _ = gate.wait_for(|open| *open).await;
            ok(&text)
        }
    }
}

impl FakeLlm {
    /// Answers every request with `fallback` once `script` is spent.
    pub async fn start(script: Vec<Reply>, fallback: Reply) -> Self {
        let (listener, addr) = testing::listener().await;
        let state = Arc::new(Mutex::new(State {
            received: Vec::new(),
            script: script.into(),
        }));
        let me = Self {
            addr,
            state,
            fallback,
        };
        let server = me.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = server.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(s.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        me
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let authorization = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        let reply = {
            let mut st = self.state.lock().unwrap();
            st.received.push(Received {
                path,
                authorization,
                body,
            });
            st.script
                .pop_front()
                .unwrap_or_else(|| self.fallback.clone())
        };
        respond(reply).await
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }
}
