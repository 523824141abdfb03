//! The door of a served store: what a PathInfo sent by a client must be
//! before the server publishes it to every builder ([`Publisher`]).
//!
//! Import and lazy substitution keep a trust chain — a narinfo signed by a
//! trusted key, a NAR that hashes to its NarHash, a tree that renders back
//! to that NAR — but a client of `lazystore serve` could otherwise put any
//! tree under any store path. With trusted keys ([`PublishPolicy`]) the
//! server keeps the chain itself, whoever the client is:
//!
//! 1. the root's data is stored ([`Store::check_root`], as always);
//! 2. a signature by a trusted key is valid for the PathInfo's fingerprint
//!    (store path, NarHash, NarSize, references) — or, with a key to sign
//!    with, a PathInfo carrying no signature at all is signed here;
//! 3. a path already published with another NarHash is not replaced
//!    unless the put asks for it ([`Replace::Yes`], logged);
//! 4. the tree renders to the NarHash and NarSize signed: the server hashes
//!    the NAR of its own copy of the tree, so a holder of the write token
//!    cannot pair a signed PathInfo with a tree of its own making (one byte
//!    of one file changed is refused). An HTTP upload skips this step: the
//!    server hashed the NAR as it ingested it ([`Proof::Ingested`]).
//!
//! The cost of step 4 is one read of the path's chunks from the server's
//! own store and a SHA-256 over its NAR: `bench/publish_verify.sh`
//! measures it per GB.
//!
//! A store collected while it serves also checks every tree whole first,
//! in its PathInfo layer (`gc::CollectedPathInfos`; `docs/design.md`,
//! "Garbage collection").
//!
//! Without trusted keys nothing but step 1 and 3 is checked — a store a
//! single trusted writer fills — and the server says so when it starts.

use std::sync::Arc;

use tokio::sync::Mutex;

use crate::Store;
use crate::pathinfos::{PathInfo, PathInfoError};
use crate::render::{RenderError, nar_hash};
use crate::signature::{PublicKey, SigningKey, VerifyError};

/// What a server requires of the PathInfos it publishes.
#[derive(Clone, Debug, Default)]
pub struct PublishPolicy {
    /// Keys whose signatures make a PathInfo publishable; empty with no
    /// `sign_with`: every signature (or none) is taken as it is.
    pub trusted_keys: Vec<PublicKey>,
    /// Signs PathInfos put with no signature at all (paths built by the
    /// writers themselves), after checking their tree renders to their
    /// NarHash; its public key is trusted as well.
    pub sign_with: Option<Arc<SigningKey>>,
}

impl PublishPolicy {
    /// Whether signatures and trees are checked: once any key is given.
    pub fn verifies(&self) -> bool {
        !self.trusted_keys.is_empty() || self.sign_with.is_some()
    }

    /// The trusted keys, the signing key's own included.
    fn keys(&self) -> Vec<PublicKey> {
        let own = self.sign_with.iter().map(|key| key.public_key());
        self.trusted_keys.iter().cloned().chain(own).collect()
    }
}

/// Whether a put may replace a path published with another tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replace {
    /// Refuse it ([`PathInfoError::AlreadyPublished`]).
    No,
    /// Replace it, and log that it did.
    Yes,
}

/// What the server already knows of a put's NarHash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// Nothing: the client sent the PathInfo and its tree separately, so
    /// the tree is rendered and hashed.
    None,
    /// The server computed NarHash and NarSize itself from the NAR the
    /// tree was ingested from (an HTTP upload).
    Ingested,
}

/// What a put did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// The path is new here.
    New,
    /// The same tree was published already; signatures were merged.
    Unchanged,
    /// Another tree was published and is replaced ([`Replace::Yes`]).
    Replaced,
}

/// Publishes PathInfos into a store under a [`PublishPolicy`]; the gRPC
/// PathInfo server and the HTTP cache's uploads go through one.
#[derive(Clone)]
pub struct Publisher {
    store: Store,
    /// The store as clients read it: `store`, or layered over it (a
    /// pull-through store). The checks use `store` itself, so a put never
    /// pulls anything from upstream.
    reads: Store,
    policy: Arc<PublishPolicy>,
    keys: Arc<[PublicKey]>,
    /// Held from the check of what is published to the put, so two puts
    /// of one path can't both find it absent; not held while rendering.
    publishing: Arc<Mutex<()>>,
}

