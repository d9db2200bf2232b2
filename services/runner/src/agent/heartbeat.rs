//! The heartbeat: renews the lease and carries the scheduler's
//! cancellations.

use std::sync::Arc;

use tokio::sync::watch;
use trainmesh_common::proto::runner::v1::HeartbeatRequest;

use super::{lock, ActiveMap, Registrar};
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
        match peers
            .scheduler
            .clone()
            .heartbeat(request(req, CALL_TIMEOUT))
            .await
        {
            Ok(resp) => {
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
                // attract work this runner will not take.
                if !*runner_stop.borrow() {
                    let mut stop = runner_stop.clone();
                    registrar.reregister(&reg.runner_id, &mut stop).await;
                }
            }
            Err(s) => {
                tracing::warn!(code = ?s.code(), detail = s.message(), "heartbeat failed");
            }
        }
    }
}
