//! A scripted Kubernetes API for tests: a `kube::Client` over
//! `tower_test::mock`, answering each request from a route function and
//! recording what was asked (method, path, query, JSON body).

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

/// One request the backend made.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The JSON body; `Null` when there was none.
    pub body: Value,
}

impl Recorded {
    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }
}

/// What a route answers.
pub enum Reply {
    Json(u16, Value),
    Text(String),
}

/// A `Status` error document as the API server sends it.
pub fn status(code: u16, reason: &str, message: &str) -> Reply {
    Reply::Json(
        code,
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }),
    )
}

pub fn ok(v: Value) -> Reply {
    Reply::Json(200, v)
}

/// A client for namespace `training` whose requests `route` answers.
pub fn client(
    mut route: impl FnMut(&Recorded) -> Reply + Send + 'static,
) -> (Client, Arc<Mutex<Vec<Recorded>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let rec = Recorded {
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let reply = route(&rec);
            seen.lock().unwrap().push(rec);
            let (code, bytes) = match reply {
                Reply::Json(code, v) => (code, serde_json::to_vec(&v).unwrap()),
                Reply::Text(t) => (200, t.into_bytes()),
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(bytes))
                    .unwrap(),
            );
        }
    });
    (Client::new(service, "training"), log)
}

/// Reads a fixture document of tests/fixtures/k8s/.
pub fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

pub fn empty_list(kind: &str) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": []})
}
