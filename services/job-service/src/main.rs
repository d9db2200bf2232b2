use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    trainmesh_common::config::private_files();
    trainmesh_common::healthcheck::exit_if_requested().await;
    let args = job_service::config::Args::parse();
    let _t = trainmesh_common::telemetry::init("job-service")?;
    let listener = args.common.bind(&args.listen).await?;
    let config = args.into_config().await?;
    job_service::run(
        config,
        listener,
        trainmesh_common::server::shutdown_signal(),
    )
    .await
}
