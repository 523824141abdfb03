//! TLS for both servers and for gRPC clients: the server's certificate and
//! key ([`ServerTls`], read once at startup, used by the gRPC listener and
//! by the HTTP binary cache), and the extra CA certificates a client trusts
//! beside the system's ([`CaCerts`], what `--ca-file` gives).
//!
//! Every file is parsed when it is read, so a wrong path, a file that holds
//! no certificate, or a key that does not belong to the certificate fails
//! at startup, naming the file and how to make a good one, rather than at
//! the first handshake.
//!
//! The crypto is rustls with the ring provider everywhere (tonic's
//! `tls-ring`, and the HTTP cache's acceptor built here): aws-lc-rs would
//! add a long C build for nothing we need.
//!
//! Clients trust the system's CA certificates (tonic's `tls-native-roots`,
//! which reads the same files as OpenSSL, e.g. `/etc/ssl/certs`) rather
//! than a bundle compiled in (`tls-webpki-roots`): a CA an administrator
//! installs system-wide is then trusted without `--ca-file`, and no
//! snapshot of Mozilla's list goes stale inside the binary. Both build
//! from crates.io alone.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// How to make a certificate and key, for messages about bad ones.
const HOW_TO_MAKE: &str = "make a self-signed pair with: openssl req -x509 -newkey ec -pkeyopt \
     ec_paramgen_curve:P-256 -nodes -days 365 -keyout key.pem -out cert.pem -subj /CN=HOST \
     -addext subjectAltName=DNS:HOST (or use one from your CA)";

/// A certificate or key file that can't be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {what} {path}")]
    Read {
        /// Which file it is ("TLS certificate", "TLS key", "CA certificate").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no PEM certificate (`-----BEGIN CERTIFICATE-----`).
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----); {hint}")]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// How to make one.
        hint: &'static str,
    },
    /// A PEM block of the file does not parse.
    #[error("{path} is not valid PEM: {reason}; {hint}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
        /// How to make a good one.
        hint: &'static str,
    },
    /// The key file holds no private key.
    #[error(
        "{path} holds no PEM private key (-----BEGIN PRIVATE KEY-----, or an RSA or EC key); \
         {HOW_TO_MAKE}"
    )]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the pair: the key does not match the certificate, or
    /// one of them is of a kind it does not support.
    #[error(
        "cannot use TLS certificate {cert} with key {key} (is the key the one the certificate \
         was made for? {HOW_TO_MAKE})"
    )]
    Unusable {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
}

/// The ring provider, for every rustls configuration built here.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads `path`, naming it as `what` if that fails.
fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The certificates of the PEM file at `path` (at least one).
fn certificates(
    path: &Path,
    pem: &[u8],
    hint: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
            hint,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
            hint,
        });
    }
    Ok(certs)
}

/// A server's certificate chain and private key, from PEM files: what
/// `lazystore serve --tls-cert FILE --tls-key FILE` reads. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Arc<[u8]>,
    key_pem: Arc<[u8]>,
    certs: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl fmt::Debug for ServerTls {
    /// The key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("certs", &self.certs.len())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the certificate chain (the server's first, then any
    /// intermediates) from `cert` and its private key from `key`, both
    /// PEM, and checks that rustls accepts them together.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        let cert_pem = read("TLS certificate", cert)?;
        let key_pem = read("TLS key", key)?;
        let certs = certificates(cert, &cert_pem, HOW_TO_MAKE)?;
        let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
                path: key.to_owned(),
            },
            e => TlsError::BadPem {
                path: key.to_owned(),
                reason: e.to_string(),
                hint: HOW_TO_MAKE,
            },
        })?;
        let tls = ServerTls {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            certs,
            key: Arc::new(private),
        };
        tls.try_rustls_config(Vec::new())
            .map_err(|source| TlsError::Unusable {
                cert: cert.to_owned(),
                key: key.to_owned(),
                source,
            })?;
        Ok(tls)
    }

    fn try_rustls_config(
        &self,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())?;
        config.alpn_protocols = alpn;
        Ok(Arc::new(config))
    }

    /// A rustls server configuration offering the ALPN protocols `alpn`
    /// (`b"http/1.1"` for the HTTP cache), for a `tokio_rustls` acceptor.
    pub fn rustls_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        self.try_rustls_config(alpn.iter().map(|p| p.to_vec()).collect())
            .expect("the pair was accepted when it was read")
    }

    /// The pair as tonic takes it (tonic builds its own configuration, with
    /// ALPN `h2`).
    pub(crate) fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}

