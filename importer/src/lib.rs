//! Closure import from Nix binary caches into the store. Not built yet.
