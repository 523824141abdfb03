//! [`PathInfoServer`]: the gRPC PathInfo service over a [`Store`].
//!
//! Every PathInfo received is validated (`TryFrom`), and published only
//! once the store holds its root's data ([`Store::check_root`]): a client
//! that skipped or lost an upload gets `FAILED_PRECONDITION`, and no reader
//! ever finds a path pointing at missing data. Nothing deletes castore data,
//! so what the check found is still there when the PathInfo is published.

use futures::stream::{BoxStream, StreamExt};
use lazystore_castore::grpc::BadMessage;
use tonic::{Request, Response, Status};

use super::MAX_PATH_INFO_SIZE;
use super::status::{invalid_request, not_found};
use crate::Store;
use crate::pathinfos::PathInfo;
use crate::proto;
use crate::proto::path_info_service_server::{self, PathInfoServiceServer};
use crate::store_path::StorePathHash;

/// The PathInfo service, answering gRPC calls from a store's PathInfo
/// backend, and checking puts against its blobs and directories.
#[derive(Clone)]
pub struct PathInfoServer {
    store: Store,
}

impl PathInfoServer {
    /// Serves `store.path_infos`, checking puts against `store.blobs` and
    /// `store.directories`.
    pub fn new(store: Store) -> Self {
        PathInfoServer { store }
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
        let request = request.into_inner();
        let hash = StorePathHash::try_from(request.hash.as_ref())
            .map_err(|e| BadMessage::new("hash", e.to_string()))?;
        match self.store.path_infos.get(&hash).await? {
            Some(info) => Ok(Response::new(proto::PathInfo::from(&info))),
            None => Err(not_found(&hash)),
        }
    }

    /// An invalid PathInfo is `INVALID_ARGUMENT`; one whose root data is not
    /// stored (or not with the size the root records) `FAILED_PRECONDITION`.
    async fn put(
        &self,
        request: Request<proto::PathInfo>,
    ) -> Result<Response<proto::PutPathInfoResponse>, Status> {
        let info = PathInfo::try_from(request.into_inner()).map_err(invalid_request)?;
        self.store.check_root(&info).await?;
        tracing::debug!(store_path = %info.store_path, "publishing");
        self.store.path_infos.put(info).await?;
        Ok(Response::new(proto::PutPathInfoResponse {}))
    }

    /// Streams the backend's listing as it produces it.
    async fn list(
        &self,
        _request: Request<proto::ListPathInfoRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let stream = self.store.path_infos.list().map(|item| {
            item.map(|info| proto::PathInfo::from(&info))
                .map_err(Status::from)
        });
        Ok(Response::new(stream.boxed()))
    }
}
