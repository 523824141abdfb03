//! What an `s3://` store is opened with and fails with: its URL, the
//! key and options ([`S3Options`], from the standard AWS environment
//! variables), and the errors of opening ([`OpenS3Error`]) and of every
//! request ([`S3Error`], with its retry class).

use std::sync::Arc;

use crate::retry::{ErrorClass, RetryPolicy, Retryable};

/// What can go wrong talking to the object store.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// A request failed (after the retries the store's policy allows).
    #[error("S3 {op} {key} failed")]
    Request {
        /// GET, PUT, LIST, HEAD or DELETE.
        op: &'static str,
        /// The object's key (or the listed prefix).
        key: String,
        /// object_store's error.
        #[source]
        source: object_store::Error,
    },
    /// A write went into a pack that could not be stored; storing the
    /// records again puts them in a new pack.
    #[error("pack holding this write was not stored")]
    PackNotStored(#[source] Arc<S3Error>),
    /// The task storing a pack is gone (it panicked): this process is
    /// broken, not the store.
    #[error("the S3 pack writer is gone")]
    WriterGone,
    /// A pack named by an index this replica read is gone: a collection
    /// deleted it (after copying what was live elsewhere).
    #[error("S3 pack {pack} is gone (deleted by a garbage collection)")]
    PackGone {
        /// The pack's name.
        pack: String,
    },
    /// A stored object is damaged: not what its checksum or format says.
    #[error("S3 object {key} is damaged: {reason}")]
    Corrupt {
        /// The object's key.
        key: String,
        /// What check failed.
        reason: &'static str,
    },
}

impl Retryable for S3Error {
    /// Refused credentials, a missing bucket or object and requests the
    /// store does not support are permanent; damaged objects corrupt;
    /// everything else (the network, a node down, 5xx) transient.
    fn class(&self) -> ErrorClass {
        use object_store::Error as E;
        match self {
            S3Error::Request { source, .. } => match source {
                E::NotFound { .. }
                | E::PermissionDenied { .. }
                | E::Unauthenticated { .. }
                | E::NotSupported { .. }
                | E::NotImplemented { .. }
                | E::InvalidPath { .. }
                | E::UnknownConfigurationKey { .. }
                | E::AlreadyExists { .. }
                | E::Precondition { .. } => ErrorClass::Permanent,
                _ => ErrorClass::Transient,
            },
            S3Error::PackNotStored(source) => source.class(),
            S3Error::WriterGone => ErrorClass::Permanent,
            // Reading again lists the indexes again and finds the copy.
            S3Error::PackGone { .. } => ErrorClass::Transient,
            S3Error::Corrupt { .. } => ErrorClass::Corrupt,
        }
    }
}

/// Why an `s3://` store cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenS3Error {
    /// The URL is not `s3://bucket[/prefix][?endpoint=…&region=…]`.
    #[error(
        "invalid store URL {url:?}: {reason} (expected s3://bucket/prefix?endpoint=http://host:port&region=name)"
    )]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No credentials in the environment.
    #[error(
        "cannot open store {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to the key of the bucket"
    )]
    NoCredentials {
        /// The URL given.
        url: String,
    },
    /// object_store refused the configuration.
    #[error("cannot open store {url}")]
    Client {
        /// The URL given.
        url: String,
        /// Why.
        #[source]
        source: object_store::Error,
    },
}

/// An access key.
#[derive(Clone)]
pub struct S3Credentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret: String,
    /// `AWS_SESSION_TOKEN`, for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// How an `s3://` store is opened, beside its URL.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    /// The key; `None` fails the open.
    pub credentials: Option<S3Credentials>,
    /// Region when the URL names none; `us-east-1` if neither does.
    pub region: Option<String>,
    /// Endpoint when the URL names none; AWS itself if neither does.
    pub endpoint: Option<String>,
    /// How every request is retried.
    pub retry: RetryPolicy,
}

impl S3Options {
    /// The defaults, with the static key `key_id`/`secret` (no session
    /// token).
    pub fn with_key(key_id: &str, secret: &str) -> Self {
        S3Options {
            credentials: Some(S3Credentials {
                key_id: key_id.to_owned(),
                secret: secret.to_owned(),
                session_token: None,
            }),
            ..S3Options::default()
        }
    }

    /// Credentials, region and endpoint from the standard AWS environment
    /// variables, and the given retry policy.
    pub fn from_env(retry: RetryPolicy) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let credentials = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(key_id), Some(secret)) => Some(S3Credentials {
                key_id,
                secret,
                session_token: var("AWS_SESSION_TOKEN"),
            }),
            _ => None,
        };
        S3Options {
            credentials,
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            endpoint: var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL")),
            retry,
        }
    }
}

/// The parts of an `s3://` URL.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct S3Url {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

pub(crate) fn parse_url(url: &str) -> Result<S3Url, OpenS3Error> {
    let bad = |reason: &str| OpenS3Error::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if parsed.scheme() != "s3" {
        return Err(bad("the scheme must be s3"));
    }
    let bucket = parsed.host_str().filter(|b| !b.is_empty());
    let bucket = bucket.ok_or_else(|| bad("no bucket"))?.to_owned();
    let prefix = parsed.path().trim_matches('/').to_owned();
    if parsed.fragment().is_some() || !parsed.username().is_empty() {
        return Err(bad("credentials and fragments do not go in the URL"));
    }
    let (mut endpoint, mut region) = (None, None);
    for (k, v) in parsed.query_pairs() {
        match &*k {
            "endpoint" => endpoint = Some(v.into_owned()),
            "region" => region = Some(v.into_owned()),
            _ => return Err(bad(&format!("unknown option {k:?}"))),
        }
    }
    Ok(S3Url {
        bucket,
        prefix,
        endpoint,
        region,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("s3://bucket/some/prefix/?endpoint=http://127.0.0.1:3900&region=garage")
            .unwrap();
        assert_eq!(
            u,
            S3Url {
                bucket: "bucket".into(),
                prefix: "some/prefix".into(),
                endpoint: Some("http://127.0.0.1:3900".into()),
                region: Some("garage".into()),
            }
        );
        assert_eq!(parse_url("s3://b").unwrap().prefix, "");
        for (bad, says) in [
            ("s3:///prefix", "bucket"),
            ("s3://b/p?sync=no", "unknown option"),
            ("s3://key:secret@b/p", "credentials"),
        ] {
            let e = parse_url(bad).expect_err(bad).to_string();
            assert!(e.contains(says) && e.contains(bad), "{bad}: {e}");
        }
    }
}
