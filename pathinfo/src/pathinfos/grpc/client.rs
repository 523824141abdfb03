//! PathInfo backend over gRPC: a client of a lazystore server's PathInfo
//! service.
//!
//! The server is not trusted: every PathInfo received is validated
//! (`TryFrom`) and a `Get` answer must be the path asked for. Get and Put
//! are retried on transient failures (see [`RetryPolicy`]); a Put is
//! idempotent, publishing the same PathInfo twice publishes it once. A
//! `List` is retried until its stream starts; a stream broken off part way
//! ends with an error, since it can't be resumed without repeating paths.
//!
//! [`RetryPolicy`]: lazystore_castore::RetryPolicy

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use lazystore_castore::error_chain;
use lazystore_castore::grpc::{
    AttemptError, AuthChannel, BadMessage, CallError, Connection, InvalidUrl,
};
use tonic::{Code, Streaming};

use super::MAX_PATH_INFO_SIZE;
use super::status::into_pathinfo_error;
use crate::pathinfos::{Facts, PathInfo, PathInfoError, PathInfoService};
use crate::proto;
use crate::proto::path_info_service_client::PathInfoServiceClient;
use crate::store_path::StorePathHash;

/// A [`PathInfoService`] on a gRPC server.
#[derive(Clone, Debug)]
pub struct GrpcPathInfoService {
    connection: Connection,
    client: PathInfoServiceClient<AuthChannel>,
}

impl GrpcPathInfoService {
    /// A client of the server at `url` (`grpc+http://HOST:PORT` or
    /// `grpc+unix:///PATH`), connected on first use, with the default
    /// retry policy. Must be called within a Tokio runtime.
    pub fn connect_lazy(url: &str) -> Result<Self, InvalidUrl> {
        Ok(Self::new(Connection::lazy(url)?))
    }

    /// A client over an existing connection (shared with the blob and
    /// directory clients, or with another retry policy).
    pub fn new(connection: Connection) -> Self {
        let client = PathInfoServiceClient::new(connection.channel())
            .max_decoding_message_size(MAX_PATH_INFO_SIZE)
            .max_encoding_message_size(MAX_PATH_INFO_SIZE);
        GrpcPathInfoService { connection, client }
    }

    /// The connection it uses.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    fn error(&self, e: CallError) -> PathInfoError {
        into_pathinfo_error(e, self.connection.url())
    }

    /// One `Get` attempt: the PathInfo, checked, or `None` on `NOT_FOUND`.
    async fn get_attempt(&self, hash: StorePathHash) -> Result<Option<PathInfo>, AttemptError> {
        let request = proto::GetPathInfoRequest {
            hash: bytes::Bytes::copy_from_slice(hash.as_bytes()),
        };
        let mut client = self.client.clone();
        let timeout = self.connection.attempt_timeout();
        let wire = match timeout.timed(client.get(request)).await {
            Ok(answer) => answer.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status) => return Err(status.into()),
        };
        let info = checked(wire)?;
        if info.store_path.hash() != hash {
            return Err(BadMessage::new(
                "store_path",
                format!("asked for hash {hash}, got {}", info.store_path),
            )
            .into());
        }
        Ok(Some(info))
    }
}

impl GrpcPathInfoService {
    /// One `Facts` attempt: the facts, checked, `None` on `NOT_FOUND`, or
    /// `Err(None)` from a server that does not know the call.
    async fn facts_attempt(
        &self,
        hash: StorePathHash,
    ) -> Result<Option<Option<Facts>>, AttemptError> {
        let request = proto::GetPathInfoRequest {
            hash: bytes::Bytes::copy_from_slice(hash.as_bytes()),
        };
        let mut client = self.client.clone();
        let timeout = self.connection.attempt_timeout();
        let wire = match timeout.timed(client.facts(request)).await {
            Ok(answer) => answer.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(Some(None)),
            Err(status) if status.code() == Code::Unimplemented => return Ok(None),
            Err(status) => return Err(status.into()),
        };
        let facts =
            Facts::try_from(&wire).map_err(|e| BadMessage::new("path_info", error_chain(&e)))?;
        if facts.store_path.hash() != hash {
            return Err(BadMessage::new(
                "store_path",
                format!("asked for hash {hash}, got {}", facts.store_path),
            )
            .into());
        }
        Ok(Some(Some(facts)))
    }
}

