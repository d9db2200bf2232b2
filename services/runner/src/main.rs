//! `runner`: see the library for what it does.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = runner::config::Args::parse();
    let _telemetry = trainmesh_common::telemetry::init("runner")?;
    let config = args.into_config()?;
    runner::run(config, trainmesh_common::server::shutdown_signal()).await
}
