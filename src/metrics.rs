//! Prometheus metrics (`--metrics-listen ADDR` on `serve` and `mount`,
//! `GET /metrics`, OpenMetrics text): the one place every component's
//! counters become metrics. Components keep plain atomic counters (the
//! mount's `Stats`, a substituter's, a pull-through service's, a
//! collector's, the gRPC server's call counts); a scrape reads them through
//! the collectors registered here, so `/metrics`, the mount's stats file
//! and its exit log read the same numbers. Names are
//! `lazystore_<component>_<counter>` (counters end in `_total`), and the
//! help text of each is in [`help`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use lazystore_castore::blobs::EncodedChunk;
use lazystore_castore::grpc::CallCounts;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Counters as `(name, value)`, read at each scrape.
type Source = Box<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// What a scrape reports.
pub struct Metrics {
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            registry: Registry::with_prefix("lazystore"),
        }
    }
}

impl Metrics {
    /// Reports the counters `source` gives as `lazystore_<component>_<name>`:
    /// counters, but for the names [`is_gauge`] says go up and down.
    pub fn counters(
        &mut self,
        component: &'static str,
        source: impl Fn() -> Vec<(&'static str, u64)> + Send + Sync + 'static,
    ) {
        self.registry.register_collector(Box::new(Counters {
            component,
            source: Box::new(source),
        }));
    }

    /// Reports a server's calls as `lazystore_grpc_requests_total`, by
    /// `method` and `code`.
    pub fn calls(&mut self, calls: Arc<CallCounts>) {
        self.registry.register_collector(Box::new(Calls(calls)));
    }

    /// A histogram of seconds, reported as `lazystore_<name>_seconds`.
    pub fn seconds(&mut self, name: &'static str, help: &'static str) -> Histogram {
        // 100 µs to ~26 s, doubling.
        let histogram = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.0001, 2.0, 18,
        ));
        self.registry.register_with_unit(
            name,
            help,
            prometheus_client::registry::Unit::Seconds,
            histogram.clone(),
        );
        histogram
    }

    /// The text a scrape gets.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }

    /// Serves `GET /metrics` on `addr` until `stop`; the URL scrapers use
    /// (with the port bound) and the task.
    pub async fn serve(
        self,
        addr: &str,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<(String, tokio::task::JoinHandle<anyhow::Result<()>>)> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for --metrics-listen"))?;
        let url = format!("http://{}/metrics", listener.local_addr()?);
        tracing::info!("metrics on {url}");
        let metrics = Arc::new(self);
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        );
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
                .context("serving metrics")
        });
        Ok((url, task))
    }
}

/// Counts the chunks read from and written to the blob service it
/// observes: a server's store.
#[derive(Default)]
pub struct StoreTraffic {
    chunks_read: AtomicU64,
    chunk_bytes_read: AtomicU64,
    chunks_written: AtomicU64,
    chunk_bytes_written: AtomicU64,
}

impl StoreTraffic {
    /// The counts, by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("chunks_read", get(&self.chunks_read)),
            ("chunk_bytes_read", get(&self.chunk_bytes_read)),
            ("chunks_written", get(&self.chunks_written)),
            ("chunk_bytes_written", get(&self.chunk_bytes_written)),
        ]
    }
}

impl lazystore_castore::blobs::BlobObserver for StoreTraffic {
    fn after_read(&self, chunks: &[EncodedChunk]) {
        self.chunks_read
            .fetch_add(chunks.len() as u64, Ordering::Relaxed);
        let bytes = chunks.iter().map(|c| c.data.len() as u64).sum();
        self.chunk_bytes_read.fetch_add(bytes, Ordering::Relaxed);
    }

