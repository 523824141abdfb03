//! `lazystore mount` as a user runs it: it mounts in the foreground, says
//! where once ready, unmounts cleanly on SIGINT/SIGTERM with its counters
//! on stderr, is unmounted by fusermount3 if killed, and explains what to
//! fix when FUSE is missing or the mountpoint is unusable.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const LAZYSTORE: &str = env!("CARGO_BIN_EXE_lazystore");

/// The tests of this file mount, kill mounts and copy the mount table into
/// new namespaces; run side by side, a killed mount was once still mounted
/// 10 s later (2 runs in ~9). One at a time, each sees only its own mounts.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the fusermount3 helpers are doing, for a failure message.
fn fusermount_processes() -> String {
    let out = Command::new("ps")
        .args(["-eo", "pid,ppid,stat,wchan:32,args"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("ps: {e}"));
    out.lines()
        .filter(|l| l.contains("fusermount") || l.contains("lazystore"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let path = path.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(path))
}

/// A running `lazystore mount`, killed (and its mount detached) if a test
/// fails before stopping it.
struct MountProcess {
    child: Option<Child>,
    mountpoint: PathBuf,
}

impl MountProcess {
    /// Starts `lazystore mount MOUNTPOINT ARGS…` and waits until it prints
    /// the mountpoint (mounted). Fails, never skips, without FUSE.
    fn start(mountpoint: &Path, args: &[&str]) -> MountProcess {
        let mut child = Command::new(LAZYSTORE)
            .arg("mount")
            .arg(mountpoint)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        if line.is_empty() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "lazystore mount exited ({}) without mounting (the test needs FUSE):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mountpoint = mountpoint.canonicalize().unwrap();
        assert_eq!(Path::new(line.trim()), mountpoint);
        assert!(is_mounted(&mountpoint));
        MountProcess {
            child: Some(child),
            mountpoint,
        }
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Waits (at most 20 s) for the process to exit; its output.
    fn wait(mut self) -> Output {
        let mut child = self.child.take().unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "lazystore mount did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mountpoint)
                .status();
        }
    }
}

fn stats(mountpoint: &Path) -> String {
    std::fs::read_to_string(mountpoint.join(".lazystore/stats")).unwrap()
}

#[test]
fn sigterm_and_sigint_unmount_cleanly_and_print_the_counters() {
    let _serial = one_at_a_time();
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let mount = MountProcess::start(dir.path(), &["--store", "memory://"]);
        let mountpoint = mount.mountpoint.clone();
        let text = stats(&mountpoint);
        assert!(
            text.contains("lookups ") && text.contains("remote_chunks 0"),
            "{text}"
        );
        // The root lists nothing without --list-root: EPERM.
        let err = std::fs::read_dir(&mountpoint)
            .and_then(|mut d| d.next().transpose())
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        // Unknown paths are absent; writes are refused.
        assert!(
            !mountpoint
                .join("00000000000000000000000000000000-x")
                .exists()
        );
        let err = std::fs::write(mountpoint.join("f"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

        mount.signal(signal);
        let out = mount.wait();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", out.status);
        assert!(stderr.contains("lazystore: unmounted"), "{stderr}");
        assert!(
            stderr.contains(" lookups=") && stderr.contains(" reads="),
            "{stderr}"
        );
        assert!(!is_mounted(&mountpoint));
    }
}

#[test]
fn a_killed_mount_is_unmounted_by_fusermount3() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let mount = MountProcess::start(dir.path(), &["--store", "memory://", "--list-root"]);
    let mountpoint = mount.mountpoint.clone();
    // --list-root: the (empty) root lists.
    assert_eq!(std::fs::read_dir(&mountpoint).unwrap().count(), 0);
    mount.signal(libc::SIGKILL);
    let started = Instant::now();
    while is_mounted(&mountpoint) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still mounted 10 s after the process died; helpers:\n{}",
            fusermount_processes()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(mount);
}

fn mount_error(mountpoint: &Path, env: &[(&str, &str)]) -> String {
    let out = Command::new(LAZYSTORE)
        .arg("mount")
        .arg(mountpoint)
        .args(["--store", "memory://"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "mounted {} unexpectedly",
        mountpoint.display()
    );
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn mount_errors_say_what_to_fix() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let e = mount_error(&missing, &[]);
    assert!(
        e.starts_with("lazystore: ") && e.contains("mkdir -p"),
        "{e}"
    );

    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let e = mount_error(&file, &[]);
    assert!(e.contains("is not a directory"), "{e}");

    let e = mount_error(
        dir.path(),
        &[("FUSERMOUNT_PATH", "/nonexistent/fusermount3")],
    );
    assert!(
        e.contains("fusermount3 not found") && e.contains("apt-get install fuse3"),
        "{e}"
    );

    // Busy: a mountpoint already in use.
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    let first = MountProcess::start(&busy, &["--store", "memory://"]);
    let e = mount_error(&busy, &[]);
    assert!(e.contains("is busy") && e.contains("fusermount3 -u"), "{e}");
    drop(first);

    // No /dev/fuse: in a mount namespace of our own with an empty /dev.
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {LAZYSTORE} mount {} --store memory://",
            dir.path().display()
        ))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("cannot open /dev/fuse") && e.contains("modprobe fuse"),
        "{e}"
    );
}
