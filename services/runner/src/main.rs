//! `runner`: see the library for what it does. The same binary is also
//! the attempt shim ([`runner::shim`]) and the container watchdog
//! ([`runner::watchdog`]), which must take over before any
//! runtime or thread starts, and a health check of a runner's health port
//! (`runner healthcheck ADDR`).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    trainmesh_common::config::private_files();
    runner::shim::run_if_shim();
    runner::watchdog::run_if_watchdog();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(trainmesh_common::healthcheck::exit_if_requested());
    let args = runner::config::Args::parse();
    runtime.block_on(async {
        let _telemetry = trainmesh_common::telemetry::init("runner")?;
        runner::join::ensure_credential(&args).await?;
        let config = args.into_config()?;
        runner::run(config, trainmesh_common::server::shutdown_signal()).await
    })
}