/// A PathInfo the server sent, validated.
fn checked(wire: proto::PathInfo) -> Result<PathInfo, BadMessage> {
    PathInfo::try_from(wire).map_err(|e| BadMessage::new("path_info", error_chain(&e)))
}

/// The rest of a `List` stream, each message awaited within the attempt
/// timeout.
struct Listing {
    service: GrpcPathInfoService,
    stream: Streaming<proto::PathInfo>,
}

impl Listing {
    async fn next(mut self) -> Option<(Result<PathInfo, PathInfoError>, Option<Listing>)> {
        let timeout = self.service.connection.attempt_timeout();
        let failed = |service: &GrpcPathInfoService, e: AttemptError| {
            service.error(CallError::not_retried("List", e))
        };
        match timeout.timed(self.stream.message()).await {
            Ok(None) => None,
            Ok(Some(wire)) => match checked(wire) {
                Ok(info) => Some((Ok(info), Some(self))),
                Err(bad) => Some((Err(failed(&self.service, bad.into())), None)),
            },
            Err(status) => Some((Err(failed(&self.service, status.into())), None)),
        }
    }
}

impl GrpcPathInfoService {
    /// Publishes `info` like [`put`](PathInfoService::put), replacing the
    /// path if the server has it published with another tree (which a put
    /// is refused); the server logs that it did.
    pub async fn replace(&self, info: PathInfo) -> Result<(), PathInfoError> {
        self.put_with(info, true).await
    }

    /// Has the server collect its store's garbage under `request`: one
    /// attempt, with no deadline (a collection of a large store takes
    /// minutes), so it is never run twice by a retry.
    pub async fn collect_garbage(
        &self,
        request: proto::CollectGarbageRequest,
    ) -> Result<proto::CollectGarbageResponse, PathInfoError> {
        let mut client = self.client.clone();
        match client.collect_garbage(request).await {
            Ok(answer) => Ok(answer.into_inner()),
            Err(status) => Err(self.error(CallError::not_retried("CollectGarbage", status.into()))),
        }
    }

    async fn put_with(&self, info: PathInfo, replace: bool) -> Result<(), PathInfoError> {
        let wire = proto::PathInfo::from(&info);
        self.connection
            .call("Put", || {
                let mut client = self.client.clone();
                let mut request = tonic::Request::new(wire.clone());
                if replace {
                    request.metadata_mut().insert(
                        super::REPLACE,
                        tonic::metadata::MetadataValue::from_static("true"),
                    );
                }
                let timeout = self.connection.attempt_timeout();
                async move {
                    timeout.timed(client.put(request)).await?;
                    Ok(())
                }
            })
            .await
            .map_err(|e| self.error(e))
    }
}

#[async_trait]
impl PathInfoService for GrpcPathInfoService {
    async fn get(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        self.connection
            .call("Get", || self.get_attempt(*hash))
            .await
            .map_err(|e| self.error(e))
    }

    /// The server's `Facts`; from `Get` if the server predates the call.
    async fn facts(&self, hash: &StorePathHash) -> Result<Option<Facts>, PathInfoError> {
        let answer = self
            .connection
            .call("Facts", || self.facts_attempt(*hash))
            .await
            .map_err(|e| self.error(e))?;
        match answer {
            Some(facts) => Ok(facts),
            None => Ok(self.get(hash).await?.map(Facts::from)),
        }
    }

