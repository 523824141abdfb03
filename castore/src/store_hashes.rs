//! The hash parts of Nix store paths inside file bytes, for
//! reference-normalised storage (`docs/design.md`, "Reference-normalised
//! chunks").
//!
//! A rebuild of a package against another dependency changes nothing in
//! most of its files but the 32-character hashes of store paths
//! (`/nix/store/<hash>-<name>`): its dependencies' and its own. Found
//! here, those hashes are what the chunker ignores when it chooses cut
//! points (so a rebuild's chunks start and end where the first build's
//! did) and what compaction takes out of a chunk before storing it (so the
//! bytes stored for both builds are the same, `compaction.rs`).
//!
//! A hash is found by its prefix: the 32 characters of the nixbase32
//! alphabet after `/nix/store/`. That finds every reference Nix itself
//! records in practice (a reference is a store path the file names), and
//! others too, harmlessly: what is replaced is always recorded beside the
//! normalised bytes and put back when they are read. A hash whose
//! `/nix/store/` falls in the chunk before is not found in the chunk
//! after, so the chunker never cuts inside `/nix/store/<hash>`.
//! Scanning runs at memory speed (`memchr::memmem`, about 10 GB/s); only
//! the bytes after a hit are examined.

/// Length of a store path's hash part.
pub(crate) const HASH_LEN: usize = 32;

/// What precedes a hash part. Stores with another store directory are not
/// normalised (their bytes are stored as they are).
const PREFIX: &[u8] = b"/nix/store/";

/// `/nix/store/` and a hash: the span the chunker never cuts inside.
pub(crate) const SPAN: usize = PREFIX.len() + HASH_LEN;

/// What replaces each hash character: not in the nixbase32 alphabet, so
/// normalised bytes have no hash left to find.
const PLACEHOLDER: u8 = b'e';

/// Whether `b` is in Nix's base-32 alphabet (`0-9a-z` without `e o t u`).
fn is_nixbase32(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'z') && !matches!(b, b'e' | b'o' | b't' | b'u')
}

/// The offsets of the hash parts in `data`, ascending; each is followed by
/// [`HASH_LEN`] nixbase32 characters and preceded by `/nix/store/`.
pub(crate) fn find(data: &[u8]) -> Vec<usize> {
    memchr::memmem::find_iter(data, PREFIX)
        .map(|at| at + PREFIX.len())
        .filter(|&hash| {
            data.get(hash..hash + HASH_LEN)
                .is_some_and(|h| h.iter().all(|&b| is_nixbase32(b)))
        })
        .collect()
}

/// Whether `hash` could be a hash part: a recorded one is checked on read.
pub(crate) fn is_hash(hash: &[u8]) -> bool {
    hash.len() == HASH_LEN && hash.iter().all(|&b| is_nixbase32(b))
}

/// Replaces the hashes at `offsets` (from [`find`]) with placeholders.
pub(crate) fn normalise(data: &mut [u8], offsets: &[usize]) {
    for &at in offsets {
        data[at..at + HASH_LEN].fill(PLACEHOLDER);
    }
}

/// The start of the `/nix/store/<hash>` that a cut at `cut` would split,
/// if any, of those whose hashes [`find`] found at `hashes`.
pub(crate) fn split_by(hashes: &[usize], cut: usize) -> Option<usize> {
    hashes
        .iter()
        .map(|hash| hash - PREFIX.len())
        .find(|&start| start < cut && cut < start + SPAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/0c9k8m1v5dz0qh4x3a6rj2wyb7sil5nf-glibc-2.40/lib";

    #[test]
    fn finds_hashes_after_the_store_dir_only() {
        let text = format!("#!{A}/ld.so\nx /nix/store/short-hash\n{A}");
        let found = find(text.as_bytes());
        assert_eq!(found, vec![13, text.rfind(A).unwrap() + PREFIX.len()]);
        for at in &found {
            assert!(is_hash(&text.as_bytes()[*at..at + HASH_LEN]));
        }
        // An `e`, `o`, `t` or `u` is not nixbase32; a hash cut short by
        // the end of the bytes is not one.
        assert!(find(b"/nix/store/0c9k8m1v5dz0qh4x3a6rj2wyb7sil5ne-x").is_empty());
        assert!(find(&A.as_bytes()[..40]).is_empty());
    }

    #[test]
    fn normalised_bytes_hold_no_hash_and_keep_their_length() {
        let mut text = format!("{A} and {A}").into_bytes();
        let at = find(&text);
        normalise(&mut text, &at);
        assert!(find(&text).is_empty());
        assert_eq!(text.len(), 2 * A.len() + 5);
        assert!(text.starts_with(b"/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-glibc"));
    }

    #[test]
    fn a_cut_inside_a_store_path_is_found() {
        let text = format!("0123456789{A}");
        let found = find(text.as_bytes());
        let start = 10;
        assert_eq!(split_by(&found, start), None);
        for cut in start + 1..start + SPAN {
            assert_eq!(split_by(&found, cut), Some(start), "cut at {cut}");
        }
        assert_eq!(split_by(&found, start + SPAN), None);
    }
}
