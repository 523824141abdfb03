# checks.<system>.vm: two NixOS machines, the central service and a builder.
#
# The server makes a store path no other machine has (from random bytes, so
# not even the host's store, which test VMs share, holds it), signs it into
# a binary cache, and imports it into `lazystore serve` over gRPC with a
# write token. The builder mounts the service lazily under an overlay at
# /nix/store, registers the path as valid and reads it, and an unmodified
# nix-build (sandboxed, as a build user) builds over it. The gc timer's
# unit collects while the service runs and keeps the path just used, and
# stopping the overlay leaves the builder's store and database as they
# were.
#
# Run with `nix build .#checks.x86_64-linux.vm` (needs KVM), or
# interactively with `nix run .#checks.x86_64-linux.vm.driverInteractive`.
{ pkgs, self }:
let
  # Test secrets in the store, world-readable: fine in a throwaway VM,
  # never on a real machine (docs/operations.md).
  writeToken = "vm-test-write-token-0123456789abcdef";
  readToken = "vm-test-read-token-fedcba9876543210";
  writeTokens = pkgs.writeText "write.tokens" "# the VM test's writers\n${writeToken}\n";
  readTokens = pkgs.writeText "read.tokens" "${readToken}\n";
  writeTokenFile = pkgs.writeText "write.token" "${writeToken}\n";
  readTokenFile = pkgs.writeText "read.token" "${readToken}\n";

  # A derivation reading one file of a path given by its store path: its
  # only input is that path (builtins.storePath), which must be valid.
  readsLazy = pkgs.writeText "reads-lazy.nix" ''
    { input }:
    derivation {
      name = "reads-lazy";
      system = builtins.currentSystem;
      builder = "/bin/sh";
      args = [ "-c" "read -r line < ''${builtins.storePath input}/greeting; echo \"$line\" > $out" ];
    }
  '';
in
pkgs.testers.runNixOSTest {
  name = "lazystore";

  nodes = {
    server =
      { pkgs, ... }:
      {
        imports = [ self.nixosModules.server ];
        services.lazystore.server = {
          enable = true;
          listen = "0.0.0.0:7000";
          httpListen = "0.0.0.0:8080";
          openFirewall = true;
          writeTokenFile = writeTokens;
          readTokenFile = readTokens;
          gc = {
            enable = true;
            tokenFile = writeTokenFile;
            keepSince = "90d";
          };
        };
        nix.settings.experimental-features = [ "nix-command" ];
        environment.systemPackages = [ pkgs.curl ];
      };

    builder =
      { lib, ... }:
      {
        imports = [ self.nixosModules.builder ];
        services.lazystore.builder = {
          enable = true;
          store = "grpc+http://server:7000";
          tokenFile = readTokenFile;
          cacheSize = "1G";
        };
        # No network beyond the test's: no substituters to wait for.
        nix.settings.substituters = lib.mkForce [ ];
      };
  };

  testScript = ''
    import shlex

    server.start()
    server.wait_for_unit("lazystore-server.service")
    server.wait_for_open_port(7000)
    server.wait_for_open_port(8080)

    with subtest("a path only the server has, imported into the service"):
        server.succeed("mkdir /tmp/payload && (head -c 30 /dev/urandom | base32 -w0; echo) > /tmp/payload/greeting")
        greeting = server.succeed("cat /tmp/payload/greeting")
        path = server.succeed("nix-store --add /tmp/payload").strip()
        base = path.removeprefix("/nix/store/")
        server.succeed("nix-store --generate-binary-cache-key vm-test-1 /root/cache.secret /root/cache.public")
        server.succeed(f"nix copy --to 'file:///var/cache/vm-test?secret-key=/root/cache.secret' {path}")
        server.succeed(
            "lazystore import --store grpc+http://127.0.0.1:7000"
            " --token-file ${writeTokenFile} --from file:///var/cache/vm-test"
            f" --trusted-public-key \"$(cat /root/cache.public)\" {path}"
        )
        # The binary cache serves it, to holders of a read token only.
        server.succeed(f"curl -fsS -H 'Authorization: Bearer ${readToken}' http://127.0.0.1:8080/{base[:32]}.narinfo")
        server.fail(f"curl -fsS http://127.0.0.1:8080/{base[:32]}.narinfo")

    with subtest("gc while serving keeps what was used within --keep-since"):
        server.succeed("systemctl start lazystore-gc.service")
        server.succeed(f"lazystore nix-db --store grpc+http://127.0.0.1:7000 --token-file ${readTokenFile} {path}")

    builder.start()
    # The /nix/store overlay is ours when this is its upper layer (the
    # test VM's store is an overlay of its own already).
    upper = "upperdir=/var/lib/lazystore-builder/store-upper"
    with subtest("the builder mounts the service under an overlay at /nix/store"):
        builder.wait_for_unit("lazystore-overlay.service")
        builder.succeed("test -e /var/lib/lazystore-builder/lazy/.lazystore/stats")
        builder.succeed(f"findmnt -n -o OPTIONS --mountpoint /nix/store | grep -q {upper}")
        builder.succeed(f"test ! -e /var/lib/lazystore-builder/host-store/{base}")

    with subtest("registered, the path is valid and reads through the mount"):
        builder.fail(f"nix-store --check-validity {path}")
        builder.succeed(f"lazystore-register {path}")
        builder.succeed(f"nix-store --check-validity {path}")
        assert builder.succeed(f"cat {path}/greeting") == greeting

    with subtest("an unmodified nix-build over the lazy path"):
        out = builder.succeed(
            f"nix-build --no-out-link ${readsLazy} --argstr input {shlex.quote(path)}"
        ).strip()
        assert builder.succeed(f"cat {out}").strip() == greeting.strip()
        stats = builder.succeed("cat /var/lib/lazystore-builder/lazy/.lazystore/stats")
        print(stats)
        fetched = dict(line.split(" ", 1) for line in stats.splitlines())
        assert int(fetched["chunks_fetched"]) > 0, stats

    with subtest("stopping the overlay leaves the machine's store and database as before"):
        builder.succeed("systemctl stop lazystore-overlay.service")
        builder.fail(f"test -e {path}")
        builder.fail(f"nix-store --check-validity {path}")
        builder.fail(f"findmnt -n -o OPTIONS --mountpoint /nix/store | grep -q {upper}")
        builder.succeed("systemctl is-active lazystore-mount.service")

    with subtest("a new session starts empty"):
        builder.succeed("systemctl start lazystore-overlay.service")
        builder.fail(f"nix-store --check-validity {path}")
        builder.succeed(f"lazystore-register {path}")
        assert builder.succeed(f"cat {path}/greeting") == greeting
  '';
}
