//! Joining: a runner without a credential trades a join token for its
//! own (`TokenService.JoinRunner`) and keeps it in its credential file.
//!
//! Many nodes (a DaemonSet, say) can share one join token while each ends
//! up with a credential bound to its own name: the name may then act only
//! as that runner. job-service gives a name one credential at a time, so
//! a second machine joining under a taken name is refused.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use tonic::Code;
use trainmesh_common::client::channel_with;
use trainmesh_common::proto::auth::v1 as pb;
use trainmesh_common::proto::auth::v1::token_service_client::TokenServiceClient;

use crate::config::{hostname, Args};
use crate::rpc::{is_permanent, request};

/// How long to keep asking a job-service that does not answer yet.
const JOIN_PATIENCE: Duration = Duration::from_secs(300);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Joins when a join token is given and the credential file is missing.
pub async fn ensure_credential(args: &Args) -> anyhow::Result<()> {
    let Some(join_file) = &args.join_token_file else {
        return Ok(());
    };
    let path = args.common.service_token_path("runner");
    if path.exists() {
        return Ok(());
    }
    let join = std::fs::read_to_string(join_file)
        .map_err(|e| anyhow::anyhow!("cannot read the join token {}: {e}", join_file.display()))?;
    let name = args.name.clone().unwrap_or_else(hostname);
    let channel = channel_with(
        &args.job_endpoint,
        Some(join.trim()),
        &args.common.client_tls()?,
    )?;
    let mut client = TokenServiceClient::new(channel);
    let give_up = tokio::time::Instant::now() + JOIN_PATIENCE;
    let mut delay = Duration::from_millis(200);
    let secret = loop {
        let ask = pb::JoinRunnerRequest { name: name.clone() };
        match client.join_runner(request(ask, CALL_TIMEOUT)).await {
            Ok(r) => break r.into_inner().secret,
            Err(s) if is_permanent(s.code()) || s.code() == Code::Unauthenticated => {
                anyhow::bail!(
                    "job-service refused to let runner `{name}` join ({:?}): {}",
                    s.code(),
                    s.message()
                )
            }
            Err(s) if tokio::time::Instant::now() + delay > give_up => {
                anyhow::bail!(
                    "cannot join runner `{name}` with job-service: {}",
                    s.message()
                )
            }
            Err(s) => {
                tracing::warn!(code = ?s.code(), detail = s.message(),
                    retry_in_ms = delay.as_millis() as u64, "cannot join yet; will retry");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    };
    write_private(&path, &secret)?;
    tracing::info!(runner = %name, credential = %path.display(), "joined: credential stored");
    Ok(())
}

/// Writes `secret` owner-only (the process umask is 077), atomically.
fn write_private(path: &Path, secret: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("joining");
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| anyhow::anyhow!("cannot store the credential {}: {e}", path.display()))
}
