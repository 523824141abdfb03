//! [`DirectoryServer`]: the gRPC directory service over any
//! [`DirectoryService`] backend.
//!
//! Every directory received is validated (`TryFrom`) and stored through the
//! backend's `put`, which refuses one whose subdirectories are not stored
//! yet; every directory sent was verified against its digest by the
//! backend's `get`.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::MAX_MESSAGE_SIZE;

/// Most directories, and most bytes of them, a `Put` stores at once: a
/// path's whole tree is usually one run, and a client streaming without
/// end holds at most this much of the server's memory.
const PUT_RUN: usize = 256;
const PUT_RUN_BYTES: usize = 4 << 20;
use super::wire::{self, BadMessage};
use crate::digest::Digest;
use crate::directories::{DirectoryError, DirectoryService, get_all};
use crate::nodes::{DecodeDirectoryError, Directory};
use crate::proto;
use crate::proto::directory_service_server::{self, DirectoryServiceServer};

/// The directory service, answering gRPC calls from a backend.
#[derive(Clone)]
pub struct DirectoryServer {
    directories: Arc<dyn DirectoryService>,
}

impl DirectoryServer {
    /// Serves `directories`.
    pub fn new(directories: Arc<dyn DirectoryService>) -> Self {
        DirectoryServer { directories }
    }

    /// The tonic service, with message limits of [`MAX_MESSAGE_SIZE`].
    pub fn into_service(self) -> DirectoryServiceServer<Self> {
        DirectoryServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }
}

/// Directories a recursive get asks its backend for at once: one call
/// per [`WALK_BATCH`] directories instead of one per directory (a 433-
/// directory tree took 200–290 ms, one redb read transaction each, while
/// the walk that asked for it waited).
const WALK_BATCH: usize = 64;

/// A recursive get in progress: breadth first from the root, the next
/// [`WALK_BATCH`] directories fetched from the backend only when the
/// stream has sent the ones before.
struct Walk {
    directories: Arc<dyn DirectoryService>,
    /// Fetched, not sent yet.
    ready: VecDeque<Directory>,
    queue: VecDeque<Digest>,
    seen: HashSet<Digest>,
}

impl Walk {
    async fn next(mut self) -> Option<(Result<proto::Directory, Status>, Walk)> {
        if self.ready.is_empty() {
            let n = self.queue.len().min(WALK_BATCH);
            if n == 0 {
                return None;
            }
            let batch: Vec<Digest> = self.queue.drain(..n).collect();
            match get_all(&*self.directories, &batch).await {
                Ok(dirs) => self.ready = dirs.into(),
                Err(e) => {
                    // Nothing after the first error.
                    self.queue.clear();
                    return Some((Err(e.into()), self));
                }
            }
        }
        let dir = self.ready.pop_front()?;
        for (_, child, _) in dir.subdirectories() {
            if self.seen.insert(child) {
                self.queue.push_back(child);
            }
        }
        Some((Ok(proto::Directory::from(&dir)), self))
    }
}

#[tonic::async_trait]
impl directory_service_server::DirectoryService for DirectoryServer {
    type GetStream = BoxStream<'static, Result<proto::Directory, Status>>;

    /// An unknown root is `NOT_FOUND`; a directory missing below it ends the
    /// stream with `NOT_FOUND` naming that directory.
    async fn get(
        &self,
        request: Request<proto::GetDirectoryRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let request = request.into_inner();
        let root = wire::digest("digest", &request.digest)?;
        let dir = self
            .directories
            .get(&root)
            .await?
            .ok_or(DirectoryError::NotFound(root))?;
        if !request.recursive {
            let one = proto::Directory::from(&dir);
            return Ok(Response::new(stream::once(async { Ok(one) }).boxed()));
        }
        let walk = Walk {
            directories: self.directories.clone(),
            ready: VecDeque::from([dir]),
            queue: VecDeque::new(),
            seen: HashSet::from([root]),
        };
        Ok(Response::new(stream::unfold(walk, Walk::next).boxed()))
    }

    /// Leaves first, root last; answers with the last digest. Stored in
    /// runs of up to [`PUT_RUN`] directories or [`PUT_RUN_BYTES`]
    /// (`put_all`), so a backend that
    /// batches writes (S3: one pack per write) gets them together.
    async fn put(
        &self,
        request: Request<Streaming<proto::Directory>>,
    ) -> Result<Response<proto::PutDirectoryResponse>, Status> {
        let mut stream = request.into_inner();
        let mut last = None;
        let (mut run, mut run_bytes) = (Vec::new(), 0);
        loop {
            let wire_dir = stream.message().await?;
            let full = run.len() >= PUT_RUN || run_bytes >= PUT_RUN_BYTES;
            if !run.is_empty() && (wire_dir.is_none() || full) {
                let stored = self.directories.put_all(std::mem::take(&mut run)).await?;
                last = stored.or(last);
                run_bytes = 0;
            }
            let Some(wire_dir) = wire_dir else { break };
            run_bytes += wire_dir.encoded_len();
            let dir = match Directory::try_from(wire_dir.clone()) {
                Ok(dir) => dir,
                Err(source) => {
                    let digest = Digest::of(&wire_dir.encode_to_vec());
                    let e = DecodeDirectoryError::Invalid { digest, source };
                    return Err(DirectoryError::Invalid(e).into());
                }
            };
            run.push(dir);
        }
        let root = last.ok_or_else(|| BadMessage::new("stream", "no directories"))?;
        Ok(Response::new(proto::PutDirectoryResponse {
            root_digest: root.into(),
        }))
    }
}
