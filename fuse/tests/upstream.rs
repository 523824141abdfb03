//! Lazy substitution in the filesystem core, from a real-Nix binary cache
//! served over HTTP on 127.0.0.1: a path with a `.ls` listing is shown
//! without its NAR and the NAR is downloaded once on the first read,
//! however many read at once — also with listings served as
//! cache.nixos.org serves them (brotli or zstd, said so only in
//! `Content-Encoding`), and from a `file://` copy of such listings; without
//! a usable listing the lookup reads the start of the NAR, counts the
//! fallback, and the first use inside fetches it; bad
//! upstream input (untrusted signature, wrong NarHash, another StorePath,
//! 404, server down) shows or reads nothing, publishes nothing, and the
//! next access tries again. A path read before its references is
//! published once they have been read too.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lazystore_fuse::{FileKind, FsError, FsOptions, Ino, LazyFs, Stats};
use lazystore_importer::{NEGATIVE_TTL, Options, RetryPolicy, UpstreamSubstituter};
use lazystore_pathinfo::substitute::{StoreSubstituter, Substituters};
use lazystore_pathinfo::{NarInfo, PublicKey, SigningKey, Store, StorePath};
use lazystore_testkit::http::{Behaviour, Encoding, TestServer};
use lazystore_testkit::{Closure, build_closure, build_paths, copy_tree, gen_key, make_cache};
use tempfile::TempDir;

struct Fixture {
    closure: Closure,
    secret_key: std::path::PathBuf,
    public_key: PublicKey,
    /// xz cache of the closure, with listings.
    cache: TempDir,
    _keys: TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let closure = build_closure();
        let keys = tempfile::tempdir().unwrap();
        let (secret_key, public_key) = gen_key(keys.path(), "lazystore-upstream-1");
        let cache = make_cache(&[closure.top()], "xz", Some(&secret_key));
        Fixture {
            closure,
            secret_key,
            public_key: public_key.parse().unwrap(),
            cache,
            _keys: keys,
        }
    })
}

/// 20 paths (each referring to the one before), in an xz cache with
/// listings, signed with the fixture's key.
struct Many {
    paths: Vec<String>,
    cache: TempDir,
}

fn many() -> &'static Many {
    static MANY: OnceLock<Many> = OnceLock::new();
    MANY.get_or_init(|| {
        let paths = build_paths(20);
        let last = paths.last().unwrap().as_str();
        let cache = make_cache(&[last], "xz", Some(&fixture().secret_key));
        Many { paths, cache }
    })
}

fn store_path(absolute: &str) -> StorePath {
    StorePath::from_absolute_path(absolute).unwrap()
}

fn basename(absolute: &str) -> Vec<u8> {
    store_path(absolute).to_string().into_bytes()
}

fn options(url: &str, key: PublicKey) -> Options {
    Options {
        caches: vec![url.to_owned()],
        trusted_keys: vec![key],
        retry: RetryPolicy {
            max_attempts: Some(2),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            ..Options::default().retry
        },
        ..Options::default()
    }
}

/// A filesystem over an empty memory store with `url` as its upstream.
async fn lazy_fs(url: &str, key: PublicKey) -> (LazyFs, Store) {
    let store = Store::open("memory://", lazystore_pathinfo::StoreOptions::default())
        .await
        .unwrap();
    (fs_over(&store, options(url, key)), store)
}

/// A filesystem over `store`, substituting as `options` say: the store,
/// then the upstream caches, as a mount composes them.
fn fs_over(store: &Store, options: Options) -> LazyFs {
    let upstream = UpstreamSubstituter::new(store.clone(), options, NEGATIVE_TTL).unwrap();
    let paths = Substituters::new()
        .then(Arc::new(StoreSubstituter::new(
            store.path_infos.clone(),
            "memory://",
        )))
        .then(Arc::new(upstream));
    LazyFs::new(store.clone(), FsOptions::default(), Arc::new(Stats::new()))
        .with_substituter(Arc::new(paths))
}

/// Looks up the single-file store path `path` and checks that reading it
/// gives the file's contents.
async fn assert_reads_file(fs: &LazyFs, path: &str) {
    let file = fs.lookup(Ino::ROOT, &basename(path)).await.unwrap();
    assert_eq!(
        fs.read(file.ino, 0, 4096).await.unwrap(),
        std::fs::read(path).unwrap(),
        "{path}"
    );
}

