//! Nix's ed25519 signatures over store paths: the fingerprint that is signed, the
//! `Sig: name:base64` values of narinfo files, and the `name:base64` public and
//! secret key files of `nix-store --generate-binary-cache-key`.
//!
//! A signature binds a key name to 64 signature bytes; Nix finds the key to check
//! it with by that name, so a signature by an unknown name is not valid, whatever
//! its bytes. A narinfo is trusted when at least one of its signatures is valid
//! under a trusted key, as Nix checks it with the default `sigs-needed = 1`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::Signer as _;
use rand::TryRng as _;
use thiserror::Error;

use crate::narinfo::{NarInfo, format_sha256};
use crate::store_path::StorePath;

/// Bytes in an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Bytes in an ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Bytes in a Nix secret key: the 32-byte seed followed by the public key, as
/// libsodium lays out its secret keys.
pub const SECRET_KEY_LEN: usize = 64;

/// Why a `Sig` value is not a signature.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignatureError {
    /// No `:` between key name and signature.
    #[error("expected `name:base64`")]
    Malformed,
    /// The key name is empty or holds characters other than printable ASCII
    /// without `:`.
    #[error("invalid key name")]
    InvalidName,
    /// The part after the colon is not canonical padded base64.
    #[error("invalid base64")]
    Base64(#[source] base64::DecodeError),
    /// The base64 does not decode to [`SIGNATURE_LEN`] bytes.
    #[error("signature is {actual} bytes, expected {SIGNATURE_LEN}")]
    WrongLength {
        /// Decoded length in bytes.
        actual: usize,
    },
}

