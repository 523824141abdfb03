//! [`PathInfoServer`]: the gRPC PathInfo service over a [`Store`].
//!
//! Every PathInfo received is validated (`TryFrom`), and published through
//! a [`Publisher`]: only once the store holds its root's data
//! ([`Store::check_root`]), so a client that skipped or lost an upload gets
//! `FAILED_PRECONDITION` and no reader ever finds a path pointing at
//! missing data; and, under a policy with trusted keys, only signed and
//! with a tree that renders to its NarHash. Nothing deletes castore data,
//! so what the checks found is still there when the PathInfo is published.
//!
//! `CollectGarbage` runs a [`Collector`] of the served store, if the
//! server has one ([`PathInfoServer::with_collector`]).
//!
//! A put replaces a path published with another tree only if it carries
//! the metadata [`REPLACE`]`: true` ([`GrpcPathInfoService::replace`]).
//!
//! [`GrpcPathInfoService::replace`]: super::GrpcPathInfoService::replace

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use lazystore_castore::grpc::BadMessage;
use tonic::{Request, Response, Status};

use super::MAX_PATH_INFO_SIZE;
use super::status::{invalid_request, not_found};
use crate::gc::{Collector, GcError, Report, Retention};
use crate::pathinfos::PathInfo;
use crate::proto;
use crate::proto::path_info_service_server::{self, PathInfoServiceServer};
use crate::publish::{Proof, Publisher, Replace};
use crate::store_path::StorePathHash;
use crate::{Store, Wanted};

/// Metadata key of a put that may replace a path published with another
/// tree (value `true`).
pub const REPLACE: &str = "lazystore-replace";

/// The PathInfo service, answering gRPC calls from a store's PathInfo
/// backend, and publishing puts through a [`Publisher`].
#[derive(Clone)]
pub struct PathInfoServer {
    publisher: Publisher,
    collector: Option<Arc<Collector>>,
}

impl PathInfoServer {
    /// Serves the publisher's store: gets and lists from its PathInfos,
    /// puts through the publisher's checks (a [`Store`] is a publisher
    /// with no trusted keys).
    pub fn new(publisher: impl Into<Publisher>) -> Self {
        PathInfoServer {
            publisher: publisher.into(),
            collector: None,
        }
    }

    /// The same, answering `CollectGarbage` with `collector`.
    pub fn with_collector(mut self, collector: Arc<Collector>) -> Self {
        self.collector = Some(collector);
        self
    }

    /// Where gets and lists read.
    fn store(&self) -> &Store {
        self.publisher.reads()
    }

    /// The tonic service, with message limits of [`MAX_PATH_INFO_SIZE`];
    /// add it to a castore server with
    /// [`Services::add_service`](lazystore_castore::grpc::Services::add_service).
    pub fn into_service(self) -> PathInfoServiceServer<Self> {
        PathInfoServiceServer::new(self)
            .max_decoding_message_size(MAX_PATH_INFO_SIZE)
            .max_encoding_message_size(MAX_PATH_INFO_SIZE)
    }
}

#[tonic::async_trait]
impl path_info_service_server::PathInfoService for PathInfoServer {
    type ListStream = BoxStream<'static, Result<proto::PathInfo, Status>>;

    /// An unknown path is `NOT_FOUND`; a hash not 20 bytes long
    /// `INVALID_ARGUMENT`.
    async fn get(
        &self,
        request: Request<proto::GetPathInfoRequest>,
    ) -> Result<Response<proto::PathInfo>, Status> {
        let hash = hash_of(&request.into_inner().hash)?;
        match self.store().path_infos.get(&hash).await? {
            Some(info) => Ok(Response::new(proto::PathInfo::from(&info))),
            None => Err(not_found(&hash)),
        }
    }

    /// A PathInfo with no root; an unknown path is `NOT_FOUND`.
    async fn facts(
        &self,
        request: Request<proto::GetPathInfoRequest>,
    ) -> Result<Response<proto::PathInfo>, Status> {
        let hash = hash_of(&request.into_inner().hash)?;
        match self.store().path_infos.facts(&hash).await? {
            Some(facts) => Ok(Response::new(proto::PathInfo::from(&facts))),
            None => Err(not_found(&hash)),
        }
    }

    /// Published only; an unknown path is `NOT_FOUND`.
    async fn get_published(
        &self,
        request: Request<proto::GetPathInfoRequest>,
    ) -> Result<Response<proto::PathInfo>, Status> {
        let hash = hash_of(&request.into_inner().hash)?;
        match self.store().path_infos.get_published(&hash).await? {
            Some(info) => Ok(Response::new(proto::PathInfo::from(&info))),
            None => Err(not_found(&hash)),
        }
    }

    /// Empty when there is no listing (or one too large for a message).
    async fn listing(
        &self,
        request: Request<proto::GetPathInfoRequest>,
    ) -> Result<Response<proto::ListingResponse>, Status> {
        let hash = hash_of(&request.into_inner().hash)?;
        let listing = self.store().path_infos.listing(&hash).await?;
        let listing = listing
            .filter(|json| json.len() < MAX_PATH_INFO_SIZE - 1024)
            .unwrap_or_default();
        Ok(Response::new(proto::ListingResponse {
            listing: listing.into(),
        }))
    }

