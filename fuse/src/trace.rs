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
//!
//! Shared traces (`mount --share-traces`, `--prefetch-shared`): a trace
//! whose session is a Nix build is also kept in the store, under the
//! build's name (`lazystore_pathinfo::traces::build_name` of the `out` its
//! builder was given, read from the session leader's environment), once it
//! has been quiet for [`QUIET`]; a mount that sees a new session of a
//! build of that name asks the store for its trace and prefetches it. The
//! trace's first file is no trigger there: builds of different packages
//! start by reading the same shell and C library.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lazystore_pathinfo::traces::TraceService;

/// Sessions traced at once; the one traced longest ago is closed past this.
const SESSIONS: usize = 256;

/// Processes whose session is remembered.
const PROCESSES: usize = 4096;

/// How long a build's trace must go without a new file before it is put
/// into the store (`--share-traces`); put again if it grows after.
pub const QUIET: Duration = Duration::from_secs(5);

/// The traces of one mount.
pub struct Traces {
    dir: PathBuf,
    // A std Mutex: a few map operations and a buffered write per first
    // read, no await.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    sessions_of: SessionOf,
    sessions: HashMap<u32, Session>,
    /// Sessions in the order they were first traced.
    order: VecDeque<u32>,
}

struct Session {
    seen: HashSet<u64>,
    out: BufWriter<File>,
    path: PathBuf,
    /// The build's name, if the session is a Nix build.
    build: Option<String>,
    /// Files traced, and how many of them the last share held.
    lines: u64,
    shared: u64,
    last: Instant,
}

/// The session of each process that read, remembered for the last
/// [`PROCESSES`] of them.
#[derive(Default)]
struct SessionOf {
    sessions: HashMap<u32, u32>,
    processes: VecDeque<u32>,
}

impl SessionOf {
    fn get(&mut self, pid: u32) -> Option<u32> {
        if let Some(sid) = self.sessions.get(&pid) {
            return Some(*sid);
        }
        let sid = read_session(pid)?;
        if self.processes.len() >= PROCESSES
            && let Some(old) = self.processes.pop_front()
        {
            self.sessions.remove(&old);
        }
        self.processes.push_back(pid);
        self.sessions.insert(pid, sid);
        Some(sid)
    }
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
        let Some(sid) = inner.sessions_of.get(pid) else {
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
            session.lines += 1;
            session.last = Instant::now();
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
        let build = read_build(sid);
        match &build {
            Some(name) => writeln!(
                out,
                "# lazystore trace v1: files read by session {sid}, a build of {name}"
            ),
            None => writeln!(out, "# lazystore trace v1: files read by session {sid}"),
        }
        .ok()?;
        Some(Session {
            seen: HashSet::new(),
            out,
            path,
            build,
            lines: 0,
            shared: 0,
            last: Instant::now(),
        })
    }

    /// The traces of builds that have new files but none for `quiet`:
    /// each build's name and its trace file, written out, and counted as
    /// shared (`--share-traces` puts them into the store).
    pub fn quiet(&self, quiet: Duration) -> Vec<(String, PathBuf)> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut ready = Vec::new();
        for session in inner.sessions.values_mut() {
            if let Some(name) = &session.build
                && session.lines > session.shared
                && session.last.elapsed() >= quiet
                && session.out.flush().is_ok()
            {
                session.shared = session.lines;
                ready.push((name.clone(), session.path.clone()));
            }
        }
        ready
    }

    /// Writes out what every trace holds.
    pub fn flush(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for session in inner.sessions.values_mut() {
            let _ = session.out.flush();
        }
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

/// The name the build session `sid` is traced under: from the `out` its
/// leader (the builder Nix started, whose pid is the session's id) was
/// given. `None` for a session that is not a Nix build, or whose leader is
/// gone.
fn read_build(sid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{sid}/environ")).ok()?;
    let out = environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(b"out="))?;
    lazystore_pathinfo::traces::build_name(std::str::from_utf8(out).ok()?)
}

