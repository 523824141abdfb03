//! A mount comes up, answers, and goes away cleanly.

mod common;

use common::TestMount;
use lazystore_fuse::FsOptions;
use lazystore_pathinfo::Store;

#[test]
fn mounts_and_unmounts() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mount = TestMount::new(runtime, Store::memory(), FsOptions::default());
    let stats = mount.stats();
    assert_eq!(stats.reads, 1);
    let path = mount.path().to_owned();
    drop(mount);
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(path.to_str().unwrap()),
        "still mounted:\n{mounts}"
    );
}
