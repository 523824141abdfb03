//! Traces over gRPC: [`TraceServer`], which a server runs beside its
//! PathInfo service over the trace backend of the store it serves, and
//! [`GrpcTraceService`], the client, sharing the castore clients'
//! [`Connection`] and retry policy. A put is idempotent (the same trace
//! under the same name), so both calls are retried on transient failures.
//! The server's backend checks every trace put ([`check`]) and the client
//! every trace got: a trace is a hint, but one naming files outside the
//! store is refused on both sides.

use std::sync::Arc;

use async_trait::async_trait;
use lazystore_castore::grpc::{AttemptError, AuthChannel, CallError, Connection};
use lazystore_castore::{ErrorClass, Retryable, error_chain};
use tonic::{Code, Request, Response, Status};

use super::{MAX_BYTES, TraceError, TraceService, check};
use crate::proto;
use crate::proto::trace_service_client::TraceServiceClient;
use crate::proto::trace_service_server::{self, TraceServiceServer};

/// Largest trace message either side encodes or decodes: a trace's text
/// and the framing of its strings.
const MAX_MESSAGE: usize = MAX_BYTES + (4 << 20);

/// The trace service of a server, answering from a store's trace backend.
#[derive(Clone)]
pub struct TraceServer {
    traces: Arc<dyn TraceService>,
}

impl TraceServer {
    /// Serves `traces` (the served store's, [`crate::Store::traces`]).
    pub fn new(traces: Arc<dyn TraceService>) -> Self {
        TraceServer { traces }
    }

    /// The tonic service; add it to a castore server with
    /// [`Services::add_service`](lazystore_castore::grpc::Services::add_service).
    pub fn into_service(self) -> TraceServiceServer<Self> {
        TraceServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

/// A trace error as a status: a refused trace is `INVALID_ARGUMENT`, a
/// damaged one `DATA_LOSS`, a backend failure `UNAVAILABLE` if a retry may
/// help and `INTERNAL` if not.
fn status(e: TraceError) -> Status {
    let text = error_chain(&e);
    match &e {
        TraceError::Invalid(_) => Status::invalid_argument(text),
        TraceError::Corrupt { .. } => Status::data_loss(text),
        TraceError::Backend(_) if e.class() == ErrorClass::Transient => Status::unavailable(text),
        TraceError::Backend(_) => Status::internal(text),
    }
}

#[tonic::async_trait]
impl trace_service_server::TraceService for TraceServer {
    async fn get(
        &self,
        request: Request<proto::GetTraceRequest>,
    ) -> Result<Response<proto::Trace>, Status> {
        let name = request.into_inner().name;
        match self.traces.get(&name).await.map_err(status)? {
            Some(files) => Ok(Response::new(proto::Trace { name, files })),
            None => Err(Status::not_found(format!(
                "no trace of builds named {name:?}"
            ))),
        }
    }

    async fn put(
        &self,
        request: Request<proto::Trace>,
    ) -> Result<Response<proto::PutTraceResponse>, Status> {
        // Every backend checks what it is given ([`check`]).
        let trace = request.into_inner();
        self.traces
            .put(&trace.name, &trace.files)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::PutTraceResponse {}))
    }
}

/// A [`TraceService`] on a gRPC server.
#[derive(Clone, Debug)]
pub struct GrpcTraceService {
    connection: Connection,
    client: TraceServiceClient<AuthChannel>,
}

impl GrpcTraceService {
    /// A client over `connection` (shared with the store's other clients).
    pub fn new(connection: Connection) -> Self {
        let client = TraceServiceClient::new(connection.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        GrpcTraceService { connection, client }
    }

    /// A refused trace stays [`TraceError::Invalid`]; anything else names
    /// the server.
    fn error(&self, e: CallError) -> TraceError {
        match e.rejection() {
            Some(s) if s.code() == Code::InvalidArgument => {
                TraceError::Invalid(s.message().to_owned())
            }
            _ => TraceError::Backend(Box::new(e.into_grpc_error(self.connection.url()))),
        }
    }
}

#[async_trait]
impl TraceService for GrpcTraceService {
    async fn get(&self, name: &str) -> Result<Option<Vec<String>>, TraceError> {
        let answer = self
            .connection
            .call("GetTrace", || {
                let mut client = self.client.clone();
                let request = proto::GetTraceRequest {
                    name: name.to_owned(),
                };
                let timeout = self.connection.attempt_timeout();
                async move {
                    match timeout.timed(client.get(request)).await {
                        Ok(answer) => Ok(Some(answer.into_inner())),
                        Err(status) if status.code() == Code::NotFound => Ok(None),
                        Err(status) => Err(AttemptError::from(status)),
                    }
                }
            })
            .await
            .map_err(|e| self.error(e))?;
        let Some(trace) = answer else {
            return Ok(None);
        };
        if trace.name != name {
            return Err(TraceError::Invalid(format!(
                "{}: asked for the trace of {name:?}, got that of {:?}",
                self.connection.url(),
                trace.name
            )));
        }
        check(name, &trace.files)?;
        Ok(Some(trace.files))
    }

    async fn put(&self, name: &str, files: &[String]) -> Result<(), TraceError> {
        check(name, files)?;
        let trace = proto::Trace {
            name: name.to_owned(),
            files: files.to_vec(),
        };
        self.connection
            .call("PutTrace", || {
                let mut client = self.client.clone();
                let request = trace.clone();
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
