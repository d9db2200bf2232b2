//! The heartbeat: renews the lease and carries the scheduler's
//! cancellations.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use trainmesh_common::proto::runner::v1::HeartbeatRequest;

use super::{lock, ActiveMap, Registrar, Registration};
use crate::attempt::StopReason;
use crate::domain::AttemptKey;
use crate::rpc::{request, Peers, CALL_TIMEOUT};

/// Renews the lease every heartbeat interval and stops attempts the
/// scheduler cancels. Runs until `hb_stop` — after the attempts are done,
/// so the lease holds while they are being stopped.
pub(super) async fn heartbeat_loop(
    peers: Peers,
    registrar: Arc<Registrar>,
    active: ActiveMap,
    mut hb_stop: watch::Receiver<bool>,
    runner_stop: watch::Receiver<bool>,
) {
    loop {
        let Some(reg) = registrar.current() else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep(reg.heartbeat_interval) => {}
            _ = hb_stop.wait_for(|s| *s) => return,
        }
        let Some(reg) = registrar.current() else {
            return;
        };
        let refs = lock(&active).keys().map(|k| k.to_ref()).collect();
        let req = HeartbeatRequest {
            runner_id: reg.runner_id.clone(),
            active: refs,
        };
        // The scheduler counts the lease from when it gets the call; the
        // runner only knows when it sent it, which is no later.
        let sent = Instant::now();
        match peers
            .scheduler
            .clone()
            .heartbeat(request(req, call_timeout(&reg)))
            .await
        {
            Ok(resp) => {
                registrar.lease.renewed(sent, reg.lease_ttl);
                for c in resp.into_inner().cancel {
                    let key = match AttemptKey::try_from(&c) {
                        Ok(k) => k,
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring an invalid cancellation");
                            continue;
                        }
                    };
                    if let Some(a) = lock(&active).get(&key) {
                        let fresh = a.stop.send_if_modified(|r| {
                            let first = r.is_none();
                            if first {
                                *r = Some(StopReason::Cancelled);
                            }
                            first
                        });
                        if fresh {
                            tracing::info!(job_id = %key.job_id, attempt = key.attempt,
                                "the scheduler cancelled the attempt");
                        }
                    }
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                // Not while shutting down: a new registration would only
                // attract work this runner will not take. Its attempts
                // belong to no lease either way.
                if *runner_stop.borrow() {
                    registrar.lease.lost();
                } else {
                    let mut stop = runner_stop.clone();
                    registrar.reregister(&reg.runner_id, &mut stop).await;
                }
            }
            Err(s) => {
                registrar.lease.renewal_failed();
                tracing::warn!(code = ?s.code(), detail = s.message(), "heartbeat failed");
            }
        }
    }
}

/// A heartbeat stuck on a dead connection must not use up the lease: at
/// most a third of the TTL, so a fresh call, perhaps on a fresh
/// connection, goes out before the runner would fence itself.
fn call_timeout(reg: &Registration) -> Duration {
    if reg.lease_ttl.is_zero() {
        return CALL_TIMEOUT;
    }
    (reg.lease_ttl / 3).min(CALL_TIMEOUT)
}