impl Drop for Traces {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Traces to prefetch from: those given (`mount --prefetch`), each
/// started when its first file is first read, and with `--prefetch-shared`
/// the store's, each asked for when a build session of its name first
/// reads. A trace started has every file it names fetched into the local
/// cache in the background, in large parallel batches
/// (`lazystore_pathinfo::prefetch`), once.
pub struct TracePrefetch {
    /// The store's traces, when asked for.
    shared: Option<Arc<dyn TraceService>>,
    // A std Mutex: map operations, no await.
    inner: Mutex<Prefetches>,
}

#[derive(Default)]
struct Prefetches {
    traces: Vec<Vec<String>>,
    /// Traces by the file each starts with.
    by_first: HashMap<String, Vec<usize>>,
    /// Traces by every file each names.
    by_file: HashMap<String, Vec<usize>>,
    started: Vec<bool>,
    sessions_of: SessionOf,
    /// Sessions seen, the last [`SESSIONS`] of them.
    seen: HashSet<u32>,
    seen_order: VecDeque<u32>,
}

impl Prefetches {
    fn add(&mut self, trace: Vec<String>, started: bool) {
        let i = self.traces.len();
        if let Some(first) = trace.first() {
            self.by_first.entry(first.clone()).or_default().push(i);
        }
        for file in &trace {
            self.by_file.entry(file.clone()).or_default().push(i);
        }
        self.traces.push(trace);
        self.started.push(started);
    }
}

impl TracePrefetch {
    /// Prefetching the files of `traces` (each a list of absolute paths,
    /// as traces hold), each when its first file is first read.
    pub fn new(traces: Vec<Vec<String>>) -> TracePrefetch {
        let mut inner = Prefetches::default();
        for trace in traces {
            inner.add(trace, false);
        }
        TracePrefetch {
            shared: None,
            inner: Mutex::new(inner),
        }
    }

    /// Also prefetching, for each new build session, the trace `shared`
    /// holds under its build's name.
    pub fn with_shared(mut self, shared: Arc<dyn TraceService>) -> TracePrefetch {
        self.shared = Some(shared);
        self
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Prefetches> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a trace being prefetched names `path`: then nothing else
    /// is fetched ahead for it (the trace says what the build reads).
    pub(crate) fn covers(&self, path: &str) -> bool {
        let inner = self.inner();
        let Some(indexes) = inner.by_file.get(path) else {
            return false;
        };
        indexes.iter().any(|&i| inner.started[i])
    }

    /// The files of the traces `path` starts that have not started yet,
    /// marked started.
    pub(crate) fn start(&self, path: &str) -> Option<Vec<String>> {
        let mut inner = self.inner();
        let indexes = inner.by_first.get(path)?.clone();
        let mut files = Vec::new();
        for i in indexes {
            if !std::mem::replace(&mut inner.started[i], true) {
                files.extend(inner.traces[i].iter().cloned());
            }
        }
        (!files.is_empty()).then_some(files)
    }

    /// With shared traces: the store's traces and the build name of the
    /// session of `pid`, if this is that session's first read and it is a
    /// Nix build.
    pub(crate) fn new_build(&self, pid: u32) -> Option<(Arc<dyn TraceService>, String)> {
        let shared = self.shared.as_ref()?;
        let sid = {
            let mut inner = self.inner();
            let sid = inner.sessions_of.get(pid)?;
            if !inner.seen.insert(sid) {
                return None;
            }
            inner.seen_order.push_back(sid);
            if inner.seen_order.len() > SESSIONS
                && let Some(old) = inner.seen_order.pop_front()
            {
                inner.seen.remove(&old);
            }
            sid
        };
        Some((shared.clone(), read_build(sid)?))
    }

    /// Adds `trace`, got from the store, as started.
    pub(crate) fn add_started(&self, trace: Vec<String>) {
        self.inner().add(trace, true);
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