async fn lookup_path(fs: &LazyFs, parent: Ino, path: &str) -> Result<Ino, FsError> {
    let mut ino = parent;
    for name in path.split('/') {
        ino = fs.lookup(ino, name.as_bytes()).await?.ino;
    }
    Ok(ino)
}

async fn published(store: &Store, path: &str) -> bool {
    store
        .path_infos
        .get(&store_path(path).hash())
        .await
        .unwrap()
        .is_some()
}

fn narinfo_file(cache: &Path, path: &str) -> std::path::PathBuf {
    cache.join(format!("{}.narinfo", store_path(path).hash_str()))
}

fn edit_narinfo(cache: &Path, path: &str, edit: impl FnOnce(&mut NarInfo)) {
    let file = narinfo_file(cache, path);
    let mut info = NarInfo::parse(&std::fs::read_to_string(&file).unwrap()).unwrap();
    edit(&mut info);
    info.signatures.clear();
    info.sign(&SigningKey::load(&fixture().secret_key).unwrap());
    std::fs::write(file, info.render()).unwrap();
}

#[tokio::test]
async fn a_listed_path_shows_without_its_nar_and_reads_fetch_it_once() {
    listed_path_shows_without_its_nar(Behaviour::default()).await;
}

#[tokio::test]
async fn a_listed_path_shows_without_its_nar_from_a_cache_like_cache_nixos_org() {
    listed_path_shows_without_its_nar(Behaviour::cache_nixos_org(Encoding::Br)).await;
}

async fn listed_path_shows_without_its_nar(behaviour: Behaviour) {
    let f = fixture();
    let server = TestServer::start_with(f.cache.path(), behaviour).await;
    let (fs, store) = lazy_fs(&server.url, f.public_key.clone()).await;
    let c = &f.closure.c;

    // The whole tree, from the listing: attributes, entries, a symlink.
    let root = fs.lookup(Ino::ROOT, &basename(c)).await.unwrap();
    assert_eq!(root.kind, FileKind::Directory);
    let hi = fs.lookup(root.ino, b"bin").await.unwrap();
    let hi = fs.lookup(hi.ino, b"hi").await.unwrap();
    assert_eq!((hi.kind, hi.perm), (FileKind::File, 0o555));
    assert_eq!(
        hi.size,
        std::fs::metadata(format!("{c}/bin/hi")).unwrap().len()
    );
    let link = fs.lookup(root.ino, b"b").await.unwrap();
    assert_eq!(fs.readlink(link.ino).unwrap(), f.closure.b.as_bytes());
    let mut names = Vec::new();
    fs.readdir(root.ino, 0, 0, |e| {
        names.push(String::from_utf8_lossy(&e.name).into_owned());
        false
    })
    .await
    .unwrap();
    assert_eq!(names, [".", "..", "b", "bin", "refs"]);
    assert_eq!(
        server.nar_requests(),
        0,
        "listing the path downloaded its NAR"
    );
    assert_eq!(server.count(|p| p.ends_with(".ls")), 1);
    // A placeholder is no digest to show.
    assert!(
        fs.getxattr(hi.ino, lazystore_fuse::DIGEST_XATTR.as_bytes())
            .is_err()
    );

    // 16 readers of two files at once: one download.
    let refs = lookup_path(&fs, root.ino, "refs").await.unwrap();
    let reads = (0..16).map(|i| {
        let (ino, file) = if i % 2 == 0 {
            (refs, "refs")
        } else {
            (hi.ino, "bin/hi")
        };
        let fs = &fs;
        async move { (fs.read(ino, 0, 4096).await.unwrap(), file) }
    });
    for (got, file) in futures::future::join_all(reads).await {
        assert_eq!(got, std::fs::read(format!("{c}/{file}")).unwrap(), "{file}");
    }
    assert_eq!(server.nar_requests(), 1, "16 readers, one NAR download");
    assert_eq!(counter(&fs, "upstream_nar_downloads").await, 1);
    // Not published: its references are not in the store.
    assert!(!published(&store, c).await);

    // A single-file path, looked up and read the same way.
    let a = fs.lookup(Ino::ROOT, &basename(&f.closure.a)).await.unwrap();
    assert_eq!(a.kind, FileKind::File);
    assert_eq!(
        fs.read(a.ino, 0, 4096).await.unwrap(),
        std::fs::read(&f.closure.a).unwrap()
    );
    assert_eq!(server.nar_requests(), 2);

    // Forgotten by the kernel and looked up again: the narinfo is not asked
    // for again (a narinfo never changes), nor is the NAR.
    let narinfos = server.narinfo_requests();
    fs.forget(a.ino, 1);
    assert_reads_file(&fs, &f.closure.a).await;
    assert_eq!(
        (server.narinfo_requests(), server.nar_requests()),
        (narinfos, 2)
    );

    // a refers to nothing, so once fetched it was published: another mount
    // of the same store finds it there, without asking upstream. c, which
    // also refers to b, waits for b.
    assert!(published(&store, &f.closure.a).await);
    assert!(!published(&store, c).await);
    let other = fs_over(&store, options(&server.url, f.public_key.clone()));
    assert_reads_file(&other, &f.closure.a).await;
    assert_eq!(
        (server.narinfo_requests(), server.nar_requests()),
        (narinfos, 2)
    );

    // Reading b publishes it (a is published), and then c, pending since
    // it was read: its NAR is not downloaded again.
    assert_reads_file(&fs, &f.closure.b).await;
    assert!(published(&store, &f.closure.b).await);
    assert!(published(&store, c).await);
    assert_eq!(server.nar_requests(), 3);
}

