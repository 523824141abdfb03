//! `Digest`: the 32-byte BLAKE3 hash that names every blob, chunk and
//! directory in the store.

use std::fmt;
use std::str::FromStr;

/// Length of a [`Digest`] in bytes.
pub const DIGEST_LEN: usize = 32;

/// A BLAKE3 hash. Shown as lowercase hex; [`Digest::fmt_short`] for logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; DIGEST_LEN]);

/// A byte string that is not 32 bytes long, or hex that is not 64 digits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid digest: expected {DIGEST_LEN} bytes (64 hex digits), got {found} bytes")]
pub struct InvalidDigest {
    /// How many bytes (or hex digits / 2) were given.
    pub found: usize,
}

impl Digest {
    /// The BLAKE3 of no bytes: the digest of the empty blob and of the empty
    /// directory (whose encoding is empty).
    pub const EMPTY: Digest = Digest([
        0xaf, 0x13, 0x49, 0xb9, 0xf5, 0xf9, 0xa1, 0xa6, 0xa0, 0x40, 0x4d, 0xea, 0x36, 0xdc, 0xc9,
        0x49, 0x9b, 0xcb, 0x25, 0xc9, 0xad, 0xc1, 0x12, 0xb7, 0xcc, 0x9a, 0x93, 0xca, 0xe4, 0x1f,
        0x32, 0x62,
    ]);

    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; DIGEST_LEN]) -> Self {
        Digest(bytes)
    }

    /// The BLAKE3 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; DIGEST_LEN] {
        &self.0
    }

    /// The first 8 hex digits, enough to tell digests apart in a log line.
    pub fn fmt_short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Digest(*h.as_bytes())
    }
}

impl TryFrom<&[u8]> for Digest {
    type Error = InvalidDigest;
    fn try_from(value: &[u8]) -> Result<Self, Self::Error> {
        <[u8; DIGEST_LEN]>::try_from(value)
            .map(Digest)
            .map_err(|_| InvalidDigest { found: value.len() })
    }
}

impl TryFrom<&bytes::Bytes> for Digest {
    type Error = InvalidDigest;
    fn try_from(value: &bytes::Bytes) -> Result<Self, Self::Error> {
        Digest::try_from(value.as_ref())
    }
}

impl From<Digest> for bytes::Bytes {
    fn from(d: Digest) -> Self {
        bytes::Bytes::copy_from_slice(&d.0)
    }
}

impl FromStr for Digest {
    type Err = InvalidDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; DIGEST_LEN];
        hex::decode_to_slice(s, &mut out).map_err(|_| InvalidDigest { found: s.len() / 2 })?;
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_blake3_of_nothing() {
        assert_eq!(Digest::of(b""), Digest::EMPTY);
        assert_eq!(
            Digest::EMPTY.to_string(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn hex_round_trip_and_bad_lengths() {
        let d = Digest::of(b"hello");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert_eq!(d.fmt_short().len(), 8);
        assert_eq!(
            Digest::try_from(&[0u8; 31][..]),
            Err(InvalidDigest { found: 31 })
        );
        assert!("abcd".parse::<Digest>().is_err());
        assert!("zz".repeat(32).parse::<Digest>().is_err());
    }
}
