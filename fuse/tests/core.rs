//! The filesystem core without a mount: name resolution, attributes, inode
//! lifetimes, listings, reads, readahead, retries and counters.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::{Tree, publish, put_tree, test_store};
use lazystore_castore::{BlobService, Node};
use lazystore_fuse::{
    DIGEST_XATTR, FileKind, FsError, FsOptions, Ino, LazyFs, RetryPolicy, Stats, StatsSnapshot,
};
use lazystore_pathinfo::Store;
use lazystore_testkit::noise;

fn fs(store: &Store, options: FsOptions) -> LazyFs {
    LazyFs::new(store.clone(), options, Arc::new(Stats::new()))
}

fn errno(e: FsError) -> i32 {
    e.errno()
}

async fn read_all(fs: &LazyFs, ino: Ino, size: u64, piece: u32) -> Vec<u8> {
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let got = fs.read(ino, out.len() as u64, piece).await.unwrap();
        assert!(!got.is_empty());
        out.extend_from_slice(&got);
    }
    out
}

fn sample_tree() -> Tree {
    Tree::Dir(vec![
        (
            "bin",
            Tree::Dir(vec![
                ("hello", Tree::Exec(b"#!/bin/sh\necho hi\n".to_vec())),
                ("same", Tree::File(b"#!/bin/sh\necho hi\n".to_vec())),
            ]),
        ),
        ("empty", Tree::File(Vec::new())),
        ("emptydir", Tree::Dir(vec![])),
        ("link", Tree::Link("bin/hello")),
        (
            "share",
            Tree::Dir(vec![
                ("a", Tree::Dir(vec![])),
                ("b", Tree::Dir(vec![])),
                ("big", Tree::File(noise(1000, 1))),
            ]),
        ),
    ])
}

#[tokio::test]
async fn attributes_are_nix_canonical() {
    let (store, _, _) = test_store();
    let root = put_tree(&store, &sample_tree()).await;
    let path = publish(&store, "sample", root).await;
    let fs = fs(&store, FsOptions::default());
    let top = fs
        .lookup(Ino::ROOT, path.to_string().as_bytes())
        .await
        .unwrap();
    let one = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
    assert_eq!(
        (top.kind, top.perm, top.mtime),
        (FileKind::Directory, 0o555, one)
    );
    // bin and share are subdirectories; emptydir too.
    assert_eq!(top.nlink, 2 + 3);
    let bin = fs.lookup(top.ino, b"bin").await.unwrap();
    let hello = fs.lookup(bin.ino, b"hello").await.unwrap();
    let same = fs.lookup(bin.ino, b"same").await.unwrap();
    // Same contents, different executable bit: different inodes and modes.
    assert_ne!(hello.ino, same.ino);
    assert_eq!(
        (hello.kind, hello.perm, hello.nlink),
        (FileKind::File, 0o555, 1)
    );
    assert_eq!((same.perm, same.size, same.blocks), (0o444, 18, 1));
    assert_eq!(hello.mtime, one);
    let big = fs
        .lookup(fs.lookup(top.ino, b"share").await.unwrap().ino, b"big")
        .await
        .unwrap();
    assert_eq!((big.size, big.blocks), (1000, 2));
    let empty = fs.lookup(top.ino, b"empty").await.unwrap();
    assert_eq!((empty.size, empty.blocks), (0, 0));
    let emptydir = fs.lookup(top.ino, b"emptydir").await.unwrap();
    assert_eq!(
        (emptydir.kind, emptydir.nlink, emptydir.size),
        (FileKind::Directory, 2, 0)
    );
    let link = fs.lookup(top.ino, b"link").await.unwrap();
    assert_eq!(
        (link.kind, link.perm, link.size),
        (FileKind::Symlink, 0o777, 9)
    );
    assert_eq!(
        fs.readlink(link.ino).unwrap(),
        Bytes::from_static(b"bin/hello")
    );
    assert_eq!(fs.getattr(hello.ino).unwrap(), hello);

    // Wrong-type operations.
    assert_eq!(
        errno(fs.lookup(hello.ino, b"x").await.unwrap_err()),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(fs.read(bin.ino, 0, 10).await.unwrap_err()),
        libc::EISDIR
    );
    assert_eq!(errno(fs.readlink(hello.ino).unwrap_err()), libc::EINVAL);
    let missing = fs.lookup(top.ino, b"nope").await.unwrap_err();
    assert!(matches!(missing, FsError::NotFound { permanent: true }));
    assert_eq!(missing.errno(), libc::ENOENT);

    // The digest xattr.
    let value = fs.getxattr(hello.ino, DIGEST_XATTR.as_bytes()).unwrap();
    assert_eq!(value.len(), 64);
    assert_eq!(
        fs.listxattr(hello.ino).unwrap(),
        Bytes::from(format!("{DIGEST_XATTR}\0"))
    );
    assert_eq!(
        errno(fs.getxattr(hello.ino, b"user.other").unwrap_err()),
        libc::ENODATA
    );
    assert_eq!(
        errno(fs.getxattr(link.ino, DIGEST_XATTR.as_bytes()).unwrap_err()),
        libc::ENODATA
    );
}