/// Why a key could not be loaded, parsed or made.
#[derive(Debug, Error)]
pub enum KeyError {
    /// No `:` between key name and key.
    #[error("expected `name:base64`")]
    Malformed,
    /// The key name is empty or holds characters other than printable ASCII
    /// without `:`.
    #[error("invalid key name")]
    InvalidName,
    /// The part after the colon is not canonical padded base64.
    #[error("invalid base64")]
    Base64(#[source] base64::DecodeError),
    /// The key has the wrong size for its kind.
    #[error("key is {actual} bytes, expected {expected}")]
    WrongLength {
        /// Size for this kind of key.
        expected: usize,
        /// Decoded length in bytes.
        actual: usize,
    },
    /// The public key bytes are not an ed25519 point.
    #[error("public key is not a valid ed25519 point")]
    InvalidPublicKey(#[source] ed25519_dalek::SignatureError),
    /// The public half of a secret key is not the one its seed derives.
    #[error("secret key's public half does not match its seed")]
    Mismatch(#[source] ed25519_dalek::SignatureError),
    /// The key file could not be read.
    #[error("cannot read key file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The operating system did not provide randomness for a new key.
    #[error("cannot get random bytes for a new key")]
    Random(#[source] rand::rngs::SysError),
}

/// Why a narinfo's signatures do not make it trusted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    /// The narinfo has no `Sig` lines.
    #[error("{path} is not signed")]
    Unsigned {
        /// The store path of the narinfo.
        path: StorePath,
    },
    /// No signature is both by a trusted key name and valid for the fingerprint.
    #[error("none of the {signatures} signatures of {path} is valid and by a trusted key")]
    NoTrustedSignature {
        /// The store path of the narinfo.
        path: StorePath,
        /// How many signatures were checked.
        signatures: usize,
    },
}

/// Key names end up in `Sig:` lines and space-separated `trusted-public-keys`
/// lists, and Nix splits `name:base64` at the first colon.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// Splits `name:base64` and decodes the base64 into exactly `N` bytes.
fn split_and_decode<const N: usize>(s: &str) -> Result<(&str, [u8; N]), SplitError> {
    let (name, encoded) = s.split_once(':').ok_or(SplitError::Malformed)?;
    if !valid_name(name) {
        return Err(SplitError::InvalidName);
    }
    let bytes = BASE64.decode(encoded).map_err(SplitError::Base64)?;
    let actual = bytes.len();
    let bytes = bytes
        .try_into()
        .map_err(|_| SplitError::WrongLength { actual })?;
    Ok((name, bytes))
}

/// The failures [`split_and_decode`] shares between signatures and keys.
enum SplitError {
    Malformed,
    InvalidName,
    Base64(base64::DecodeError),
    WrongLength { actual: usize },
}

impl From<SplitError> for SignatureError {
    fn from(e: SplitError) -> Self {
        match e {
            SplitError::Malformed => Self::Malformed,
            SplitError::InvalidName => Self::InvalidName,
            SplitError::Base64(e) => Self::Base64(e),
            SplitError::WrongLength { actual } => Self::WrongLength { actual },
        }
    }
}

impl KeyError {
    fn from_split(e: SplitError, expected: usize) -> Self {
        match e {
            SplitError::Malformed => Self::Malformed,
            SplitError::InvalidName => Self::InvalidName,
            SplitError::Base64(e) => Self::Base64(e),
            SplitError::WrongLength { actual } => Self::WrongLength { expected, actual },
        }
    }
}

/// The text Nix signs for a store path:
/// `1;<store path>;sha256:<nixbase32 NarHash>;<NarSize>;<references>`, with the
/// references as absolute paths, sorted and deduplicated (Nix keeps them in a set),
/// joined by `,`.
///
/// Nix refuses to fingerprint a path whose NAR size is unknown (zero);
/// [`NarInfo`] never holds a zero size.
pub fn fingerprint<'a>(
    store_path: &StorePath,
    nar_sha256: &[u8; 32],
    nar_size: u64,
    references: impl IntoIterator<Item = &'a StorePath>,
) -> String {
    let mut references: Vec<&StorePath> = references.into_iter().collect();
    references.sort();
    references.dedup();
    let references: Vec<String> = references.iter().map(|r| r.to_absolute()).collect();
    format!(
        "1;{};{};{nar_size};{}",
        store_path.to_absolute(),
        format_sha256(nar_sha256),
        references.join(",")
    )
}

/// A signature as in a narinfo `Sig` line: `<key name>:<base64 of 64 bytes>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    key_name: Box<str>,
    bytes: [u8; SIGNATURE_LEN],
}

impl Signature {
    /// Builds a signature, checking the key name.
    pub fn new(key_name: &str, bytes: [u8; SIGNATURE_LEN]) -> Result<Self, SignatureError> {
        if !valid_name(key_name) {
            return Err(SignatureError::InvalidName);
        }
        Ok(Self {
            key_name: key_name.into(),
            bytes,
        })
    }

    /// The name of the key that made it.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// The raw ed25519 signature.
    pub fn bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.bytes
    }
}

