//! Clients of the services the runner talks to, and how it retries them.

use std::time::Duration;

use tonic::Code;
use trainmesh_common::client::{channel_with, Channel};
use trainmesh_common::proto::job::v1::job_internal_service_client::JobInternalServiceClient;
use trainmesh_common::proto::metrics::v1::metrics_service_client::MetricsServiceClient;
use trainmesh_common::proto::runner::v1::runner_service_client::RunnerServiceClient;

use crate::config::Config;

/// Per-call deadline of unary calls (the long-poll adds its wait).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct Peers {
    pub scheduler: RunnerServiceClient<Channel>,
    pub jobs: JobInternalServiceClient<Channel>,
    pub metrics: MetricsServiceClient<Channel>,
}

impl Peers {
    /// Lazy channels: the services may start after the runner.
    pub fn connect(config: &Config) -> anyhow::Result<Self> {
        let connect = |endpoint: &str| {
            channel_with(endpoint, Some(config.token.as_str()), &config.client_tls)
        };
        Ok(Self {
            scheduler: RunnerServiceClient::new(connect(&config.scheduler_endpoint)?),
            jobs: JobInternalServiceClient::new(connect(&config.job_endpoint)?),
            metrics: MetricsServiceClient::new(connect(&config.metrics_endpoint)?),
        })
    }
}

/// A request with a deadline, so a hung peer cannot stall a loop.
pub fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// Errors that retrying the same call cannot fix: the call was refused
/// for what it says, not for the peer's condition.
pub fn is_permanent(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::OutOfRange
            | Code::AlreadyExists
    )
}

/// Doubling delays from `min` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay to wait now; the next one is twice as long (capped).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let seen: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seen, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }

    #[test]
    fn refusals_are_permanent_and_outages_are_not() {
        assert!(is_permanent(Code::FailedPrecondition));
        assert!(!is_permanent(Code::Unavailable));
        assert!(!is_permanent(Code::ResourceExhausted));
        assert!(!is_permanent(Code::DeadlineExceeded));
    }
}
