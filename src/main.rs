//! The `shindensen` binary: serve (default), migrate, healthcheck, backup, config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shindensen::app::Application;
use shindensen::config::{Backend, Settings};
use shindensen::store::{self, NoopSink};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// jemalloc with its background purge threads: memory freed by closed
/// connections or a burst of logins goes back to the system within seconds,
/// even when nothing else runs (docs/decisions/0014-jemalloc.md). glibc
/// kept the 19 MiB argon2id work areas resident per thread arena.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Exit 0 only when the local instance answers /readyz with 200 (for
    /// container HEALTHCHECKs in images with no shell or curl).
    Healthcheck {
        /// Address to ask instead of the one `server.listen` names.
        #[arg(long)]
        addr: Option<SocketAddr>,
    },
    /// Write a consistent online copy of the database to PATH and check it.
    Backup { path: PathBuf },
    /// Print the effective configuration, secrets redacted.
    Config,
    /// Copy everything from a SQLite database into an empty PostgreSQL
    /// database (stop the server first), then compare the copy.
    MigrateData {
        /// The SQLite database, e.g. sqlite:/data/shindensen.db
        #[arg(long)]
        from: String,
        /// The PostgreSQL database, e.g. postgres://user:password@host/db
        #[arg(long)]
        to: String,
    },
}

fn main() -> ExitCode {
    // Like the seed, read a `.env` in the working directory if there is one.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shindensen: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shindensen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command.unwrap_or(Command::Serve), settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shindensen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve => {
            let telemetry = shindensen::telemetry::init(&settings)?;
            let env: std::collections::HashMap<String, String> = std::env::vars().collect();
            let ignored = shindensen::config::ignored_env_vars(&env);
            if !ignored.is_empty() {
                tracing::debug!(
                    ?ignored,
                    "environment variables with the SHINDENSEN_ prefix that are not SHINDENSEN_SECTION__KEY settings were ignored"
                );
            }
            match shindensen::limits::raise_nofile() {
                Some(((soft0, _), (soft, hard))) => tracing::info!(
                    soft_before = soft0,
                    soft,
                    hard,
                    max_connections =
                        shindensen::limits::connection_cap(settings.server.max_connections),
                    "open-files limit"
                ),
                None => tracing::warn!("could not read the open-files limit"),
            }
            let app = Application::build(settings).await?;
            app.run(shutdown_signal()).await?;
            tokio::task::spawn_blocking(move || telemetry.shutdown(Duration::from_secs(5))).await?;
        }
        Command::Migrate => {
            let _telemetry = shindensen::telemetry::init(&settings)?;
            let store = store::open(
                &settings.database,
                &settings.cluster,
                std::sync::Arc::new(NoopSink),
            )
            .await
            .context("opening the database and applying migrations")?;
            store.close().await;
            println!("migrations applied to {}", store.describe());
        }
        Command::Healthcheck { addr } => return Ok(healthcheck(&settings, addr).await),
        Command::Backup { path } => {
            if settings.database.backend() == Backend::Postgres {
                eprintln!("shindensen: {}", store::POSTGRES_BACKUP_ADVICE);
                return Ok(ExitCode::from(2));
            }
            let report = store::backup(&settings.database, &path)
                .await
                .with_context(|| format!("backing up to {}", path.display()))?;
            println!(
                "backup written to {}: {} bytes, {} users, {} chats, {} messages; integrity_check ok",
                path.display(),
                report.bytes,
                report.users,
                report.chats,
                report.messages
            );
        }
        Command::Config => print!("{}", settings.redacted_toml()),
        Command::MigrateData { from, to } => {
            let report = store::transfer::migrate_data(&from, &to)
                .await
                .with_context(|| {
                    format!(
                        "copying {} into {}",
                        shindensen::config::redacted_url(&from),
                        shindensen::config::redacted_url(&to)
                    )
                })?;
            println!(
                "copied into {}: {} users, {} chats, {} memberships, {} messages (largest id {}); \
                 every table's row count and largest id match the source",
                shindensen::config::redacted_url(&to),
                report.users.0,
                report.chats.0,
                report.members.0,
                report.messages.0,
                report.messages.1
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// GET /readyz on the local listener with a plain HTTP/1.1 request.
async fn healthcheck(settings: &Settings, addr: Option<SocketAddr>) -> ExitCode {
    let addr = addr.unwrap_or_else(|| {
        let mut a = settings.server.listen;
        if a.ip().is_unspecified() {
            a.set_ip(if a.is_ipv4() {
                [127, 0, 0, 1].into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        a
    });
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(head.starts_with(b"HTTP/1.1 200"))
    };
    match tokio::time::timeout(Duration::from_secs(3), probe).await {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => {
            eprintln!("shindensen: {addr} is not ready");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("shindensen: cannot reach {addr}: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("shindensen: {addr} did not answer within 3 s");
            ExitCode::FAILURE
        }
    }
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
