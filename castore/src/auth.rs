//! Access tokens: the one place token files are read ([`Token::from_file`]
//! for a client, [`Tokens::from_file`] for a server), tokens are compared
//! (in constant time), and the server's policy decides what a request
//! needs ([`Access`]). The gRPC server applies it to every call
//! ([`grpc::serve`](crate::grpc::serve)), the HTTP cache to every request;
//! the gRPC client sends its token with every call
//! ([`Connection::with_token`](crate::grpc::Connection::with_token)).
//!
//! A token file holds tokens one a line; blank lines and lines starting
//! with `#` are ignored. A server's file may hold several, so a new token
//! can be added, handed to clients, and the old one removed without a
//! moment when neither works. A token is printable ASCII without spaces
//! (what `openssl rand -hex 32` prints), so it fits an HTTP header, gRPC
//! metadata and a netrc file unchanged.
//!
//! Tokens authenticate; they do not encrypt. Over cleartext HTTP/2 or HTTP
//! anyone on the path reads them (`docs/security.md`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest token accepted: far more than any random token needs, and short
/// enough that a binary file given by mistake is refused.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Why a token file can't be used. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read token file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no token (only blank lines and comments, or nothing).
    #[error(
        "token file {} holds no token; put one in it, one a line (e.g. from: openssl rand -hex 32)",
        path.display()
    )]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A line is not a token.
    #[error("token file {} line {line}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line, counting from 1.
        line: usize,
        /// What is wrong with it (never the line itself: it may be a
        /// secret with a typo).
        reason: &'static str,
    },
    /// A client's token file holds more than one token: it sends one.
    #[error(
        "token file {} holds {count} tokens; a client sends one, so keep only the token it should use",
        path.display()
    )]
    Several {
        /// The file.
        path: PathBuf,
        /// How many tokens it holds.
        count: usize,
    },
}

/// Parses the tokens of a token file's `text`, in order; `path` names the
/// file in errors.
fn parse(path: &Path, text: &str) -> Result<Vec<String>, TokenFileError> {
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let invalid = |reason| TokenFileError::Invalid {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        if line.len() > MAX_TOKEN_LEN {
            return Err(invalid("longer than 4096 bytes: not a token"));
        }
        if !line.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "a token is printable ASCII without spaces (e.g. from: openssl rand -hex 32)",
            ));
        }
        tokens.push(line.to_owned());
    }
    if tokens.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(tokens)
}

fn read(path: &Path) -> Result<String, TokenFileError> {
    std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The token a client sends. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl Token {
    /// The one token in the file at `path`.
    pub fn from_file(path: &Path) -> Result<Token, TokenFileError> {
        Token::parse(path, &read(path)?)
    }

    /// The one token in `text`, read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Token, TokenFileError> {
        let mut tokens = parse(path, text)?;
        if tokens.len() > 1 {
            return Err(TokenFileError::Several {
                path: path.to_owned(),
                count: tokens.len(),
            });
        }
        Ok(Token(tokens.remove(0).into()))
    }

    /// The token itself, to send.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<secret>)")
    }
}

/// The tokens a server accepts for one kind of access, kept only as their
/// BLAKE3 hashes.
#[derive(Clone)]
pub struct Tokens {
    hashes: Arc<[blake3::Hash]>,
    /// The file they were read from, for messages.
    file: Arc<Path>,
}

impl Tokens {
    /// The tokens in the file at `path`.
    pub fn from_file(path: &Path) -> Result<Tokens, TokenFileError> {
        Tokens::parse(path, &read(path)?)
    }

    /// The tokens in `text`, read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Tokens, TokenFileError> {
        let tokens = parse(path, text)?;
        Ok(Tokens {
            hashes: tokens.iter().map(|t| blake3::hash(t.as_bytes())).collect(),
            file: path.into(),
        })
    }

    /// The file the tokens were read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Whether `presented` is one of the tokens, in time that depends on
    /// neither which token (nor how much of one) it matches, nor their
    /// lengths: the presented bytes are hashed once, and the hash is
    /// compared with every token's, all of them, with `blake3::Hash`'s
    /// equality, which is constant-time. Only the number of tokens shows.
    pub fn contains(&self, presented: &[u8]) -> bool {
        let presented = blake3::hash(presented);
        // `|`, not `||` nor `any`: no early exit at the first match.
        self.hashes
            .iter()
            .fold(false, |found, hash| found | (*hash == presented))
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tokens({} from {})",
            self.hashes.len(),
            self.file.display()
        )
    }
}