    /// The server's `GetPublished`; `Get` if the server predates the call
    /// (it then pulled nothing: it had no such layer).
    async fn get_published(&self, hash: &StorePathHash) -> Result<Option<PathInfo>, PathInfoError> {
        let answer = self
            .connection
            .call("GetPublished", || async {
                let request = proto::GetPathInfoRequest {
                    hash: bytes::Bytes::copy_from_slice(hash.as_bytes()),
                };
                let mut client = self.client.clone();
                let timeout = self.connection.attempt_timeout();
                match timeout.timed(client.get_published(request)).await {
                    Ok(answer) => Ok(Some(Some(answer.into_inner()))),
                    Err(status) if status.code() == Code::NotFound => Ok(Some(None)),
                    Err(status) if status.code() == Code::Unimplemented => Ok(None),
                    Err(status) => Err(AttemptError::from(status)),
                }
            })
            .await
            .map_err(|e| self.error(e))?;
        let Some(wire) = answer else {
            return self.get(hash).await;
        };
        let Some(wire) = wire else {
            return Ok(None);
        };
        let info = checked(wire)
            .map_err(|bad| self.error(CallError::not_retried("GetPublished", bad.into())))?;
        if info.store_path.hash() != *hash {
            let bad = BadMessage::new(
                "store_path",
                format!("asked for hash {hash}, got {}", info.store_path),
            );
            return Err(self.error(CallError::not_retried("GetPublished", bad.into())));
        }
        Ok(Some(info))
    }

    /// The server's `Listing`; none from a server that predates the call.
    async fn listing(&self, hash: &StorePathHash) -> Result<Option<Vec<u8>>, PathInfoError> {
        self.connection
            .call("Listing", || async {
                let request = proto::GetPathInfoRequest {
                    hash: bytes::Bytes::copy_from_slice(hash.as_bytes()),
                };
                let mut client = self.client.clone();
                let timeout = self.connection.attempt_timeout();
                match timeout.timed(client.listing(request)).await {
                    Ok(answer) => {
                        let json = answer.into_inner().listing;
                        Ok((!json.is_empty()).then(|| json.to_vec()))
                    }
                    Err(status) if status.code() == Code::Unimplemented => Ok(None),
                    Err(status) => Err(AttemptError::from(status)),
                }
            })
            .await
            .map_err(|e| self.error(e))
    }

    /// The server checks the root's data is stored before it publishes, and
    /// refuses with [`PathInfoError::MissingRoot`] otherwise; it may check
    /// more (signatures, the tree's NarHash: `publish`), and does not
    /// replace a path published with another tree ([`Self::replace`]).
    async fn put(&self, info: PathInfo) -> Result<(), PathInfoError> {
        self.put_with(info, false).await
    }

    async fn delete(&self, hash: &StorePathHash) -> Result<bool, PathInfoError> {
        let request = proto::DeletePathInfoRequest {
            hash: bytes::Bytes::copy_from_slice(hash.as_bytes()),
        };
        self.connection
            .call("Delete", || {
                let mut client = self.client.clone();
                let request = request.clone();
                let timeout = self.connection.attempt_timeout();
                async move {
                    let answer = timeout.timed(client.delete(request)).await?;
                    Ok(answer.into_inner().deleted)
                }
            })
            .await
            .map_err(|e| self.error(e))
    }

    fn list(&self) -> BoxStream<'static, Result<PathInfo, PathInfoError>> {
        let service = self.clone();
        let start = async move {
            let started = service
                .connection
                .call("List", || {
                    let mut client = service.client.clone();
                    let timeout = service.connection.attempt_timeout();
                    async move {
                        let answer = timeout
                            .timed(client.list(proto::ListPathInfoRequest {}))
                            .await?;
                        Ok(answer.into_inner())
                    }
                })
                .await;
            match started {
                Ok(stream) => {
                    let listing = Listing { service, stream };
                    stream::unfold(
                        Some(listing),
                        |listing| async move { listing?.next().await },
                    )
                    .boxed()
                }
                Err(e) => stream::once(std::future::ready(Err(service.error(e)))).boxed(),
            }
        };
        stream::once(start).flatten().boxed()
    }
}