impl FromStr for Signature {
    type Err = SignatureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split_and_decode::<SIGNATURE_LEN>(s)?;
        Ok(Self {
            key_name: name.into(),
            bytes,
        })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, BASE64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

/// A named ed25519 public key, as in Nix's `trusted-public-keys`: `<name>:<base64>`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: Box<str>,
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    /// The key's name, which signatures by it carry.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The raw 32-byte public key.
    pub fn bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        self.key.as_bytes()
    }

    /// Whether `signature` is by this key (same name) and valid for `fingerprint`.
    ///
    /// Uses strict verification (no small-order keys or `R`, canonical `S`), as
    /// libsodium, which Nix uses, does.
    pub fn verify(&self, fingerprint: impl AsRef<[u8]>, signature: &Signature) -> bool {
        if signature.key_name() != self.name() {
            return false;
        }
        let signature = ed25519_dalek::Signature::from_bytes(signature.bytes());
        self.key
            .verify_strict(fingerprint.as_ref(), &signature)
            .is_ok()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split_and_decode::<PUBLIC_KEY_LEN>(s)
            .map_err(|e| KeyError::from_split(e, PUBLIC_KEY_LEN))?;
        let key =
            ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(KeyError::InvalidPublicKey)?;
        Ok(Self {
            name: name.into(),
            key,
        })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A named ed25519 secret key, in the format of Nix's secret key files:
/// `<name>:<base64 of seed ‖ public key>`.
///
/// It has no `Display`, so that it does not end up in logs by accident; use
/// [`SigningKey::to_secret_string`] to write a key file.
pub struct SigningKey {
    name: Box<str>,
    key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// Makes a new key from the operating system's random source.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        if !valid_name(name) {
            return Err(KeyError::InvalidName);
        }
        let mut seed = [0u8; ed25519_dalek::SECRET_KEY_LENGTH];
        rand::rngs::SysRng
            .try_fill_bytes(&mut seed)
            .map_err(KeyError::Random)?;
        Ok(Self {
            name: name.into(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// Reads a secret key file as written by `nix-store --generate-binary-cache-key`.
    /// Trailing whitespace is ignored, as Nix's own reader stops at the padding.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        text.trim_end().parse()
    }

    /// The key's name, which its signatures carry.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public half, under the same name.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs `fingerprint` (see [`fingerprint`]).
    pub fn sign(&self, fingerprint: impl AsRef<[u8]>) -> Signature {
        let signature = self.key.sign(fingerprint.as_ref());
        Signature {
            key_name: self.name.clone(),
            bytes: signature.to_bytes(),
        }
    }

    /// The secret key file contents Nix reads (`secret-key-files`,
    /// `nix store sign -k`), without a trailing newline, as Nix writes them.
    pub fn to_secret_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }
}

impl FromStr for SigningKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split_and_decode::<SECRET_KEY_LEN>(s)
            .map_err(|e| KeyError::from_split(e, SECRET_KEY_LEN))?;
        let key =
            ed25519_dalek::SigningKey::from_keypair_bytes(&bytes).map_err(KeyError::Mismatch)?;
        Ok(Self {
            name: name.into(),
            key,
        })
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}:<secret>)", self.name)
    }
}

/// Checks that at least one of `signatures` (those of `path`, whose
/// [`fingerprint`] is given) is by one of `trusted` and valid, and returns
/// the first such signature. What narinfos and PathInfos are checked with.
pub fn verify<'a>(
    path: &StorePath,
    fingerprint: &str,
    signatures: &'a [Signature],
    trusted: &[PublicKey],
) -> Result<&'a Signature, VerifyError> {
    if signatures.is_empty() {
        return Err(VerifyError::Unsigned { path: path.clone() });
    }
    signatures
        .iter()
        .find(|signature| trusted.iter().any(|key| key.verify(fingerprint, signature)))
        .ok_or_else(|| VerifyError::NoTrustedSignature {
            path: path.clone(),
            signatures: signatures.len(),
        })
}

impl NarInfo {
    /// The text the signatures of this narinfo sign (see [`fingerprint`]).
    pub fn fingerprint(&self) -> String {
        fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Checks that at least one signature is by one of `trusted` and valid for this
    /// narinfo's fingerprint, and returns the first such signature.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<&Signature, VerifyError> {
        verify(
            &self.store_path,
            &self.fingerprint(),
            &self.signatures,
            trusted,
        )
    }

