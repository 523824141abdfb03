//! A real dynamically linked program runs from the mount with its shared
//! library and its standard library read through the mount: a copy of a
//! Python install (pyenv's, on these machines) made a store path with
//! `nix-store --add`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TestMount, import, nix_hash_path};
use lazystore_fuse::FsOptions;
use lazystore_pathinfo::{Store, nixbase32};
use lazystore_testkit::add_tree;

/// Python installs tried, newest first; the tests fail if none is there.
const PYTHONS: &[&str] = &["3.11.7", "3.12.1", "3.10.13"];

fn find_python() -> (PathBuf, String) {
    let home = std::env::var("HOME").unwrap();
    for v in PYTHONS {
        let root = Path::new(&home).join(".pyenv/versions").join(v);
        let minor = v.rsplit_once('.').unwrap().0.to_owned();
        if root.join(format!("lib/libpython{minor}.so.1.0")).exists() {
            return (root, minor);
        }
    }
    panic!("no pyenv Python with a shared libpython under ~/.pyenv/versions ({PYTHONS:?})");
}

/// Copies the interpreter, its libpython and its standard library (less
/// tests, site-packages and other bulk) into `to`.
fn copy_python(from: &Path, minor: &str, to: &Path) {
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "set -e; mkdir -p {to}/bin {to}/lib; \
             cp {from}/bin/python{minor} {to}/bin/; \
             cp {from}/lib/libpython{minor}.so.1.0 {to}/lib/; \
             tar -C {from}/lib -c \
               --exclude=__pycache__ --exclude=test --exclude=tests --exclude=site-packages \
               --exclude=idlelib --exclude=tkinter --exclude=ensurepip --exclude=lib2to3 \
               --exclude='config-*' python{minor} | tar -C {to}/lib -x",
            from = from.display(),
            to = to.display(),
        ))
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn python_runs_from_the_mount_with_its_libraries_read_through_it() {
    let (python, minor) = find_python();
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("python");
    copy_python(&python, &minor, &tree);
    let path = add_tree(&tree);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = Store::memory();
    let info = runtime.block_on(import(&store, &path));
    let mount = TestMount::new(runtime, store, FsOptions::default());
    let root = mount.join(&path);

    let script = "import hashlib, json, sys, zlib\n\
                  maps = open('/proc/self/maps').read()\n\
                  libs = sorted({l.split()[-1] for l in maps.splitlines() if '.so' in l})\n\
                  print(json.dumps({'prefix': sys.prefix, 'libs': libs,\n\
                    'sha': hashlib.sha256(b'lazy').hexdigest(), 'z': len(zlib.compress(b'a' * 1000))}))";
    let out = Command::new(root.join(format!("bin/python{minor}")))
        .args(["-I", "-c", script])
        // RUNPATH points at the original install; LD_LIBRARY_PATH wins.
        .env("LD_LIBRARY_PATH", root.join("lib"))
        .env("PYTHONHOME", &root)
        .env_remove("PYTHONPATH")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python from the mount failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mount_root = root.to_str().unwrap();
    assert!(
        stdout.contains(&format!("\"prefix\": \"{mount_root}\"")),
        "{stdout}"
    );
    // libpython and the C extensions (zlib, hashlib) mapped from the mount.
    let libpython = format!("{mount_root}/lib/libpython{minor}.so.1.0");
    assert!(
        stdout.contains(&libpython),
        "libpython not mapped from the mount: {stdout}"
    );
    assert!(
        stdout.contains(&format!("{mount_root}/lib/python{minor}/lib-dynload/zlib")),
        "{stdout}"
    );
    assert!(
        stdout.contains("81fd67d02f679b818a4df6a50139958aa857eddc4d8f3561630dfb905e6d3c24"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(python.to_str().unwrap()),
        "something loaded from the original: {stdout}"
    );

    // And the whole tree hashes as Nix says.
    assert_eq!(nix_hash_path(&root), nixbase32::encode(&info.nar_sha256));
    let s = mount.stats();
    eprintln!("python run: {s:?}");
    assert!(s.chunks_fetched > 0);
}
