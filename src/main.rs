//! The `lazystore` command: parses arguments and hands each subcommand to its
//! module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod compact;
mod delete;
mod fsck;
mod gc;
mod import;
mod metrics;
mod mount;
mod nar_check;
mod nix_db;
mod prefetch;
mod remote;
mod serve;
mod stats;
mod upstream;

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
    Compact(compact::Args),
    Delete(delete::Args),
    Fsck(fsck::Args),
    Gc(gc::Args),
    Import(import::Args),
    Mount(mount::Args),
    NarCheck(nar_check::Args),
    NixDb(nix_db::Args),
    Prefetch(prefetch::Args),
    Serve(Box<serve::Args>),
    Stats(stats::Args),
}

/// Keeps glibc's allocator from holding on to freed memory. Chunk buffers
/// (16 KiB to 256 KiB) are allocated on one runtime or blocking thread and
/// freed on another; by default each thread may get its own arena, and the
/// mmap threshold rises after the first large free, so freed buffers stay
/// resident in many arenas. Two arenas and a fixed 512 KiB threshold (every
/// chunk comes from the heap, larger buffers are mapped and unmapped) took a
/// mount reading 1 GiB through a remote store while filling a local cache
/// (with a 64 MiB redb page cache) from 265 to 198 MiB; a 128 KiB threshold
/// used as little memory but made a cold read from the local cache spend a
/// third more CPU faulting in and zeroing fresh pages. The threshold is
/// 2 MiB, so a 1 MiB FUSE read reply also comes from the heap: at 512 KiB
/// each was mapped and unmapped again, and faulting in and zeroing those
/// pages was a tenth of a cold read's CPU. The heap is trimmed only once
/// 32 MiB are free at its top, for the same reason. All are glibc's
/// documented tunables, set before any thread starts.
fn bound_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

/// Logs without `RUST_LOG`: warnings and errors, the HTTP cache's access
/// log (one line per request, when it serves), and a mount's upstream
/// lookups that found nothing (one line per path, per negative TTL).
const DEFAULT_LOG: &str = "warn,lazystore::http=info,lazystore_importer::substituter=info";

fn main() -> ExitCode {
    bound_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs redirected to a file or a
        // journal stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
            Command::Compact(args) => compact::run(args).await,
            Command::Delete(args) => delete::run(args).await,
            Command::Fsck(args) => fsck::run(args).await,
            Command::Gc(args) => gc::run(args).await,
            Command::Import(args) => import::run(args).await,
            Command::Mount(args) => mount::run(args).await,
            Command::NarCheck(args) => nar_check::run(args).await,
            Command::NixDb(args) => nix_db::run(args).await,
            Command::Prefetch(args) => prefetch::run(args).await,
            Command::Serve(args) => serve::run(*args).await,
            Command::Stats(args) => stats::run(args).await,
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