/// CA certificates a client trusts beside the system's, from a PEM file
/// (what `--ca-file FILE` gives): the private CA that signed a server's
/// certificate, or a self-signed server certificate itself. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CaCerts {
    path: Arc<Path>,
    pem: Arc<[u8]>,
}

/// How to get a CA file, for messages about a bad one.
const CA_HINT: &str = "give the PEM certificate of the CA that signed the server's certificate \
     (or the server's own, if self-signed)";

impl CaCerts {
    /// Reads the certificates of the PEM file at `path` (at least one).
    pub fn from_pem_file(path: &Path) -> Result<CaCerts, TlsError> {
        let pem = read("CA certificate", path)?;
        certificates(path, &pem, CA_HINT)?;
        Ok(CaCerts {
            path: path.into(),
            pem: pem.into(),
        })
    }

    /// The file they were read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's PEM text: one or more certificates.
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }
}

/// Whether the system has CA certificates rustls can read. tonic refuses
/// to set up TLS with native roots when there are none; then only
/// `--ca-file` is trusted. Asked once: reading them takes a few
/// milliseconds, and they do not change while a command runs.
fn system_has_roots() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        if !found.errors.is_empty() {
            tracing::debug!(errors = ?found.errors, "reading the system's CA certificates");
        }
        !found.certs.is_empty()
    })
}

/// A gRPC client's TLS configuration: the system's CA certificates (if it
/// has any) and `ca`. `Err` names what is missing when neither is there.
pub(crate) fn client_config(ca: Option<&CaCerts>) -> Result<ClientTlsConfig, &'static str> {
    let mut config = ClientTlsConfig::new();
    if system_has_roots() {
        config = config.with_native_roots();
    } else if ca.is_none() {
        return Err(
            "this system has no CA certificates to check the server's with: give the CA's \
             certificate with --ca-file",
        );
    }
    if let Some(ca) = ca {
        config = config.ca_certificate(Certificate::from_pem(ca.pem()));
    }
    Ok(config)
}

/// The hint for a failed connection whose error chain (as text, in
/// `message`) says why, if TLS explains it: a certificate the client does
/// not trust, a TLS client at a cleartext server, or the other way round.
/// `tls` is whether the client spoke TLS.
pub(crate) fn hint(message: &str, tls: bool) -> Option<&'static str> {
    let message = message.to_ascii_lowercase();
    if tls {
        if untrusted(&message) {
            return Some(
                "the server's TLS certificate is not trusted: give the certificate of the CA \
                 that signed it with --ca-file (or $LAZYSTORE_CA_FILE), and check that it \
                 names the host of the URL",
            );
        }
        if message.contains("corrupt message") || message.contains("invalidcontenttype") {
            return Some("the server does not speak TLS: use grpc+http://");
        }
        None
    } else {
        // A TLS server answers an HTTP/2 preface with an alert and closes
        // the connection before HTTP/2 starts: hyper reports the connection
        // closed, or h2 reads the alert as a malformed frame, or — when the
        // close comes while the client still writes its first frames, as
        // on a loaded machine — a broken pipe. (A server going away
        // mid-call is reset or sends GOAWAY instead.)
        const SIGNS: [&str; 4] = [
            "connection closed",
            "frame with invalid size",
            "invalid frame",
            "broken pipe",
        ];
        SIGNS
            .iter()
            .any(|sign| message.contains(sign))
            .then_some("the server may use TLS: if so, use grpc+https://")
    }
}

/// Whether a failed connection's error chain says the server's
/// certificate is not trusted: retrying will not change that.
pub(crate) fn untrusted(message: &str) -> bool {
    message
        .to_ascii_lowercase()
        .contains("invalid peer certificate")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_say_what_tls_explains() {
        let may_tls = Some("the server may use TLS: if so, use grpc+https://");
        for closed in [
            "transport error: connection closed before message completed",
            "transport error: connection error: stream closed because of a broken pipe",
            "h2 protocol error: frame with invalid size",
        ] {
            assert_eq!(hint(closed, false), may_tls, "{closed}");
        }
        assert_eq!(hint("connection reset by peer", false), None);
        assert_eq!(
            hint("received corrupt message of type InvalidContentType", true),
            Some("the server does not speak TLS: use grpc+http://")
        );
        assert!(
            hint("invalid peer certificate: UnknownIssuer", true)
                .unwrap()
                .contains("--ca-file")
        );
    }
}
