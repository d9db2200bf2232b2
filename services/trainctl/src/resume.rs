//! Following a server stream across breaks, the one way every resuming
//! command does it.
//!
//! A service that restarts ends its streams with UNAVAILABLE (or the
//! connection just drops); the stream is then opened again from the cursor
//! of the last message handled, with growing pauses, so each message is
//! handled exactly once. Only the stream's real end (status OK) is a
//! success; an error the server answers about the request itself ends the
//! follow at once, as does a first call that fails (nothing was followed
//! yet, and the user should hear about a wrong endpoint or token now).

use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use tonic::{Code, Status, Streaming};

use crate::context::{code_name, Context, Service};

/// Re-opens in a row without receiving a message before giving up: with
/// the pauses below, about two minutes, longer than a service restart.
const MAX_REOPENS: u32 = 30;
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// What to do after a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Whether a failed stream may be resumed: the server went away (it ends
/// streams with UNAVAILABLE when it shuts down) or the connection broke.
/// Statuses the transport raises itself carry the error as their source;
/// statuses the server sent carry none, and are its answer.
pub fn is_break(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Cancelled | Code::Internal => {
            std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

fn pause(reopens: u32) -> Duration {
    let doublings = reopens.saturating_sub(1).min(16);
    FIRST_PAUSE.saturating_mul(1 << doublings).min(MAX_PAUSE)
}

/// Follows a stream of `service` until its real end or until `on_message`
/// says [`Flow::Stop`]. `open(cursor)` starts the call (an empty cursor:
/// the request as first asked); `cursor_of` reads where a message lets the
/// stream resume (empty: it does not move the position).
pub async fn follow<M, Open, Fut>(
    ctx: &Context,
    service: Service,
    mut cursor: String,
    mut open: Open,
    cursor_of: impl Fn(&M) -> &str,
    mut on_message: impl FnMut(M) -> anyhow::Result<Flow>,
) -> anyhow::Result<()>
where
    Open: FnMut(String) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Streaming<M>>, Status>>,
{
    let mut opened = false;
    let mut reopens = 0u32;
    loop {
        let broke = match open(cursor.clone()).await {
            Ok(resp) => {
                opened = true;
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(msg)) => {
                            reopens = 0;
                            let at = cursor_of(&msg);
                            if !at.is_empty() {
                                cursor = at.to_owned();
                            }
                            if on_message(msg)? == Flow::Stop {
                                return Ok(());
                            }
                        }
                        Ok(None) => return Ok(()),
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        if !opened || !is_break(&broke) {
            return Err(ctx.err(service)(broke).into());
        }
        reopens += 1;
        if reopens > MAX_REOPENS {
            return Err(anyhow!(
                "the stream from {} keeps breaking; gave up after {MAX_REOPENS} attempts to \
                 resume (last: {}: {})",
                service.binary(),
                code_name(broke.code()),
                broke.message()
            ));
        }
        if reopens == 1 {
            eprintln!(
                "note: the stream from {} was interrupted ({}: {}); resuming where it stopped",
                service.binary(),
                code_name(broke.code()),
                broke.message()
            );
        }
        tokio::time::sleep(pause(reopens)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_answers_are_final_and_outages_are_breaks() {
        assert!(is_break(&Status::unavailable(
            "job-service is shutting down"
        )));
        assert!(!is_break(&Status::not_found("job `x` not found")));
        // Sent by a server: its answer, not a broken connection.
        assert!(!is_break(&Status::internal("internal error")));
        assert!(!is_break(&Status::unknown("boom")));
        let dropped = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert_eq!(dropped.code(), Code::Unknown);
        assert!(is_break(&dropped));
    }

    #[test]
    fn pauses_grow_to_a_cap() {
        assert_eq!(pause(1), FIRST_PAUSE);
        assert_eq!(pause(2), FIRST_PAUSE * 2);
        assert_eq!(pause(30), MAX_PAUSE);
        assert_eq!(pause(u32::MAX), MAX_PAUSE);
    }
}