/// Without listings, a lookup reads only the start of the NAR: a directory
/// is shown and its NAR fetched at the first lookup inside it (once, for
/// eight at once), a file is shown with its size and fetched at its first
/// read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_listing_the_nar_is_fetched_on_first_use_inside() {
    nar_fetched_on_first_use_inside(Behaviour::default()).await;
}

/// The same from a server that answers ranges, as cache.nixos.org does:
/// the peeks get only the NARs' starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_listing_ranges_answered_as_cache_nixos_org_does() {
    nar_fetched_on_first_use_inside(Behaviour::cache_nixos_org(Encoding::Zstd)).await;
}

async fn nar_fetched_on_first_use_inside(behaviour: Behaviour) {
    let f = fixture();
    let cache = copy_tree(f.cache.path());
    for entry in std::fs::read_dir(cache.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "ls") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let server = TestServer::start_with(cache.path(), behaviour).await;
    let (fs, _store) = lazy_fs(&server.url, f.public_key.clone()).await;

    let c = &f.closure.c;
    let root = fs.lookup(Ino::ROOT, &basename(c)).await.unwrap();
    assert_eq!(root.kind, FileKind::Directory);
    assert_eq!(server.nar_requests(), 1, "the lookup peeks");
    assert_eq!(counter(&fs, "upstream_listing_fallbacks").await, 1);
    assert_eq!(
        (
            counter(&fs, "upstream_nar_peeks").await,
            counter(&fs, "upstream_nar_downloads").await
        ),
        (1, 0)
    );
    // Nothing real to show as a digest yet.
    assert!(
        fs.getxattr(root.ino, lazystore_fuse::DIGEST_XATTR.as_bytes())
            .is_err()
    );
    let fs = Arc::new(fs);
    let lookups: Vec<_> = (0..8)
        .map(|_| {
            let fs = fs.clone();
            tokio::spawn(async move { lookup_path(&fs, root.ino, "refs").await.unwrap() })
        })
        .collect();
    let mut refs = Vec::new();
    for l in lookups {
        refs.push(l.await.unwrap());
    }
    assert_eq!(
        server.nar_requests(),
        2,
        "eight lookups inside, one download"
    );
    assert_eq!(counter(&fs, "upstream_nar_downloads").await, 1);
    assert_eq!(
        fs.read(refs[0], 0, 4096).await.unwrap(),
        std::fs::read(format!("{c}/refs")).unwrap()
    );
    assert!(
        fs.getxattr(refs[0], lazystore_fuse::DIGEST_XATTR.as_bytes())
            .is_ok()
    );
    assert_eq!(server.nar_requests(), 2);
    // Forgotten and looked up again once fetched: the real directory, with
    // its entries counted and its digest shown.
    fs.forget(root.ino, 1);
    let again = fs.lookup(Ino::ROOT, &basename(c)).await.unwrap();
    assert_eq!(again.size, 3, "refs, bin and b");
    assert!(
        fs.getxattr(again.ino, lazystore_fuse::DIGEST_XATTR.as_bytes())
            .is_ok()
    );
    assert_eq!(server.nar_requests(), 2);

    // A single-file path: shown with its size, fetched on read.
    let a = &f.closure.a;
    let file = fs.lookup(Ino::ROOT, &basename(a)).await.unwrap();
    let want = std::fs::read(a).unwrap();
    assert_eq!((file.kind, file.size), (FileKind::File, want.len() as u64));
    assert_eq!(server.nar_requests(), 3);
    assert_eq!(counter(&fs, "upstream_nar_downloads").await, 1);
    assert_eq!(fs.read(file.ino, 0, 4096).await.unwrap(), want);
    assert_eq!(server.nar_requests(), 4);
    assert_eq!(counter(&fs, "upstream_nar_downloads").await, 2);
}

