//! Nix's base-32 encoding, the one in store path hashes (`/nix/store/<here>-name`)
//! and in `sha256:…` hashes of narinfo files.
//!
//! It is not RFC 4648 base32: the alphabet omits `e`, `o`, `u` and `t`, and the
//! bits run the other way. Character `n` counted from the *end* of the string holds
//! bits `5n .. 5n+5` of the input read as one little-endian number, so the last
//! character carries the low bits of byte 0. An encoding of `n` bytes has
//! `ceil(8n / 5)` characters; the bits of the first character that lie beyond the
//! input must be zero, and Nix rejects the string otherwise, so we do too: every byte
//! string then has exactly one encoding.
//!
//! No crate does Nix's variant: data-encoding's bit orders cannot express it.

use thiserror::Error;

/// The 32 digits, value 0 first.
const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Marks a byte that is not a digit in [`DIGIT_VALUES`].
const INVALID: u8 = 0xff;

/// Value of each byte as a digit, or [`INVALID`].
const DIGIT_VALUES: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut value = 0;
    while value < ALPHABET.len() {
        table[ALPHABET[value] as usize] = value as u8;
        value += 1;
    }
    table
};

/// Why a string is not the Nix base-32 encoding of some bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Nixbase32Error {
    /// No byte count encodes to this many characters (for example 1, 4 or 51).
    #[error("{len} characters is not the length of any nixbase32 encoding")]
    InvalidLength {
        /// Length of the input in bytes.
        len: usize,
    },
    /// The input has the length of an encoding, but of one with a different size
    /// than the caller asked for.
    #[error("expected {expected} nixbase32 characters, got {actual}")]
    WrongLength {
        /// Encoded length of the requested byte count.
        expected: usize,
        /// Length of the input in bytes.
        actual: usize,
    },
    /// A byte outside the alphabet `0123456789abcdfghijklmnpqrsvwxyz`.
    #[error("invalid nixbase32 character {byte:?} at position {position}")]
    InvalidCharacter {
        /// Offset of the byte in the input.
        position: usize,
        /// The byte, shown as a char when printable.
        byte: char,
    },
    /// The first character sets bits beyond the end of the decoded bytes.
    #[error("nixbase32 string sets bits beyond its last byte")]
    NonZeroPadding,
}

/// Number of characters that encode `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Number of bytes that `len` characters decode to, if `len` is the length of
/// some encoding.
pub const fn decoded_len(len: usize) -> Option<usize> {
    let n = len * 5 / 8;
    if encoded_len(n) == len { Some(n) } else { None }
}

/// Encodes `input` in Nix's base-32.
pub fn encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(encoded_len(input.len()));
    encode_with(input, |c| out.push(char::from(c)));
    out
}

/// Feeds the encoding of `input` to `push` one ASCII character at a time, first
/// character first, so callers can encode without allocating.
pub(crate) fn encode_with(input: &[u8], mut push: impl FnMut(u8)) {
    for n in (0..encoded_len(input.len())).rev() {
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        // The digit straddles bytes i and i+1 when j > 3; byte i+1 is absent (zero)
        // for the highest digit.
        let low = u16::from(input[i]) >> j;
        let high = input.get(i + 1).map_or(0, |&b| u16::from(b) << (8 - j));
        push(ALPHABET[usize::from((low | high) & 0x1f)]);
    }
}

/// Decodes a Nix base-32 string of any valid length.
pub fn decode(input: impl AsRef<[u8]>) -> Result<Vec<u8>, Nixbase32Error> {
    let input = input.as_ref();
    let len = decoded_len(input.len()).ok_or(Nixbase32Error::InvalidLength { len: input.len() })?;
    let mut out = vec![0; len];
    decode_into(input, &mut out)?;
    Ok(out)
}

/// Decodes a Nix base-32 string that must encode exactly `N` bytes, as store path
/// hashes (20) and sha256 hashes (32) do.
pub fn decode_fixed<const N: usize>(input: impl AsRef<[u8]>) -> Result<[u8; N], Nixbase32Error> {
    let input = input.as_ref();
    if input.len() != encoded_len(N) {
        return Err(Nixbase32Error::WrongLength {
            expected: encoded_len(N),
            actual: input.len(),
        });
    }
    let mut out = [0; N];
    decode_into(input, &mut out)?;
    Ok(out)
}

