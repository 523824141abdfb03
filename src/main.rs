//! The `lazystore` command: parses arguments and hands each subcommand to its
//! module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod import;
mod mount;
mod nar_check;
mod nix_db;
mod serve;

/// Lazy /nix/store for Nix builders: store paths split into a
/// content-addressed, chunked store and fetched only when read.
#[derive(Parser)]
#[command(name = "lazystore", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Import(import::Args),
    Mount(mount::Args),
    NarCheck(nar_check::Args),
    NixDb(nix_db::Args),
    Serve(serve::Args),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lazystore: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Import(args) => import::run(args).await,
            Command::Mount(args) => mount::run(args).await,
            Command::NarCheck(args) => nar_check::run(args).await,
            Command::NixDb(args) => nix_db::run(args).await,
            Command::Serve(args) => serve::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lazystore: {e:#}");
            ExitCode::FAILURE
        }
    }
}
