//! Decompressing what binary caches store: the one mapping from a
//! [`Compression`] (a narinfo's `Compression` line, the extension of a NAR
//! file name, or an HTTP `Content-Encoding`) to a streaming decoder.

use std::pin::Pin;

use async_compression::tokio::bufread::{
    BrotliDecoder, BzDecoder, GzipDecoder, XzDecoder, ZstdDecoder,
};
use tokio::io::{AsyncRead, BufReader};

use crate::Compression;

/// Memory an xz decoder may use. `xz -9` needs 65 MiB; Nix writes `xz -6`
/// (9 MiB). A stream asking for more is refused instead of allocated.
pub const XZ_MEMORY_LIMIT: u64 = 128 << 20;

/// Read size between the transport and the decoder.
const COMPRESSED_BUFFER: usize = 256 << 10;

/// A decompressed stream.
pub type Decompressed = Pin<Box<dyn AsyncRead + Send>>;

impl Compression {
    /// Whether [`decompress`] reads it. Nix caches use xz, zstd, bzip2 and
    /// none; br and gzip come almost free with the others.
    pub fn supported(self) -> bool {
        !matches!(self, Compression::Lzip | Compression::Lz4)
    }

    /// The compression of a NAR file named `<anything>.nar<extension>`, as
    /// Nix names them (`.nar`, `.nar.xz`, `.nar.zst`, `.nar.bz2`, `.nar.br`,
    /// `.nar.gz`, `.nar.lz`, `.nar.lz4`); `None` for another extension.
    pub fn from_nar_extension(extension: &str) -> Option<Compression> {
        Some(match extension {
            "" => Compression::None,
            ".xz" => Compression::Xz,
            ".zst" => Compression::Zstd,
            ".bz2" => Compression::Bzip2,
            ".br" => Compression::Brotli,
            ".gz" => Compression::Gzip,
            ".lz" => Compression::Lzip,
            ".lz4" => Compression::Lz4,
            _ => return None,
        })
    }

    /// The compression one coding of an HTTP `Content-Encoding` header
    /// names (`br`, `zstd`, `gzip`, `xz`, `bzip2`, `identity`; the names
    /// are case-insensitive), as Nix's own HTTP client reads them; `None`
    /// for a coding no decoder here reads (`compress`, `deflate`, …).
    /// cache.nixos.org stores listings brotli- or zstd-compressed and says
    /// so only in this header.
    pub fn from_content_encoding(coding: &str) -> Option<Compression> {
        let coding = coding.trim().to_ascii_lowercase();
        Some(match coding.as_str() {
            "" | "identity" | "none" => Compression::None,
            "br" => Compression::Brotli,
            "zstd" => Compression::Zstd,
            "gzip" | "x-gzip" => Compression::Gzip,
            "xz" => Compression::Xz,
            "bzip2" => Compression::Bzip2,
            _ => return None,
        })
    }
}

/// `compressed`, decompressed as `compression` says; `None` if it is not
/// [`supported`](Compression::supported). Decoder failures surface as
/// `io::Error`s of the returned reader.
pub fn decompress<R>(compressed: R, compression: Compression) -> Option<Decompressed>
where
    R: AsyncRead + Send + 'static,
{
    let input = BufReader::with_capacity(COMPRESSED_BUFFER, compressed);
    Some(match compression {
        Compression::None => Box::pin(input),
        Compression::Xz => Box::pin(XzDecoder::with_mem_limit(input, XZ_MEMORY_LIMIT)),
        Compression::Zstd => Box::pin(ZstdDecoder::new(input)),
        Compression::Bzip2 => Box::pin(BzDecoder::new(input)),
        Compression::Brotli => Box::pin(BrotliDecoder::new(input)),
        Compression::Gzip => Box::pin(GzipDecoder::new(input)),
        Compression::Lzip | Compression::Lz4 => return None,
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    #[tokio::test]
    async fn decodes_what_it_supports_and_names_extensions() {
        let plain = b"nix-archive-1".repeat(100);
        let zstd = zstd::encode_all(&plain[..], 3).unwrap();
        let mut out = Vec::new();
        decompress(std::io::Cursor::new(zstd), Compression::Zstd)
            .unwrap()
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!(out, plain);
        assert!(decompress(std::io::Cursor::new(vec![]), Compression::Lz4).is_none());
        assert_eq!(
            Compression::from_nar_extension(".zst"),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::from_nar_extension(""), Some(Compression::None));
        assert_eq!(Compression::from_nar_extension(".rar"), None);
        assert_eq!(
            Compression::from_content_encoding("br"),
            Some(Compression::Brotli)
        );
        assert_eq!(
            Compression::from_content_encoding(" ZSTD "),
            Some(Compression::Zstd)
        );
        assert_eq!(
            Compression::from_content_encoding("identity"),
            Some(Compression::None)
        );
        assert_eq!(Compression::from_content_encoding("deflate"), None);
        for c in [
            Compression::Xz,
            Compression::Zstd,
            Compression::Bzip2,
            Compression::None,
        ] {
            assert!(c.supported(), "{c}");
        }
    }
}