    /// Signs this narinfo with `key`. An earlier signature under the same key name
    /// is replaced: it is either identical (ed25519 is deterministic) or stale.
    pub fn sign(&mut self, key: &SigningKey) {
        let signature = key.sign(self.fingerprint());
        self.signatures.retain(|s| s.key_name() != key.name());
        self.signatures.push(signature);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A narinfo written by Nix 2.8 after `nix store sign -k sk` with the key pair
    /// below (`nix-store --generate-binary-cache-key test-key-1 sk pk`).
    const SIGNED: &str = "\
StorePath: /nix/store/cmf6kjvpb6w0660lmkvrbp14s03144sv-c
URL: nar/052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip.nar
Compression: none
FileHash: sha256:052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip
FileSize: 208
NarHash: sha256:052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip
NarSize: 208
References: lg82kdw0qw11sm45914jsrp9l0cinhr0-b qdbvz8kr5favd6rq5fpqb84n3yjbr87y-a
Deriver: zxa5rl464b4iz5ffq65s12k3x22c95ny-c.drv
Sig: test-key-1:5MhDLClarHABz45hyHJy/RU9OhdVKm/fsNwIoJOi2qO4NS03QYHMRhT9G4YbcbCL8Lwz9c6Mur9jJg7SPhNTDw==
";
    const PUBLIC: &str = "test-key-1:a95spTt3uq2R5zjeP7kyzke7os/IpvEuQVqrH4Avnbc=";

    fn nix_narinfo() -> NarInfo {
        NarInfo::parse(SIGNED).unwrap()
    }

    #[test]
    fn fingerprint_matches_nix_layout() {
        assert_eq!(
            nix_narinfo().fingerprint(),
            "1;/nix/store/cmf6kjvpb6w0660lmkvrbp14s03144sv-c;\
             sha256:052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip;208;\
             /nix/store/lg82kdw0qw11sm45914jsrp9l0cinhr0-b,/nix/store/qdbvz8kr5favd6rq5fpqb84n3yjbr87y-a"
        );
        // References are sorted and deduplicated whatever order they come in.
        let info = nix_narinfo();
        let mut refs = info.references.clone();
        refs.reverse();
        refs.push(refs[0].clone());
        assert_eq!(
            fingerprint(&info.store_path, &info.nar_hash, info.nar_size, &refs),
            info.fingerprint()
        );
        let none: [&StorePath; 0] = [];
        assert!(fingerprint(&info.store_path, &info.nar_hash, 1, none).ends_with(";1;"));
    }

    #[test]
    fn verifies_a_signature_made_by_nix() {
        let key: PublicKey = PUBLIC.parse().unwrap();
        assert_eq!(key.to_string(), PUBLIC);
        let info = nix_narinfo();
        assert_eq!(
            info.verify(std::slice::from_ref(&key)).unwrap(),
            &info.signatures[0]
        );

        let mut tampered = info.clone();
        tampered.nar_size += 1;
        assert!(matches!(
            tampered.verify(std::slice::from_ref(&key)),
            Err(VerifyError::NoTrustedSignature { signatures: 1, .. })
        ));
        let mut unsigned = info.clone();
        unsigned.signatures.clear();
        assert!(matches!(
            unsigned.verify(&[key]),
            Err(VerifyError::Unsigned { .. })
        ));

        // Same key bytes under another name: Nix looks keys up by name.
        let renamed: PublicKey = PUBLIC.replace("test-key-1", "test-key-2").parse().unwrap();
        assert!(info.verify(&[renamed]).is_err());
    }

    #[test]
    fn signs_and_verifies_round_trip() {
        let key = SigningKey::generate("cache.example.org-1").unwrap();
        let reloaded: SigningKey = key.to_secret_string().parse().unwrap();
        assert_eq!(reloaded.public_key(), key.public_key());
        assert_eq!(
            reloaded
                .public_key()
                .to_string()
                .parse::<PublicKey>()
                .unwrap(),
            key.public_key()
        );

        let mut info = nix_narinfo();
        info.sign(&key);
        assert_eq!(info.signatures.len(), 2);
        assert_eq!(
            info.verify(&[key.public_key()]).unwrap().key_name(),
            "cache.example.org-1"
        );
        // Re-signing replaces, and the rendered narinfo still verifies after a parse.
        info.sign(&reloaded);
        assert_eq!(info.signatures.len(), 2);
        let reparsed = NarInfo::parse(&info.render()).unwrap();
        assert!(reparsed.verify(&[key.public_key()]).is_ok());

        let other = SigningKey::generate("cache.example.org-1").unwrap();
        assert!(info.verify(&[other.public_key()]).is_err());
    }

    #[test]
    fn signature_format() {
        let sig_text = SIGNED
            .lines()
            .find_map(|l| l.strip_prefix("Sig: "))
            .unwrap();
        let sig: Signature = sig_text.parse().unwrap();
        assert_eq!(sig.to_string(), sig_text);
        assert_eq!(format!("{sig:?}"), format!("Signature({sig_text})"));
        assert_eq!(
            Signature::new("a b", [0; 64]),
            Err(SignatureError::InvalidName)
        );

        let cases: &[(&str, SignatureError)] = &[
            ("no-colon", SignatureError::Malformed),
            (":AAAA", SignatureError::InvalidName),
            ("a b:AAAA", SignatureError::InvalidName),
            ("k:AAAA", SignatureError::WrongLength { actual: 3 }),
        ];
        for (text, err) in cases {
            assert_eq!(text.parse::<Signature>().as_ref(), Err(err), "{text}");
        }
        assert!(matches!(
            "k:not base64!".parse::<Signature>(),
            Err(SignatureError::Base64(_))
        ));
        // Base64 without its padding is not what Nix writes.
        let unpadded = sig_text.trim_end_matches('=');
        assert!(matches!(
            unpadded.parse::<Signature>(),
            Err(SignatureError::Base64(_))
        ));
    }

    #[test]
    fn key_formats() {
        let key = SigningKey::generate("k").unwrap();
        let secret = key.to_secret_string();
        assert_eq!(secret.len(), "k:".len() + 88);
        assert!(
            format!("{key:?}").contains("<secret>") && !format!("{key:?}").contains(&secret[2..])
        );

        assert!(matches!(
            PUBLIC.replace("a95sp", "").parse::<PublicKey>(),
            Err(KeyError::Base64(_)) | Err(KeyError::WrongLength { .. })
        ));
        // A secret key is not a public key, nor the other way round.
        assert!(matches!(
            secret.parse::<PublicKey>(),
            Err(KeyError::WrongLength {
                expected: 32,
                actual: 64
            })
        ));
        assert!(matches!(
            PUBLIC.parse::<SigningKey>(),
            Err(KeyError::WrongLength {
                expected: 64,
                actual: 32
            })
        ));
        // A secret key whose public half belongs to another seed.
        let other = SigningKey::generate("k").unwrap();
        let mut bytes = key.key.to_keypair_bytes();
        bytes[32..].copy_from_slice(other.public_key().bytes());
        assert!(matches!(
            format!("k:{}", BASE64.encode(bytes)).parse::<SigningKey>(),
            Err(KeyError::Mismatch(_))
        ));
        assert!(matches!(
            SigningKey::generate("a:b"),
            Err(KeyError::InvalidName)
        ));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sk");
        std::fs::write(&file, format!("{secret}\n")).unwrap();
        assert_eq!(
            SigningKey::load(&file).unwrap().public_key(),
            key.public_key()
        );
        assert!(matches!(
            SigningKey::load(dir.path().join("missing")),
            Err(KeyError::Read { .. })
        ));
    }

    /// RFC 8032 test 2 (one-byte message), to pin the ed25519 layer itself.
    #[test]
    fn rfc8032_vector() {
        let seed = hex::decode("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
            .unwrap();
        let public =
            hex::decode("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
                .unwrap();
        let mut keypair = seed.clone();
        keypair.extend_from_slice(&public);
        let key: SigningKey = format!("rfc:{}", BASE64.encode(&keypair)).parse().unwrap();
        let sig = key.sign([0x72]);
        assert_eq!(
            hex::encode(sig.bytes()),
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
             085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
        );
        assert!(key.public_key().verify([0x72], &sig));
        assert!(!key.public_key().verify([0x73], &sig));
    }
}
