# A Nix builder over the central lazystore service: docs/builders.md's
# procedure as three systemd units.
#
#   lazystore-mount.service     step 1: `lazystore mount` of the service on
#                               STATE/lazy, with a bounded local chunk cache
#   lazystore-overlay.service   steps 2-4: /nix/store and /nix/var/nix/db
#                               become overlays over the machine's own and
#                               (the store) the mount; stopping it undoes them
#   lazystore-register.service  step 5: the closures of `registerPaths` made
#                               valid (`lazystore nix-db | nix-store --load-db`)
#
# `lazystore-register PATH…` registers more closures by hand. Everything
# written to the store or Nix's database while the overlay is up (build
# outputs, registrations) is in its upper layers and is gone when it stops
# or the machine reboots, so the machine's own store and database are as
# before: copy results off first (`nix copy --to …`).
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
    types
    optional
    optionals
    concatMap
    ;

  cfg = config.services.lazystore.builder;
  execLine = import ./exec-line.nix { inherit lib; };
  inherit (execLine) arg credential;

  state = cfg.stateDir;
  lazy = "${state}/lazy";

  credentials = lib.filterAttrs (_: path: path != null) {
    token = cfg.tokenFile;
    "ca.pem" = cfg.caFile;
  };
  loadCredentials = lib.mapAttrsToList (name: path: "${name}:${path}") credentials;

  flag = name: value: [
    name
    (arg value)
  ];

  # --upstream and --trusted-public-key, for the mount and nix-db alike.
  substituterArgs =
    concatMap (flag "--upstream") cfg.upstreams
    ++ concatMap (flag "--trusted-public-key") cfg.trustedPublicKeys;

  mountArgs = [
    "mount"
    (arg lazy)
  ]
  ++ flag "--store" cfg.store
  ++ flag "--cache" "redb://${state}/cache.redb"
  ++ flag "--cache-size" cfg.cacheSize
  # Build users may read STATE/lazy directly too, as they read the store.
  ++ [ "--allow-other" ]
  ++ optional cfg.listRoot "--list-root"
  ++ optionals (credentials ? token) [
    "--token-file"
    (credential "token")
  ]
  ++ optionals (credentials ? "ca.pem") [
    "--ca-file"
    (credential "ca.pem")
  ]
  ++ substituterArgs
  ++ map arg cfg.extraMountArgs;

  # `lazystore nix-db … PATH… | nix-store --load-db`, in shell: nothing is
  # registered unless every record was printed. `secrets` are the shell
  # words of --token-file and --ca-file.
  registerScript = secrets: ''
    set -euo pipefail
    if [ "$#" -eq 0 ]; then
      echo "usage: lazystore-register PATH..." >&2
      exit 2
    fi
    records=$(mktemp)
    trap 'rm -f "$records"' EXIT
    ${cfg.package}/bin/lazystore nix-db --store ${lib.escapeShellArg cfg.store} ${secrets} ${lib.escapeShellArgs substituterWords} -- "$@" >"$records"
    ${config.nix.package}/bin/nix-store --load-db <"$records"
    echo "lazystore-register: the closures of $# path(s) are valid until lazystore-overlay.service stops" >&2
  '';
  substituterWords =
    concatMap (u: [
      "--upstream"
      u
    ]) cfg.upstreams
    ++ concatMap (k: [
      "--trusted-public-key"
      k
    ]) cfg.trustedPublicKeys;

  # The command for the administrator: the units' settings, the secrets
  # read where they are (it runs as root).
  registerCommand = pkgs.writeShellScriptBin "lazystore-register" (
    registerScript (
      lib.escapeShellArgs (
        optionals (cfg.tokenFile != null) [
          "--token-file"
          "${cfg.tokenFile}"
        ]
        ++ optionals (cfg.caFile != null) [
          "--ca-file"
          "${cfg.caFile}"
        ]
      )
    )
  );

  overlayScript = pkgs.writeShellScript "lazystore-overlay" (builtins.readFile ./lazystore-overlay.sh);

  # The mount prints its mountpoint once ready; this waits for the same, so
  # that units after it find the mount serving.
  waitForMount = pkgs.writeShellScript "lazystore-mount-wait" ''
    for _ in $(seq 600); do
      [ -e "$1/.lazystore/stats" ] && exit 0
      sleep 0.1
    done
    echo "lazystore mount on $1 not ready after 60 s" >&2
    exit 1
  '';

  stateDirPlain = builtins.match "/[A-Za-z0-9_./-]+" state != null;
