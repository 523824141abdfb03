//! [`Facts`]: what a store path is without its contents — its narinfo's
//! metadata, no root node. What Nix's validity database needs (a builder's
//! `lazystore nix-db`), and what a pull-through store can answer from an
//! upstream narinfo before downloading the NAR
//! ([`PathInfoService::facts`](super::PathInfoService::facts)).

use super::{PathInfo, PathInfoDecodeError, store_path};
use crate::NarInfo;
use crate::proto;
use crate::signature::{PublicKey, Signature, VerifyError, fingerprint, verify};
use crate::store_path::StorePath;

/// A store path's metadata, without its root node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// The store path.
    pub store_path: StorePath,
    /// Store paths it refers to, sorted.
    pub references: Vec<StorePath>,
    /// Length of its NAR.
    pub nar_size: u64,
    /// SHA-256 of its NAR.
    pub nar_sha256: [u8; 32],
    /// Signatures over its fingerprint.
    pub signatures: Vec<Signature>,
    /// The derivation that built it, when known.
    pub deriver: Option<StorePath>,
    /// Its content address, when it has one.
    pub ca: Option<String>,
}

impl Facts {
    /// The text Nix signatures sign for this path.
    pub fn fingerprint(&self) -> String {
        fingerprint(
            &self.store_path,
            &self.nar_sha256,
            self.nar_size,
            &self.references,
        )
    }

    /// Checks that at least one signature is by one of `trusted` and valid
    /// for the fingerprint; the first such signature.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<&Signature, VerifyError> {
        verify(
            &self.store_path,
            &self.fingerprint(),
            &self.signatures,
            trusted,
        )
    }
}

impl From<PathInfo> for Facts {
    fn from(info: PathInfo) -> Self {
        Facts {
            store_path: info.store_path,
            references: info.references,
            nar_size: info.nar_size,
            nar_sha256: info.nar_sha256,
            signatures: info.signatures,
            deriver: info.deriver,
            ca: info.ca,
        }
    }
}

impl From<NarInfo> for Facts {
    /// The narinfo's metadata (references sorted; its URL, compression and
    /// file hash belong to the cache it came from).
    fn from(narinfo: NarInfo) -> Self {
        let mut references = narinfo.references;
        references.sort();
        Facts {
            store_path: narinfo.store_path,
            references,
            nar_size: narinfo.nar_size,
            nar_sha256: narinfo.nar_hash,
            signatures: narinfo.signatures,
            deriver: narinfo.deriver,
            ca: narinfo.ca,
        }
    }
}

/// Every field of a wire PathInfo but its root, validated.
impl TryFrom<&proto::PathInfo> for Facts {
    type Error = PathInfoDecodeError;
    fn try_from(wire: &proto::PathInfo) -> Result<Self, Self::Error> {
        let mut references = wire
            .references
            .iter()
            .map(|r| store_path(r))
            .collect::<Result<Vec<_>, _>>()?;
        references.sort();
        if wire.nar_size == 0 {
            return Err(PathInfoDecodeError::EmptyNar);
        }
        Ok(Facts {
            store_path: store_path(&wire.store_path)?,
            references,
            nar_size: wire.nar_size,
            nar_sha256: <[u8; 32]>::try_from(wire.nar_sha256.as_ref())
                .map_err(|_| PathInfoDecodeError::NarHashLength(wire.nar_sha256.len()))?,
            signatures: wire
                .signatures
                .iter()
                .map(|s| s.parse().map_err(PathInfoDecodeError::Signature))
                .collect::<Result<_, _>>()?,
            deriver: match wire.deriver.as_str() {
                "" => None,
                d => Some(store_path(d)?),
            },
            ca: Some(wire.ca.clone()).filter(|ca| !ca.is_empty()),
        })
    }
}

/// On the wire: a PathInfo with no root.
impl From<&Facts> for proto::PathInfo {
    fn from(facts: &Facts) -> Self {
        proto::PathInfo {
            store_path: facts.store_path.to_string(),
            root: None,
            references: facts.references.iter().map(ToString::to_string).collect(),
            nar_size: facts.nar_size,
            nar_sha256: bytes::Bytes::copy_from_slice(&facts.nar_sha256),
            signatures: facts.signatures.iter().map(ToString::to_string).collect(),
            deriver: facts
                .deriver
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            ca: facts.ca.clone().unwrap_or_default(),
        }
    }
}
