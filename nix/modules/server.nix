# The central lazystore service: `lazystore serve` (gRPC for importers and
# builders, and the store as a Nix binary cache over HTTP), and an optional
# timer collecting its garbage while it serves. docs/operations.md is the
# operator's guide; `lazystore serve --help` describes every flag used here.
#
# Secrets (token files, keys, the TLS key) are read by systemd as root and
# handed to the service as credentials (LoadCredential=): give their paths
# outside the Nix store, readable by root only.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    mkMerge
    types
    optional
    optionals
    concatMap
    ;

  cfg = config.services.lazystore.server;
  execLine = import ./exec-line.nix { inherit lib; };
  inherit (execLine) arg credential;

  # Credentials the service is given, by name: `name:path` for LoadCredential.
  credentials = lib.filterAttrs (_: path: path != null) {
    signing-key = cfg.signingKeyFile;
    sign-with = cfg.signWithKeyFile;
    write-tokens = cfg.writeTokenFile;
    read-tokens = cfg.readTokenFile;
    "tls-cert.pem" = cfg.tls.certFile;
    "tls-key.pem" = cfg.tls.keyFile;
  };
  loadCredentials = lib.mapAttrsToList (name: path: "${name}:${path}") credentials;

  flag = name: value: [
    name
    (arg value)
  ];
  flagIf = cond: name: value: optionals cond (flag name value);
  credentialFlag =
    name: file:
    optionals (credentials ? ${file}) [
      name
      (credential file)
    ];

  serveArgs =
    flag "--store" cfg.store
    ++ flagIf (cfg.listen != null) "--listen" cfg.listen
    ++ flagIf (cfg.httpListen != null) "--http-listen" cfg.httpListen
    ++ concatMap (flag "--upstream") cfg.upstreams
    ++ concatMap (flag "--trusted-public-key") cfg.trustedPublicKeys
    ++ credentialFlag "--signing-key" "signing-key"
    ++ credentialFlag "--sign-with" "sign-with"
    ++ credentialFlag "--write-token-file" "write-tokens"
    ++ credentialFlag "--read-token-file" "read-tokens"
    ++ credentialFlag "--tls-cert" "tls-cert.pem"
    ++ credentialFlag "--tls-key" "tls-key.pem"
    ++ optional cfg.allowUpload "--allow-upload"
    ++ flagIf (cfg.gc.lease != null) "--gc-lease" cfg.gc.lease
    ++ map arg cfg.extraArgs;

  tls = cfg.tls.certFile != null;

  # HOST:PORT of a TCP listener, or null for a Unix socket (unix:/PATH).
  tcp =
    addr:
    let
      m = builtins.match "(.*):([0-9]+)" addr;
    in
    if addr == null || lib.hasPrefix "unix:" addr || m == null then
      null
    else
      {
        host = builtins.head m;
        port = lib.toInt (builtins.elemAt m 1);
      };
  grpcTcp = tcp cfg.listen;
  ports = lib.concatMap (a: optional (tcp a != null) (tcp a).port) [
    cfg.listen
    cfg.httpListen
  ];

  # Where the gc timer finds the gRPC listener: the same machine.
  derivedGcStore =
    if cfg.listen == null then
      null
    else if lib.hasPrefix "unix:" cfg.listen then
      "grpc+unix://${lib.removePrefix "unix:" cfg.listen}"
    else if grpcTcp == null then
      null
    else
      let
        local =
          {
            "0.0.0.0" = "127.0.0.1";
            "[::]" = "[::1]";
            "" = "127.0.0.1";
          }
          .${grpcTcp.host} or grpcTcp.host;
      in
      "grpc+${if tls then "https" else "http"}://${local}:${toString grpcTcp.port}";
  gcStore = if cfg.gc.store != null then cfg.gc.store else derivedGcStore;

  gcCredentials = lib.filterAttrs (_: path: path != null) {
    token = cfg.gc.tokenFile;
    "ca.pem" = cfg.gc.caFile;
  };
  gcArgs =
    flag "--store" gcStore
    ++ optionals (gcCredentials ? token) [
      "--token-file"
      (credential "token")
    ]
    ++ optionals (gcCredentials ? "ca.pem") [
      "--ca-file"
      (credential "ca.pem")
    ]
    ++ flagIf (cfg.gc.keepSince != null) "--keep-since" cfg.gc.keepSince
    ++ concatMap (flag "--keep-closure-of") cfg.gc.keepClosureOf
    ++ flagIf (cfg.gc.rootsFile != null) "--roots" cfg.gc.rootsFile
    ++ map arg cfg.gc.extraArgs;

  stateDir = "/var/lib/lazystore";

  # What both units share: no privileges, no devices, a read-only system.
  hardening = {
    NoNewPrivileges = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    SystemCallErrorNumber = "EPERM";
    UMask = "0077";
  };