in
{
  options.services.lazystore.builder = {
    enable = mkEnableOption "lazily fetched inputs for this machine's Nix builds (`lazystore mount`, an overlay at /nix/store)";

    package = mkOption {
      type = types.package;
      description = "The lazystore package; the flake's `nixosModules.builder` sets its own.";
    };

    store = mkOption {
      type = types.str;
      example = "grpc+https://lazystore.example.org:7000";
      description = "The central service (`--store`): `grpc+http://HOST:PORT`, `grpc+https://HOST:PORT` or `grpc+unix:///PATH`.";
    };

    tokenFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/keys/lazystore-builder.token";
      description = ''
        File holding the one token the service wants (a read token;
        `--token-file`). Read when the mount starts: restart
        `lazystore-mount.service` after changing it.
      '';
    };

    caFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "CA certificate(s) to trust for a `grpc+https://` service (`--ca-file`).";
    };

    cacheSize = mkOption {
      type = types.str;
      default = "10G";
      example = "50G";
      description = ''
        Most bytes the local chunk cache (`STATE/cache.redb`,
        `STATE/cache.packs/`, `STATE/cache.files/`) keeps (`--cache-size`;
        suffixes K, M, G, T). It outlives sessions: it is content-addressed.
      '';
    };

    stateDir = mkOption {
      type = types.str;
      default = "/var/lib/lazystore-builder";
      description = ''
        Where the mount, the chunk cache and the overlays' upper layers live:
        an absolute path without `,`, `:` or spaces (overlayfs option syntax),
        on a file system that can be an overlay's upper layer (ext4, xfs,
        btrfs, tmpfs; not another overlay or NFS).
      '';
    };

    upstreams = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "https://cache.nixos.org" ];
      description = ''
        Binary caches paths the service lacks are substituted from, lazily, by
        the mount and by registration alike (`--upstream`, in order).
      '';
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = ''
        Keys trusted for upstream narinfos and, given, required of the
        service's own paths (`--trusted-public-key`, for the mount and
        `nix-db`). None: upstream narinfos need cache.nixos.org's signature.
      '';
    };

    listRoot = mkOption {
      type = types.bool;
      default = true;
      description = ''
        List the service's paths in a listing of /nix/store (`--list-root`),
        as Nix's garbage collector and `ls` expect. Each listing then costs a
        listing of every PathInfo of the service.
      '';
    };

    overlay = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Make /nix/store and Nix's database overlays over the mount
        (`lazystore-overlay.service`). Off: only the mount, on `STATE/lazy`.
      '';
    };

    registerPaths = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "/nix/store/…-toolchain" ];
      description = ''
        Store paths whose closures are registered as valid whenever the
        overlay comes up (`lazystore-register.service`); more by hand with
        `lazystore-register PATH…`.
      '';
    };

    extraMountArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "--retry-deadline"
        "60"
      ];
      description = "More `lazystore mount` arguments.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = stateDirPlain;
        message = "services.lazystore.builder.stateDir must be an absolute path of letters, digits and _ . / - (overlayfs splits its options on , and :), not ${state}.";
      }
      {
        assertion = cfg.registerPaths != [ ] -> cfg.overlay;
        message = "services.lazystore.builder.registerPaths registers paths in the overlay's database: keep overlay on.";
      }
    ];

    warnings =
      optional (cfg.overlay && config.nix.optimise.automatic) ''
        services.lazystore.builder: nix.optimise.automatic reads every valid path, so the
        lazily mounted ones whole: it fetches whole closures from the service.
      ''
      ++ optional (cfg.overlay && config.system.autoUpgrade.enable) ''
        services.lazystore.builder: system.autoUpgrade builds the new system while the
        /nix/store overlay is up, into its upper layer, which is emptied when the
        overlay stops: the generation it boots would be missing. Upgrade with
        lazystore-overlay.service stopped.
      '';

    environment.systemPackages = [ cfg.package ] ++ optional cfg.overlay registerCommand;

    systemd.tmpfiles.rules = [ "d ${state} 0755 root root -" ];

    systemd.services.lazystore-mount = {
      description = "lazystore: the central store mounted lazily on ${lazy}";
      documentation = [ "https://github.com/lazystore/lazystore/blob/main/docs/builders.md" ];
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      path = [ pkgs.fuse3 ];
      # Keep trying while the service is away (at boot, say).
      unitConfig.StartLimitIntervalSec = 0;
      # A restart would pull the store from under running builds.
      restartIfChanged = false;
      serviceConfig = {
        ExecStartPre = [
          # What a crashed mount left: a dead FUSE mountpoint.
          "-${pkgs.util-linux}/bin/umount --quiet --lazy ${lazy}"
          "${pkgs.coreutils}/bin/mkdir -p ${lazy}"
        ];
        ExecStart = execLine.command "${cfg.package}/bin/lazystore" mountArgs;
        ExecStartPost = "${waitForMount} ${lazy}";
        LoadCredential = loadCredentials;
        # SIGTERM: the mount unmounts itself and prints its counters.
        KillSignal = "SIGTERM";
        Restart = "on-failure";
        RestartSec = "5s";
        # The mount must be made in the machine's mount namespace, for the
        # overlay and every process to see it: nothing here may give the
        # unit a namespace of its own (PrivateTmp=, ProtectSystem=,
        # ProtectHome=, PrivateDevices=, ProtectKernel*=, ReadWritePaths=,
        # …). What remains is what needs none.
        NoNewPrivileges = true;
        CapabilityBoundingSet = [ "CAP_SYS_ADMIN" ];
        DeviceAllow = [ "/dev/fuse rw" ];
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
          "@mount"
        ];
        SystemCallErrorNumber = "EPERM";
      };
    };

    systemd.services.lazystore-overlay = mkIf cfg.overlay {
      description = "lazystore: /nix/store and Nix's database as overlays over ${lazy}";
      documentation = [ "https://github.com/lazystore/lazystore/blob/main/docs/builders.md" ];
      # Up whenever the mount is, and down (then up again) with it: an
      # overlay over a mount that went away shows nothing.
      wantedBy = [
        "multi-user.target"
        "lazystore-mount.service"
      ];
      bindsTo = [ "lazystore-mount.service" ];
      after = [ "lazystore-mount.service" ];
      # Builds started before would keep the store they opened.
      before = [ "nix-daemon.service" ];
      path = [
        pkgs.util-linux
        pkgs.coreutils
      ];
      restartIfChanged = false;
      # Root, unconfined: it mounts over /nix/store and /nix/var/nix/db in
      # the machine's mount namespace.
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${overlayScript} setup ${state}";
        # After a stop, and after a setup that failed half way.
        ExecStopPost = "${overlayScript} teardown ${state}";
      };
    };

    systemd.services.lazystore-register = mkIf (cfg.overlay && cfg.registerPaths != [ ]) {
      description = "lazystore: register the closures of the wanted paths as valid";
      wantedBy = [ "lazystore-overlay.service" ];
      bindsTo = [ "lazystore-overlay.service" ];
      after = [ "lazystore-overlay.service" ];
      restartIfChanged = false;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        LoadCredential = loadCredentials;
      };
      scriptArgs = lib.escapeShellArgs cfg.registerPaths;
      script = registerScript (
        lib.optionalString (credentials ? token) ''--token-file "$CREDENTIALS_DIRECTORY/token" ''
        + lib.optionalString (credentials ? "ca.pem") ''--ca-file "$CREDENTIALS_DIRECTORY/ca.pem"''
      );
    };
  };
}
