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
use super::wire::{self, BadMessage};
use crate::digest::Digest;
use crate::directories::{DirectoryError, DirectoryService};
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

/// A recursive get in progress: breadth first from the root, each directory
/// fetched from the backend only when the stream is ready for it.
struct Walk {
    directories: Arc<dyn DirectoryService>,
    root: Option<Directory>,
    queue: VecDeque<Digest>,
    seen: HashSet<Digest>,
}

impl Walk {
    async fn next(mut self) -> Option<(Result<proto::Directory, Status>, Walk)> {
        let dir = match self.root.take() {
            Some(root) => root,
            None => {
                let digest = self.queue.pop_front()?;
                match self.directories.get(&digest).await {
                    Ok(Some(dir)) => dir,
                    failed => {
                        // Nothing after the first error.
                        self.queue.clear();
                        let e = failed.err().unwrap_or(DirectoryError::NotFound(digest));
                        return Some((Err(e.into()), self));
                    }
                }
            }
        };
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
            root: Some(dir),
            queue: VecDeque::new(),
            seen: HashSet::from([root]),
        };
        Ok(Response::new(stream::unfold(walk, Walk::next).boxed()))
    }

    /// Leaves first, root last; answers with the last digest.
    async fn put(
        &self,
        request: Request<Streaming<proto::Directory>>,
    ) -> Result<Response<proto::PutDirectoryResponse>, Status> {
        let mut stream = request.into_inner();
        let mut last = None;
        while let Some(wire_dir) = stream.message().await? {
            let dir = match Directory::try_from(wire_dir.clone()) {
                Ok(dir) => dir,
                Err(source) => {
                    let digest = Digest::of(&wire_dir.encode_to_vec());
                    let e = DecodeDirectoryError::Invalid { digest, source };
                    return Err(DirectoryError::Invalid(e).into());
                }
            };
            last = Some(self.directories.put(dir).await?);
        }
        let root = last.ok_or_else(|| BadMessage::new("stream", "no directories"))?;
        Ok(Response::new(proto::PutDirectoryResponse {
            root_digest: root.into(),
        }))
    }
}
