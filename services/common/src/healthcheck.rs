//! `<binary> healthcheck ADDR [SERVICE]`: asks the gRPC health service at
//! ADDR and exits 0 when it answers SERVING, 1 otherwise. Every service
//! binary (and the runner, on its health port) understands it, so a
//! container health check needs no shell and no extra tool in the image.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The first argument that makes a binary a health check instead.
pub const COMMAND: &str = "healthcheck";

/// How long the whole check may take; container engines kill checks that
/// hang, but a clear message beats a kill.
const TIMEOUT: Duration = Duration::from_secs(5);

/// When the process was started as `<binary> healthcheck ...`, runs the
/// check and exits; otherwise returns at once.
pub async fn exit_if_requested() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some(COMMAND) {
        return;
    }
    let code = match &args[1..] {
        [addr] => report(check(addr, "").await),
        [addr, service] => report(check(addr, service).await),
        _ => {
            eprintln!("usage: {COMMAND} HOST:PORT [SERVICE]");
            2
        }
    };
    std::process::exit(code);
}

fn report(r: anyhow::Result<ServingStatus>) -> i32 {
    match r {
        Ok(ServingStatus::Serving) => {
            println!("SERVING");
            0
        }
        Ok(s) => {
            println!("{}", s.as_str_name());
            1
        }
        Err(e) => {
            println!("unreachable: {e:#}");
            1
        }
    }
}

/// The serving status `addr` reports for `service` ("" is the whole server).
pub async fn check(addr: &str, service: &str) -> anyhow::Result<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(crate::client::endpoint_uri(addr))?
        .connect_timeout(TIMEOUT);
    let ask = async {
        let mut client = HealthClient::new(channel.connect().await?);
        let resp = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?;
        anyhow::Ok(resp.into_inner().status())
    };
    tokio::time::timeout(TIMEOUT, ask)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {}s", TIMEOUT.as_secs()))?
}
