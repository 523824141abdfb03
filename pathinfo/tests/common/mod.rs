//! What several of this crate's test files share.

#![allow(dead_code)]

use lazystore_castore::S3Options;
use lazystore_pathinfo::nar::NarWriter;
use lazystore_testkit::garage::Garage;

/// Options for the S3 store on `garage`, with its key.
pub fn s3_options(garage: &Garage) -> S3Options {
    let (key_id, secret) = garage.key();
    S3Options::with_key(key_id, secret)
}

/// A NAR of a directory holding `files` (name, contents), in name order.
pub async fn nar_of<N: AsRef<[u8]>>(files: &[(N, Vec<u8>)]) -> Vec<u8> {
    let mut nar = NarWriter::new(Vec::new());
    nar.start_directory(None).await.unwrap();
    for (name, data) in files {
        nar.file(Some(name.as_ref()), false, data.len() as u64)
            .await
            .unwrap();
        nar.write_content(data).await.unwrap();
    }
    nar.end_directory().await.unwrap();
    nar.finish().await.unwrap()
}
