//! `<binary> healthcheck ADDR [SERVICE]`: asks the gRPC health service at
//! ADDR and exits 0 when it answers SERVING, 1 otherwise. Every service
//! binary (and the runner, on its health port) understands it, so a
//! container health check needs no shell and no extra tool in the image.

use std::time::Duration;

use clap::Parser as _;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::tls::{ClientTls, ClientTlsArgs};

/// The first argument that makes a binary a health check instead.
pub const COMMAND: &str = "healthcheck";

/// How long the whole check may take; container engines kill checks that
/// hang, but a clear message beats a kill.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `<binary> healthcheck [TLS flags] ADDR [SERVICE]`. The TLS flags and
/// their variables are the ones the binary's own clients take, so in a
/// container whose environment sets them the check speaks TLS as well.
#[derive(clap::Parser, Debug)]
#[command(name = COMMAND, about = "Exit 0 when ADDR's gRPC health service answers SERVING")]
struct Args {
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// `host:port`, `http(s)://host:port` or `file:PATH`.
    addr: String,
    /// The service to ask about; "" (the default) is the server as a whole.
    #[arg(default_value = "")]
    service: String,
}

/// When the process was started as `<binary> healthcheck ...`, runs the
/// check and exits; otherwise returns at once.
pub async fn exit_if_requested() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some(COMMAND) {
        return;
    }
    let args = match Args::try_parse_from(&args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let code = match args.tls.load() {
        Ok(tls) => report(check(&args.addr, &args.service, &tls).await),
        Err(e) => {
            eprintln!("{COMMAND}: {e:#}");
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
pub async fn check(addr: &str, service: &str, tls: &ClientTls) -> anyhow::Result<ServingStatus> {
    let ask = async {
        let mut client = HealthClient::new(crate::client::channel_with(addr, None, tls)?);
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