/// A publisher with no trusted keys: it checks roots and refuses
/// replacements only.
impl From<Store> for Publisher {
    fn from(store: Store) -> Self {
        Publisher::new(store, PublishPolicy::default())
    }
}

impl Publisher {
    /// Publishes into `store` under `policy`.
    pub fn new(store: Store, policy: PublishPolicy) -> Self {
        let keys = policy.keys().into();
        Publisher {
            reads: store.clone(),
            store,
            policy: Arc::new(policy),
            keys,
            publishing: Arc::default(),
        }
    }

    /// The store published into.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The same, with clients' reads going through `reads` (the store
    /// with layers over it, such as upstream caches behind its PathInfos).
    pub fn with_reads(mut self, reads: Store) -> Self {
        self.reads = reads;
        self
    }

    /// The store as clients read it.
    pub fn reads(&self) -> &Store {
        &self.reads
    }

    /// The policy.
    pub fn policy(&self) -> &PublishPolicy {
        &self.policy
    }

    /// Checks `info` against the policy (the steps of the module docs) and
    /// publishes it. A refusal is logged with the path and the reason, and
    /// publishes nothing.
    pub async fn publish(
        &self,
        mut info: PathInfo,
        proof: Proof,
        replace: Replace,
    ) -> Result<Published, PathInfoError> {
        let result = match self.check(&mut info, proof, replace).await {
            Ok(()) => self.put(info.clone(), replace).await,
            Err(e) => Err(e),
        };
        match &result {
            Err(e @ (PathInfoError::Backend(_) | PathInfoError::Internal(_))) => {
                tracing::warn!(path = %info.store_path, "publishing failed: {}", lazystore_castore::error_chain(e));
            }
            Err(e) => tracing::warn!(path = %info.store_path, "refused: {e}"),
            Ok(Published::Replaced) => {
                tracing::warn!(path = %info.store_path, "replaced a published path with another tree, as asked")
            }
            Ok(_) => tracing::debug!(path = %info.store_path, "published"),
        }
        result
    }

    /// Steps 1 to 4 (3 again under the lock when putting); signs `info` where the policy says to.
    async fn check(
        &self,
        info: &mut PathInfo,
        proof: Proof,
        replace: Replace,
    ) -> Result<(), PathInfoError> {
        self.store.check_root(info).await?;
        if !self.policy.verifies() {
            return Ok(());
        }
        let sign = match info.verify(&self.keys) {
            Ok(_) => false,
            Err(VerifyError::Unsigned { .. }) if self.policy.sign_with.is_some() => true,
            Err(e) => return Err(PathInfoError::Untrusted(e)),
        };
        // Before the expensive step: a conflicting put is refused without
        // reading its tree.
        self.published(info, replace).await?;
        if proof == Proof::None {
            self.check_tree(info).await?;
        }
        if sign && let Some(key) = &self.policy.sign_with {
            info.signatures.push(key.sign(info.fingerprint()));
        }
        Ok(())
    }

    /// What publishing `info` would do to the path published now, with
    /// the published PathInfo; refuses to replace another tree unless
    /// asked.
    async fn published(
        &self,
        info: &PathInfo,
        replace: Replace,
    ) -> Result<(Published, Option<PathInfo>), PathInfoError> {
        let Some(old) = self.store.path_infos.get(&info.store_path.hash()).await? else {
            return Ok((Published::New, None));
        };
        if old.nar_sha256 == info.nar_sha256 && old.root == info.root {
            return Ok((Published::Unchanged, Some(old)));
        }
        match replace {
            Replace::Yes => Ok((Published::Replaced, Some(old))),
            Replace::No => Err(PathInfoError::AlreadyPublished {
                store_path: info.store_path.clone(),
                published: Box::new(old.nar_sha256),
            }),
        }
    }