#[tokio::test]
async fn root_lookup_needs_the_hash_and_the_name() {
    let (store, _, _) = test_store();
    let root = put_tree(&store, &Tree::File(b"x".to_vec())).await;
    let path = publish(&store, "thing-1.0", root).await;
    let fs = fs(&store, FsOptions::default());
    let hash = path.hash_str();
    assert!(
        fs.lookup(Ino::ROOT, path.to_string().as_bytes())
            .await
            .is_ok()
    );
    for bad in [
        format!("{hash}-thing-2.0"),
        format!("{hash}-thing"),
        "00000000000000000000000000000000-thing-1.0".to_owned(),
        hash.clone(),
        "not-a-store-path".to_owned(),
        "..".to_owned(),
    ] {
        let e = fs.lookup(Ino::ROOT, bad.as_bytes()).await.unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT, "{bad}");
    }
    // An unknown but valid store path may appear later: not permanent.
    let e = fs
        .lookup(Ino::ROOT, format!("{hash}-thing-2.0").as_bytes())
        .await
        .unwrap_err();
    assert!(matches!(e, FsError::NotFound { permanent: false }));
    // The control directory and its stats file.
    let control = fs.lookup(Ino::ROOT, b".lazystore").await.unwrap();
    assert_eq!(control.ino, Ino::CONTROL_DIR);
    let stats = fs.lookup(control.ino, b"stats").await.unwrap();
    let text = fs.read(stats.ino, 0, 1 << 20).await.unwrap();
    let snapshot = StatsSnapshot::parse(std::str::from_utf8(&text).unwrap());
    // Every lookup of a well-formed name asks the path-info service.
    assert_eq!(snapshot.path_infos_fetched, 5);
    assert_eq!(stats.size, text.len() as u64);
    assert_eq!(stats.ttl, Duration::ZERO);
}

#[tokio::test]
async fn single_file_and_symlink_store_paths() {
    let (store, _, _) = test_store();
    let file = put_tree(&store, &Tree::Exec(b"#!/bin/sh\n".to_vec())).await;
    let file = publish(&store, "script", file).await;
    let link = put_tree(&store, &Tree::Link("/nix/store/elsewhere")).await;
    let link = publish(&store, "link", link).await;
    let fs = fs(&store, FsOptions::default());
    let f = fs
        .lookup(Ino::ROOT, file.to_string().as_bytes())
        .await
        .unwrap();
    assert_eq!((f.kind, f.perm, f.size), (FileKind::File, 0o555, 10));
    assert_eq!(&fs.read(f.ino, 0, 100).await.unwrap()[..], b"#!/bin/sh\n");
    let l = fs
        .lookup(Ino::ROOT, link.to_string().as_bytes())
        .await
        .unwrap();
    assert_eq!(l.kind, FileKind::Symlink);
    assert_eq!(&fs.readlink(l.ino).unwrap()[..], b"/nix/store/elsewhere");
}

