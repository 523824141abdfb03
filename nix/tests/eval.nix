# What tests/flake.rs reads: the flake and the NixOS modules evaluated with
# nix/tests/stub.nix, for sample configurations, as plain data (JSON).
#
#   nix-instantiate --eval --strict --json nix/tests/eval.nix -A results
#
# The arguments point the samples at real things for the test that runs the
# units' commands on this machine; their defaults are placeholders.
{
  # Out path of a lazystore package (with bin/lazystore).
  lazystore ? "/nix/store/00000000000000000000000000000000-lazystore-test",
  # Store paths of the tools the units run (coreutils, util-linux, fuse3,
  # nix), when they are to be this machine's (e.g. "/usr").
  tools ? null,
  # Where the samples' secrets are.
  secrets ? "/run/keys",
  # The sample service's store (null: the module's default).
  serverStore ? null,
  # Paths the sample gc keeps (they must be published: gc refuses else).
  keepClosureOf ? [ "/nix/store/00000000000000000000000000000000-pinned" ],
  # The sample service's listeners.
  listenHost ? "0.0.0.0",
  port ? 7000,
  httpPort ? 8080,
  # Whether the sample service serves TLS (certificate and key in
  # `secrets`, for 127.0.0.1), with the gc and the builder trusting its CA.
  withTls ? false,
  # Upstream caches and trusted keys of the samples (server and builder).
  upstreams ? [ "https://cache.example.org/with%20space" ],
  trustedPublicKeys ? [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ],
  # The builder sample's state directory and the paths it registers.
  builderState ? "/var/lib/lazystore-builder",
  registerPaths ? [ "/nix/store/00000000000000000000000000000000-toolchain" ],
}:
let
  stub = import ./stub.nix {
    # Scripts as real files (builtins.toFile) when the commands are to run.
    realScripts = tools != null;
    outPaths =
      if tools == null then
        { }
      else
        {
          coreutils = tools;
          util-linux = tools;
          fuse3 = tools;
          nix = tools;
        };
  };
  inherit (stub) lib pkgs;

  package = {
    type = "derivation";
    name = "lazystore-test";
    outPath = lazystore;
  };

  # What the modules read of the rest of a NixOS system.
  environment = {
    nix.package = pkgs.nix;
    nix.optimise.automatic = false;
    system.autoUpgrade.enable = false;
  };

  eval =
    module: config:
    lib.evalModule {
      inherit module pkgs environment;
      config = lib.recursiveUpdate { services.lazystore = config; } { };
    };
  server = settings: eval ../modules/server.nix { server = { inherit package; } // settings; };
  builder = settings: eval ../modules/builder.nix { builder = { inherit package; } // settings; };

  # A unit as the tests read it: its command lines and credentials.
  unit =
    s:
    let
      sc = s.serviceConfig or { };
      list = v: if v == null then [ ] else if builtins.isList v then v else [ v ];
    in
    {
      execStart = sc.ExecStart or null;
      execStartPre = list (sc.ExecStartPre or null);
      execStartPost = list (sc.ExecStartPost or null);
      execStopPost = list (sc.ExecStopPost or null);
      loadCredential = sc.LoadCredential or [ ];
      environmentFile = sc.EnvironmentFile or [ ];
      script = s.script or null;
      scriptArgs = s.scriptArgs or null;
      path = map toString (s.path or [ ]);
      environment = s.environment or { };
      wantedBy = s.wantedBy or [ ];
      bindsTo = s.bindsTo or [ ];
      after = s.after or [ ];
      # Every other setting, as text (hardening and the like).
      settings = builtins.mapAttrs (_: v: if builtins.isList v then map toString v else toString v) (
        removeAttrs sc [
          "ExecStart"
          "ExecStartPre"
          "ExecStartPost"
          "ExecStopPost"
          "LoadCredential"
          "EnvironmentFile"
        ]
      );
    };

  # What a system evaluation made, for the tests.
  report =
    e:
    let
      c = e.config;
    in
    {
      services = builtins.mapAttrs (_: unit) (c.systemd.services or { });
      timers = builtins.mapAttrs (_: t: t.timerConfig // { wantedBy = t.wantedBy or [ ]; }) (
        c.systemd.timers or { }
      );
      firewallPorts = c.networking.firewall.allowedTCPPorts or [ ];
      users = builtins.attrNames (c.users.users or { });
      # Commands installed, as { name, path, text } (writeShellScriptBin).
      commands = map (p: {
        inherit (p) name text;
        path = toString p;
      }) (builtins.filter (p: p.bin or false) (c.environment.systemPackages or [ ]));
      tmpfiles = c.systemd.tmpfiles.rules or [ ];
      assertions = e.failedAssertions;
      inherit (e) warnings;
    };
  fullServer = server (
    {
      enable = true;
      listen = "${listenHost}:${toString port}";
      httpListen = "${listenHost}:${toString httpPort}";
      openFirewall = true;
      inherit upstreams trustedPublicKeys;
      signingKeyFile = "${secrets}/cache.secret";
      writeTokenFile = "${secrets}/write.tokens";
      readTokenFile = "${secrets}/read.tokens";
      allowUpload = true;
      tls = lib.optionalAttrs withTls {
        certFile = "${secrets}/cert.pem";
        keyFile = "${secrets}/key.pem";
      };
      extraArgs = [
        "--max-upload-size"
        "8589934592"
      ];
      gc = {
        enable = true;
        keepSince = "90d";
        inherit keepClosureOf;
        tokenFile = "${secrets}/gc.token";
        lease = "2h";
      }
      // lib.optionalAttrs withTls {
        store = "grpc+https://127.0.0.1:${toString port}";
        caFile = "${secrets}/ca.pem";
      };
    }
    // lib.optionalAttrs (serverStore != null) { store = serverStore; }
  );

  s3Server = server {
    enable = true;
    store = "s3://lazystore/main?endpoint=https://s3.example.org&region=garage";
    environmentFile = "${secrets}/s3.env";
    listen = "unix:/run/lazystore/grpc.sock";
    gc.enable = true;
  };

  tlsServer = server {
    enable = true;
    listen = "[::]:7443";
    tls.certFile = "${secrets}/cert.pem";
    tls.keyFile = "${secrets}/key.pem";
    writeTokenFile = "${secrets}/write.tokens";
    gc = {
      enable = true;
      tokenFile = "${secrets}/gc.token";
      store = "grpc+https://lazystore.example.org:7443";
      caFile = "${secrets}/ca.pem";
    };
  };

  fullBuilder = builder {
    enable = true;
    store = "grpc+${if withTls then "https" else "http"}://127.0.0.1:${toString port}";
    tokenFile = "${secrets}/builder.token";
    caFile = "${secrets}/ca.pem";
    cacheSize = "20G";
    stateDir = builderState;
    inherit upstreams trustedPublicKeys registerPaths;
  };

  # The flake's outputs over a stub nixpkgs.
  flake = import ../../flake.nix;
  outputs = flake.outputs {
    self = outputs // {
      outPath = ../..;
    };
    inherit (stub) nixpkgs;
  };
  pkg = outputs.packages.x86_64-linux.default;
  checkPkg = outputs.checks.x86_64-linux.package;
  vm = outputs.checks.x86_64-linux.vm;
  viaFlake = lib.evalModule {
    module = outputs.nixosModules.server;
    inherit environment;
    pkgs = stub.pkgsFor "x86_64-linux";
    config.services.lazystore.server.enable = true;
  };
