//! Server streams that end with UNAVAILABLE, not OK, when the server stops.
//!
//! A stream that simply stopped at shutdown would end with status OK, which
//! a client cannot tell from the real end of a log or a watch: `trainctl
//! logs -f` would exit 0 in the middle of a job. Every server stream is
//! therefore wrapped in [`until_shutdown`]: once shutdown begins it sends
//! nothing more and ends with UNAVAILABLE naming the cursor of the last
//! message it sent, so a client that resumes from there (its own last cursor
//! is the same or later) loses and repeats nothing.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::Status;

use crate::server::ShutdownWatch;

/// A boxed server stream, as tonic handlers return them.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The status a stream ends with when `service` shuts down; `cursor` is
/// where the client should resume (empty: nothing was sent, so the same
/// request again).
pub fn shutting_down(service: &str, cursor: &str) -> Status {
    if cursor.is_empty() {
        Status::unavailable(format!(
            "{service} is shutting down; resume with the same request"
        ))
    } else {
        Status::unavailable(format!(
            "{service} is shutting down; resume from cursor `{cursor}`"
        ))
    }
}

/// Ends `inner` with [`shutting_down`] once `shutdown` fires. `cursor_of`
/// reads the resume cursor a message carries (`None`: it carries none and
/// the previous one still holds); `start` is the request's own cursor.
///
/// Shutdown wins over a message that is ready at the same moment, and an
/// inner stream that ends while the server is stopping counts as stopped by
/// it (its task may have seen the shutdown first): a client then resumes
/// once more and is told the real end at once, which costs one call, while
/// the opposite mistake would lose the rest of the stream.
pub fn until_shutdown<T, S>(
    service: &'static str,
    inner: S,
    shutdown: ShutdownWatch,
    start: String,
    cursor_of: fn(&T) -> Option<&str>,
) -> BoxStream<T>
where
    T: Send + 'static,
    S: Stream<Item = Result<T, Status>> + Send + 'static,
{
    struct State<S> {
        inner: Pin<Box<S>>,
        shutdown: ShutdownWatch,
        cursor: String,
        done: bool,
    }
    let state = State {
        inner: Box::pin(inner),
        shutdown,
        cursor: start,
        done: false,
    };
    let stream = futures::stream::unfold(state, move |mut st| async move {
        if st.done {
            return None;
        }
        let next = tokio::select! {
            biased;
            _ = st.shutdown.wait() => None,
            item = st.inner.next() => Some(item),
        };
        let item = match next {
            Some(Some(Ok(msg))) => {
                if let Some(c) = cursor_of(&msg) {
                    if !c.is_empty() {
                        st.cursor = c.to_owned();
                    }
                }
                Ok(msg)
            }
            Some(Some(Err(status))) => {
                st.done = true;
                Err(status)
            }
            Some(None) if !st.shutdown.is_shutting_down() => return None,
            None | Some(None) => {
                st.done = true;
                Err(shutting_down(service, &st.cursor))
            }
        };
        Some((item, st))
    });
    Box::pin(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::shutdown_pair;

    // The item type of these streams is `String`, so `&String` it is.
    #[allow(clippy::ptr_arg)]
    fn cursor(s: &String) -> Option<&str> {
        Some(s.as_str())
    }

    #[tokio::test]
    async fn a_real_end_stays_ok() {
        let (_trigger, watch) = shutdown_pair();
        let inner = futures::stream::iter(vec![Ok("1".to_string()), Ok("2".to_string())]);
        let out: Vec<_> = until_shutdown("svc", inner, watch, String::new(), cursor)
            .collect()
            .await;
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn shutdown_ends_with_unavailable_naming_the_last_cursor_sent() {
        let (trigger, watch) = shutdown_pair();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, Status>>(8);
        let mut s = until_shutdown(
            "job-service",
            tokio_stream::wrappers::ReceiverStream::new(rx),
            watch,
            "c0".into(),
            cursor,
        );
        tx.send(Ok("c7".into())).await.unwrap();
        assert_eq!(s.next().await.unwrap().unwrap(), "c7");
        // Queued but not sent when shutdown begins: not sent at all, so the
        // cursor named is still the last one the client could have seen.
        tx.send(Ok("c8".into())).await.unwrap();
        trigger.fire();
        let end = s.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Unavailable);
        assert!(end.message().contains("resume from cursor `c7`"), "{end:?}");
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn an_inner_end_during_shutdown_is_unavailable_too() {
        let (trigger, watch) = shutdown_pair();
        trigger.fire();
        let inner = futures::stream::empty::<Result<String, Status>>();
        let mut s = until_shutdown("metrics-service", inner, watch, String::new(), cursor);
        let end = s.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Unavailable);
        assert!(end.message().contains("same request"), "{end:?}");
    }
}