/// The name of the HTTP header, and gRPC metadata key, a token is sent in.
pub const AUTHORIZATION: &str = "authorization";

/// The header value a client sends: `Bearer TOKEN`.
pub fn bearer_value(token: &Token) -> String {
    format!("Bearer {}", token.secret())
}

/// The token in an `Authorization` header value of the scheme `scheme`
/// (`Bearer`, `Basic`; case-insensitive), or `None` for another scheme.
pub fn credentials<'a>(value: &'a [u8], scheme: &str) -> Option<&'a [u8]> {
    let value = value.trim_ascii();
    let space = value.iter().position(|&b| b == b' ')?;
    let (given, rest) = value.split_at(space);
    given
        .eq_ignore_ascii_case(scheme.as_bytes())
        .then(|| rest.trim_ascii())
}

/// The token of an `Authorization: Bearer TOKEN` header value, or `None`
/// for another scheme.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    credentials(value, "Bearer")
}

/// What a request does, and so which tokens it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Nothing: a health check, `nix-cache-info`.
    Nothing,
    /// It reads the store.
    Read,
    /// It changes the store.
    Write,
}

impl Need {
    /// What a gRPC call of `path` (`/package.Service/Method`) needs.
    ///
    /// Puts write, a trace's included: a trace only steers what builders
    /// fetch ahead, but a builder that may write one may make every other
    /// builder fetch what it names. Every other call of the store's services reads,
    /// `MissingChunks` and `ChunkerParams` included: writers ask them
    /// before a `Put`, but they store nothing, and what they tell (which
    /// chunks the store holds) is the store's contents, for a read token
    /// to guard. `ReportCorrupt` reads too: the server drops only chunks
    /// its own check fails, so a reader can make it check, never make it
    /// lose good data. Health checks need nothing, so a load balancer or a
    /// client's readiness probe needs no token. A call of any other
    /// service is taken as a write: a service added later is guarded
    /// until someone decides otherwise.
    pub fn of_grpc_call(path: &str) -> Need {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        if service == "grpc.health.v1.Health" {
            return Need::Nothing;
        }
        let ours = matches!(
            service,
            "lazystore.castore.v1.BlobService"
                | "lazystore.castore.v1.DirectoryService"
                | "lazystore.pathinfo.v1.PathInfoService"
                | "lazystore.pathinfo.v1.TraceService"
        );
        // The reads, by name: a method added later needs a write token
        // until it is listed here.
        let reads = matches!(
            method,
            "Get"
                | "Facts"
                | "GetPublished"
                | "Listing"
                | "List"
                | "Stat"
                | "StatMany"
                | "ReadChunks"
                | "MissingChunks"
                | "ChunkerParams"
                | "ReportCorrupt"
                | "Quarantined"
                | "StoredSizes"
        );
        if ours && reads {
            Need::Read
        } else {
            Need::Write
        }
    }
}

/// Who may do what on a server: the tokens that allow reads, and those that
/// allow writes.
///
/// A write token allows reads too (a writer reads: an importer looks up
/// what the store already has), so a client needs one token whatever it
/// does. A write needs a write token if write tokens are set, else a read
/// token if read tokens are; a server with neither is open to anyone who
/// can reach it.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Tokens that allow reads (`--read-token-file`); `None`: reads are
    /// open.
    pub read: Option<Tokens>,
    /// Tokens that allow writes and reads (`--write-token-file`); `None`:
    /// writes need what reads need.
    pub write: Option<Tokens>,
}

/// Why a request was refused. The messages tell a `lazystore` client what
/// to do; other clients' messages (HTTP) say the same in their own terms.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Denied {
    /// No token was sent, and one is needed.
    #[error(
        "this store needs a {kind} token, and none was sent: give the client --token-file FILE \
         (or set LAZYSTORE_TOKEN_FILE) with a token from the server's --{kind}-token-file"
    )]
    Missing {
        /// "read" or "write".
        kind: &'static str,
    },
    /// A token was sent that does not allow the request.
    #[error(
        "the token sent is not a {kind} token of this store: the client's --token-file (or \
         LAZYSTORE_TOKEN_FILE) must hold a token from the server's --{kind}-token-file"
    )]
    Wrong {
        /// "read" or "write".
        kind: &'static str,
    },
}