#[tokio::test]
async fn the_root_lists_only_with_list_root() {
    let (store, _, _) = test_store();
    let mut names = Vec::new();
    for i in 0..5 {
        let root = put_tree(&store, &Tree::File(vec![i])).await;
        names.push(publish(&store, &format!("p{i}"), root).await.to_string());
    }
    names.sort();
    let closed = fs(&store, FsOptions::default());
    assert_eq!(
        errno(closed.opendir(Ino::ROOT).await.unwrap_err()),
        libc::EPERM
    );
    let e = closed
        .readdir(Ino::ROOT, 0, 0, |_| false)
        .await
        .unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);

    let open = fs(
        &store,
        FsOptions {
            list_root: true,
            ..FsOptions::default()
        },
    );
    let fh = open.opendir(Ino::ROOT).await.unwrap();
    let mut listed = Vec::new();
    open.readdir(Ino::ROOT, fh, 0, |e| {
        listed.push(String::from_utf8(e.name.to_vec()).unwrap());
        false
    })
    .await
    .unwrap();
    assert_eq!(&listed[..2], [".", ".."]);
    assert_eq!(listed[2..], names[..]);
    // Resuming at an offset, and readdirplus holding lookups.
    let mut rest = Vec::new();
    open.readdirplus(Ino::ROOT, fh, 4, |name, _, attr| {
        rest.push((name.clone(), attr.kind));
        false
    })
    .await
    .unwrap();
    assert_eq!(rest.len(), 3);
    assert_eq!(open.inode_count(), 3);
    open.releasedir(fh);
}

#[tokio::test]
async fn forget_frees_inodes() {
    let (store, _, _) = test_store();
    let root = put_tree(&store, &sample_tree()).await;
    let path = publish(&store, "sample", root).await;
    let fs = fs(&store, FsOptions::default());
    let name = path.to_string();
    let top = fs.lookup(Ino::ROOT, name.as_bytes()).await.unwrap();
    let again = fs.lookup(Ino::ROOT, name.as_bytes()).await.unwrap();
    assert_eq!(top.ino, again.ino, "one inode per name while it lives");
    let bin = fs.lookup(top.ino, b"bin").await.unwrap();
    let hello = fs.lookup(bin.ino, b"hello").await.unwrap();
    assert_eq!(fs.inode_count(), 3);
    fs.forget(hello.ino, 1);
    fs.forget(bin.ino, 1);
    fs.forget(top.ino, 1);
    assert_eq!(fs.inode_count(), 1, "top still has a lookup");
    fs.forget(top.ino, 1);
    assert_eq!(fs.inode_count(), 0);
    assert_eq!(errno(fs.getattr(hello.ino).unwrap_err()), libc::ESTALE);
    // A new lookup makes a new inode; numbers are not reused.
    let top2 = fs.lookup(Ino::ROOT, name.as_bytes()).await.unwrap();
    assert!(top2.ino.0 > hello.ino.0);

    // Many lookups and forgets leave nothing behind.
    let share = fs.lookup(top2.ino, b"share").await.unwrap();
    for _ in 0..1000 {
        let a = fs.lookup(share.ino, b"a").await.unwrap();
        let big = fs.lookup(share.ino, b"big").await.unwrap();
        fs.forget(a.ino, 1);
        fs.forget(big.ino, 1);
    }
    assert_eq!(fs.inode_count(), 2);
}

#[tokio::test]
async fn readdirplus_holds_a_lookup_per_entry_it_returns() {
    let (store, _, _) = test_store();
    let root = put_tree(&store, &sample_tree()).await;
    let path = publish(&store, "sample", root).await;
    let fs = fs(&store, FsOptions::default());
    let top = fs
        .lookup(Ino::ROOT, path.to_string().as_bytes())
        .await
        .unwrap();
    let mut seen = Vec::new();
    // A "buffer" that takes four entries: . .. bin empty; "emptydir" is refused.
    fs.readdirplus(top.ino, 0, 0, |name, offset, attr| {
        if seen.len() == 4 {
            return true;
        }
        seen.push((name.clone(), offset, attr.ino));
        false
    })
    .await
    .unwrap();
    let names: Vec<_> = seen.iter().map(|s| s.0.clone()).collect();
    assert_eq!(
        names,
        [".", "..", "bin", "empty"].map(|s| Bytes::from_static(s.as_bytes()))
    );
    assert_eq!(
        fs.inode_count(),
        3,
        "top, bin and empty; the refused entry holds nothing"
    );
    // Continue from the last offset.
    let mut more = Vec::new();
    fs.readdirplus(top.ino, 0, seen[3].1, |name, _, _| {
        more.push(name.clone());
        false
    })
    .await
    .unwrap();
    assert_eq!(
        more,
        ["emptydir", "link", "share"].map(|s| Bytes::from_static(s.as_bytes()))
    );
    // Plain readdir: types, and real inode numbers where they exist.
    let mut plain = Vec::new();
    fs.readdir(top.ino, 0, 0, |e| {
        plain.push(e);
        false
    })
    .await
    .unwrap();
    assert_eq!(plain.len(), 7);
    assert_eq!(plain[2].ino, seen[2].2);
    assert_eq!(plain[5].kind, FileKind::Symlink);
}

