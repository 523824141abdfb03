//! 64 readers at once on random ranges of several files, through a real
//! mount with a memory cache smaller than the files: every byte right.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::{TestMount, Tree, publish, put_tree};
use lazystore_fuse::FsOptions;
use lazystore_pathinfo::Store;
use lazystore_testkit::noise;

#[test]
fn sixty_four_readers_on_random_ranges_read_the_right_bytes() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = Store::memory();
    let files: Vec<Vec<u8>> = (0..4)
        .map(|i| noise((5 << 20) + i * 77_777, 50 + i as u64))
        .collect();
    let tree = Tree::Dir(
        files
            .iter()
            .enumerate()
            .map(|(i, f)| (["a", "b", "c", "d"][i], Tree::File(f.clone())))
            .collect(),
    );
    let path = runtime.block_on(async {
        let node = put_tree(&store, &tree).await;
        publish(&store, "concurrent", node).await
    });
    let options = FsOptions {
        memory_cache_bytes: 4 << 20,
        ..FsOptions::default()
    };
    let mount = TestMount::new(runtime, store, options);
    let root = mount.join(&path.to_string());
    let files = Arc::new(files);
    let readers: Vec<_> = (0..64u64)
        .map(|t| {
            let (root, files) = (root.clone(), files.clone());
            std::thread::spawn(move || {
                let handles: Vec<_> = ["a", "b", "c", "d"]
                    .iter()
                    .map(|n| std::fs::File::open(root.join(n)).unwrap())
                    .collect();
                let mut x = t * 7919 + 1;
                for _ in 0..30 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let f = (x >> 60) as usize % files.len();
                    let len = files[f].len() as u64;
                    let offset = (x >> 20) % len;
                    let size = 1 + ((x >> 8) % (400 << 10)) as usize;
                    let mut buf = vec![0u8; size];
                    let n = handles[f].read_at(&mut buf, offset).unwrap();
                    let end = (offset as usize + size).min(len as usize);
                    assert_eq!(n, end - offset as usize, "reader {t}");
                    assert!(
                        buf[..n] == files[f][offset as usize..end],
                        "reader {t}: wrong bytes"
                    );
                }
            })
        })
        .collect();
    for r in readers {
        r.join().expect("a reader failed");
    }
    let s = mount.stats();
    assert_eq!(s.io_errors, 0);
    assert!(s.reads > 0);
}
