# Evaluates nix/module.nix for real, without nixpkgs or NixOS: the module
# system from a nixpkgs `lib` checkout, stub declarations for the NixOS
# options the module sets (typed like NixOS's, so type errors surface), and a
# stub `pkgs` (formats.toml, runCommand, llama-cpp, claracore).
#
#   nix-instantiate --eval --strict --json tests/nix/eval-module.nix \
#     --arg lib 'import /path/to/nixpkgs.lib/lib'
#
# prints, for each scenario below, the generated unit settings, sockets,
# rendered settings (the TOML as JSON), the build-time check command, failed
# assertions and warnings. tests/nix/drift.py compares them with the unit
# files in systemd/ and with what each scenario expects.
{ lib }:
let
  inherit (lib) mkOption types;

  # A store path that changes with `seed`, as a real output changes with its
  # inputs (so reloadTriggers can be compared between scenarios).
  fakePath =
    seed: name:
    "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" "${seed}${name}")}-${name}";
  mkPkg =
    name: attrs:
    {
      type = "derivation";
      inherit name;
      outPath = fakePath (attrs.seed or "") name;
      outputs = [ "out" ];
      meta = { };
    }
    // removeAttrs attrs [ "seed" ];

  llamaCpp = mkPkg "llama-cpp" {
    meta.mainProgram = "llama";
    src = mkPkg "llama-cpp-source" { };
    override =
      args:
      mkPkg "llama-cpp-${lib.concatStringsSep "-" (lib.attrNames (lib.filterAttrs (_: v: v) args))}" {
        meta.mainProgram = "llama";
      };
  };

  stubPkgs = nixpkgsConfig: {
    config = nixpkgsConfig;
    claracore = mkPkg "claracore" { meta.mainProgram = "claracore"; };
    llama-cpp = llamaCpp;
    formats.toml =
      { }:
      {
        # nixpkgs' TOML value type: no null in TOML.
        type =
          let
            valueType =
              types.oneOf [
                types.bool
                types.int
                types.float
                types.str
                types.path
                (types.attrsOf valueType)
                (types.listOf valueType)
              ]
              // {
                description = "TOML value";
              };
          in
          valueType;
        generate =
          name: value:
          mkPkg name {
            seed = builtins.toJSON value;
            passthru.settings = value;
          };
      };
    runCommand =
      name: env: script:
      mkPkg name {
        seed = script;
        inherit env script;
      };
    callPackage = _: _: throw "stub pkgs: callPackage is not expected to be called";
  };

  # NixOS's systemd option value: atoms (derivations count, as in
  # `reloadTriggers = [ configFile ]`) or lists of atoms; lists concatenate.
  # NixOS itself does not check; this catches what would render badly.
  atom = v: builtins.isBool v || builtins.isInt v || lib.isStringLike v;
  unitOption = types.mkOptionType {
    name = "systemd option";
    check = v: atom v || (builtins.isList v && lib.all atom v);
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if builtins.isList (builtins.head defs').value then
        lib.concatMap (d: lib.toList d.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };
  oneOfCheck =
    key: allowed: cfg:
    !(cfg ? ${key}) || builtins.elem cfg.${key} allowed;
  serviceConfigType = types.addCheck (types.attrsOf unitOption) (
    cfg:
    oneOfCheck "Type" [
      "exec"
      "simple"
      "forking"
      "oneshot"
      "dbus"
      "notify"
      "notify-reload"
      "idle"
    ] cfg
    && oneOfCheck "Restart" [
      "no"
      "on-success"
      "on-failure"
      "on-abnormal"
      "on-abort"
      "on-watchdog"
      "always"
    ] cfg
  );
  unitNames = types.listOf types.str;
  common = {
    description = mkOption {
      type = types.singleLineStr;
      default = "";
    };
    wantedBy = mkOption {
      type = unitNames;
      default = [ ];
    };
    after = mkOption {
      type = unitNames;
      default = [ ];
    };
    wants = mkOption {
      type = unitNames;
      default = [ ];
    };
    requires = mkOption {
      type = unitNames;
      default = [ ];
    };
    partOf = mkOption {
      type = unitNames;
      default = [ ];
    };
    restartTriggers = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    reloadTriggers = mkOption {
      type = types.listOf unitOption;
      default = [ ];
    };
    unitConfig = mkOption {
      type = types.attrsOf unitOption;
      default = { };
    };
  };

  nixosStubs = {
    options = {
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      warnings = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      systemd.services = mkOption {
        default = { };
        type = types.attrsOf (
          types.submodule {
            options = common // {
              environment = mkOption {
                type = types.attrsOf (
                  types.nullOr (
                    types.oneOf [
                      types.str
                      types.path
                      types.package
                    ]
                  )
                );
                default = { };
              };
              path = mkOption {
                type = types.listOf (types.either types.package types.str);
                default = [ ];
              };
              serviceConfig = mkOption {
                type = serviceConfigType;
                default = { };
              };
            };
          }
        );
      };
      systemd.sockets = mkOption {
        default = { };
        type = types.attrsOf (
          types.submodule {
            options = common // {
              listenStreams = mkOption {
                type = types.listOf types.str;
                default = [ ];
              };
              socketConfig = mkOption {
                type = types.attrsOf unitOption;
                default = { };
              };
            };
          }
        );
      };
      users.users = mkOption {
        default = { };
        type = types.attrsOf (
          types.submodule {
            options = {
              isSystemUser = mkOption {
                type = types.bool;
                default = false;
              };
              group = mkOption {
                type = types.str;
                default = "";
              };
              home = mkOption {
                type = types.path;
                default = "/var/empty";
              };
              description = mkOption {
                type = types.singleLineStr;
                default = "";
              };
            };
          }
        );
      };
      users.groups = mkOption {
        default = { };
        type = types.attrsOf (types.submodule { });
      };
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      environment.etc = mkOption {
        default = { };
        type = types.attrsOf (
          types.submodule {
            options.source = mkOption { type = types.path; };
          }
        );
      };
      environment.systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
    };
  };

  storeModel = mkPkg "tiny.gguf" { };

  tinyModel = {
    model = "/var/lib/claracore/models/tiny.gguf";
    args = [
      "-c"
      "512"
    ];
    aliases = [ "tiny-chat" ];
    ttl = "5m";
    group = "small";
  };

  # name -> { config = module; nixpkgs = pkgs.config; }
  scenarios = {
    default.config.services.claracore.models.tiny = tinyModel;
    store-model.config.services.claracore.models.tiny = tinyModel // {
      model = storeModel;
    };
    cuda.config.services.claracore = {
      acceleration = "cuda";
      models.tiny = tinyModel;
    };
    rocm.config.services.claracore = {
      acceleration = "rocm";
      models.tiny = tinyModel;
    };
    vulkan.config.services.claracore = {
      acceleration = "vulkan";
      models.tiny = tinyModel;
    };
    nixpkgs-cuda = {
      nixpkgs.cudaSupport = true;
      config.services.claracore.models.tiny = tinyModel;
    };
    no-socket.config.services.claracore = {
      socketActivation = false;
      models.tiny = tinyModel;
    };
    tcp-only.config.services.claracore.settings.listen = [ "127.0.0.1:5800" ];
    firewall.config.services.claracore = {
      openFirewall = true;
      settings.listen = [
        "0.0.0.0:5800"
        "[::]:5801"
        "unix:/run/claracore/claracore.sock"
      ];
      # Beyond loopback a key is required (or settings.auth.open).
      apiKeys.lan = {
        hash = "sha256:18fdf5a0a968df83bcbe43255e56234f270b03b5e479f70adc4a8db3edb9fd58";
        scopes = [ "inference" ];
        rate = 60;
      };
    };
    exposed-no-key.config.services.claracore.settings.listen = [ "0.0.0.0:5800" ];
    firewall-loopback.config.services.claracore.openFirewall = true;
    secrets.config.services.claracore = {
      environmentFile = "/run/secrets/claracore.env";
      credentials.api-keys = "/run/secrets/claracore-keys";
    };
    secrets-in-store.config.services.claracore = {
      environmentFile = "${builtins.storeDir}/00000000000000000000000000000000-claracore.env";
      credentials.api-keys = "${builtins.storeDir}/00000000000000000000000000000000-keys";
    };
    model-and-cmd.config.services.claracore.models.bad = {
      model = "/m.gguf";
      cmd = [
        "/bin/server"
        "{port}"
      ];
    };
    cmd-model.config.services.claracore.models.custom = {
      cmd = [
        "/opt/bin/server"
        "--port"
        "{port}"
      ];
      env.OMP_NUM_THREADS = "4";
    };
    limits.config.services.claracore = {
      memoryMax = null;
      memoryHigh = null;
      tasksMax = null;
      cpuQuota = "200%";
    };
    state-dir.config.services.claracore.settings.state_dir = "/srv/claracore";
    freeform.config.services.claracore = {
      settings.log_format = "json";
      settings.models."qwen2.5".model = "/models/qwen.gguf";
      models.tiny = tinyModel;
    };
    # A typo that only `claracore check-config` can catch.
    typo.config.services.claracore.settings.scheduler.max_loadd = 2;
    disabled.config.services.claracore.enable = lib.mkForce false;
  };

  evalScenario =
    s:
    let
      eval = lib.evalModules {
        modules = [
          nixosStubs
          ../../nix/module.nix
          { _module.args.pkgs = stubPkgs (s.nixpkgs or { }); }
          { services.claracore.enable = lib.mkDefault true; }
          (s.config or { })
        ];
      };
      c = eval.config;
      service = c.systemd.services.claracore or null;
      etc = c.environment.etc."claracore/config.toml".source or null;
    in
    {
      failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
      inherit (c) warnings;
      service =
        if service == null then
          null
        else
          {
            inherit (service)
              description
              after
              wants
              wantedBy
              serviceConfig
              reloadTriggers
              restartTriggers
              ;
          };
      sockets = lib.mapAttrs (_: s: {
        inherit (s)
          description
          wantedBy
          listenStreams
          socketConfig
          ;
      }) c.systemd.sockets;
      settings = if c.services.claracore.enable then c.services.claracore.settings else null;
      configFile = if etc == null then null else toString etc;
      configCheck = if etc == null then null else etc.script or null;
      firewall = c.networking.firewall.allowedTCPPorts;
      users = c.users.users;
      groups = lib.attrNames c.users.groups;
      systemPackages = map toString c.environment.systemPackages;
      stubs = {
        llamaCpp = toString llamaCpp;
        storeModel = toString storeModel;
      };
    };
in
lib.mapAttrs (_: evalScenario) scenarios
