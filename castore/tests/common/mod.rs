//! What the castore integration tests share: a gRPC server on 127.0.0.1
//! over a redb store.

#![allow(dead_code)]

use std::sync::Arc;

use lazystore_castore::RedbStore;
use lazystore_castore::blobs::RedbBlobService;
use lazystore_castore::directories::RedbDirectoryService;
use lazystore_castore::grpc::{ServeError, Services, serve};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A server running until [`Server::stop`], or until it is dropped.
pub struct Server {
    /// `grpc+http://127.0.0.1:PORT`.
    pub url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Server {
    /// Stops it and waits for it to finish.
    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// Serves `store`'s blobs and directories on a free port of 127.0.0.1.
pub async fn serve_redb(store: &RedbStore) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc+http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let services = Services::new(
        Arc::new(RedbBlobService::new(store.clone())),
        Arc::new(RedbDirectoryService::new(store.clone())),
    );
    let task = tokio::spawn(serve(listener, services, async {
        stopped.await.ok();
    }));
    Server { url, stop, task }
}
