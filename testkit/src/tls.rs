//! Test certificates: a CA of its own and a server certificate it signed
//! for `127.0.0.1` and `localhost`, written as PEM files, for servers run
//! with `--tls-cert`/`--tls-key` and clients given `--ca-file` (or Nix's
//! `ssl-cert-file`). Made with rcgen (ring), so no `openssl` binary is
//! needed.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// A CA and a server certificate, in PEM files of a temporary directory
/// that lives as long as this.
pub struct TestPki {
    /// The CA's certificate: what clients trust.
    pub ca: PathBuf,
    /// The server's certificate, for `127.0.0.1` and `localhost`.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    _dir: TempDir,
}

/// A new CA (named `name`) and a server certificate signed by it.
pub fn test_pki(name: &str) -> TestPki {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("no names");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().expect("CA key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("valid names");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &issuer).expect("server certificate");

    let write = |file: &str, pem: String| {
        let path = dir.path().join(file);
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    TestPki {
        ca: write("ca.pem", ca_cert.pem()),
        cert: write("cert.pem", cert.pem()),
        key: write("key.pem", key.serialize_pem()),
        _dir: dir,
    }
}
