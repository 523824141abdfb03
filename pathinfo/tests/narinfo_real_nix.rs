//! Narinfo files and signatures against real Nix: what `nix copy` writes parses,
//! renders back byte for byte and verifies; tampering breaks verification; and
//! signatures made here are accepted by Nix when it substitutes with
//! `require-sigs`.

use lazystore_testkit as common;

use std::collections::BTreeSet;
use std::path::Path;

use lazystore_pathinfo::{
    Compression, NarInfo, PublicKey, SigningKey, StorePath, VerifyError, parse_sha256,
};
use sha2::{Digest, Sha256};

const KEY_NAME: &str = "lazystore-test-1";

/// Checks one narinfo written by Nix against everything Nix says about its path.
fn check_nix_narinfo(
    file: &Path,
    cache: &Path,
    compression: Compression,
    nix_key: &SigningKey,
    trusted: &PublicKey,
    untrusted: &PublicKey,
) {
    let text = std::fs::read_to_string(file).unwrap();
    let info = NarInfo::parse(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", file.display()));
    let path = info.store_path.to_absolute();

    // Our rendering is Nix's: same keys, order and hash notation.
    assert_eq!(info.render(), text, "{}", file.display());
    assert_eq!(NarInfo::parse(&info.render()).unwrap(), info);

    // Fields agree with Nix's own view of the path and with the cache's files.
    assert_eq!(
        file.file_stem().unwrap().to_str().unwrap(),
        info.store_path.hash_str()
    );
    assert_eq!(info.compression, compression);
    let nix_hash = common::nix_cmd(["nix-store", "--query", "--hash", &path]);
    assert_eq!(parse_sha256(nix_hash.trim()).unwrap(), info.nar_hash);
    let nix_size = common::nix_cmd(["nix-store", "--query", "--size", &path]);
    assert_eq!(nix_size.trim().parse::<u64>().unwrap(), info.nar_size);
    let nix_refs: BTreeSet<String> =
        common::nix_cmd(["nix-store", "--query", "--references", &path])
            .lines()
            .map(str::to_owned)
            .collect();
    let our_refs: BTreeSet<String> = info.references.iter().map(StorePath::to_absolute).collect();
    assert_eq!(our_refs, nix_refs);
    let nar_file = std::fs::read(cache.join(&info.url)).unwrap();
    assert_eq!(info.file_size, Some(nar_file.len() as u64));
    assert_eq!(
        info.file_hash,
        Some(<[u8; 32]>::from(Sha256::digest(&nar_file)))
    );
    if compression == Compression::None {
        assert_eq!(<[u8; 32]>::from(Sha256::digest(&nar_file)), info.nar_hash);
    }

    // Nix's signature verifies under our fingerprint, and is exactly the one we
    // make with the same key file (ed25519 is deterministic).
    assert_eq!(info.signatures.len(), 1, "{text}");
    assert_eq!(
        info.verify(std::slice::from_ref(trusted))
            .unwrap()
            .key_name(),
        KEY_NAME
    );
    assert_eq!(nix_key.sign(info.fingerprint()), info.signatures[0]);
    assert!(matches!(
        info.verify(std::slice::from_ref(untrusted)),
        Err(VerifyError::NoTrustedSignature { signatures: 1, .. })
    ));

    // Every signed field matters.
    let trusted = std::slice::from_ref(trusted);
    let mut t = info.clone();
    t.nar_hash[7] ^= 1;
    assert!(t.verify(trusted).is_err(), "NarHash changed");
    let mut t = info.clone();
    t.nar_size += 1;
    assert!(t.verify(trusted).is_err(), "NarSize changed");
    let mut t = info.clone();
    t.references.push(info.store_path.clone());
    assert!(t.verify(trusted).is_err(), "reference added");
    if !info.references.is_empty() {
        let mut t = info.clone();
        t.references.pop();
        assert!(t.verify(trusted).is_err(), "reference removed");
    }
    let mut t = info.clone();
    t.store_path = StorePath::from_parts(info.store_path.hash(), "renamed").unwrap();
    assert!(t.verify(trusted).is_err(), "StorePath changed");
    // Unsigned fields do not.
    let mut t = info.clone();
    t.url = "nar/elsewhere.nar".into();
    t.compression = Compression::Bzip2;
    t.file_hash = None;
    t.file_size = None;
    t.deriver = None;
    t.references.reverse();
    assert!(t.verify(trusted).is_ok(), "unsigned fields changed");
}

#[test]
fn nix_written_narinfos_parse_render_back_and_verify() {
    let closure = common::build_closure();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = common::gen_key(keys.path(), KEY_NAME);
    // Same name, another key: a signature must not verify by name alone.
    let other_keys = tempfile::tempdir().unwrap();
    let (_, other_public) = common::gen_key(other_keys.path(), KEY_NAME);

    let nix_key = SigningKey::load(&secret).unwrap();
    let trusted: PublicKey = public.parse().unwrap();
    assert_eq!(trusted.to_string(), public);
    assert_eq!(nix_key.public_key(), trusted);
    let untrusted: PublicKey = other_public.parse().unwrap();

    for compression in [Compression::Xz, Compression::Zstd, Compression::None] {
        let cache = common::make_cache(&closure.paths(), compression.as_str(), Some(&secret));
        let files = common::narinfo_files(cache.path());
        assert_eq!(files.len(), 3, "one narinfo per path of the closure");
        for file in &files {
            check_nix_narinfo(
                file,
                cache.path(),
                compression,
                &nix_key,
                &trusted,
                &untrusted,
            );
        }
    }
}

#[test]
fn narinfo_of_an_added_tree_carries_its_content_address() {
    let tree = tempfile::tempdir().unwrap();
    std::fs::write(tree.path().join("file"), "lazystore narinfo test\n").unwrap();
    std::fs::create_dir(tree.path().join("dir")).unwrap();
    std::os::unix::fs::symlink("../file", tree.path().join("dir/link")).unwrap();
    // A unique file makes the path new, so it carries no signatures from elsewhere.
    std::fs::write(
        tree.path().join("unique"),
        format!("{:?}", std::time::SystemTime::now()),
    )
    .unwrap();
    let path = common::add_tree(tree.path());

    let cache = common::make_cache(&[&path], "none", None);
    let files = common::narinfo_files(cache.path());
    assert_eq!(files.len(), 1);
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let info = NarInfo::parse(&text).unwrap();
    assert_eq!(info.store_path.to_absolute(), path);
    assert_eq!((info.references.len(), info.deriver.clone()), (0, None));
    assert!(info.signatures.is_empty());
    let ca = info
        .ca
        .as_deref()
        .expect("nix-store --add paths are content-addressed");
    assert_eq!(
        parse_sha256(ca.strip_prefix("fixed:r:").unwrap()).unwrap(),
        info.nar_hash
    );
    assert_eq!(info.render(), text);
    assert!(matches!(
        info.verify(&[]),
        Err(VerifyError::Unsigned { .. })
    ));
}

/// Substitutes `path` from the cache at `cache` into a fresh store with only
/// `trusted_key` trusted and signatures required; returns whether Nix accepted it.
fn nix_substitutes(cache: &Path, path: &str, trusted_key: &str) -> bool {
    let (root, store_url) = common::fresh_store();
    let output = common::nix_output([
        "nix",
        "copy",
        "--from",
        &format!("file://{}", cache.display()),
        "--to",
        &store_url,
        "--option",
        "require-sigs",
        "true",
        "--option",
        "trusted-public-keys",
        trusted_key,
        path,
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let copied = root.path().join(path.trim_start_matches('/')).exists();
    assert_eq!(
        output.status.success(),
        copied,
        "nix copy status and result disagree:\n{stderr}"
    );
    if !copied {
        assert!(
            stderr.contains("lacks a valid signature"),
            "unexpected failure:\n{stderr}"
        );
    }
    copied
}

#[test]
fn nix_accepts_signatures_made_here() {
    let closure = common::build_closure();
    let unsigned = common::make_cache(&closure.paths(), "xz", None);

    // A key made by Nix and loaded from its file, and a key made here.
    let keys = tempfile::tempdir().unwrap();
    let (secret, nix_public) = common::gen_key(keys.path(), "lazystore-nix-made-1");
    let loaded = SigningKey::load(&secret).unwrap();
    assert_eq!(loaded.public_key().to_string(), nix_public);
    let generated = SigningKey::generate("lazystore-made-here-1").unwrap();
    let (_, unrelated_public) = common::gen_key(keys.path(), "lazystore-unrelated-1");

    let signed = common::copy_tree(unsigned.path());
    for file in common::narinfo_files(signed.path()) {
        let mut info = NarInfo::parse(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert!(info.signatures.is_empty());
        info.sign(&loaded);
        info.sign(&generated);
        std::fs::write(&file, info.render()).unwrap();
    }

    let top = closure.top();
    assert!(
        nix_substitutes(signed.path(), top, &nix_public),
        "key file made by Nix"
    );
    assert!(
        nix_substitutes(signed.path(), top, &generated.public_key().to_string()),
        "key made here"
    );
    // Controls: Nix does check, both with an unrelated key and without signatures.
    assert!(
        !nix_substitutes(signed.path(), top, &unrelated_public),
        "unrelated key"
    );
    assert!(
        !nix_substitutes(unsigned.path(), top, &nix_public),
        "unsigned cache"
    );
}
