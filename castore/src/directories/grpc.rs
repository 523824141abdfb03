//! Directory backend over gRPC: a client of a lazystore server's directory
//! service.
//!
//! The server is not trusted: every directory received is validated and
//! checked against the digest it was asked for, and a recursive get must
//! send exactly the tree below the root, each directory after its parent.
//! Every call is retried on transient failures (see
//! [`RetryPolicy`](crate::RetryPolicy)); puts are idempotent, the
//! store being content-addressed.

use std::collections::HashSet;

use async_trait::async_trait;
use futures::stream;

use super::{DirectoryError, DirectoryService};
use crate::digest::Digest;
use crate::grpc::{
    AttemptError, AuthChannel, BadMessage, CallError, Connection, InvalidUrl, MAX_MESSAGE_SIZE,
    wire,
};
use crate::nodes::Directory;
use crate::proto;
use crate::proto::directory_service_client::DirectoryServiceClient;

/// A [`DirectoryService`] on a gRPC server.
#[derive(Clone, Debug)]
pub struct GrpcDirectoryService {
    connection: Connection,
    client: DirectoryServiceClient<AuthChannel>,
}

impl GrpcDirectoryService {
    /// A client of the server at `url` (`grpc+http://HOST:PORT` or
    /// `grpc+unix:///PATH`), connected on first use, with the default
    /// retry policy. Must be called within a Tokio runtime.
    pub fn connect_lazy(url: &str) -> Result<Self, InvalidUrl> {
        Ok(Self::new(Connection::lazy(url)?))
    }

    /// A client over an existing connection (shared with other clients, or
    /// with another retry policy).
    pub fn new(connection: Connection) -> Self {
        let client = DirectoryServiceClient::new(connection.channel())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        GrpcDirectoryService { connection, client }
    }

    /// The connection it uses.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    fn error(&self, e: CallError) -> DirectoryError {
        e.into_directory_error(self.connection.url())
    }

    /// One `Get` attempt: every directory the server sends, verified.
    async fn get_attempt(
        &self,
        root: Digest,
        recursive: bool,
    ) -> Result<Vec<Directory>, AttemptError> {
        let timeout = self.connection.attempt_timeout();
        let request = proto::GetDirectoryRequest {
            digest: root.into(),
            recursive,
        };
        let mut client = self.client.clone();
        let mut stream = timeout.timed(client.get(request)).await?.into_inner();
        // Digests the server may still send: the root, then the
        // subdirectories of what it sent. Each is sent once, after its parent.
        let mut expected = HashSet::from([root]);
        let mut received = HashSet::new();
        let mut out = Vec::new();
        while let Some(wire_dir) = timeout.timed(stream.message()).await? {
            if !recursive && !out.is_empty() {
                return Err(BadMessage::new("stream", "more than one directory").into());
            }
            let dir = Directory::try_from(wire_dir)
                .map_err(|e| BadMessage::new("directory", e.to_string()))?;
            let digest = dir.digest();
            if out.is_empty() && digest != root {
                return Err(BadMessage::new(
                    "directory",
                    format!("asked for {root}, got {digest}"),
                )
                .into());
            }
            if !expected.contains(&digest) || !received.insert(digest) {
                return Err(BadMessage::new(
                    "directory",
                    format!("{digest} is not below {root}, or came twice or before its parent"),
                )
                .into());
            }
            expected.extend(dir.subdirectories().map(|(_, d, _)| d));
            out.push(dir);
        }
        if out.is_empty() {
            return Err(BadMessage::new("stream", "no directory").into());
        }
        if recursive && received.len() != expected.len() {
            return Err(BadMessage::new(
                "stream",
                format!(
                    "{} directories below {root} missing",
                    expected.len() - received.len()
                ),
            )
            .into());
        }
        Ok(out)
    }

    /// Sends `dirs` as one `Put` stream and checks the answer is the last
    /// one's digest.
    async fn put_attempt(
        &self,
        dirs: Vec<proto::Directory>,
        last: Digest,
    ) -> Result<Digest, AttemptError> {
        let timeout = self.connection.attempt_timeout();
        let bytes = dirs.iter().map(prost::Message::encoded_len).sum();
        let mut client = self.client.clone();
        let answer = timeout
            .timed_upload(bytes, client.put(stream::iter(dirs)))
            .await?
            .into_inner();
        let root = wire::digest("root_digest", &answer.root_digest)?;
        if root != last {
            return Err(BadMessage::new(
                "root_digest",
                format!("{root}, but the last directory sent is {last}"),
            )
            .into());
        }
        Ok(root)
    }

    async fn get_verified(
        &self,
        root: Digest,
        recursive: bool,
    ) -> Result<Vec<Directory>, DirectoryError> {
        self.connection
            .call("Get", || self.get_attempt(root, recursive))
            .await
            .map_err(|e| self.error(e))
    }
}

#[async_trait]
impl DirectoryService for GrpcDirectoryService {
    async fn get(&self, digest: &Digest) -> Result<Option<Directory>, DirectoryError> {
        match self.get_verified(*digest, false).await {
            Ok(mut dirs) => Ok(dirs.pop()),
            Err(DirectoryError::NotFound(d)) if d == *digest => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn put(&self, dir: Directory) -> Result<Digest, DirectoryError> {
        Ok(self
            .put_all(vec![dir])
            .await?
            .expect("one directory was put"))
    }

    /// One `Put` stream for all of them. Idempotent, so retried like a read.
    async fn put_all(&self, dirs: Vec<Directory>) -> Result<Option<Digest>, DirectoryError> {
        let Some(last) = dirs.last().map(Directory::digest) else {
            return Ok(None);
        };
        let wire_dirs: Vec<proto::Directory> = dirs.iter().map(proto::Directory::from).collect();
        self.connection
            .call("Put", || self.put_attempt(wire_dirs.clone(), last))
            .await
            .map(Some)
            .map_err(|e| self.error(e))
    }

    /// One recursive `Get`, verified as it arrives.
    async fn get_recursive(&self, root: &Digest) -> Result<Vec<Directory>, DirectoryError> {
        self.get_verified(*root, true).await
    }
}