/// Decodes `input` into `out`, whose length the caller has matched to the input's.
fn decode_into(input: &[u8], out: &mut [u8]) -> Result<(), Nixbase32Error> {
    debug_assert_eq!(input.len(), encoded_len(out.len()));
    for (n, (position, &c)) in input.iter().enumerate().rev().enumerate() {
        let digit = DIGIT_VALUES[usize::from(c)];
        if digit == INVALID {
            return Err(Nixbase32Error::InvalidCharacter {
                position,
                byte: char::from(c),
            });
        }
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        out[i] |= ((u16::from(digit) << j) & 0xff) as u8;
        let carry = u16::from(digit) >> (8 - j);
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry as u8,
            None if carry != 0 => return Err(Nixbase32Error::NonZeroPadding),
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (hex, encoding) pairs printed by Nix 2.8: `nix hash to-base32 --type <algo> <hex>`.
    const NIX_VECTORS: &[(&str, &str)] = &[
        (
            "373ee80db6cdaa76d017583496ce7de612453d63957b95fc5db513111b215414",
            "052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip",
        ),
        (
            "a148e3f82e45e5b37b5c55b83811d9a33e3aa473389a1a8c741bd8e7d0e5c73d",
            "0gf7wp8fgn0vfj61m6iqffj3lgm3v48kif2mbixv7ra55vwf6j51",
        ),
        (
            "0000000000000000000000000000000000000000000000000000000000000001",
            "0080000000000000000000000000000000000000000000000000",
        ),
        (
            "ff00000000000000000000000000000000000000000000000000000000000000",
            "000000000000000000000000000000000000000000000000007z",
        ),
        (
            "0123456789abcdef0123456789abcdef01234567",
            "cx2j60ggrnmqjrs54c0yzkdbi5kla8q1",
        ),
    ];

    #[test]
    fn matches_nix_vectors() {
        for &(hex, encoded) in NIX_VECTORS {
            let bytes = hex::decode(hex).unwrap();
            assert_eq!(encode(&bytes), encoded, "encode {hex}");
            assert_eq!(decode(encoded).unwrap(), bytes, "decode {encoded}");
        }
    }

    #[test]
    fn lengths() {
        let table = [
            (0, 0),
            (1, 2),
            (2, 4),
            (3, 5),
            (4, 7),
            (5, 8),
            (20, 32),
            (32, 52),
            (64, 103),
        ];
        for (bytes, chars) in table {
            assert_eq!(encoded_len(bytes), chars);
            assert_eq!(decoded_len(chars), Some(bytes));
            assert_eq!(encode(&vec![0xa5; bytes]).len(), chars);
        }
        for chars in [1, 3, 6, 51, 54] {
            assert_eq!(decoded_len(chars), None);
            assert_eq!(
                decode("0".repeat(chars)),
                Err(Nixbase32Error::InvalidLength { len: chars })
            );
        }
    }

    #[test]
    fn round_trips_every_length_and_byte() {
        for len in 0..=70usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 151 + len * 7) as u8).collect();
            assert_eq!(decode(encode(&bytes)).unwrap(), bytes, "len {len}");
        }
        for b in 0..=255u8 {
            assert_eq!(decode(encode(&[b, !b])).unwrap(), [b, !b]);
        }
    }

    #[test]
    fn rejects_characters_outside_the_alphabet() {
        for bad in [b'e', b'o', b'u', b't', b'A', b'Z', b'-', b' ', 0, 0xff] {
            let mut s = *b"052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip";
            s[7] = bad;
            assert_eq!(
                decode(s),
                Err(Nixbase32Error::InvalidCharacter {
                    position: 7,
                    byte: char::from(bad)
                })
            );
        }
    }

    #[test]
    fn rejects_bits_past_the_end_like_nix() {
        // 52 digits carry 260 bits for 256, so the first digit may only be 0 or 1:
        // Nix 2.8 accepts `152l…` and rejects `252l…` and `z52l…`.
        let tail = "52l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip";
        assert!(decode_fixed::<32>(format!("1{tail}")).is_ok());
        for first in ["2", "z"] {
            assert_eq!(
                decode_fixed::<32>(format!("{first}{tail}")),
                Err(Nixbase32Error::NonZeroPadding)
            );
        }
        // 32 digits carry exactly 160 bits, so every first digit is fine for 20 bytes.
        assert!(decode_fixed::<20>("zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz").is_ok());
        // One byte in two digits: the first may only carry the top 3 bits.
        assert_eq!(decode("70").unwrap(), [0xe0]);
        assert_eq!(decode("80"), Err(Nixbase32Error::NonZeroPadding));
    }

    #[test]
    fn decode_fixed_checks_the_length() {
        assert_eq!(
            decode_fixed::<20>("052l44di24xmbpy9aywmccyla4p6gp79cd2q2z87dandnq6yhgip"),
            Err(Nixbase32Error::WrongLength {
                expected: 32,
                actual: 52
            })
        );
        assert_eq!(decode_fixed::<0>(""), Ok([]));
    }
}