    fn before_put(&self, chunks: &[EncodedChunk]) {
        self.chunks_written
            .fetch_add(chunks.len() as u64, Ordering::Relaxed);
        let bytes = chunks.iter().map(|c| c.data.len() as u64).sum();
        self.chunk_bytes_written.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Times the reads of the blob service it observes into a histogram.
pub struct FetchTimer(pub Histogram);

impl lazystore_castore::blobs::BlobObserver for FetchTimer {
    fn read_took(&self, elapsed: std::time::Duration) {
        self.0.observe(elapsed.as_secs_f64());
    }
}

/// Names of counters that go up and down (reported as gauges).
fn is_gauge(name: &str) -> bool {
    matches!(
        name,
        "uptime_secs" | "bytes" | "chunks" | "max_bytes" | "quarantined"
    )
}

/// The help text of a counter.
pub fn help(component: &str, name: &str) -> &'static str {
    match (component, name) {
        ("mount", "lookups") => "FUSE lookups answered",
        ("mount", "bytes_presented") => {
            "Bytes of the files shown to readers (what an eager copy would download)"
        }
        ("mount", "bytes_read") => "Bytes read by readers",
        ("mount", "chunk_bytes_fetched") => {
            "Decoded bytes of the chunks fetched from the store or the local cache"
        }
        ("mount", "remote_bytes") => "Decoded bytes of the chunks fetched from the remote store",
        ("mount", "remote_wire_bytes") => "Bytes of the chunks as they crossed the network",
        ("mount", "io_errors") => "Reads answered with EIO",
        ("local_cache", "hits") => "Chunks served from the local cache",
        ("local_cache", "misses") => "Chunks the local cache did not have",
        ("local_cache", "evictions") => "Chunks evicted from the local cache",
        ("upstream", "nar_downloads") => "NAR downloads started from upstream caches",
        ("upstream", "bytes_downloaded") => "Compressed bytes received from upstream caches",
        ("upstream", "failures") => {
            "Paths whose fetch from upstream failed (not counting absent ones)"
        }
        ("store", "chunks_read") => {
            "Chunks read from the store (served to clients or rendered into NARs)"
        }
        ("store", "chunk_bytes_read") => "Stored bytes of the chunks read",
        ("store", "chunks_written") => {
            "Chunks sent to the store to write (some may be stored already)"
        }
        ("store", "chunk_bytes_written") => "Encoded bytes of the chunks sent to write",
        ("gc", "runs") => "Garbage collections finished",
        ("gc", "failures") => "Garbage collections that stopped on an error",
        ("gc", "paths_deleted") => "Paths deleted by retention rules",
        ("gc", "chunks_dropped") => "Chunks dropped by garbage collections",
        ("gc", "bytes_reclaimed") => "Pack bytes given back by garbage collections",
        _ => "A lazystore counter (see docs/operations.md)",
    }
}

struct Counters {
    component: &'static str,
    source: Source,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counters({})", self.component)
    }
}

impl Collector for Counters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, value) in (self.source)() {
            let full = format!("{}_{name}", self.component);
            let help = help(self.component, name);
            if is_gauge(name) {
                let gauge = ConstGauge::new(value as i64);
                gauge.encode(encoder.encode_descriptor(
                    &full,
                    help,
                    None,
                    gauge.metric_type(),
                )?)?;
            } else {
                let counter = ConstCounter::new(value);
                counter.encode(encoder.encode_descriptor(
                    &full,
                    help,
                    None,
                    counter.metric_type(),
                )?)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Calls(Arc<CallCounts>);

impl Collector for Calls {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let calls = self.0.snapshot();
        let counter = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "grpc_requests",
            "gRPC calls answered, by method and status code",
            None,
            counter.metric_type(),
        )?;
        for (method, code, n) in calls {
            let labels = [("method", method), ("code", format!("{code:?}"))];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_render_with_their_help() {
        let mut metrics = Metrics::default();
        metrics.counters("mount", || vec![("bytes_read", 42), ("uptime_secs", 7)]);
        let text = metrics.render();
        assert!(
            text.contains("# TYPE lazystore_mount_bytes_read counter"),
            "{text}"
        );
        assert!(
            text.contains("lazystore_mount_bytes_read_total 42"),
            "{text}"
        );
        assert!(
            text.contains("# HELP lazystore_mount_bytes_read Bytes read by readers"),
            "{text}"
        );
        assert!(text.contains("lazystore_mount_uptime_secs 7"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
