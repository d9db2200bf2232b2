use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    trainmesh_common::config::private_files();
    let cli = trainctl::cli::Cli::parse();
    std::process::ExitCode::from(trainctl::run(cli).await)
}
