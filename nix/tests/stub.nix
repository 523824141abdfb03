# A minimal stand-in for nixpkgs' `lib`, a `pkgs` and the NixOS module
# system, so that tests/flake.rs can evaluate the flake and the NixOS
# modules with plain `nix-instantiate` and no nixpkgs (none is here).
#
# Only what the flake and nix/modules/ use is here, each as simply as
# nixpkgs documents it. Options are checked as the module system checks
# them where it matters to the tests: an undeclared option, an option used
# with no value, and a value its type refuses are errors naming the option.
# Modules' config sections are read through mkIf/mkMerge/mkOverride; their
# definitions are merged as NixOS merges them (attribute sets recursively,
# lists concatenated, anything else must agree).
#
# `outPaths`: store paths to give stub packages by name (the tests point
# tools at the real ones on this machine, e.g. { coreutils = "/usr"; }).
# `realScripts`: writeShellScript and writeShellScriptBin write their text
# to the store (builtins.toFile), so that the command lines naming them
# can be run (with bash: such files are not executable).
{
  outPaths ? { },
  realScripts ? false,
}:
let
  inherit (builtins)
    isAttrs
    isList
    isString
    isInt
    isBool
    isPath
    isFunction
    attrNames
    filter
    all
    any
    elem
    concatMap
    concatStringsSep
    mapAttrs
    foldl'
    substring
    stringLength
    toJSON
    typeOf
    ;

  lib = rec {
    inherit
      elem
      filter
      all
      any
      concatMap
      concatStringsSep
      mapAttrs
      ;
    inherit (builtins) replaceStrings elemAt head tail length;

    # Lists and strings.
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalString = cond: s: if cond then s else "";
    optionalAttrs = cond: as: if cond then as else { };
    concatMapStringsSep = sep: f: xs: concatStringsSep sep (map f xs);
    hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;
    removePrefix =
      prefix: s:
      if hasPrefix prefix s then substring (stringLength prefix) (stringLength s) s else s;
    toInt =
      s:
      let
        n = builtins.fromJSON s;
      in
      if builtins.match "-?[0-9]+" s != null && isInt n then n else throw "toInt: not an integer: ${s}";
    makeBinPath = paths: concatMapStringsSep ":" (p: "${toString p}/bin") paths;
    escapeShellArg =
      arg:
      let
        s = toString arg;
      in
      if builtins.match "[A-Za-z0-9,._+:@%/-]+" s != null then
        s
      else
        "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] s}'";
    escapeShellArgs = xs: concatStringsSep " " (map escapeShellArg xs);

    # Attribute sets.
    genAttrs =
      names: f:
      builtins.listToAttrs (
        map (n: {
          name = n;
          value = f n;
        }) names
      );
    filterAttrs =
      pred: set:
      builtins.listToAttrs (
        map (n: {
          name = n;
          value = set.${n};
        }) (filter (n: pred n set.${n}) (attrNames set))
      );
    mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);

    licenses = {
      mit = {
        spdxId = "MIT";
      };
      asl20 = {
        spdxId = "Apache-2.0";
      };
    };
    platforms.linux = [
      "x86_64-linux"
      "aarch64-linux"
    ];

    # lib.fileset: the file set is the list of its files; the source is the
    # root, with the list beside it for the tests to check.
    fileset = {
      unions = files: files;
      toSource =
        { root, fileset }:
        {
          inherit root;
          files = fileset;
        };
    };

    # The module system's vocabulary.
    mkOption =
      args:
      {
        _type = "option";
        type = args.type or types.unspecified;
      }
      // optionalAttrs (args ? default) { inherit (args) default; };
    mkEnableOption =
      name:
      mkOption {
        type = types.bool;
        default = false;
        description = "Whether to enable ${name}.";
      };
    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    mkMerge = contents: {
      _type = "merge";
      inherit contents;
    };
    mkOverride = priority: content: {
      _type = "override";
      inherit priority content;
    };
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;
    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };

    types = rec {
      # A type: its name, what it accepts, and how a value is completed
      # (a submodule's defaults filled in).
      mk = name: check: {
        inherit name check;
        fill = path: v: v;
      };
      unspecified = mk "unspecified" (_: true);
      str = mk "string" isString;
      lines = str;
      bool = mk "boolean" isBool;
      int = mk "signed integer" isInt;
      port = mk "16 bit unsigned integer" (v: isInt v && v >= 0 && v <= 65535);
      ints.positive = mk "positive integer" (v: isInt v && v > 0);
      path = mk "path" (
        v:
        isPath v
        || (isString v && hasPrefix "/" v)
        || (isAttrs v && v ? outPath && hasPrefix "/" (toString v))
      );
      package = mk "package" (v: isAttrs v && v ? outPath);
      enum = values: mk "one of ${toJSON values}" (v: elem v values);
      strMatching = re: mk "string matching ${re}" (v: isString v && builtins.match re v != null);
      nullOr = t: {
        name = "null or ${t.name}";
        check = v: v == null || t.check v;
        fill = path: v: if v == null then null else t.fill path v;
      };
      listOf = t: {
        name = "list of ${t.name}";
        check = v: isList v && all t.check v;
        fill = path: map (t.fill path);
      };
      attrsOf = t: {
        name = "attribute set of ${t.name}";
        check = v: isAttrs v && all (n: t.check v.${n}) (attrNames v);
        fill = path: mapAttrs (n: t.fill (path ++ [ n ]));
      };
      either = a: b: {
        name = "${a.name} or ${b.name}";
        check = v: a.check v || b.check v;
        fill = path: v: if a.check v then a.fill path v else b.fill path v;
      };
      submodule = module: {
        name = "submodule";
        check = isAttrs;
        fill =
          path: v:
          let
            m = if isFunction module then module { inherit lib; } else module;
          in
          fillOptions path m.options v;
      };
    };

    # --- evaluation ---------------------------------------------------

    isOption = v: isAttrs v && (v._type or null) == "option";
    showPath = concatStringsSep ".";
    typeIs = t: v: isAttrs v && (v._type or null) == t;

    # The definitions at `path` in a config section, as the module system
    # finds them: mkIf and mkOverride apply to what they hold, so only the
    # conditions of definitions found at `path` are evaluated (a module's
    # `mkIf cfg.enable` does not depend on itself). Each is { priority; value; }.
    defsAt =
      path: v:
      if typeIs "if" v then
        let
          inner = defsAt path v.content;
        in
        if builtins.length inner == 0 then [ ] else if v.condition then inner else [ ]
      else if typeIs "merge" v then
        concatMap (defsAt path) v.contents
      else if typeIs "override" v then
        map (d: d // { inherit (v) priority; }) (defsAt path v.content)
      else if path == [ ] then
        [
          {
            priority = 100;
            value = v;
          }
        ]
      else if isAttrs v && !(v ? outPath) && v ? ${builtins.head path} then
        defsAt (builtins.tail path) v.${builtins.head path}
      else
        [ ];

    # The value of the option `o` at `path` from the definitions in
    # `sections`: those of the highest priority, merged; else its default.
    optionValue =
      path: o: sections:
      let
        defs = concatMap (defsAt path) sections;
        best = foldl' (p: d: if d.priority < p then d.priority else p) 1500 defs;
        winners = map (d: d.value) (filter (d: d.priority == best) defs);
        v =
          if builtins.length winners == 0 then
            if o ? default then
              o.default
            else
              throw "The option `${showPath path}' is used but not defined."
          else
            foldl' mergeDefs nothing (map resolve winners);
      in
      if o.type.check v then
        o.type.fill path v
      else
        throw "A definition for option `${showPath path}' is not of type `${o.type.name}': ${typeOf v}.";

    # Every option `opts` declares (at `path`), with its value.
    optionValues =
      path: opts: sections:
      mapAttrs (
        name: o:
        if isOption o then
          optionValue (path ++ [ name ]) o sections
        else
          optionValues (path ++ [ name ]) o sections
      ) opts;

    # An error for a definition of an option nobody declared.
    checkDeclared =
      path: opts: defs:
      all (
        n:
        if !(opts ? ${n}) then
          throw "The option `${showPath (path ++ [ n ])}' does not exist."
        else
          isOption opts.${n} || checkDeclared (path ++ [ n ]) opts.${n} defs.${n}
      ) (attrNames defs);

    # Submodule values: the options `opts` at `path` from the definitions `v`.
    fillOptions =
      path: opts: v:
      assert checkDeclared path opts v;
      optionValues path opts [ (setAttrByPath path v) ];
    setAttrByPath =
      path: v: if path == [ ] then v else { ${builtins.head path} = setAttrByPath (builtins.tail path) v; };

    # A module and those it imports, each as { options; config; }.
    collect =
      args: module:
      let
        m = if isPath module then import module else module;
        body = if isFunction m then m args else m;
        own =
          if body ? options || body ? config then
            {
              options = body.options or { };
              config = body.config or { };
            }
          else
            {
              options = { };
              config = removeAttrs body [ "imports" ];
            };
      in
      [ own ] ++ concatMap (collect args) (body.imports or [ ]);

    # A module's config section as NixOS reads it once options have values:
    # mkIf false defines nothing, mkMerge merges, overrides are dropped.
    nothing = {
      _type = "nothing";
    };
    isNothing = typeIs "nothing";
    resolve =
      v:
      if typeIs "if" v then
        if v.condition then resolve v.content else nothing
      else if typeIs "merge" v then
        foldl' mergeDefs nothing (map resolve v.contents)
      else if typeIs "override" v then
        resolve v.content
      else if isAttrs v && !(v ? outPath) && !(v ? _type) then
        filterAttrs (_: x: !isNothing x) (mapAttrs (_: resolve) v)
      else
        v;
    mergeDefs =
      a: b:
      if isNothing a then
        b
      else if isNothing b then
        a
      else if isList a && isList b then
        a ++ b
      else if isAttrs a && isAttrs b && !(a ? outPath) && !(b ? outPath) then
        a // b // mapAttrs (n: _: mergeDefs a.${n} b.${n}) (builtins.intersectAttrs a b)
      else if a == b then
        a
      else
        throw "conflicting definitions: ${toJSON a} and ${toJSON b}";

    # Evaluates `module` (a file or function taking { config, lib, pkgs },
    # and what it imports) with the definitions `config`, over
    # `environment` (what the modules read of the rest of the system).
    # Returns the option values, the modules' config sections merged, and
    # the messages of failing assertions and of warnings.
    evalModule =
      {
        module,
        config,
        environment ? { },
        pkgs,
      }:
      let
        modules = collect {
          inherit lib pkgs;
          config = values;
        } module;
        options = foldl' recursiveUpdate { } (map (m: m.options) modules);
        sections = map (m: m.config) modules ++ [ config ];
        values =
          assert checkDeclared [ ] options config;
          recursiveUpdate environment (optionValues [ ] options sections);
        out = foldl' mergeDefs nothing (map (m: resolve m.config) modules);
        out' = if isNothing out then { } else out;
      in
      {
        options = values;
        config = out';
        failedAssertions = map (a: a.message) (filter (a: !a.assertion) (out'.assertions or [ ]));
        warnings = out'.warnings or [ ];
      };

    recursiveUpdate =
      a: b:
      a
      // b
      // mapAttrs (
        n: _: if isAttrs a.${n} && isAttrs b.${n} then recursiveUpdate a.${n} b.${n} else b.${n}
      ) (builtins.intersectAttrs a b);
  };

  # A package: what modules and the flake interpolate and read.
  fakeHash = "00000000000000000000000000000000";
  drv = name: {
    type = "derivation";
    inherit name;
    outPath = outPaths.${name} or "/nix/store/${fakeHash}-${name}";
  };

  # `pkgs` for `system`: stub packages, and builders that return their
  # arguments (for the tests to read) with an out path.
  pkgsFor =
    system:
    let
      tools = lib.genAttrs [
        "coreutils"
        "util-linux"
        "fuse3"
        "nix"
        "curl"
        "openssl"
        "xz"
        "zstd"
        "clippy"
        "rustfmt"
        "rust-analyzer"
        "makeBinaryWrapper"
        "pkg-config"
        "bash"
      ] drv;
      script =
        name: text:
        drv name
        // {
          inherit text;
          script = true;
        }
        // lib.optionalAttrs realScripts { outPath = builtins.toFile name text; };
    in
    tools
    // {
      inherit lib system;
      stdenv.hostPlatform.system = system;
      writeShellScript = script;
      writeShellScriptBin = name: text: script name text // { bin = true; };
      writeText = name: text: drv name // { inherit text; };
      rustPlatform.buildRustPackage =
        args:
        drv "${args.pname}-${args.version}"
        // {
          inherit args;
          inherit (args) pname version;
        };
      mkShell = args: drv "shell" // { inherit args; };
      testers.runNixOSTest = args: drv "vm-test-${args.name}" // { inherit args; };
    };
in
{
  inherit lib pkgsFor;
  pkgs = pkgsFor "x86_64-linux";

  # A nixpkgs flake input, as much as flake.nix reads of one.
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs lib.platforms.linux pkgsFor;
  };
}