in
{
  options.services.lazystore.server = {
    enable = mkEnableOption "the central lazystore service (`lazystore serve`)";

    package = mkOption {
      type = types.package;
      description = "The lazystore package; the flake's `nixosModules.server` sets its own.";
    };

    store = mkOption {
      type = types.str;
      default = "redb://${stateDir}/store.redb";
      example = "s3://lazystore/main?endpoint=https://s3.example.org&region=garage";
      description = ''
        The store served (`--store`): the embedded redb store in the state
        directory (`${stateDir}`, its chunk bytes in `store.packs/` beside
        it), or any store URL the package understands, such as an
        S3-compatible object store (`s3://bucket/prefix?endpoint=…&region=…`)
        with its AWS credentials in {option}`environmentFile`.
      '';
    };

    listen = mkOption {
      type = types.nullOr types.str;
      default = "0.0.0.0:7000";
      example = "unix:/run/lazystore/grpc.sock";
      description = ''
        Where to serve gRPC (`--listen`): HOST:PORT, or `unix:/PATH` (a socket
        under `/run/lazystore`, the unit's runtime directory). Builders and
        importers use `grpc+http://HOST:PORT` (`grpc+https://` with
        {option}`tls`). `null`: no gRPC, only the binary cache.
      '';
    };

    httpListen = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "0.0.0.0:8080";
      description = "Where to serve the store as a Nix binary cache over HTTP (`--http-listen`), if at all.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the TCP ports of {option}`listen` and {option}`httpListen` in the firewall.";
    };

    upstreams = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "https://cache.nixos.org" ];
      description = ''
        Binary caches a lookup of a path the store lacks imports it from, with
        its closure (`--upstream`, in order): a pull-through service.
      '';
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      description = ''
        Keys whose signatures are trusted (`--trusted-public-key`). Given, the
        service publishes only what one of them signed, over a tree it hashed
        itself (docs/security.md); with none, upstream narinfos need
        cache.nixos.org's signature and writers are trusted.
      '';
    };

    signingKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/keys/lazystore-cache.secret";
      description = ''
        Nix secret key (`nix-store --generate-binary-cache-key`) signing every
        narinfo served over HTTP (`--signing-key`). Needs {option}`httpListen`.
      '';
    };

    signWithKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = ''
        Nix secret key signing paths written with no signature at all
        (`--sign-with`): writers are then trusted to build (docs/security.md).
      '';
    };

    writeTokenFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/keys/lazystore-write.tokens";
      description = ''
        Tokens, one a line, every write needs one of (`--write-token-file`).
        Read at startup: after changing it, restart the service.
      '';
    };

    readTokenFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/keys/lazystore-read.tokens";
      description = ''
        Tokens, one a line, every read needs one of (or a write token;
        `--read-token-file`). Read at startup: after changing it, restart.
      '';
    };

    allowUpload = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Accept `nix copy --to` uploads over HTTP (`--allow-upload`) from
        holders of a write token. Needs {option}`httpListen` and
        {option}`writeTokenFile`.
      '';
    };

    tls = {
      certFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "PEM certificate (chain) served on both listeners (`--tls-cert`).";
      };
      keyFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "PEM private key of {option}`tls.certFile` (`--tls-key`).";
      };
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/keys/lazystore-s3.env";
      description = ''
        Environment file (systemd's EnvironmentFile=) for the service, such as
        `AWS_ACCESS_KEY_ID=…` and `AWS_SECRET_ACCESS_KEY=…` for an `s3://`
        {option}`store`, or `RUST_LOG=info`.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "--max-upload-size"
        "8589934592"
        "--nar-compression"
        "zstd"
      ];
      description = "More `lazystore serve` arguments.";
    };

    user = mkOption {
      type = types.str;
      default = "lazystore";
      description = ''
        User the service runs as, owner of ${stateDir}. Created when left at
        `lazystore`. Run offline commands on the store as this user
        (`runuser -u lazystore -- lazystore gc --store redb://${stateDir}/store.redb`).
      '';
    };

    group = mkOption {
      type = types.str;
      default = "lazystore";
      description = "Group the service runs as.";
    };

    gc = {
      enable = mkEnableOption "a timer collecting the store's garbage while it is served (`lazystore gc --store grpc+…`)";

      dates = mkOption {
        type = types.str;
        default = "weekly";
        example = "*-*-* 03:00:00";
        description = "When to collect (systemd's OnCalendar=).";
      };

      randomizedDelaySec = mkOption {
        type = types.str;
        default = "1h";
        description = "Random delay added to {option}`gc.dates` (RandomizedDelaySec=).";
      };

      keepSince = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "90d";
        description = ''
          Keep the paths used (asked for by a builder or Nix client, or
          published) within this long (`--keep-since`), and delete the others
          with what only they reach. `null`, with no other rule: delete no
          path, only drop what no published path reaches.
        '';
      };

      keepClosureOf = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Store paths kept, with their closures, whatever their last use (`--keep-closure-of`).";
      };

      rootsFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "File listing more store paths to keep, one a line (`--roots`).";
      };

      tokenFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/run/keys/lazystore-gc.token";
        description = ''
          File holding one write token (one of {option}`writeTokenFile`'s):
          collecting is a write. Needed when the service has tokens.
        '';
      };

      caFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "CA certificate(s) to trust for the service's TLS certificate (`--ca-file`).";
      };

      store = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "grpc+https://lazystore.example.org:7000";
        description = ''
          The service's gRPC URL for `lazystore gc`. `null`: the
          {option}`listen` address on this machine (`grpc+http://127.0.0.1:7000`
          for `0.0.0.0:7000`). With {option}`tls`, give a name the certificate
          holds.
        '';
      };

      lease = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "2h";
        description = ''
          How long a writer's touch keeps an object from a collection
          (`serve --gc-lease`; the binary's default, 1h, when `null`). Raise it
          if uploads take longer between their first question and their
          PathInfo.
        '';
      };

      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "More `lazystore gc` arguments.";
      };
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = cfg.listen != null || cfg.httpListen != null;
          message = "services.lazystore.server: set listen or httpListen (or both).";
        }
        {
          assertion = (cfg.tls.certFile == null) == (cfg.tls.keyFile == null);
          message = "services.lazystore.server: tls.certFile and tls.keyFile go together.";
        }
        {
          assertion = !(tls && cfg.listen != null && lib.hasPrefix "unix:" cfg.listen);
          message = "services.lazystore.server: TLS is for TCP listeners; a unix: listen socket is guarded by its permissions.";
        }
        {
          assertion = cfg.allowUpload -> (cfg.httpListen != null && cfg.writeTokenFile != null);
          message = "services.lazystore.server: allowUpload needs httpListen and writeTokenFile.";
        }
        {
          assertion = cfg.signingKeyFile != null -> cfg.httpListen != null;
          message = "services.lazystore.server: signingKeyFile signs narinfos served over HTTP: set httpListen.";
        }
      ];

      users.users = mkIf (cfg.user == "lazystore") {
        lazystore = {
          isSystemUser = true;
          group = cfg.group;
          home = stateDir;
          description = "lazystore service";
        };
      };
      users.groups = mkIf (cfg.group == "lazystore") { lazystore = { }; };

      networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall ports;

      environment.systemPackages = [ cfg.package ];

      systemd.services.lazystore-server = {
        description = "lazystore: the central store over gRPC and HTTP";
        documentation = [ "https://github.com/lazystore/lazystore/blob/main/docs/operations.md" ];
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        # Where a command given no --store looks (the default store).
        environment.LAZYSTORE_DIR = stateDir;
        serviceConfig = hardening // {
          ExecStart = execLine.command "${cfg.package}/bin/lazystore" ([ "serve" ] ++ serveArgs);
          User = cfg.user;
          Group = cfg.group;
          StateDirectory = "lazystore";
          StateDirectoryMode = "0700";
          RuntimeDirectory = "lazystore";
          RuntimeDirectoryMode = "0750";
          LoadCredential = loadCredentials;
          EnvironmentFile = optional (cfg.environmentFile != null) cfg.environmentFile;
          # SIGTERM: stop accepting, let calls in flight finish, exit 0.
          KillSignal = "SIGTERM";
          TimeoutStopSec = "2min";
          Restart = "on-failure";
          RestartSec = "5s";
          # Up to 1024 gRPC connections, the HTTP ones, the pack files.
          LimitNOFILE = 65536;
        };
      };
    }

    (mkIf cfg.gc.enable {
      assertions = [
        {
          assertion = gcStore != null;
          message = "services.lazystore.server.gc: collecting needs the gRPC listener (listen) or gc.store.";
        }
        {
          assertion = (cfg.writeTokenFile != null || cfg.readTokenFile != null) -> cfg.gc.tokenFile != null;
          message = "services.lazystore.server.gc: the service has tokens: set gc.tokenFile to a file holding one write token.";
        }
        {
          assertion = tls -> cfg.gc.store != null;
          message = "services.lazystore.server.gc: with TLS, set gc.store to a grpc+https:// URL naming a host the certificate holds.";
        }
      ];

      systemd.services.lazystore-gc = {
        description = "lazystore: collect the served store's garbage";
        documentation = [ "https://github.com/lazystore/lazystore/blob/main/docs/operations.md" ];
        wants = [ "lazystore-server.service" ];
        after = [ "lazystore-server.service" ];
        serviceConfig = hardening // {
          Type = "oneshot";
          ExecStart = execLine.command "${cfg.package}/bin/lazystore" ([ "gc" ] ++ gcArgs);
          # The server's user: it may connect to a unix: listener.
          User = cfg.user;
          Group = cfg.group;
          LoadCredential = lib.mapAttrsToList (name: path: "${name}:${path}") gcCredentials;
        };
      };

      systemd.timers.lazystore-gc = {
        description = "lazystore: collect the served store's garbage";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnCalendar = cfg.gc.dates;
          RandomizedDelaySec = cfg.gc.randomizedDelaySec;
          Persistent = true;
        };
      };
    })
  ]);
}
