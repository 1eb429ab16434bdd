# Evaluates nix/module.nix for real, without nixpkgs or NixOS: the module
# system from a nixpkgs `lib` checkout, NixOS's option declarations and checks
# for what the module sets, and a stub `pkgs` (tests/nix/nixos-stubs.nix).
#
#   nix-instantiate --eval --strict --json tests/nix/eval-module.nix \
#     --arg lib 'import /path/to/nixpkgs.lib/lib' -A scenarios
#
# prints, for each scenario below, the generated unit settings, sockets,
# rendered settings (the TOML as JSON), the build-time check command, failed
# assertions and warnings; tests/nix/nixcheck.py compares them with the unit
# files in systemd/ and with what each scenario expects. `-A expectedErrors`
# names the scenarios NixOS refuses at evaluation (a type or unit check, not
# an assertion) with a piece of the error; `-A failing.NAME` evaluates one of
# them, which must fail with it (tests/nix/check.sh runs each).
{ lib }:
let
  stubs = import ./nixos-stubs.nix { inherit lib; };
  inherit (stubs) mkPkg;

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

  # name -> { config = module; nixpkgs = pkgs.config; buildSystem; }
  scenarios = {
    default.config.services.claracore.models.tiny = tinyModel;
    store-model.config.services.claracore.models.tiny = tinyModel // {
      model = storeModel;
    };
    # A path literal is copied into the store: an input of the check.
    path-model.config.services.claracore.models.tiny = tinyModel // {
      model = ./nixos-stubs.nix;
    };
    # A string that looks like a store path but has no context is no input
    # of the check derivation: the build could not see it, so no --strict.
    store-string-model.config.services.claracore.models.tiny = tinyModel // {
      model = "${builtins.storeDir}/00000000000000000000000000000000-tiny.gguf";
    };
    # The same path with its context (as "${drv}/file" would have).
    store-context-model.config.services.claracore.models.tiny = tinyModel // {
      model = "${storeModel}";
    };
    cuda = {
      nixpkgs.allowUnfree = true;
      config.services.claracore = {
        acceleration = "cuda";
        models.tiny = tinyModel;
      };
    };
    cuda-not-unfree.config.services.claracore = {
      acceleration = "cuda";
      models.tiny = tinyModel;
    };
    cuda-unfree-predicate = {
      nixpkgs.allowUnfreePredicate = _: true;
      config.services.claracore.acceleration = "cuda";
    };
    # nixpkgs.config.cudaSupport set, but this service on the CPU.
    cpu-forced = {
      nixpkgs.cudaSupport = true;
      config.services.claracore = {
        acceleration = false;
        models.tiny = tinyModel;
      };
    };
    custom-user.config.services.claracore = {
      user = "llm";
      group = "llm-users";
    };
    custom-group.config.services.claracore.group = "llm";
    # Cross build: the build machine cannot run the host's claracore.
    cross = {
      buildSystem = "aarch64-linux";
      config.services.claracore.models.tiny = tinyModel;
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
    # What ListenAddr::parse refuses (host names, no port, a port out of
    # range, a bad address, a relative unix path), and port 0, which it
    # takes but ListenStream= does not.
    bad-listen.config.services.claracore.openFirewall = true;
    bad-listen.config.services.claracore.settings.listen = [
      "localhost:5800"
      "127.0.0.1"
      "127.0.0.1:0"
      "127.0.0.1:65536"
      "256.0.0.1:5800"
      "01.2.3.4:5800"
      "[::1:5800"
      "[1::2::3]:5800"
      "[1:2:3:4:5:6:7:8:9]:5800"
      "[::1]"
      "[fe80::1%eth0]:5800"
      "unix:run/claracore.sock"
      "unix:/run/claracore/claracore.sock"
    ];
    # ... and what it accepts.
    good-listen.config.services.claracore = {
      settings.listen = [
        "127.0.0.1:5800"
        "127.0.0.2:05801"
        "[::1]:5802"
        "[0:0:0:0:0:0:0:1]:5803"
        "[::ffff:127.0.0.1]:5804"
        "[fe80::1%2]:5805"
        "[1:2:3:4:5:6:7::]:5806"
        "unix:/run/claracore/claracore.sock"
        "unix:/run/claracore-other.sock"
      ];
      # [::ffff:127.0.0.1] and [fe80::1%2] are not loopback to the daemon.
      settings.auth.open = true;
    };
    # A unix socket in the service's own runtime directory would be chowned
    # to the service user at each start.
    socket-in-service-dir.config.services.claracore.settings.listen = [
      "unix:/run/claracore/daemon/claracore.sock"
    ];
    firewall-loopback.config.services.claracore.openFirewall = true;
    secrets.config.services.claracore = {
      environmentFile = "/run/secrets/claracore.env";
      credentials.api-keys = "/run/secrets/claracore-keys";
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
    # The queue and GPU settings, typed in the module, as the daemon reads them.
    queue-gpu.config.services.claracore = {
      settings.scheduler = {
        max_queue = 64;
        max_wait_before_swap = "2s";
        vram_reserve_mb = 1024;
      };
      settings.gpu.sample_interval = "500ms";
      models.tiny = tinyModel // {
        vram_mb = 1200;
        gpus = [ 0 ];
        priority = 5;
      };
      apiKeys.batch = {
        hash = "sha256:18fdf5a0a968df83bcbe43255e56234f270b03b5e479f70adc4a8db3edb9fd58";
        scopes = [ "inference" ];
        priority = -10;
      };
    };
    freeform.config.services.claracore = {
      settings.log_format = "json";
      settings.models."qwen2.5".model = "/models/qwen.gguf";
      models.tiny = tinyModel;
    };
    # Models folders, the Ollama store, [models_defaults], and a model
    # fetched from a hub into modelsDir.
    models-folder.config.services.claracore = {
      modelsDir = "/var/lib/claracore/models";
      settings.models_dir = [ "/srv/gguf" ];
      ollamaModels = "/home/alice/.ollama/models";
      hfTokenFile = "/run/secrets/hf-token";
      hfEndpoint = "http://127.0.0.1:8088";
      settings.models_defaults = {
        args = [
          "-c"
          "4096"
        ];
        ttl = "10m";
      };
      models.qwen = {
        source = {
          hf = "Qwen/Qwen2.5-0.5B-Instruct-GGUF";
          file = "qwen2.5-0.5b-instruct-q4_k_m.gguf";
          sha256 = "74a4da8c9fdbcd15bd1f6d01d621410d31c6fc00986f5eb687824e7b93d7a9db";
        };
        args = [
          "-c"
          "8192"
        ];
      };
    };
    # A models folder of its own (not the state directory) under /srv.
    models-dir-elsewhere.config.services.claracore = {
      modelsDir = "/srv/models";
      models.tiny.source = {
        hf = "ggml-org/models";
        file = "tinyllamas/stories260K.gguf";
        sha256 = "047a5d9ed7bbfd8e5ac0b3b8e5f3bd5bf3bca61b5fbf7e8e5e4c0f3b1c1e9d2a";
        revision = "0123456789abcdef0123456789abcdef01234567";
      };
    };
    # A source needs modelsDir; a split part is refused.
    source-no-dir.config.services.claracore.models.qwen.source = {
      hf = "Qwen/Qwen2.5-0.5B-Instruct-GGUF";
      file = "qwen2.5-0.5b-instruct-q4_k_m.gguf";
      sha256 = "74a4da8c9fdbcd15bd1f6d01d621410d31c6fc00986f5eb687824e7b93d7a9db";
    };
    source-split.config.services.claracore = {
      modelsDir = "/var/lib/claracore/models";
      models.big.source = {
        hf = "u/r";
        file = "big-q4_k_m-00001-of-00002.gguf";
        sha256 = "74a4da8c9fdbcd15bd1f6d01d621410d31c6fc00986f5eb687824e7b93d7a9db";
      };
    };
    # A typo that only `claracore check-config` can catch.
    typo.config.services.claracore.settings.scheduler.max_loadd = 2;
    disabled.config.services.claracore.enable = lib.mkForce false;
  };

  # Refused by NixOS while evaluating (types, unit checks): name -> the
  # scenario and the pieces of the error message it must fail with.
  errorScenarios = {
    env-file-in-store = {
      config.services.claracore.environmentFile = "${builtins.storeDir}/00000000000000000000000000000000-claracore.env";
      error = [ "services.claracore.environmentFile' is not of type `null or absolute path not in the Nix store'" ];
    };
    credential-in-store = {
      config.services.claracore.credentials.api-keys = "${builtins.storeDir}/00000000000000000000000000000000-keys";
      error = [ "services.claracore.credentials.api-keys' is not of type `absolute path not in the Nix store'" ];
    };
    # A path literal would be copied into the store, readable by everyone.
    env-file-path-literal = {
      config.services.claracore.environmentFile = ./nixos-stubs.nix;
      error = [ "services.claracore.environmentFile' is not of type `null or absolute path not in the Nix store'" ];
    };
    # systemd knows on-watchdog, NixOS's checkService does not.
    restart-on-watchdog = {
      config.systemd.services.claracore.serviceConfig.Restart = lib.mkForce "on-watchdog";
      error = [
        "Systemd Service field `Restart' cannot have value `on-watchdog'."
        "systemd.services.claracore.serviceConfig' is not of type"
      ];
    };
    # Unit names are checked as NixOS checks them.
    bad-unit-name = {
      config.systemd.services.claracore.after = [ "network" ];
      error = [
        "option `systemd.services.claracore.after."
        "is not of type `string matching the pattern"
      ];
    };
    # A source's sha256 is 64 hex digits (not an SRI hash).
    source-sri-hash = {
      config.services.claracore = {
        modelsDir = "/var/lib/claracore/models";
        models.qwen.source = {
          hf = "Qwen/Qwen2.5-0.5B-Instruct-GGUF";
          file = "qwen2.5-0.5b-instruct-q4_k_m.gguf";
          sha256 = "sha256-dKTajJ/bzRW9H20B1iFBDTHG/ACYb162h4JOe5PXqds=";
        };
      };
      error = [ "services.claracore.models.qwen.source.sha256' is not of type `string matching the pattern [0-9a-f]{64}'" ];
    };
    # stopIfChanged is an option of services only.
    socket-stop-if-changed = {
      config.systemd.sockets.claracore.stopIfChanged = false;
      error = [ "The option `systemd.sockets.claracore.stopIfChanged' does not exist" ];
    };
  };

  evalScenario =
    s:
    let
      eval = lib.evalModules {
        modules = [
          stubs.module
          ../../nix/module.nix
          {
            _module.args.pkgs = stubs.pkgs {
              nixpkgsConfig = s.nixpkgs or { };
              buildSystem = s.buildSystem or "x86_64-linux";
            };
          }
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
              stopIfChanged
              restartIfChanged
              reloadIfChanged
              ;
          };
      fetchUnits = lib.mapAttrs (_: u: {
        inherit (u)
          description
          after
          before
          wants
          wantedBy
          requiredBy
          unitConfig
          serviceConfig
          ;
        script = u.serviceConfig.ExecStart.text or null;
      }) (lib.filterAttrs (n: _: lib.hasPrefix "claracore-fetch-" n) c.systemd.services);
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
      users = lib.mapAttrs (_: u: removeAttrs u [ "name" ]) c.users.users;
      groups = lib.attrNames c.users.groups;
      tmpfiles = c.systemd.tmpfiles.rules;
      systemPackages = map toString c.environment.systemPackages;
      stubs = {
        llamaCpp = toString (stubs.pkgs { }).llama-cpp;
        storeModel = toString storeModel;
        package = toString (stubs.pkgs { }).claracore;
      };
    };
in
{
  scenarios = lib.mapAttrs (_: evalScenario) scenarios;
  expectedErrors = lib.mapAttrs (_: s: s.error) errorScenarios;
  failing = lib.mapAttrs (_: evalScenario) errorScenarios;
}
