{
  description = "lazystore: a lazy /nix/store for Nix builders, and the central service it reads from";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      # FUSE, overlayfs and the NixOS modules are Linux only.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The workspace's version, read where cargo reads it (tests/flake.rs
      # checks the package carries it).
      version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).workspace.package.version;

      # The crates and what their build reads; docs, scripts and benchmarks
      # stay out, so editing them rebuilds nothing.
      src = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [
          ./Cargo.toml
          ./Cargo.lock
          ./src
          ./tests
          ./proto
          ./castore
          ./pathinfo
          ./importer
          ./fuse
          ./httpcache
          ./testkit
        ];
      };

      lazystorePackage =
        pkgs:
        { doCheck }:
        pkgs.rustPlatform.buildRustPackage {
          pname = "lazystore";
          inherit version src doCheck;
          cargoLock.lockFile = ./Cargo.lock;

          # No protoc: the protos are compiled by protox (castore/build.rs,
          # pathinfo/build.rs). No libfuse and no pkg-config either: fuser
          # is built without libfuse and mounts through fusermount3, found
          # on PATH at run time (the wrapper below appends fuse3's, so a
          # system's own, such as NixOS's setuid wrapper, comes first), and
          # xz and zstd are built from the crates' bundled sources.
          nativeBuildInputs = [ pkgs.makeBinaryWrapper ];
          postInstall = ''
            wrapProgram $out/bin/lazystore --suffix PATH : ${lib.makeBinPath [ pkgs.fuse3 ]}
          '';

          # The tests a build sandbox can run (checks.<system>.package):
          # every crate's unit tests but three that call Nix, and the chunk
          # store's own suites (redb, packs, gRPC on 127.0.0.1). The others
          # use real Nix as their oracle, real FUSE mounts and root, which
          # the sandbox has not: scripts/test.sh runs them all, and
          # checks.<system>.vm runs the service and a builder in VMs.
          cargoTestFlags = [
            "--workspace"
            "--lib"
            "--bins"
          ]
          ++ lib.concatMap (t: [
            "--test"
            t
          ]) castoreTests;
          checkFlags = map (t: "--skip=${t}") needNix;

          meta = {
            description = "Lazy /nix/store for Nix builders: content-addressed, chunked, fetched on read";
            homepage = "https://github.com/lazystore/lazystore";
            license = [
              lib.licenses.mit
              lib.licenses.asl20
            ];
            mainProgram = "lazystore";
            platforms = lib.platforms.linux;
          };
        };

      # castore/tests/*.rs: pure Rust, loopback only.
      castoreTests = [
        "backends"
        "cache"
        "grpc_bounds"
        "grpc_concurrency"
        "grpc_restart"
        "grpc_round_trip"
        "grpc_shutdown"
        "grpc_verification"
        "quarantine"
        "redb"
      ];
      # Unit tests that run nix-store or nix to compare with.
      needNix = [
        "listing::tests::same_bytes_as_nix_writes"
        "nar::tests::nar_round_trips_nix_dump"
        "nar::tests::nar_writer_output_restores_with_nix"
      ];
    in
    {
      packages = forAllSystems (pkgs: rec {
        lazystore = lazystorePackage pkgs { doCheck = false; };
        default = lazystore;
      });

      nixosModules = {
        server =
          { lib, pkgs, ... }:
          {
            imports = [ ./nix/modules/server.nix ];
            services.lazystore.server.package =
              lib.mkDefault
                self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          };
        builder =
          { lib, pkgs, ... }:
          {
            imports = [ ./nix/modules/builder.nix ];
            services.lazystore.builder.package =
              lib.mkDefault
                self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          };
      };

      checks = forAllSystems (pkgs: {
        package = lazystorePackage pkgs { doCheck = true; };
        vm = import ./nix/tests/vm.nix { inherit pkgs self; };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          # What scripts/test.sh and the tests call: real Nix as the oracle,
          # fusermount3 for mounts, the compressions binary caches use.
          packages = [
            pkgs.clippy
            pkgs.rustfmt
            pkgs.rust-analyzer
            pkgs.nix
            pkgs.fuse3
            pkgs.xz
            pkgs.zstd
            pkgs.openssl
          ];
        };
      });
    };
}