/// Everything under the directory `dir`, as `ls -lR` sees it: each
/// directory read, each entry looked up and its attributes read, each
/// symlink read. Returns how many entries there were.
async fn walk(fs: &LazyFs, dir: Ino) -> usize {
    let mut dirs = vec![dir];
    let mut entries = 0;
    while let Some(dir) = dirs.pop() {
        let mut names = Vec::new();
        fs.readdir(dir, 0, 0, |e| {
            names.push(e.name.clone());
            false
        })
        .await
        .unwrap();
        for name in names.iter().filter(|n| &n[..] != b"." && &n[..] != b"..") {
            let attr = fs.lookup(dir, name).await.unwrap();
            assert_eq!(fs.getattr(attr.ino).unwrap().kind, attr.kind);
            entries += 1;
            match attr.kind {
                FileKind::Directory => dirs.push(attr.ino),
                FileKind::Symlink => {
                    fs.readlink(attr.ino).unwrap();
                }
                FileKind::File => {}
            }
        }
    }
    entries
}

/// With listings served as cache.nixos.org serves them (compressed with
/// `encoding`, said so only in `Content-Encoding`), looking at every entry
/// of 20 never-fetched paths downloads no NAR, and reading a file then
/// downloads that path's NAR, once.
async fn encoded_listings_show_paths_without_their_nars(encoding: Encoding) {
    let f = fixture();
    let m = many();
    let server = TestServer::start_with(m.cache.path(), Behaviour::cache_nixos_org(encoding)).await;
    let (fs, _store) = lazy_fs(&server.url, f.public_key.clone()).await;
    for (i, path) in m.paths.iter().enumerate() {
        let root = fs.lookup(Ino::ROOT, &basename(path)).await.unwrap();
        assert_eq!(fs.getattr(root.ino).unwrap().kind, FileKind::Directory);
        // bin, bin/tool, share, share/note, link, and prev but in the first.
        let want = if i == 0 { 5 } else { 6 };
        assert_eq!(walk(&fs, root.ino).await, want, "{path}");
        let tool = lookup_path(&fs, root.ino, "bin/tool").await.unwrap();
        let tool = fs.getattr(tool).unwrap();
        assert_eq!((tool.perm, tool.size), (0o555, file_size(path, "bin/tool")));
        let link = lookup_path(&fs, root.ino, "link").await.unwrap();
        assert_eq!(fs.readlink(link).unwrap(), &b"share/note"[..]);
    }
    assert_eq!(server.listing_requests(), 20);
    assert_eq!(
        server.nar_requests(),
        0,
        "looking at listed paths asked for a NAR"
    );
    assert_eq!(
        (
            counter(&fs, "upstream_nar_downloads").await,
            counter(&fs, "upstream_nar_peeks").await,
            counter(&fs, "upstream_listing_fallbacks").await,
        ),
        (0, 0, 0)
    );

    // Reading files of one path downloads its NAR, once.
    let path = &m.paths[7];
    let root = fs.lookup(Ino::ROOT, &basename(path)).await.unwrap();
    for file in ["share/note", "bin/tool", "prev"] {
        let ino = lookup_path(&fs, root.ino, file).await.unwrap();
        assert_eq!(
            fs.read(ino, 0, 4096).await.unwrap(),
            std::fs::read(format!("{path}/{file}")).unwrap(),
            "{path}/{file}"
        );
    }
    let nar = format!("/{}", read_narinfo(m.cache.path(), path).url);
    assert_eq!(server.count(|r| r == nar), 1);
    assert_eq!(server.nar_requests(), 1);
    assert_eq!(
        (
            counter(&fs, "upstream_nar_downloads").await,
            counter(&fs, "upstream_nar_peeks").await,
        ),
        (1, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brotli_listings_show_paths_without_their_nars() {
    encoded_listings_show_paths_without_their_nars(Encoding::Br).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_listings_show_paths_without_their_nars() {
    encoded_listings_show_paths_without_their_nars(Encoding::Zstd).await;
}

/// A `file://` cache has no headers: its listings, stored brotli-compressed
/// (as in a copy of cache.nixos.org's files), are recognised by their
/// contents.
#[tokio::test]
async fn brotli_listings_of_a_file_cache_are_recognised() {
    let f = fixture();
    let cache = copy_tree(f.cache.path());
    for path in f.closure.paths() {
        let file = listing_file(cache.path(), path);
        let compressed = Encoding::Br.encode(&std::fs::read(&file).unwrap()).await;
        std::fs::write(file, compressed).unwrap();
    }
    let store = Store::open("memory://", lazystore_pathinfo::StoreOptions::default())
        .await
        .unwrap();
    let url = format!("file://{}", cache.path().display());
    let fs = fs_over(&store, options(&url, f.public_key.clone()));
    let root = fs.lookup(Ino::ROOT, &basename(&f.closure.c)).await.unwrap();
    assert_eq!(walk(&fs, root.ino).await, 4, "b, bin, bin/hi, refs");
    assert_eq!(
        (
            counter(&fs, "upstream_nar_peeks").await,
            counter(&fs, "upstream_nar_downloads").await,
            counter(&fs, "upstream_listing_fallbacks").await,
        ),
        (0, 0, 0)
    );
    let hi = lookup_path(&fs, root.ino, "bin/hi").await.unwrap();
    assert_eq!(
        fs.read(hi, 0, 4096).await.unwrap(),
        std::fs::read(format!("{}/bin/hi", f.closure.c)).unwrap()
    );
    assert_eq!(counter(&fs, "upstream_nar_downloads").await, 1);
}

/// A listing stored zstd-compressed and sent brotli-encoded on top is
/// undone layer by layer: the `Content-Encoding` first, then the magic
/// bytes of what it held.
#[tokio::test]
async fn content_encoding_is_undone_before_the_magic_bytes_are_read() {
    let f = fixture();
    let cache = copy_tree(f.cache.path());
    let file = listing_file(cache.path(), &f.closure.c);
    let compressed = Encoding::Zstd.encode(&std::fs::read(&file).unwrap()).await;
    std::fs::write(file, compressed).unwrap();
    let server =
        TestServer::start_with(cache.path(), Behaviour::cache_nixos_org(Encoding::Br)).await;
    let (fs, _) = lazy_fs(&server.url, f.public_key.clone()).await;
    let root = fs.lookup(Ino::ROOT, &basename(&f.closure.c)).await.unwrap();
    assert_eq!(walk(&fs, root.ino).await, 4, "b, bin, bin/hi, refs");
    assert_eq!(server.nar_requests(), 0);
    assert_eq!(counter(&fs, "upstream_listing_fallbacks").await, 0);
}

/// A listing that is not one (here: bytes that, their `Content-Encoding`
/// undone, are neither JSON nor compressed) is not used; the lookup falls
/// back to the NAR's start, and the fallback is counted.
#[tokio::test]
async fn unusable_listings_fall_back_and_are_counted() {
    let f = fixture();
    let cache = copy_tree(f.cache.path());
    let server =
        TestServer::start_with(cache.path(), Behaviour::cache_nixos_org(Encoding::Br)).await;
    for path in f.closure.paths() {
        std::fs::write(listing_file(cache.path(), path), b"\x8bnot brotli either").unwrap();
    }
    let (fs, _) = lazy_fs(&server.url, f.public_key.clone()).await;
    for path in f.closure.paths() {
        fs.lookup(Ino::ROOT, &basename(path)).await.unwrap();
    }
    assert_eq!(server.listing_requests(), 3);
    assert_eq!(counter(&fs, "upstream_listing_fallbacks").await, 3);
    assert_eq!(counter(&fs, "upstream_nar_peeks").await, 3);
    // The cache answers ranges: the peeks asked for the NARs' starts.
    assert_eq!(server.nar_requests(), 3);
}

fn file_size(path: &str, file: &str) -> u64 {
    std::fs::symlink_metadata(format!("{path}/{file}"))
        .unwrap()
        .len()
}

fn read_narinfo(cache: &Path, path: &str) -> NarInfo {
    NarInfo::parse(&std::fs::read_to_string(narinfo_file(cache, path)).unwrap()).unwrap()
}

/// A counter of the mount's stats file.
async fn counter(fs: &LazyFs, name: &str) -> u64 {
    let stats = fs.read(Ino::STATS_FILE, 0, 1 << 16).await.unwrap();
    String::from_utf8_lossy(&stats)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_owned))
        .unwrap_or_else(|| panic!("no {name} in the stats"))
        .parse()
        .unwrap()
}

fn enoent(r: Result<lazystore_fuse::Attr, FsError>) {
    match r {
        Err(e) => assert_eq!(e.errno(), libc::ENOENT, "{e}"),
        Ok(a) => panic!("shown: {a:?}"),
    }
}

#[tokio::test]
async fn untrusted_signatures_and_other_store_paths_show_nothing_until_fixed() {
    let f = fixture();
    let keys = tempfile::tempdir().unwrap();
    let (_, other_key) = gen_key(keys.path(), "someone-else-1");
    let server = TestServer::start(f.cache.path()).await;
    let (fs, store) = lazy_fs(&server.url, other_key.parse().unwrap()).await;
    let c = &f.closure.c;
    enoent(fs.lookup(Ino::ROOT, &basename(c)).await);
    enoent(fs.lookup(Ino::ROOT, &basename(c)).await);
    // Failures are not remembered: each lookup asked again.
    assert_eq!(server.narinfo_requests(), 2);
    assert!(!published(&store, c).await);

    // b's narinfo file names a.
    let cache = copy_tree(f.cache.path());
    std::fs::copy(
        narinfo_file(cache.path(), &f.closure.a),
        narinfo_file(cache.path(), &f.closure.b),
    )
    .unwrap();
    let server = TestServer::start(cache.path()).await;
    let (fs, _) = lazy_fs(&server.url, f.public_key.clone()).await;
    enoent(fs.lookup(Ino::ROOT, &basename(&f.closure.b)).await);
    assert_eq!(server.nar_requests(), 0);
}

#[tokio::test]
async fn a_wrong_nar_hash_fails_reads_with_eio_and_publishes_nothing() {
    let f = fixture();
    let cache = copy_tree(f.cache.path());
    let c = &f.closure.c;
    edit_narinfo(cache.path(), c, |info| info.nar_hash[0] ^= 1);
    let server = TestServer::start(cache.path()).await;
    let (fs, store) = lazy_fs(&server.url, f.public_key.clone()).await;
    // Signed and listed: shown.
    let root = fs.lookup(Ino::ROOT, &basename(c)).await.unwrap();
    let refs = lookup_path(&fs, root.ino, "refs").await.unwrap();
    let e = fs.read(refs, 0, 4096).await.unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(e.to_string().contains("NarHash"), "{e}");
    assert_eq!(server.nar_requests(), 1);
    // The next read tries again (and fails again).
    assert_eq!(fs.read(refs, 0, 4096).await.unwrap_err().errno(), libc::EIO);
    assert_eq!(server.nar_requests(), 2);
    assert!(!published(&store, c).await);
}

#[tokio::test]
async fn missing_paths_are_remembered_and_a_down_server_is_retried() {
    let f = fixture();
    let server = TestServer::start(f.cache.path()).await;
    let (fs, _) = lazy_fs(&server.url, f.public_key.clone()).await;
    let absent = "/nix/store/00000000000000000000000000000000-absent";
    enoent(fs.lookup(Ino::ROOT, &basename(absent)).await);
    enoent(fs.lookup(Ino::ROOT, &basename(absent)).await);
    assert_eq!(
        server.narinfo_requests(),
        1,
        "a 404 is believed for a while"
    );

    // Nobody listens on this port any more.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (fs, store) = lazy_fs(&format!("http://127.0.0.1:{port}"), f.public_key.clone()).await;
    let c = &f.closure.c;
    enoent(fs.lookup(Ino::ROOT, &basename(c)).await);
    assert!(!published(&store, c).await);
    // Up again on the same port: the next lookup works.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await;
    if let Ok(listener) = listener {
        let server = TestServer::serve(listener, f.cache.path());
        let root = fs.lookup(Ino::ROOT, &basename(c)).await.unwrap();
        assert_eq!(root.kind, FileKind::Directory);
        assert_eq!(server.narinfo_requests(), 1);
    } else {
        panic!("port {port} was taken meanwhile");
    }
}

fn listing_file(cache: &Path, path: &str) -> std::path::PathBuf {
    cache.join(format!("{}.ls", store_path(path).hash_str()))
}

/// Rewrites the listing of `path` in `cache` with `edit` on its text.
fn edit_listing(cache: &Path, path: &str, edit: impl FnOnce(String) -> String) {
    let file = listing_file(cache, path);
    let text = std::fs::read_to_string(&file).unwrap();
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit changed nothing");
    std::fs::write(file, edited).unwrap();
}

#[tokio::test]
async fn a_listing_that_lies_is_caught_by_its_size_or_by_the_nar() {
    let f = fixture();
    let c = &f.closure.c;

    // Dropping the executable bit changes the NAR the listing implies: it
    // is not used, and the lookup fetches the NAR to show the truth.
    let cache = copy_tree(f.cache.path());
    edit_listing(cache.path(), c, |t| t.replace(r#","executable":true"#, ""));
    // The single-file path a, listed as a directory holding a file.
    let a_size = std::fs::metadata(&f.closure.a).unwrap().len();
    std::fs::write(
        listing_file(cache.path(), &f.closure.a),
        format!(
            r#"{{"version":1,"root":{{"type":"directory","entries":{{"x":{{"type":"regular","size":{a_size}}}}}}}}}"#
        ),
    )
    .unwrap();
    let server = TestServer::start(cache.path()).await;
    let (fs, _) = lazy_fs(&server.url, f.public_key.clone()).await;
    let root = fs.lookup(Ino::ROOT, &basename(c)).await.unwrap();
    assert_eq!(
        server.nar_requests(),
        1,
        "a listing that does not add up was used"
    );
    let hi = lookup_path(&fs, root.ino, "bin/hi").await.unwrap();
    assert_eq!(fs.getattr(hi).unwrap().perm, 0o555);
    let a = fs.lookup(Ino::ROOT, &basename(&f.closure.a)).await.unwrap();
    assert_eq!(a.kind, FileKind::File);
    assert_eq!(
        fs.read(a.ino, 0, 4096).await.unwrap(),
        std::fs::read(&f.closure.a).unwrap()
    );
    // Both listings were not used: counted.
    assert_eq!(counter(&fs, "upstream_listing_fallbacks").await, 2);

    // A symlink target of the same length adds up; the NAR shows the lie
    // when it arrives, and from then on the path fails with EIO.
    let cache = copy_tree(f.cache.path());
    let b = &f.closure.b;
    let forged = format!("{}x", &b[..b.len() - 1]);
    edit_listing(cache.path(), c, |t| t.replace(b.as_str(), &forged));
    let server = TestServer::start(cache.path()).await;
    let (fs, store) = lazy_fs(&server.url, f.public_key.clone()).await;
    let root = fs.lookup(Ino::ROOT, &basename(c)).await.unwrap();
    let link = fs.lookup(root.ino, b"b").await.unwrap();
    // Before the NAR: what the cache claims, kept by the kernel briefly.
    assert_eq!(fs.readlink(link.ino).unwrap(), forged.as_bytes());
    assert!(link.ttl <= lazystore_pathinfo::substitute::PROVISIONAL_TTL);
    let refs = lookup_path(&fs, root.ino, "refs").await.unwrap();
    let e = fs.read(refs, 0, 4096).await.unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(e.to_string().contains("listing differs"), "{e}");
    assert_eq!(fs.readlink(link.ino).unwrap_err().errno(), libc::EIO);
    assert_eq!(fs.getattr(root.ino).unwrap_err().errno(), libc::EIO);
    // Poisoned for good: no second download.
    assert_eq!(fs.read(refs, 0, 4096).await.unwrap_err().errno(), libc::EIO);
    assert_eq!(server.nar_requests(), 1);
    assert!(!published(&store, c).await);
}

#[tokio::test]
async fn readers_waiting_on_a_failed_download_share_its_failure() {
    let f = fixture();
    let cache = copy_tree(f.cache.path());
    let c = &f.closure.c;
    edit_narinfo(cache.path(), c, |info| info.nar_hash[0] ^= 1);
    let server = TestServer::start(cache.path()).await;
    let (fs, _) = lazy_fs(&server.url, f.public_key.clone()).await;
    let root = fs.lookup(Ino::ROOT, &basename(c)).await.unwrap();
    let refs = lookup_path(&fs, root.ino, "refs").await.unwrap();
    let reads = (0..8).map(|_| fs.read(refs, 0, 4096));
    for r in futures::future::join_all(reads).await {
        assert_eq!(r.unwrap_err().errno(), libc::EIO);
    }
    assert_eq!(server.nar_requests(), 1, "8 waiting readers, one download");
}

/// The same for lookups inside a directory shown from its NAR's start: the
/// eight that wait on one failed download share its failure, and a later
/// lookup tries again.
#[tokio::test]
async fn lookups_inside_an_unlisted_path_share_a_failed_download() {
    let f = fixture();
    let cache = copy_tree(f.cache.path());
    let c = &f.closure.c;
    edit_narinfo(cache.path(), c, |info| info.nar_hash[0] ^= 1);
    std::fs::remove_file(listing_file(cache.path(), c)).unwrap();
    let server = TestServer::start(cache.path()).await;
    let (fs, _) = lazy_fs(&server.url, f.public_key.clone()).await;
    let root = fs.lookup(Ino::ROOT, &basename(c)).await.unwrap();
    assert_eq!(server.nar_requests(), 1, "the peek");
    let lookups = (0..8).map(|_| fs.lookup(root.ino, b"refs"));
    for r in futures::future::join_all(lookups).await {
        assert_eq!(r.unwrap_err().errno(), libc::EIO);
    }
    assert_eq!(server.nar_requests(), 2, "8 waiting lookups, one download");
    assert_eq!(
        fs.lookup(root.ino, b"refs").await.unwrap_err().errno(),
        libc::EIO
    );
    assert_eq!(server.nar_requests(), 3, "a later lookup tries again");
}

#[tokio::test]
async fn a_path_is_shown_under_its_own_name_only() {
    let f = fixture();
    let server = TestServer::start(f.cache.path()).await;
    let (fs, _) = lazy_fs(&server.url, f.public_key.clone()).await;
    let c = &f.closure.c;
    fs.lookup(Ino::ROOT, &basename(c)).await.unwrap();
    let other = format!("{}-evil", &store_path(c).hash_str());
    enoent(fs.lookup(Ino::ROOT, other.as_bytes()).await);
}

/// With signature checks off, a path is shown and read but never published:
/// an unchecked narinfo vouches for nothing.
#[tokio::test]
async fn unchecked_paths_are_not_published() {
    let f = fixture();
    let server = TestServer::start(f.cache.path()).await;
    let store = Store::open("memory://", lazystore_pathinfo::StoreOptions::default())
        .await
        .unwrap();
    let unchecked = Options {
        check_signatures: false,
        ..options(&server.url, f.public_key.clone())
    };
    let fs = fs_over(&store, unchecked);
    assert_reads_file(&fs, &f.closure.a).await;
    assert!(!published(&store, &f.closure.a).await);
}
