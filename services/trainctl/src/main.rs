use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = trainctl::cli::Cli::parse();
    std::process::ExitCode::from(trainctl::run(cli).await)
}