    /// An invalid PathInfo is `INVALID_ARGUMENT`; one the publisher refuses
    /// gets the code of its [`PathInfoError`](crate::pathinfos::PathInfoError)
    /// (root data not stored: `FAILED_PRECONDITION`; no trusted signature:
    /// `PERMISSION_DENIED`; …).
    async fn put(
        &self,
        request: Request<proto::PathInfo>,
    ) -> Result<Response<proto::PutPathInfoResponse>, Status> {
        let replace = match request.metadata().get(REPLACE) {
            Some(v) if v.as_bytes() == b"true" => Replace::Yes,
            _ => Replace::No,
        };
        let info = PathInfo::try_from(request.into_inner()).map_err(invalid_request)?;
        self.publisher.publish(info, Proof::None, replace).await?;
        Ok(Response::new(proto::PutPathInfoResponse {}))
    }

    /// Unpublishes a path of the store itself (not of caches behind it);
    /// logged. A hash not 20 bytes long is `INVALID_ARGUMENT`.
    async fn delete(
        &self,
        request: Request<proto::DeletePathInfoRequest>,
    ) -> Result<Response<proto::DeletePathInfoResponse>, Status> {
        let hash = hash_of(&request.into_inner().hash)?;
        let deleted = self.publisher.store().path_infos.delete(&hash).await?;
        if deleted {
            tracing::warn!("unpublished the path with hash {hash}, as asked");
        }
        Ok(Response::new(proto::DeletePathInfoResponse { deleted }))
    }

    /// One collection, logged; the rules' paths must parse
    /// (`INVALID_ARGUMENT`) and be published (`FAILED_PRECONDITION`).
    async fn collect_garbage(
        &self,
        request: Request<proto::CollectGarbageRequest>,
    ) -> Result<Response<proto::CollectGarbageResponse>, Status> {
        let Some(collector) = &self.collector else {
            return Err(Status::failed_precondition(
                "this server's store is not collected while it serves (only an embedded redb:// \
                 store is); run lazystore gc where the store is",
            ));
        };
        let request = request.into_inner();
        let keep_closure_of = request
            .keep_closure_of
            .iter()
            .map(|p| p.parse::<Wanted>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BadMessage::new("keep_closure_of", e.to_string()))?;
        let retention = Retention {
            keep_since: request.keep_since_seconds.map(Duration::from_secs),
            keep_closure_of,
        };
        tracing::info!(
            dry_run = request.dry_run,
            ?retention,
            "garbage collection asked for"
        );
        // In a task of its own: a client that goes away does not cut a
        // collection short between its steps.
        let dry_run = request.dry_run;
        let collecting = collector.clone();
        let report = tokio::spawn(async move { collecting.collect(&retention, dry_run).await })
            .await
            .map_err(|e| {
                Status::internal(format!("the garbage collection failed internally: {e}"))
            })?
            .map_err(|e| {
                tracing::warn!(
                    "garbage collection failed: {}",
                    lazystore_castore::error_chain(&e)
                );
                match e {
                    GcError::Running => Status::aborted(e.to_string()),
                    GcError::UnknownRoot(_) => Status::failed_precondition(e.to_string()),
                    e => Status::internal(lazystore_castore::error_chain(&e)),
                }
            })?;
        tracing::info!(
            deleted = report.paths_deleted.len(),
            dropped_chunks = report.swept.chunks,
            reclaimed = report
                .swept
                .packs_before
                .saturating_sub(report.swept.packs_after),
            dry_run = report.dry_run,
            "garbage collection done"
        );
        Ok(Response::new(report.into()))
    }

    /// Streams the backend's listing as it produces it.
    async fn list(
        &self,
        _request: Request<proto::ListPathInfoRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let stream = self.store().path_infos.list().map(|item| {
            item.map(|info| proto::PathInfo::from(&info))
                .map_err(Status::from)
        });
        Ok(Response::new(stream.boxed()))
    }
}

impl From<Report> for proto::CollectGarbageResponse {
    fn from(r: Report) -> Self {
        proto::CollectGarbageResponse {
            paths_kept: r.paths_kept,
            paths_deleted: r.paths_deleted.iter().map(ToString::to_string).collect(),
            live_directories: r.live.0,
            live_blobs: r.live.1,
            live_chunks: r.live.2,
            dropped_directories: r.swept.directories,
            dropped_blobs: r.swept.blobs,
            dropped_chunks: r.swept.chunks,
            dropped_chunk_bytes: r.swept.chunk_bytes,
            pack_bytes_before: r.swept.packs_before,
            pack_bytes_after: r.swept.packs_after,
        }
    }
}

/// The store path hash a request names (its `hash` field); `INVALID_ARGUMENT` if it is not 20
/// bytes long.
fn hash_of(hash: &[u8]) -> Result<StorePathHash, BadMessage> {
    StorePathHash::try_from(hash).map_err(|e| BadMessage::new("hash", e.to_string()))
}
