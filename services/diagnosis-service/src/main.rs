use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    trainmesh_common::config::private_files();
    trainmesh_common::healthcheck::exit_if_requested().await;
    let args = diagnosis_service::Args::parse();
    let _t = trainmesh_common::telemetry::init("diagnosis-service")?;
    let listener = args.common.bind(&args.listen).await?;
    let config = args.into_config().await?;
    diagnosis_service::run(
        config,
        listener,
        trainmesh_common::server::shutdown_signal(),
    )
    .await
}