impl Access {
    /// Whether any request needs a token.
    pub fn is_open(&self) -> bool {
        self.read.is_none() && self.write.is_none()
    }

    /// Whether a request that `need`s this, presenting `token` (the bytes
    /// after `Bearer `, or a Basic password), is allowed.
    pub fn check(&self, need: Need, token: Option<&[u8]>) -> Result<(), Denied> {
        // The token sets that allow it, and the kind named in messages.
        let (kind, allowed): (&'static str, [Option<&Tokens>; 2]) = match need {
            Need::Nothing => return Ok(()),
            Need::Read if self.read.is_some() => {
                ("read", [self.read.as_ref(), self.write.as_ref()])
            }
            Need::Read => return Ok(()),
            Need::Write if self.write.is_some() => ("write", [self.write.as_ref(), None]),
            Need::Write if self.read.is_some() => ("read", [self.read.as_ref(), None]),
            Need::Write => return Ok(()),
        };
        let Some(token) = token else {
            return Err(Denied::Missing { kind });
        };
        // Every set is asked, so the time taken does not tell which one
        // (if any) holds the token.
        let found = allowed
            .iter()
            .flatten()
            .fold(false, |found, tokens| found | tokens.contains(token));
        if found {
            Ok(())
        } else {
            Err(Denied::Wrong { kind })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("/etc/lazystore/tokens")
    }

    #[test]
    fn files_hold_tokens_one_a_line() {
        let text = "# rotated 2026-12-01\n\n  new-token  \nold-token\n# old-token goes next week\n";
        let tokens = Tokens::parse(path(), text).unwrap();
        assert!(tokens.contains(b"new-token"));
        assert!(tokens.contains(b"old-token"));
        assert!(!tokens.contains(b"new-token "));
        assert!(!tokens.contains(b"# rotated 2026-12-01"));
        assert!(!tokens.contains(b""));
        assert!(!tokens.contains(b"new-toke"));
        // A client sends exactly one.
        let e = Token::parse(path(), text).unwrap_err();
        assert!(matches!(e, TokenFileError::Several { count: 2, .. }), "{e}");
        assert!(e.to_string().contains("/etc/lazystore/tokens"), "{e}");
        let one = Token::parse(path(), "# mine\nabc123\n").unwrap();
        assert_eq!(one.secret(), "abc123");
        assert!(!format!("{one:?}").contains("abc123"));
    }

    #[test]
    fn a_file_without_a_token_is_an_error_naming_it() {
        for text in ["", "\n\n", "# only a comment\n   \n"] {
            for e in [
                Tokens::parse(path(), text).err().unwrap(),
                Token::parse(path(), text).err().unwrap(),
            ] {
                assert!(matches!(e, TokenFileError::Empty { .. }), "{e}");
                assert!(e.to_string().contains("/etc/lazystore/tokens"), "{e}");
            }
        }
        let e = Tokens::from_file(Path::new("/nonexistent/tokens")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/tokens"), "{e}");
    }

    #[test]
    fn lines_that_are_not_tokens_are_refused_without_showing_them() {
        let e = Tokens::parse(path(), "good\nsecret with space\n").unwrap_err();
        assert!(matches!(e, TokenFileError::Invalid { line: 2, .. }), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = Tokens::parse(path(), "caf\u{e9}\n").unwrap_err();
        assert!(matches!(e, TokenFileError::Invalid { line: 1, .. }), "{e}");
        let long = "x".repeat(MAX_TOKEN_LEN + 1);
        assert!(Tokens::parse(path(), &long).is_err());
        assert!(Tokens::parse(path(), &long[1..]).is_ok());
    }

    #[test]
    fn grpc_calls_are_classed() {
        use Need::*;
        for (call, need) in [
            ("/lazystore.castore.v1.BlobService/Put", Write),
            ("/lazystore.castore.v1.DirectoryService/Put", Write),
            ("/lazystore.pathinfo.v1.PathInfoService/Put", Write),
            ("/lazystore.pathinfo.v1.PathInfoService/Delete", Write),
            ("/lazystore.pathinfo.v1.TraceService/Put", Write),
            ("/lazystore.pathinfo.v1.TraceService/Get", Read),
            ("/lazystore.pathinfo.v1.PathInfoService/SomethingNew", Write),
            ("/lazystore.castore.v1.BlobService/ReadChunks", Read),
            ("/lazystore.castore.v1.BlobService/Stat", Read),
            ("/lazystore.castore.v1.BlobService/StatMany", Read),
            ("/lazystore.castore.v1.BlobService/MissingChunks", Read),
            ("/lazystore.castore.v1.BlobService/ChunkerParams", Read),
            ("/lazystore.castore.v1.BlobService/ReportCorrupt", Read),
            ("/lazystore.castore.v1.BlobService/Quarantined", Read),
            ("/lazystore.castore.v1.BlobService/StoredSizes", Read),
            ("/lazystore.castore.v1.DirectoryService/Get", Read),
            ("/lazystore.pathinfo.v1.PathInfoService/Get", Read),
            ("/lazystore.pathinfo.v1.PathInfoService/List", Read),
            ("/lazystore.pathinfo.v1.PathInfoService/Facts", Read),
            ("/lazystore.pathinfo.v1.PathInfoService/GetPublished", Read),
            ("/lazystore.pathinfo.v1.PathInfoService/Listing", Read),
            (
                "/lazystore.pathinfo.v1.PathInfoService/CollectGarbage",
                Write,
            ),
            ("/grpc.health.v1.Health/Check", Nothing),
            ("/grpc.health.v1.Health/Watch", Nothing),
            ("/some.other.Service/Get", Write),
            ("/", Write),
            ("", Write),
        ] {
            assert_eq!(Need::of_grpc_call(call), need, "{call}");
        }
    }

    #[test]
    fn write_tokens_allow_reads_and_read_tokens_do_not_allow_writes() {
        let read = Tokens::parse(path(), "r1\nr2\n").unwrap();
        let write = Tokens::parse(path(), "w\n").unwrap();
        let open = Access::default();
        assert!(open.is_open());
        for need in [Need::Nothing, Need::Read, Need::Write] {
            assert!(open.check(need, None).is_ok());
        }

        let both = Access {
            read: Some(read.clone()),
            write: Some(write.clone()),
        };
        assert!(both.check(Need::Nothing, None).is_ok());
        assert!(both.check(Need::Read, Some(b"r2")).is_ok());
        assert!(both.check(Need::Read, Some(b"w")).is_ok());
        assert!(matches!(
            both.check(Need::Read, None),
            Err(Denied::Missing { kind: "read" })
        ));
        assert!(matches!(
            both.check(Need::Read, Some(b"x")),
            Err(Denied::Wrong { kind: "read" })
        ));
        assert!(both.check(Need::Write, Some(b"w")).is_ok());
        assert!(matches!(
            both.check(Need::Write, Some(b"r1")),
            Err(Denied::Wrong { kind: "write" })
        ));
        assert!(matches!(
            both.check(Need::Write, None),
            Err(Denied::Missing { kind: "write" })
        ));

        // Only writes guarded: reads stay open.
        let writes = Access {
            read: None,
            write: Some(write),
        };
        assert!(writes.check(Need::Read, None).is_ok());
        assert!(writes.check(Need::Write, None).is_err());
        // Only reads guarded: a write needs at least a read token.
        let reads = Access {
            read: Some(read),
            write: None,
        };
        assert!(reads.check(Need::Write, Some(b"r1")).is_ok());
        assert!(matches!(
            reads.check(Need::Write, None),
            Err(Denied::Missing { kind: "read" })
        ));
    }

    #[test]
    fn schemes() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(credentials(b"BASIC dTpw", "Basic"), Some(&b"dTpw"[..]));
        let token = Token::parse(path(), "t0k").unwrap();
        assert_eq!(bearer(bearer_value(&token).as_bytes()), Some(&b"t0k"[..]));
    }

    #[test]
    fn messages_name_the_flags() {
        let m = Denied::Missing { kind: "write" }.to_string();
        assert!(
            m.contains("--token-file") && m.contains("--write-token-file"),
            "{m}"
        );
        let w = Denied::Wrong { kind: "read" }.to_string();
        assert!(
            w.contains("--token-file") && w.contains("--read-token-file"),
            "{w}"
        );
    }
}
