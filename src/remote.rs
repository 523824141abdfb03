//! `--token-file`: the token a client command sends to a remote store, for
//! every command that opens one (`import`, `mount`, `nix-db`, `serve`
//! against a `grpc+…` store). The token goes into
//! [`StoreOptions::token`](lazystore_pathinfo::StoreOptions), and from there
//! into every call; no command handles it otherwise.

use std::path::PathBuf;

use anyhow::Context as _;
use lazystore_castore::auth::Token;

/// The client's token.
#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// Send the token in FILE with every call to a remote store (one that
    /// runs with --read-token-file or --write-token-file). The file holds
    /// one token; blank lines and lines starting with # are ignored.
    #[arg(long, value_name = "FILE", env = "LAZYSTORE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token, read from its file, if one was given.
    pub fn load(&self) -> anyhow::Result<Option<Token>> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        // The error names the file; say where it came from.
        let token =
            Token::from_file(path).context("cannot use --token-file (or $LAZYSTORE_TOKEN_FILE)")?;
        Ok(Some(token))
    }
}
