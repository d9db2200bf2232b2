//! The backend's health ping against the scripted API server: it reads
//! `/version` and nothing else, and an API that answers with an error is
//! unreachable for health's purposes.

use serde_json::json;

use super::fake_api::{self, status};
use super::test_support::config;
use super::*;
use crate::backend::Backend;

#[tokio::test]
async fn ping_reads_the_version_and_nothing_else() {
    let (client, log) = fake_api::client(|r| {
        if r.is("GET", "/version") {
            fake_api::ok(json!({
                "major": "1", "minor": "30", "gitVersion": "v1.30.2", "gitCommit": "",
                "gitTreeState": "clean", "buildDate": "2024-06-11T00:00:00Z",
                "goVersion": "go1.22.4", "compiler": "gc", "platform": "linux/amd64"
            }))
        } else {
            status(404, "NotFound", "not scripted")
        }
    });
    let backend = KubernetesBackend::new(client, config());
    backend.ping().await.unwrap();
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].is("GET", "/version"), "{seen:?}");
}

#[tokio::test]
async fn an_api_answering_with_an_error_fails_the_ping() {
    let (client, _log) =
        fake_api::client(|_| status(503, "ServiceUnavailable", "etcd is unavailable"));
    let backend = KubernetesBackend::new(client, config());
    let err = backend.ping().await.unwrap_err();
    assert!(err.to_string().contains("does not answer"), "{err}");
}