in
{
  results = {
    server = report fullServer;
    s3Server = report s3Server;
    tlsServer = report tlsServer;
    builder = report fullBuilder;
    builderNoOverlay = report (builder {
      enable = true;
      store = "grpc+http://central:7000";
      overlay = false;
    });
    disabled = report (server { });

    # Configurations the modules refuse, with the messages why.
    refused = {
      uploadWithoutTokens =
        (server {
          enable = true;
          httpListen = "0.0.0.0:8080";
          allowUpload = true;
        }).failedAssertions;
      certWithoutKey =
        (server {
          enable = true;
          tls.certFile = "/k/cert.pem";
        }).failedAssertions;
      noListener =
        (server {
          enable = true;
          listen = null;
        }).failedAssertions;
      gcWithoutToken =
        (server {
          enable = true;
          readTokenFile = "/k/read.tokens";
          gc.enable = true;
        }).failedAssertions;
      gcOverTlsWithoutStore =
        (server {
          enable = true;
          tls.certFile = "/k/cert.pem";
          tls.keyFile = "/k/key.pem";
          gc.enable = true;
        }).failedAssertions;
      signingWithoutHttp =
        (server {
          enable = true;
          signingKeyFile = "/k/cache.secret";
        }).failedAssertions;
      stateDirWithComma =
        (builder {
          enable = true;
          store = "grpc+http://central:7000";
          stateDir = "/var/lib/a,b";
        }).failedAssertions;
    };

    flake = {
      inherit (pkg) pname version;
      lockFile = toString pkg.args.cargoLock.lockFile;
      lockFileIsCargoLock = pkg.args.cargoLock.lockFile == ../../Cargo.lock;
      src = map toString pkg.args.src.files;
      srcRoot = toString pkg.args.src.root;
      doCheck = pkg.args.doCheck;
      checkDoCheck = checkPkg.args.doCheck;
      cargoTestFlags = checkPkg.args.cargoTestFlags;
      checkFlags = checkPkg.args.checkFlags;
      mainProgram = pkg.args.meta.mainProgram;
      packages = builtins.mapAttrs (_: builtins.attrNames) outputs.packages;
      checks = builtins.mapAttrs (_: builtins.attrNames) outputs.checks;
      devShells = builtins.mapAttrs (_: builtins.attrNames) outputs.devShells;
      nixosModules = builtins.attrNames outputs.nixosModules;
      vm = {
        inherit (vm.args) name;
        nodes = builtins.attrNames vm.args.nodes;
        testScript = vm.args.testScript;
      };
      # The flake's module brings the flake's package.
      moduleExecStart = viaFlake.config.systemd.services.lazystore-server.serviceConfig.ExecStart;
      packageOutPath = toString pkg;
    };
  };

  # A value of the wrong type: evaluation fails naming the option.
  typeError = (server {
    enable = true;
    listen = 7000;
  }).options.services.lazystore.server.listen;

  # A misspelt option: evaluation fails naming it.
  undeclared = (server {
    enable = true;
    listenn = "0.0.0.0:7000";
  }).options.services.lazystore.server.enable;
}
