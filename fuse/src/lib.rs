//! The lazy `/nix/store` FUSE frontend: store paths appear from metadata, file
//! contents are fetched per chunk when read. Not built yet.
