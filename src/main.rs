//! The `shindensen` binary: serve (default), migrate, config.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shindensen::app::Application;
use shindensen::config::Settings;
use shindensen::store::{NoopSink, Store};

#[derive(Parser)]
#[command(name = "shindensen", version, about = "Messenger backend")]
struct Cli {
    /// TOML config file (also `SHINDENSEN_CONFIG`).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the effective configuration, secrets redacted.
    Config,
}

fn main() -> std::process::ExitCode {
    // Like the seed, read a `.env` in the working directory if there is one.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shindensen: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shindensen: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command.unwrap_or(Command::Serve), settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shindensen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<std::process::ExitCode> {
    match command {
        Command::Serve => {
            shindensen::telemetry::init_logging(&settings.log);
            let app = Application::build(settings).await?;
            app.run(shutdown_signal()).await?;
        }
        Command::Migrate => {
            shindensen::telemetry::init_logging(&settings.log);
            let store = Store::open(&settings.database, std::sync::Arc::new(NoopSink))
                .await
                .context("opening the database and applying migrations")?;
            store.close().await;
            println!("migrations applied to {}", store.path().display());
        }
        Command::Config => print!("{}", settings.redacted_toml()),
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
