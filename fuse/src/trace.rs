//! Access traces (`mount --trace-dir DIR`): which files each build read,
//! for `lazystore prefetch` to fetch ahead of the next build like it.
//!
//! A trace is kept per session (`setsid(2)`): Nix starts every builder in
//! a session of its own, and everything a build runs stays in it unless
//! it asks for another, so a session is a build, with no process tree to
//! follow. (Per store path would mix the builds that share an input; per
//! process would split a build into its compiler's many processes.) A
//! reader's session is read from `/proc/PID/stat` once per process.
//!
//! A trace is a text file `DIR/<session>-<unix seconds>.trace`: a header
//! line, then the absolute path of every file the session read, once, in
//! the order of their first reads. Whole files: a build reads most files
//! whole (headers, modules, the libraries it links), and a file's chunks
//! are what the store serves anyway. Lines go out through a buffer,
//! written when it fills, four times a second (`lazystore mount`) and at
//! unmount; a file name holding
//! a newline is left out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Sessions traced at once; the one traced longest ago is closed past this.
const SESSIONS: usize = 256;

/// Processes whose session is remembered.
const PROCESSES: usize = 4096;

/// The traces of one mount.
pub struct Traces {
    dir: PathBuf,
    // A std Mutex: a few map operations and a buffered write per first
    // read, no await.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Session by process.
    sessions_of: HashMap<u32, u32>,
    processes: VecDeque<u32>,
    sessions: HashMap<u32, Session>,
    /// Sessions in the order they were first traced.
    order: VecDeque<u32>,
}

struct Session {
    seen: HashSet<u64>,
    out: BufWriter<File>,
}

impl Traces {
    /// Traces into `dir`, made if missing.
    pub fn new(dir: &Path) -> std::io::Result<Traces> {
        std::fs::create_dir_all(dir)?;
        Ok(Traces {
            dir: dir.to_owned(),
            inner: Mutex::default(),
        })
    }

    /// Notes that process `pid` read file `ino`; `path` gives its absolute
    /// path, asked only for the session's first read of it.
    pub(crate) fn read(&self, pid: u32, ino: u64, path: impl FnOnce() -> Option<String>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sid) = inner.session_of(pid) else {
            return;
        };
        if !inner.sessions.contains_key(&sid) {
            let Some(session) = self.open(sid) else {
                return;
            };
            if inner.order.len() >= SESSIONS
                && let Some(old) = inner.order.pop_front()
                && let Some(mut s) = inner.sessions.remove(&old)
            {
                let _ = s.out.flush();
            }
            inner.order.push_back(sid);
            inner.sessions.insert(sid, session);
        }
        let session = inner.sessions.get_mut(&sid).expect("just made");
        if !session.seen.insert(ino) {
            return;
        }
        if let Some(path) = path().filter(|p| !p.contains('\n')) {
            let _ = writeln!(session.out, "{path}");
        }
    }

    fn open(&self, sid: u32) -> Option<Session> {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let path = self.dir.join(format!("{sid}-{started}.trace"));
        let file = match File::create(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("cannot write the trace {}: {e}", path.display());
                return None;
            }
        };
        let mut out = BufWriter::new(file);
        let _ = writeln!(out, "# lazystore trace v1: files read by session {sid}");
        Some(Session {
            seen: HashSet::new(),
            out,
        })
    }

    /// Writes out what every trace holds.
    pub fn flush(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for session in inner.sessions.values_mut() {
            let _ = session.out.flush();
        }
    }
}

impl Inner {
    fn session_of(&mut self, pid: u32) -> Option<u32> {
        if let Some(sid) = self.sessions_of.get(&pid) {
            return Some(*sid);
        }
        let sid = read_session(pid)?;
        if self.processes.len() >= PROCESSES
            && let Some(old) = self.processes.pop_front()
        {
            self.sessions_of.remove(&old);
        }
        self.processes.push_back(pid);
        self.sessions_of.insert(pid, sid);
        Some(sid)
    }
}

/// The session of process `pid`: field 6 of `/proc/PID/stat`, counted
/// after the command name (which may hold spaces and parentheses).
fn read_session(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    // state, ppid, pgrp, session
    after_name.split_whitespace().nth(3)?.parse().ok()
}

impl Drop for Traces {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Traces to prefetch from (`mount --prefetch`): when a file that starts
/// one of them is first read, every file it names is fetched into the
/// local cache in the background, in large parallel batches
/// (`lazystore_pathinfo::prefetch`), once per trace.
pub struct TracePrefetch {
    traces: Vec<Vec<String>>,
    /// Traces by the file each starts with.
    by_first: HashMap<String, Vec<usize>>,
    /// Traces by every file each names.
    by_file: HashMap<String, Vec<usize>>,
    // A std Mutex: one flag per trace, set once, no await.
    started: Mutex<Vec<bool>>,
}

impl TracePrefetch {
    /// Prefetching the files of `traces` (each a list of absolute paths,
    /// as traces hold), each when its first file is first read.
    pub fn new(traces: Vec<Vec<String>>) -> TracePrefetch {
        let mut by_first: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_file: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, trace) in traces.iter().enumerate() {
            if let Some(first) = trace.first() {
                by_first.entry(first.clone()).or_default().push(i);
            }
            for file in trace {
                by_file.entry(file.clone()).or_default().push(i);
            }
        }
        TracePrefetch {
            started: Mutex::new(vec![false; traces.len()]),
            traces,
            by_first,
            by_file,
        }
    }

    /// Whether a trace being prefetched names `path`: then nothing else
    /// is fetched ahead for it (the trace says what the build reads).
    pub(crate) fn covers(&self, path: &str) -> bool {
        let Some(indexes) = self.by_file.get(path) else {
            return false;
        };
        let started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        indexes.iter().any(|&i| started[i])
    }

    /// The files of the traces `path` starts that have not started yet,
    /// marked started.
    pub(crate) fn start(&self, path: &str) -> Option<Vec<String>> {
        let indexes = self.by_first.get(path)?;
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        let mut files = Vec::new();
        for &i in indexes {
            if !std::mem::replace(&mut started[i], true) {
                files.extend(self.traces[i].iter().cloned());
            }
        }
        (!files.is_empty()).then_some(files)
    }
}

/// The files a trace file names: its lines but comments and blank ones.
pub fn read_trace(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_session_is_read() {
        // SAFETY: getsid(0) reads this process's session.
        let sid = unsafe { libc::getsid(0) };
        assert_eq!(read_session(std::process::id()), Some(sid as u32));
    }

    #[test]
    fn a_session_traces_each_file_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let traces = Traces::new(dir.path()).unwrap();
        let pid = std::process::id();
        for (ino, name) in [(7, "a"), (8, "b"), (7, "a"), (9, "c\nd"), (10, "e")] {
            traces.read(pid, ino, || Some(format!("/nix/store/x-p/{name}")));
        }
        traces.flush();
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let text = std::fs::read_to_string(file.path()).unwrap();
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            lines,
            ["/nix/store/x-p/a", "/nix/store/x-p/b", "/nix/store/x-p/e"]
        );
    }
}
