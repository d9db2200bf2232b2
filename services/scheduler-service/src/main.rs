//! `scheduler-service`: see the library for what it does.

use clap::Parser;
use scheduler_service::{run, Args};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    trainmesh_common::config::private_files();
    trainmesh_common::healthcheck::exit_if_requested().await;
    let args = Args::parse();
    let _telemetry = trainmesh_common::telemetry::init("scheduler-service")?;
    let listener = args.common.bind(&args.listen).await?;
    let config = args.into_config().await?;
    run(
        config,
        listener,
        trainmesh_common::server::shutdown_signal(),
    )
    .await
}