async fn one_file(
    len: usize,
    options: FsOptions,
) -> (LazyFs, Ino, Vec<u8>, Store, Arc<common::Faults>) {
    let (store, _, faults) = test_store();
    let data = noise(len, 7);
    let root = put_tree(&store, &Tree::File(data.clone())).await;
    let path = publish(&store, "data", root).await;
    let fs = fs(&store, options);
    let ino = fs
        .lookup(Ino::ROOT, path.to_string().as_bytes())
        .await
        .unwrap()
        .ino;
    (fs, ino, data, store, faults)
}

async fn chunk_starts(store: &Store, data: &[u8]) -> Vec<(u64, u64)> {
    let meta = store
        .blobs
        .stat(&lazystore_castore::Digest::of(data))
        .await
        .unwrap()
        .unwrap();
    let mut at = 0;
    meta.chunks
        .iter()
        .map(|c| {
            let s = (at, c.size);
            at += c.size;
            s
        })
        .collect()
}

#[tokio::test]
async fn a_read_fetches_only_the_chunks_it_overlaps() {
    let (fs, ino, data, store, faults) = one_file(8 << 20, FsOptions::default()).await;
    let chunks = chunk_starts(&store, &data).await;
    assert!(chunks.len() > 40);
    let (start, _) = chunks[10];
    // Inside one chunk, away from the start: not sequential, no readahead.
    let got = fs.read(ino, start + 10, 100).await.unwrap();
    assert_eq!(&got[..], &data[start as usize + 10..start as usize + 110]);
    assert_eq!(faults.chunks_read.load(Ordering::Relaxed), 1);
    // The same chunk again comes from memory.
    let got = fs.read(ino, start + 10, 100).await.unwrap();
    assert_eq!(&got[..], &data[start as usize + 10..start as usize + 110]);
    // Across a boundary far away (no readahead): just the two chunks.
    let far = chunks.iter().position(|c| c.0 > start + (4 << 20)).unwrap();
    let (start2, size2) = chunks[far];
    let got = fs.read(ino, start2 + size2 - 50, 100).await.unwrap();
    let at = (start2 + size2 - 50) as usize;
    assert_eq!(&got[..], &data[at..at + 100]);
    assert_eq!(faults.chunks_read.load(Ordering::Relaxed), 3);
    let s = fs.stats();
    assert_eq!(
        (s.chunks_fetched, s.memory_cache_hits, s.readahead_chunks),
        (3, 1, 0)
    );
    assert_eq!(
        s.chunk_bytes_fetched,
        chunks[10].1 + size2 + chunks[far + 1].1
    );
    // Past the end: nothing.
    assert!(
        fs.read(ino, data.len() as u64, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        fs.read(ino, data.len() as u64 - 3, 10).await.unwrap().len(),
        3
    );
}

#[tokio::test]
async fn sequential_reads_fetch_ahead_within_the_bound() {
    let readahead = 2 << 20;
    let options = FsOptions {
        readahead_bytes: readahead,
        ..FsOptions::default()
    };
    let (fs, ino, data, store, _) = one_file(24 << 20, options).await;
    let chunks = chunk_starts(&store, &data).await;
    let max_chunk = chunks.iter().map(|c| c.1).max().unwrap();
    // Read the first MiB as the kernel would: 128 KiB at a time.
    let mut at = 0u64;
    while at < 1 << 20 {
        let got = fs.read(ino, at, 128 << 10).await.unwrap();
        assert_eq!(&got[..], &data[at as usize..at as usize + got.len()]);
        at += got.len() as u64;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = fs.stats();
    assert!(s.readahead_chunks > 0, "{s:?}");
    assert!(
        s.chunk_bytes_fetched <= (1 << 20) + readahead + 2 * max_chunk,
        "fetched {} bytes reading 1 MiB with a {readahead}-byte window",
        s.chunk_bytes_fetched
    );
    // The rest, in order: every byte right, most chunks found in memory.
    let all = read_all(&fs, ino, data.len() as u64, 128 << 10).await;
    assert!(all == data);
    let s = fs.stats();
    assert_eq!(
        s.chunks_fetched as usize,
        chunks.len(),
        "each chunk fetched once"
    );
    assert!(s.readahead_chunks as usize > chunks.len() / 2, "{s:?}");
}

#[tokio::test]
async fn reading_a_whole_small_file_fetches_just_its_chunks() {
    let (fs, ino, data, store, faults) = one_file(1 << 20, FsOptions::default()).await;
    let chunks = chunk_starts(&store, &data).await;
    let all = read_all(&fs, ino, data.len() as u64, 128 << 10).await;
    assert!(all == data);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        faults.chunks_read.load(Ordering::Relaxed) as usize,
        chunks.len()
    );
    assert_eq!(fs.stats().chunk_bytes_fetched, 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_on_one_file_run_concurrently() {
    let (fs, ino, data, store, faults) = one_file(4 << 20, FsOptions::default()).await;
    let chunks = chunk_starts(&store, &data).await;
    faults.delay_ms.store(300, Ordering::Relaxed);
    let fs = Arc::new(fs);
    let started = Instant::now();
    let reads: Vec<_> = chunks[5..13]
        .iter()
        .map(|&(start, _)| {
            let fs = fs.clone();
            tokio::spawn(async move { fs.read(ino, start + 1, 10).await.unwrap() })
        })
        .collect();
    for r in reads {
        r.await.unwrap();
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(900),
        "8 reads of 300 ms took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_random_reads_are_all_correct() {
    let (store, _, _) = test_store();
    let files: Vec<Vec<u8>> = (0..4)
        .map(|i| noise((3 << 20) + i * 12345, i as u64))
        .collect();
    let mut entries = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let node = put_tree(&store, &Tree::File(f.clone())).await;
        entries.push(publish(&store, &format!("f{i}"), node).await);
    }
    let fs = Arc::new(fs(
        &store,
        FsOptions {
            memory_cache_bytes: 2 << 20,
            ..FsOptions::default()
        },
    ));
    let mut inos = Vec::new();
    for p in &entries {
        inos.push(
            fs.lookup(Ino::ROOT, p.to_string().as_bytes())
                .await
                .unwrap()
                .ino,
        );
    }
    let files = Arc::new(files);
    let tasks: Vec<_> = (0..64u64)
        .map(|t| {
            let (fs, files, inos) = (fs.clone(), files.clone(), inos.clone());
            tokio::spawn(async move {
                let mut x = t * 7919 + 1;
                for _ in 0..40 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let f = (x >> 60) as usize % files.len();
                    let len = files[f].len() as u64;
                    let offset = (x >> 20) % len;
                    let size = ((x >> 8) % (300 << 10)) as u32;
                    let got = fs.read(inos[f], offset, size).await.unwrap();
                    let end = (offset + size as u64).min(len) as usize;
                    assert!(got[..] == files[f][offset as usize..end], "task {t}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn transient_failures_are_retried_then_fail_with_eio() {
    let retry = RetryPolicy {
        deadline: Duration::from_millis(500),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        max_attempts: None,
        corrupt_attempts: 3,
    };
    let options = FsOptions {
        retry,
        ..FsOptions::default()
    };
    let (fs, ino, data, _, faults) = one_file(300_000, options).await;
    faults.fail_reads.store(3, Ordering::Relaxed);
    let got = fs.read(ino, 1000, 100).await.unwrap();
    assert_eq!(&got[..], &data[1000..1100]);
    assert_eq!(fs.stats().retries, 3);

    faults.fail_reads.store(u64::MAX, Ordering::Relaxed);
    let started = Instant::now();
    let e = fs.read(ino, 200_000, 100).await.unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(e.to_string().contains("-data"), "{e}");
    assert_eq!(fs.stats().io_errors, 1);
}

#[tokio::test]
async fn internal_failures_are_not_retried() {
    // A deadline long enough that a retried read would show.
    let options = FsOptions {
        retry: RetryPolicy {
            deadline: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(100),
            ..RetryPolicy::default()
        },
        ..FsOptions::default()
    };
    let (fs, ino, data, _, faults) = one_file(300_000, options).await;
    faults.fail_internal.store(1, Ordering::Relaxed);
    let started = Instant::now();
    let e = fs.read(ino, 1000, 100).await.unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(fs.stats().retries, 0);
    assert_eq!(fs.stats().io_errors, 1);
    // Nothing of the failure stays behind: the next read fetches anew.
    let got = fs.read(ino, 1000, 100).await.unwrap();
    assert_eq!(&got[..], &data[1000..1100]);
}

#[tokio::test]
async fn a_corrupt_chunk_is_an_error_never_bytes() {
    let options = FsOptions {
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(1),
            ..RetryPolicy::default()
        },
        ..FsOptions::default()
    };
    let (store, mem, _) = test_store();
    let data = noise(200_000, 3);
    let node = put_tree(&store, &Tree::File(data.clone())).await;
    let path = publish(&store, "data", node).await;
    let Node::File { digest, .. } = put_tree(&store, &Tree::File(data.clone())).await else {
        unreachable!()
    };
    let meta = store.blobs.stat(&digest).await.unwrap().unwrap();
    assert!(mem.corrupt_chunk(&meta.chunks[0].digest, |c| {
        let mut d = c.data.to_vec();
        d[10] ^= 1;
        c.data = d.into();
    }));
    let fs = fs(&store, options);
    let ino = fs
        .lookup(Ino::ROOT, path.to_string().as_bytes())
        .await
        .unwrap()
        .ino;
    assert_eq!(fs.read(ino, 0, 10).await.unwrap_err().errno(), libc::EIO);
    // The store's copy fails its own check too, so it is quarantined: the
    // one refetch finds it gone, and the read gives up.
    assert_eq!(fs.stats().retries, 1, "refetched once, then given up");
    let victim = meta.chunks[0].digest;
    assert_eq!(mem.missing_chunks(&[victim]).await.unwrap(), vec![victim]);
    assert_eq!(mem.quarantined().await.unwrap(), 1);
    // The other chunks still read.
    let last = meta.chunks.last().unwrap().size;
    let got = fs.read(ino, data.len() as u64 - last, 10).await.unwrap();
    assert_eq!(&got[..], &data[data.len() - last as usize..][..10]);
}

#[tokio::test]
async fn counters_count_what_was_presented() {
    let (store, _, _) = test_store();
    let root = put_tree(&store, &sample_tree()).await;
    let path = publish(&store, "sample", root).await;
    let fs = fs(&store, FsOptions::default());
    let top = fs
        .lookup(Ino::ROOT, path.to_string().as_bytes())
        .await
        .unwrap();
    fs.readdirplus(top.ino, 0, 0, |_, _, _| false)
        .await
        .unwrap();
    let share = fs.lookup(top.ino, b"share").await.unwrap();
    fs.readdirplus(share.ino, 0, 0, |_, _, _| false)
        .await
        .unwrap();
    let s = fs.stats();
    assert_eq!(s.files_presented, 2, "empty and big");
    assert_eq!(s.bytes_presented, 1000);
    assert_eq!(s.chunks_fetched, 0, "attributes come from directories");
    // top, bin, share and one empty directory: emptydir, a and b are the
    // same directory, fetched once.
    assert_eq!(s.directories_fetched, 4);
    assert_eq!(s.path_infos_fetched, 1);
}

/// A store path holding `lib/` with files `names` of `contents`, looked
/// up through a fresh filesystem: it and the files' inodes.
async fn one_directory(
    store: &Store,
    names: &[String],
    contents: &[Vec<u8>],
) -> (LazyFs, Vec<Ino>) {
    let files: Vec<(&'static str, Tree)> = names
        .iter()
        .zip(contents)
        .map(|(n, c)| {
            (
                &*Box::leak(n.clone().into_boxed_str()),
                Tree::File(c.clone()),
            )
        })
        .collect();
    let root = put_tree(store, &Tree::Dir(vec![("lib", Tree::Dir(files))])).await;
    let path = publish(store, "lib", root).await;
    let fs = fs(store, FsOptions::default());
    let top = fs
        .lookup(Ino::ROOT, path.to_string().as_bytes())
        .await
        .unwrap();
    let lib = fs.lookup(top.ino, b"lib").await.unwrap();
    let mut inos = Vec::new();
    for n in names {
        inos.push(fs.lookup(lib.ino, n.as_bytes()).await.unwrap().ino);
    }
    (fs, inos)
}

/// A directory's small files come ahead of a reader walking it, a window
/// of 2 MiB at a time: with every store read taking 50 ms, reading 399
/// small files (3.2 MB) one after another takes a few reads' time, not
/// 399, and each is fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_s_small_files_travel_together() {
    let (store, _, faults) = test_store();
    let contents: Vec<Vec<u8>> = (0..400).map(|i| noise(8000 + i, i as u64)).collect();
    let names: Vec<String> = (0..400).map(|i| format!("m{i:03}.py")).collect();
    let (fs, inos) = one_directory(&store, &names, &contents).await;
    // The first read asks the store's chunker minimum in the background.
    assert!(read_all(&fs, inos[0], 8000, 4096).await == contents[0]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    faults.delay_ms.store(50, Ordering::Relaxed);
    let started = Instant::now();
    for (i, ino) in inos.iter().enumerate().skip(1) {
        let got = read_all(&fs, *ino, contents[i].len() as u64, 4096).await;
        assert!(got == contents[i], "file {i}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "{took:?} for 399 small files"
    );
    let s = fs.stats();
    assert!(s.readahead_chunks >= 390, "{s:?}");
    assert_eq!(
        faults.chunks_read.load(Ordering::Relaxed),
        400,
        "each fetched once"
    );
}

/// The second file read in a directory has the chunk lists of its larger
/// neighbours asked in one call: reading them after asks for none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_s_chunk_lists_come_together() {
    let (store, _, _) = test_store();
    let contents: Vec<Vec<u8>> = (0..10).map(|i| noise(200_000 + i, 50 + i as u64)).collect();
    let names: Vec<String> = (0..10).map(|i| format!("lib{i}.so")).collect();
    let (fs, inos) = one_directory(&store, &names, &contents).await;
    // The first read asks the store's chunker minimum in the background;
    // the second is the directory's first with it known (nothing ahead for
    // a build that reads one file of it); the third brings the
    // neighbours' chunk lists.
    for i in 0..3 {
        let got = read_all(&fs, inos[i], contents[i].len() as u64, 65536).await;
        assert!(got == contents[i]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Files 0 to 2 asked for their own (2's may have come with the
    // window, if the window's answer came first).
    let before = fs.stats().chunk_lists_fetched;
    assert!((2..=3).contains(&before), "{:?}", fs.stats());
    for i in 3..10 {
        let got = read_all(&fs, inos[i], contents[i].len() as u64, 65536).await;
        assert!(got == contents[i], "file {i}");
    }
    assert_eq!(fs.stats().chunk_lists_fetched, before, "{:?}", fs.stats());
}

/// A store path of `dirs` directories (`d0`, `d1`, …) of `per_dir` files
/// each, every fourth file larger than the chunker's minimum: its tree,
/// the files' contents and their paths inside it, both in NAR order.
fn walk_tree(dirs: usize, per_dir: usize) -> (Tree, Vec<(String, String)>, Vec<Vec<u8>>) {
    let mut top = Vec::new();
    let (mut paths, mut contents) = (Vec::new(), Vec::new());
    for d in 0..dirs {
        let mut files = Vec::new();
        for f in 0..per_dir {
            let size = if f % 4 == 0 { 150_000 } else { 3000 + f };
            let data = noise(size, (d * 1000 + f) as u64);
            let name = format!("f{f:03}");
            files.push((
                &*Box::leak(name.clone().into_boxed_str()),
                Tree::File(data.clone()),
            ));
            paths.push((format!("d{d}"), name));
            contents.push(data);
        }
        top.push((
            &*Box::leak(format!("d{d}").into_boxed_str()),
            Tree::Dir(files),
        ));
    }
    (Tree::Dir(top), paths, contents)
}

/// Reads the files of `paths` (in a store path named `top`) one after
/// another, each looked up first, as `nix hash path` does; checks every byte.
async fn walk_files(fs: &LazyFs, top: Ino, paths: &[(String, String)], contents: &[Vec<u8>]) {
    for ((dir, name), data) in paths.iter().zip(contents) {
        let d = fs.lookup(top, dir.as_bytes()).await.unwrap();
        let f = fs.lookup(d.ino, name.as_bytes()).await.unwrap();
        let got = read_all(fs, f.ino, data.len() as u64, 65536).await;
        assert!(&got == data, "{dir}/{name}");
    }
}

/// `walk_tree(dirs, per_dir)` published as `name`, looked up through a
/// fresh filesystem whose first read (of the first file, which asks the
/// store's chunker minimum in the background) is done: the filesystem,
/// the store path's inode, the files' paths and contents.
async fn walked_path(
    store: &Store,
    name: &str,
    dirs: usize,
    per_dir: usize,
) -> (LazyFs, Ino, Vec<(String, String)>, Vec<Vec<u8>>) {
    let (tree, paths, contents) = walk_tree(dirs, per_dir);
    let root = put_tree(store, &tree).await;
    let path = publish(store, name, root).await;
    let fs = fs(store, FsOptions::default());
    let top = fs
        .lookup(Ino::ROOT, path.to_string().as_bytes())
        .await
        .unwrap()
        .ino;
    walk_files(&fs, top, &paths[..1], &contents[..1]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    (fs, top, paths, contents)
}

/// A store path read file after file in NAR order is streamed once 64
/// first reads came each of the next file: with every store read taking 60 ms, the
/// 94 files after those take a few reads' time, not 94 (or more: the
/// larger ones' chunk lists), and every chunk is fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_read_in_nar_order_is_streamed() {
    let (store, _, faults) = test_store();
    let (fs, top, paths, contents) = walked_path(&store, "walked", 4, 40).await;
    // 64 first reads each of the next file after that one (which could not
    // count: the minimum was not known) and the first of d1, which starts
    // a directory.
    walk_files(&fs, top, &paths[1..65], &contents[1..65]).await;
    assert_eq!(fs.stats().walks_streamed, 0, "{:?}", fs.stats());
    walk_files(&fs, top, &paths[65..66], &contents[65..66]).await;
    assert_eq!(fs.stats().walks_streamed, 1, "{:?}", fs.stats());
    tokio::time::sleep(Duration::from_millis(300)).await;
    faults.delay_ms.store(60, Ordering::Relaxed);
    let started = Instant::now();
    walk_files(&fs, top, &paths[66..], &contents[66..]).await;
    let took = started.elapsed();
    // Without the stream, each larger file's first read waits on the store
    // (the directory windows bring small files and chunk lists only): 1.4 s.
    assert!(took < Duration::from_millis(800), "{took:?} for 94 files");
    let mut distinct = std::collections::HashSet::new();
    for c in &contents {
        let meta = store.blobs.stat(&lazystore_castore::Digest::of(c)).await;
        distinct.extend(meta.unwrap().unwrap().chunks.iter().map(|c| c.digest));
    }
    assert_eq!(
        faults.chunks_read.load(Ordering::Relaxed),
        distinct.len() as u64,
        "each chunk fetched once"
    );
}

/// A reader going through a path in NAR order but reading one file in
/// three (a build picking what it needs) gets no stream: it would fetch
/// the files skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_reader_in_nar_order_is_not_streamed() {
    let (store, _, _) = test_store();
    let (fs, top, paths, contents) = walked_path(&store, "sparse", 2, 200).await;
    let picked: Vec<usize> = (1..paths.len()).step_by(3).collect();
    let some: Vec<_> = picked.iter().map(|&i| paths[i].clone()).collect();
    let some_contents: Vec<_> = picked.iter().map(|&i| contents[i].clone()).collect();
    walk_files(&fs, top, &some, &some_contents).await;
    assert_eq!(fs.stats().walks_streamed, 0, "{:?}", fs.stats());
}

/// Reads that are few, or not in NAR order, never start a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_or_unordered_reads_are_not_streamed() {
    let (store, _, _) = test_store();
    let (fs, top, paths, contents) = walked_path(&store, "unordered", 2, 50).await;
    walk_files(&fs, top, &paths[1..40], &contents[1..40]).await;
    assert_eq!(fs.stats().walks_streamed, 0, "{:?}", fs.stats());
    // The rest backwards: each first read comes before the last in NAR order.
    let rest: Vec<_> = paths[40..].iter().rev().cloned().collect();
    let rest_contents: Vec<_> = contents[40..].iter().rev().cloned().collect();
    walk_files(&fs, top, &rest, &rest_contents).await;
    assert_eq!(fs.stats().walks_streamed, 0, "{:?}", fs.stats());
}