    /// Step 4: the tree renders to the NarHash and NarSize claimed.
    async fn check_tree(&self, info: &PathInfo) -> Result<(), PathInfoError> {
        let rendered = nar_hash(&self.store.blobs, &*self.store.directories, &info.root).await;
        let (size, sha256) = rendered.map_err(|e| match e {
            RenderError::Blob(_) | RenderError::Directory(_) | RenderError::Io(_) => {
                PathInfoError::Backend(Box::new(e))
            }
            // Missing or mis-sized data below the root, or impossible
            // sizes: the client's tree, not the store, is at fault.
            e => PathInfoError::BadTree {
                store_path: info.store_path.clone(),
                source: Box::new(e),
            },
        })?;
        if (size, sha256) != (info.nar_size, info.nar_sha256) {
            return Err(PathInfoError::NarMismatch {
                store_path: info.store_path.clone(),
                claimed: Box::new(info.nar_sha256),
                claimed_size: info.nar_size,
                actual: Box::new(sha256),
                actual_size: size,
            });
        }
        Ok(())
    }

    /// Puts `info`, checking again under the lock what is published (a
    /// concurrent put may have published the path since); the signatures
    /// of an unchanged path are merged.
    async fn put(&self, mut info: PathInfo, replace: Replace) -> Result<Published, PathInfoError> {
        let _publishing = self.publishing.lock().await;
        let (published, old) = self.published(&info, replace).await?;
        if let (Published::Unchanged, Some(old)) = (published, old) {
            let new: Vec<_> = info
                .signatures
                .iter()
                .filter(|s| !old.signatures.contains(s))
                .cloned()
                .collect();
            if new.is_empty() {
                return Ok(Published::Unchanged);
            }
            info.signatures = old.signatures.into_iter().chain(new).collect();
        }
        self.store.path_infos.put(info).await?;
        Ok(published)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StorePath;
    use crate::ingest::{Ingested, ingest_nar};
    use crate::nar::NarWriter;

    const PATH: &str = "00bgd045z0d4icpbc2yyz4gx48ak44la-hello";

    /// Stores a NAR of one file holding `contents`.
    async fn stored(store: &Store, contents: &[u8]) -> Ingested {
        let mut nar = NarWriter::new(Vec::new());
        nar.file(None, false, contents.len() as u64).await.unwrap();
        nar.write_content(contents).await.unwrap();
        let nar = nar.finish().await.unwrap();
        ingest_nar(&store.blobs, &*store.directories, &nar[..])
            .await
            .unwrap()
    }

    /// The PathInfo of PATH for `tree`, signed by `key` if given.
    fn info(tree: &Ingested, key: Option<&SigningKey>) -> PathInfo {
        let mut info = PathInfo {
            store_path: StorePath::from_basename(PATH).unwrap(),
            root: tree.root.clone(),
            references: Vec::new(),
            nar_size: tree.nar_size,
            nar_sha256: tree.nar_sha256,
            signatures: Vec::new(),
            deriver: None,
            ca: None,
        };
        if let Some(key) = key {
            info.signatures.push(key.sign(info.fingerprint()));
        }
        info
    }

    async fn published(store: &Store) -> Option<PathInfo> {
        let hash = StorePath::from_basename(PATH).unwrap().hash();
        store.path_infos.get(&hash).await.unwrap()
    }

    #[tokio::test]
    async fn only_signed_paths_whose_tree_renders_to_their_nar_hash() {
        let store = Store::memory();
        let trusted = SigningKey::generate("trusted-1").unwrap();
        let other = SigningKey::generate("other-1").unwrap();
        let policy = PublishPolicy {
            trusted_keys: vec![trusted.public_key()],
            sign_with: None,
        };
        let publisher = Publisher::new(store.clone(), policy);
        let good = stored(&store, b"the tree that was signed").await;
        let evil = stored(&store, b"the tree that was signeD").await;

        // Signed, but pointing at another tree: the stored tree renders to
        // another NarHash.
        let mut forged = info(&good, Some(&trusted));
        forged.root = evil.root.clone();
        let e = publisher
            .publish(forged, Proof::None, Replace::No)
            .await
            .unwrap_err();
        assert!(matches!(e, PathInfoError::NarMismatch { .. }), "{e}");
        assert!(e.to_string().contains(PATH), "{e}");
        // Unsigned, or signed by a key not trusted.
        for unsigned in [info(&good, None), info(&good, Some(&other))] {
            let e = publisher
                .publish(unsigned, Proof::None, Replace::No)
                .await
                .unwrap_err();
            assert!(matches!(e, PathInfoError::Untrusted(_)), "{e}");
        }
        assert_eq!(published(&store).await, None);

        let true_info = info(&good, Some(&trusted));
        let done = publisher.publish(true_info.clone(), Proof::None, Replace::No);
        assert_eq!(done.await.unwrap(), Published::New);
        assert_eq!(published(&store).await, Some(true_info.clone()));
        // Again: nothing changes.
        let again = publisher.publish(true_info.clone(), Proof::None, Replace::No);
        assert_eq!(again.await.unwrap(), Published::Unchanged);
    }

    #[tokio::test]
    async fn unsigned_paths_are_signed_with_the_servers_key() {
        let store = Store::memory();
        let own = Arc::new(SigningKey::generate("builders-1").unwrap());
        let policy = PublishPolicy {
            trusted_keys: Vec::new(),
            sign_with: Some(own.clone()),
        };
        let publisher = Publisher::new(store.clone(), policy);
        let good = stored(&store, b"built in house").await;
        let evil = stored(&store, b"built in hous3").await;
        // Even unsigned, the tree must be the NarHash's: the server signs
        // what it checked.
        let mut forged = info(&good, None);
        forged.root = evil.root.clone();
        let e = publisher.publish(forged, Proof::None, Replace::No).await;
        assert!(matches!(e, Err(PathInfoError::NarMismatch { .. })));
        publisher
            .publish(info(&good, None), Proof::None, Replace::No)
            .await
            .unwrap();
        let signed = published(&store).await.unwrap();
        assert_eq!(signed.signatures.len(), 1);
        signed.verify(&[own.public_key()]).unwrap();
        // A signature by an unknown key is not replaced by the server's.
        let stranger = SigningKey::generate("stranger-1").unwrap();
        let e = publisher
            .publish(info(&good, Some(&stranger)), Proof::None, Replace::No)
            .await;
        assert!(matches!(e, Err(PathInfoError::Untrusted(_))));
    }

    #[tokio::test]
    async fn a_published_tree_is_replaced_only_when_asked() {
        let store = Store::memory();
        // No keys: the server checks nothing but roots and replacements.
        let publisher = Publisher::from(store.clone());
        let first = stored(&store, b"first").await;
        let second = stored(&store, b"second").await;
        publisher
            .publish(info(&first, None), Proof::None, Replace::No)
            .await
            .unwrap();
        let e = publisher
            .publish(info(&second, None), Proof::None, Replace::No)
            .await
            .unwrap_err();
        assert!(matches!(e, PathInfoError::AlreadyPublished { .. }), "{e}");
        assert_eq!(published(&store).await, Some(info(&first, None)));
        let replaced = publisher.publish(info(&second, None), Proof::None, Replace::Yes);
        assert_eq!(replaced.await.unwrap(), Published::Replaced);
        assert_eq!(published(&store).await, Some(info(&second, None)));
    }

    #[tokio::test]
    async fn signatures_of_an_unchanged_path_are_merged() {
        let store = Store::memory();
        let (a, b) = (
            SigningKey::generate("a-1").unwrap(),
            SigningKey::generate("b-1").unwrap(),
        );
        let policy = PublishPolicy {
            trusted_keys: vec![a.public_key(), b.public_key()],
            sign_with: None,
        };
        let publisher = Publisher::new(store.clone(), policy);
        let tree = stored(&store, b"one tree, two signers").await;
        for key in [&a, &b] {
            publisher
                .publish(info(&tree, Some(key)), Proof::None, Replace::No)
                .await
                .unwrap();
        }
        let both = published(&store).await.unwrap();
        assert_eq!(both.signatures.len(), 2);
        both.verify(&[a.public_key()]).unwrap();
        both.verify(&[b.public_key()]).unwrap();
    }
}
