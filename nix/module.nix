# NixOS module: services.claracore.
#
# Renders services.claracore.settings (RFC 42, TOML) to
# /etc/claracore/config.toml, validated at build time by
# `claracore check-config`, and runs the daemon with the semantics of
# systemd/claracore.service: Type=notify-reload, watchdog, socket activation
# with named fds (http, local), StateDirectory for the history database.
#
# The service/socket settings between the `drift:` markers below mirror
# systemd/claracore.service and the socket units; tests/nix/check.sh fails
# when the two disagree. Keep the values there literal (or `cfg.<option>`
# with a literal default) so that check can read them without evaluating.
{
  config,
  options,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkOption
    types
    ;

  cfg = config.services.claracore;
  settingsFormat = pkgs.formats.toml { };

  # Where the service reads its config. A fixed path, so that a change of
  # the file alone is a reload (reloadTriggers), not a new ExecStart.
  configPath = "/etc/claracore/config.toml";

  isUnix = lib.hasPrefix "unix:";
  unixListen = map (lib.removePrefix "unix:") (lib.filter isUnix cfg.settings.listen);
  tcpListen = lib.filter (a: !isUnix a) cfg.settings.listen;

  # What `ListenAddr::parse` in src/config.rs accepts, which is also what
  # ListenStream= accepts: `unix:/absolute/path`, or a literal IP socket
  # address, `a.b.c.d:port` or `[v6]:port` (v6 may end in a dotted quad and
  # carry a numeric `%scope`). No host names: `localhost:5800` is refused by
  # both. Port 0 ("any port" to the daemon) is refused as ListenStream= does.
  decOctet = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
  ipv4 = "${decOctet}[.]${decOctet}[.]${decOctet}[.]${decOctet}";
  isIPv6 =
    addr:
    let
      # A trailing dotted quad stands for the last two groups.
      quad = builtins.match "(.*:)${ipv4}" addr;
      hex = if quad == null then addr else "${builtins.head quad}0:0";
      halves = lib.splitString "::" hex;
      groups = s: if s == "" then [ ] else lib.splitString ":" s;
      valid = lib.all (g: builtins.match "[0-9a-fA-F]{1,4}" g != null);
      head = groups (builtins.elemAt halves 0);
      tail = groups (builtins.elemAt halves 1);
    in
    if builtins.length halves == 1 then
      builtins.length head == 8 && valid head
    else
      builtins.length halves == 2 && valid head && valid tail && builtins.length head + builtins.length tail <= 7;
  # "a.b.c.d:port" or "[v6]:port" -> { host; port; }, null if it is neither.
  parseTcp =
    addr:
    let
      v4 = builtins.match "(${ipv4}):0*([0-9]{1,5})" addr;
      v6 = builtins.match "\\[([0-9a-fA-F:.]+)(%[0-9]+)?]:0*([0-9]{1,5})" addr;
      port = lib.toInt (lib.last (if v4 != null then v4 else v6));
    in
    if (v4 == null && v6 == null) || (v6 != null && !isIPv6 (builtins.head v6)) then
      null
    else if port < 1 || port > 65535 then
      null
    else
      {
        host = builtins.head (if v4 != null then v4 else v6);
        inherit port;
      };
  validListen =
    addr: if isUnix addr then lib.hasPrefix "/" (lib.removePrefix "unix:" addr) else parseTcp addr != null;
  # The TCP addresses that parse (the others fail an assertion).
  validTcp = lib.filter validListen tcpListen;
  tcpPort = addr: (parseTcp addr).port;
  isLoopback =
    addr:
    let
      host = (parseTcp addr).host;
    in
    lib.hasPrefix "127." host || builtins.elem host [
      "::1"
      "0:0:0:0:0:0:0:1"
    ];

  socketUnits =
    lib.optional (cfg.socketActivation && tcpListen != [ ]) "claracore.socket"
    ++ lib.optional (cfg.socketActivation && unixListen != [ ]) "claracore-local.socket";

  # null follows nixpkgs' own flags, as pkgs.llama-cpp does; false is CPU.
  acceleration =
    if cfg.acceleration == false then
      null
    else if cfg.acceleration != null then
      cfg.acceleration
    else if pkgs.config.cudaSupport or false then
      "cuda"
    else if pkgs.config.rocmSupport or false then
      "rocm"
    else
      null;

  # Device classes and groups a GPU build of llama-server needs. The union of
  # these is what systemd/claracore.service allows (it cannot know the GPU).
  # drift:gpu-begin
  gpuDevices = {
    cuda = [
      "char-nvidiactl"
      "char-nvidia-caps"
      "char-nvidia-frontend"
      "char-nvidia-uvm"
      # CUDA under WSL2 goes through the paravirtualised GPU, /dev/dxg.
      "/dev/dxg"
    ];
    rocm = [
      "char-drm"
      "char-fb"
      "char-kfd"
    ];
    vulkan = [
      "char-drm"
      "char-nvidiactl"
      "char-nvidia-frontend"
    ];
  };
  gpuGroups = {
    cuda = [ ];
    rocm = [
      "render"
      "video"
    ];
    vulkan = [
      "render"
      "video"
    ];
  };
  # drift:gpu-end
  deviceAllow = if acceleration == null then [ ] else gpuDevices.${acceleration};
  supplementaryGroups = if acceleration == null then [ ] else gpuGroups.${acceleration};

  # null leaves a systemd setting out of the unit.
  optionalSetting = value: mkIf (value != null) value;

  renderModel =
    _name: m:
    lib.filterAttrs (_: v: v != null && v != [ ] && v != { }) (
      m
      // {
        # A path literal is copied into the store; a string is used as is.
        model =
          if m.model == null then
            null
          else if builtins.isPath m.model then
            "${m.model}"
          else
            toString m.model;
      }
    );

  # `--strict` also checks that model files exist, which the build sandbox
  # can see only for store paths it has as inputs: a path literal or a
  # derivation (whose string carries its context, so the generated TOML
  # refers to it and the check below gets it). A plain string that merely
  # starts with /nix/store has no context, is no input, and is not there.
  isStoreInput = v: builtins.isPath v || (builtins.isString v && builtins.hasContext v);
  allModelsInStore = lib.all (m: !(m ? model) || isStoreInput m.model) (
    lib.attrValues (cfg.settings.models or { })
  );

  generatedConfig = settingsFormat.generate "claracore.toml" cfg.settings;

  configFile =
    if cfg.checkConfig then
      pkgs.runCommand "claracore-checked.toml" { preferLocalBuild = true; } ''
        ${lib.getExe cfg.package} check-config ${lib.optionalString allModelsInStore "--strict "}${generatedConfig}
        cp ${generatedConfig} $out
      ''
    else
      generatedConfig;

  # A path outside the Nix store given as a string (a path literal would be
  # copied into the store). nixpkgs has it as types.externalPath; the same
  # check for a nixpkgs without it.
  externalPath =
    types.externalPath or (types.addCheck types.str (
      p: lib.hasPrefix "/" p && !lib.hasPrefix "${builtins.storeDir}/" p
    ) // { description = "absolute path not in the Nix store"; });

  # The directory the local socket units put their sockets in must not be
  # one the service owns: systemd chowns those (recursively) to the service
  # user at every start, which would take the socket from root.
  serviceOwnedDirs = [
    "/run/claracore/daemon"
    cfg.settings.state_dir
    "/var/lib/claracore"
  ];

  duration =
    default: what:
    mkOption {
      type = types.str;
      inherit default;
      example = "90s";
      description = "${what} A duration such as `\"30s\"`, `\"10m\"` or `\"1h 30m\"`.";
    };

  modelModule =
    { name, ... }:
    {
      freeformType = settingsFormat.type;
      options = {
        model = mkOption {
          type = types.nullOr (types.either types.path types.str);
          default = null;
          example = literalExpression ''"/var/lib/claracore/models/qwen2.5-7b-instruct-q4_k_m.gguf"'';
          description = ''
            The GGUF file of model `${name}`, served by
            `llama_server -m <model> --host 127.0.0.1 --port <N> <args...>`.
            A string is used as it is (keep large models out of the store,
            e.g. under `/var/lib/claracore/models`); a path literal or a
            derivation is a store path, which also lets the build check that
            the file exists. Exactly one of `model` and `cmd` must be set.
          '';
        };
        cmd = mkOption {
          type = types.nullOr (types.listOf types.str);
          default = null;
          example = [
            "/opt/bin/server"
            "--port"
            "{port}"
          ];
          description = ''
            A full argv for any OpenAI-compatible server instead of `model`;
            `{port}` is replaced by the port claracore assigns.
          '';
        };
        args = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [
            "-c"
            "8192"
            "-ngl"
            "99"
          ];
          description = "Extra llama-server arguments (only with `model`).";
        };
        aliases = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "chat" ];
          description = "Other names clients may request this model by.";
        };
        ttl = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "5m";
          description = ''
            Idle time after which the model is unloaded; `"0"` = never.
            `null` inherits `settings.scheduler.idle_ttl`.
          '';
        };
        group = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "big";
          description = "Models in one group replace each other.";
        };
        health = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "/health";
          description = "Readiness and liveness path on the child; `null` = `/health`.";
        };
        env = mkOption {
          type = types.attrsOf types.str;
          default = { };
          example = {
            OMP_NUM_THREADS = "4";
          };
          description = "Environment variables for this model's process.";
        };
        vram_mb = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          example = 6000;
          description = ''
            The GPU memory (MiB) the model needs. `null`: the most it used in its
            last runs (measured through NVML), else an estimate from its GGUF.
          '';
        };
        gpus = mkOption {
          type = types.nullOr (types.nonEmptyListOf (types.ints.between 0 63));
          default = null;
          example = [ 0 ];
          description = "The GPUs (NVML indices) it may be placed on; `null`: any.";
        };
        priority = mkOption {
          type = types.nullOr (types.ints.between (-1000) 1000);
          default = null;
          example = 10;
          description = "Added to the priority of its requests while they wait: higher is served first and may swap a busy model out before the fairness bound.";
        };
      };
    };
in
{
  options.services.claracore = {
    enable = mkEnableOption "claracore, a local LLM server that runs llama.cpp's llama-server on demand";

    package = mkOption {
      type = types.package;
      default = pkgs.claracore or (pkgs.callPackage ./package.nix { });
      defaultText = lib.literalMD ''
        With the flake's `nixosModules.default`: the flake's own
        `packages.''${system}.claracore`, built with the nixpkgs the flake
        pins (its Rust is new enough for claracore's `rust-version`).
        With `nix/module.nix` imported directly: `pkgs.claracore` where the
        flake's overlay is applied, else `nix/package.nix` built with the
        system's nixpkgs.
      '';
      description = "The claracore package (daemon and CLI).";
    };

    acceleration = mkOption {
      type = types.nullOr (
        types.enum [
          false
          "cuda"
          "rocm"
          "vulkan"
        ]
      );
      default = null;
      example = "cuda";
      description = ''
        GPU backend. Chooses the llama.cpp build
        (`pkgs.llama-cpp.override { cudaSupport = true; }` and so on) and
        which device classes and groups the service may use.

        - `null`: nixpkgs' default build, CPU-only unless
          `nixpkgs.config.cudaSupport` or `rocmSupport` is set (devices then
          follow those flags).
        - `false`: a CPU build even where `nixpkgs.config.cudaSupport` or
          `rocmSupport` is set (`cudaSupport = false; rocmSupport = false;`),
          with `PrivateDevices=yes`.
        - `"cuda"`: NVIDIA, also under WSL2 (`/dev/dxg`). CUDA is unfree:
          it needs `nixpkgs.config.allowUnfree = true` (or an
          `allowUnfreePredicate` that accepts the CUDA packages), and as
          cache.nixos.org builds no unfree packages, llama.cpp is compiled
          from source (an hour or more) unless a binary cache with CUDA
          builds is configured.
        - `"rocm"`: AMD; `"vulkan"`: most GPUs.
      '';
    };

    llamaCpp.package = mkOption {
      type = types.package;
      default =
        if cfg.acceleration == null then
          pkgs.llama-cpp
        else if cfg.acceleration == false then
          pkgs.llama-cpp.override {
            cudaSupport = false;
            rocmSupport = false;
          }
        else
          pkgs.llama-cpp.override { "${cfg.acceleration}Support" = true; };
      defaultText = literalExpression ''
        if config.services.claracore.acceleration == null then pkgs.llama-cpp
        else if config.services.claracore.acceleration == false
        then pkgs.llama-cpp.override { cudaSupport = false; rocmSupport = false; }
        else pkgs.llama-cpp.override { ''${acceleration}Support = true; }  # cudaSupport, rocmSupport, vulkanSupport
      '';
      example = literalExpression "pkgs.llama-cpp.override { vulkanSupport = true; }";
      description = ''
        The llama.cpp build whose `bin/llama-server` serves models given by
        `model`. A GPU build set here still needs `acceleration` for device
        access.
      '';
    };

    socketActivation = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Let systemd own the listeners: `claracore.socket` (TCP addresses of
        `settings.listen`, fd name `http`) and `claracore-local.socket` (its
        `unix:` paths, fd name `local`, group `services.claracore.group`). The
        service then starts on the first connection, and connections queue
        while it starts or restarts. When false the daemon binds `listen`
        itself and starts at boot.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the TCP ports of `settings.listen` in the firewall.";
    };

    checkConfig = mkOption {
      type = types.bool;
      default = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
      defaultText = literalExpression "pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform";
      description = ''
        Run `claracore check-config` on the generated file at build time, so a
        wrong key or value fails the system build instead of the service.
        (`--strict`, which also checks model files exist, when every model is
        a path literal or a derivation, i.e. an input of the build.) It runs
        `package`, a binary for the machine being configured, on the build
        machine: off by default when that cannot run it (cross builds).
      '';
    };

    user = mkOption {
      type = types.str;
      default = "claracore";
      example = "llm";
      description = ''
        User the daemon and its models run as, created as a system user
        (home `/var/lib/claracore`, primary group `group`). A static user
        (like the repository's unit) so that the history database and the
        local socket's group keep one owner.
      '';
    };

    group = mkOption {
      type = types.str;
      default = "claracore";
      example = "llm";
      description = ''
        Group of the daemon, the state directory and the local unix socket,
        created with the user: add users to it
        (`users.users.<name>.extraGroups`) to let them use the `claracore`
        CLI over `/run/claracore/claracore.sock`.
      '';
    };

    environmentFile = mkOption {
      type = types.nullOr externalPath;
      default = null;
      example = "/run/secrets/claracore.env";
      description = ''
        `EnvironmentFile=` for the service (e.g. `CLARACORE_LOG=debug`, or
        secrets for `cmd` models). Must not be in the Nix store, which every
        user can read.
      '';
    };

    credentials = mkOption {
      type = types.attrsOf externalPath;
      default = { };
      example = {
        api-keys = "/run/secrets/claracore-api-keys";
      };
      description = ''
        Files handed to the service with `LoadCredential=NAME:PATH`, readable
        by the daemon as `$CREDENTIALS_DIRECTORY/NAME`
        (`/run/credentials/claracore.service/NAME`) while the files
        themselves stay root-only. Must not be in the Nix store.
      '';
    };

    memoryHigh = mkOption {
      type = types.nullOr types.str;
      default = "85%";
      example = "24G";
      description = "`MemoryHigh=` for the whole service (daemon and every model); `null` leaves it unset.";
    };

    memoryMax = mkOption {
      type = types.nullOr types.str;
      default = "90%";
      example = "28G";
      description = ''
        `MemoryMax=` for the whole service. A model that does not fit is
        killed by the kernel (children run with `oom_score_adj` 500); the
        daemon survives (`OOMPolicy=continue`) and reports that model failed.
        `null` leaves it unset.
      '';
    };

    cpuQuota = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "400%";
      description = "`CPUQuota=` for the whole service; `null` = no quota.";
    };

    tasksMax = mkOption {
      type = types.nullOr (types.either types.ints.positive types.str);
      default = 4096;
      example = "infinity";
      description = "`TasksMax=` for the whole service; `null` leaves it unset.";
    };

    settings = mkOption {
      default = { };
      description = ''
        claracore's configuration, written to `${configPath}` (format:
        `systemd/config.example.toml` in the claracore repository). Keys
        without an option here are passed through; unknown keys fail the
        build through `checkConfig`. Models are best given in
        `services.claracore.models`.
      '';
      example = literalExpression ''
        {
          listen = [ "0.0.0.0:5800" "unix:/run/claracore/claracore.sock" ];
          scheduler.max_loaded = 2;
          history.content = "none";
        }
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          listen = mkOption {
            type = types.listOf types.str;
            default = [
              "127.0.0.1:5800"
              "unix:/run/claracore/claracore.sock"
            ];
            example = [
              "[::]:5800"
              "unix:/run/claracore/claracore.sock"
            ];
            description = ''
              Addresses clients connect to: `a.b.c.d:port`, `[v6]:port` (literal
              IP addresses, as the daemon and `ListenStream=` take them: no host
              names), or `unix:/absolute/path`. With `socketActivation` these
              become the `ListenStream=`s of the socket units.

              A rebuild that changes them restarts the daemon, but
              switch-to-configuration leaves changed `.socket` units as they
              are (and the service's `stopIfChanged = false` keeps them up across
              restarts), so apply new addresses with
              `systemctl restart claracore.socket claracore-local.socket claracore.service`.
            '';
          };
          socket_mode = mkOption {
            type = types.strMatching "0?[0-7]{3}";
            default = "0660";
            example = "0600";
            description = "Permission bits of unix sockets (`SocketMode=` with socket activation).";
          };
          llama_server = mkOption {
            type = types.str;
            default = lib.getExe' cfg.llamaCpp.package "llama-server";
            defaultText = literalExpression ''lib.getExe' config.services.claracore.llamaCpp.package "llama-server"'';
            example = "/run/current-system/sw/bin/llama-server";
            description = ''
              The llama-server binary run for models given by `model`. Set
              `llamaCpp.package` (or `acceleration`) rather than this.
            '';
          };
          state_dir = mkOption {
            type = types.str;
            default = "/var/lib/claracore";
            example = "/srv/claracore";
            description = ''
              Persistent state (the request history). The default is the
              service's `StateDirectory=`; another path is added to
              `ReadWritePaths=` and must exist, owned by the service user.
            '';
          };
          log_level = mkOption {
            type = types.str;
            default = "info";
            example = "info,claracore::child=warn";
            description = "A tracing filter; `CLARACORE_LOG` in `environmentFile` overrides it.";
          };
          http = mkOption {
            default = { };
            description = ''
              HTTP front-end limits. Keys without a default here pass through
              as written, e.g. `max_open_connections` (client connections
              open at once; left out, it is `LimitNOFILE=` less 64 for the
              daemon and, per resident model, 4 plus its `max_connections`,
              64 when unlimited; see config.example.toml).
            '';
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                max_body_bytes = mkOption {
                  type = types.ints.positive;
                  default = 33554432;
                  example = 134217728;
                  description = "Largest request body accepted; larger bodies get 413.";
                };
                header_read_timeout = duration "30s" "Time a client has to send its request head.";
                body_memory_bytes = mkOption {
                  type = types.ints.positive;
                  default = 268435456;
                  example = 1073741824;
                  description = ''
                    Request-body bytes the whole daemon holds in memory at once while it reads
                    inference requests for their model; beyond it new bodies wait up to 2 s, then
                    get 503 with Retry-After. Must be at least `max_body_bytes`. Needs a restart.
                  '';
                };
                body_read_timeout = duration "30s" "Time a client has to send its request body once the head is in; then 408.";
              };
            };
          };
          scheduler = mkOption {
            default = { };
            description = "When models start, stop and replace each other.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                max_loaded = mkOption {
                  type = types.ints.positive;
                  default = 1;
                  example = 2;
                  description = "Models resident at once; beyond it the least recently used idle one is stopped.";
                };
                idle_ttl = duration "10m" "Default unload after this much idle time; `\"0\"` = never.";
                start_timeout = duration "5m" "Deadline from spawning llama-server to its /health answering 200.";
                stop_grace = duration "10s" "SIGTERM to SIGKILL grace for a model's process group.";
                shutdown_timeout = duration "30s" "How long a stop waits for requests in flight.";
                health_interval = duration "10s" "Period of health pings to ready models; `\"0\"` = off.";
                max_queue = mkOption {
                  type = types.ints.between 1 1000000;
                  default = 256;
                  description = "Requests waiting for models (not ready yet) at once, over all models; beyond it 503 with Retry-After.";
                };
                max_wait_before_swap = duration "5s" ''
                  The fairness bound of grouping requests by model: a busy loaded model
                  is swapped out for another model's requests once the oldest of them
                  has waited this long (sooner for a higher priority); an idle one at
                  once. `"0s"` swaps at once.
                '';
                vram_reserve_mb = mkOption {
                  type = types.ints.unsigned;
                  default = 512;
                  description = "GPU memory (MiB) kept free on every GPU when placing a model.";
                };
              };
            };
          };
          gpu = mkOption {
            default = { };
            description = ''
              GPU readings through NVML (loaded at run time; without an NVIDIA driver
              there are none, which is normal). `nvml_library` (an absolute path) may be
              set here too; by default the loader's search and then
              `/run/opengl-driver/lib/libnvidia-ml.so.1` are tried.
            '';
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                enabled = mkOption {
                  type = types.bool;
                  default = true;
                  description = "Read GPU memory, use, temperature and power, and place models by measured GPU memory.";
                };
                sample_interval = duration "2s" "How often the GPUs are read (100ms to 1h).";
              };
            };
          };
          history = mkOption {
            default = { };
            description = "The SQLite request history in `state_dir`.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                enabled = mkOption {
                  type = types.bool;
                  default = true;
                  description = "Record every inference request and model event.";
                };
                content = mkOption {
                  type = types.enum [
                    "none"
                    "truncated"
                    "full"
                  ];
                  default = "truncated";
                  example = "none";
                  description = "How much prompt and response text is kept (`truncated` = first 1000 characters).";
                };
                retention = duration "30d" "Age after which request rows are deleted.";
                samples_retention = duration "7d" "Age after which resource samples are deleted.";
                queue = mkOption {
                  type = types.ints.positive;
                  default = 16384;
                  example = 65536;
                  description = "Rows waiting for the writer before new ones are dropped (and counted).";
                };
                batch_window = duration "50ms" "How long the writer gathers rows into one transaction.";
              };
            };
          };
        };
      };
    };

    apiKeys = mkOption {
      type = types.attrsOf (
        types.submodule {
          options = {
            hash = mkOption {
              type = types.strMatching "sha256:[0-9a-f]{64}";
              example = "sha256:18fdf5a0a968df83bcbe43255e56234f270b03b5e479f70adc4a8db3edb9fd58";
              description = ''
                The SHA-256 of the key's token, as `claracore key new NAME --scope …` prints it.
                Only the hash is in the config (and the store); the token stays with the client.
              '';
            };
            scopes = mkOption {
              type = types.nonEmptyListOf (types.enum [ "inference" "read" "admin" ]);
              example = [ "inference" ];
              description = "What the key may do: `inference` (model routes), `read` (history, stats, ps, metrics), `admin` (stop, backup, the raw pass-through; includes read).";
            };
            models = mkOption {
              type = types.nullOr (types.listOf types.str);
              default = null;
              description = "Models (names or aliases) the key may use; others answer 404 as if they did not exist. Null: all.";
            };
            rate = mkOption {
              type = types.nullOr types.ints.positive;
              default = null;
              description = "Requests per minute (a token bucket); beyond it 429 with Retry-After.";
            };
            expires = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "2027-01-31";
              description = "When the key stops working: a date or an RFC 3339 time.";
            };
            priority = mkOption {
              type = types.nullOr (types.ints.between (-1000) 1000);
              default = null;
              example = 10;
              description = "Added to the priority of its requests while they wait for a model.";
            };
          };
        }
      );
      default = { };
      example = literalExpression ''
        {
          ci = { hash = "sha256:…"; scopes = [ "inference" ]; models = [ "chat" ]; rate = 60; };
          grafana = { hash = "sha256:…"; scopes = [ "read" ]; };
        }
      '';
      description = ''
        API keys by name, rendered into `settings.auth.keys`. With none, loopback TCP
        serves inference to every local user and the read and admin routes are only
        reachable through the local socket; with any, every TCP request but
        /health, /live and /ready needs a key.
      '';
    };

    models = mkOption {
      type = types.attrsOf (types.submodule modelModule);
      default = { };
      example = literalExpression ''
        {
          qwen = {
            model = "/var/lib/claracore/models/qwen2.5-7b-instruct-q4_k_m.gguf";
            args = [ "-c" "8192" "-ngl" "99" ];
            aliases = [ "chat" ];
            ttl = "30m";
            group = "big";
          };
        }
      '';
      description = ''
        Models, rendered into `settings.models`. Names may contain letters,
        digits, `-`, `_`, `.` and `:`.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions =
      lib.mapAttrsToList (name: m: {
        assertion = (m.model == null) != (m.cmd == null);
        message = "services.claracore.models.${name}: set exactly one of `model` (a GGUF file) and `cmd` (a full argv).";
      }) cfg.models
      ++ map (a: {
        assertion = validListen a;
        message = "services.claracore.settings.listen: ${builtins.toJSON a} is not an address claracore (or ListenStream=) accepts: give `unix:/absolute/path`, `a.b.c.d:port` or `[v6]:port`, with a literal IP address (no host names such as localhost) and a port from 1 to 65535.";
      }) cfg.settings.listen
      ++ map (path: {
        assertion = !lib.any (dir: lib.hasPrefix "${dir}/" path) serviceOwnedDirs;
        message = "services.claracore.settings.listen: unix:${path} is inside a directory that claracore.service owns (${lib.concatStringsSep ", " serviceOwnedDirs}); systemd would hand the socket to the service user at each start. Put it elsewhere, e.g. /run/claracore/claracore.sock.";
      }) (lib.optionals cfg.socketActivation unixListen)
      ++ [
        {
          assertion = cfg.settings.listen != [ ];
          message = "services.claracore.settings.listen is empty: give at least one address.";
        }
        {
          assertion =
            lib.all isLoopback validTcp
            || (cfg.settings.auth.keys or { }) != { }
            || (cfg.settings.auth.open or false);
          message = "services.claracore.settings.listen has an address beyond loopback and no API key is configured: add services.claracore.apiKeys (claracore key new prints one) or set services.claracore.settings.auth.open = true if every client on the network may run inference.";
        }
        {
          # nixpkgs would refuse too, but later and without saying why.
          assertion =
            cfg.acceleration != "cuda"
            || options.services.claracore.llamaCpp.package.highestPrio < (lib.mkOptionDefault { }).priority
            || pkgs.config.allowUnfree or false
            || pkgs.config ? allowUnfreePredicate
            || builtins.getEnv "NIXPKGS_ALLOW_UNFREE" == "1";
          message = "services.claracore.acceleration = \"cuda\" needs CUDA, which is unfree: set nixpkgs.config.allowUnfree = true (or an allowUnfreePredicate accepting the CUDA packages). Without a binary cache that has CUDA builds, llama.cpp then compiles from source.";
        }
      ];

    warnings = lib.optional (cfg.openFirewall && validTcp != [ ] && lib.all isLoopback validTcp) "services.claracore.openFirewall is set, but every TCP address in settings.listen is a loopback address.";

    services.claracore.settings.models = lib.mapAttrs renderModel cfg.models;
    services.claracore.settings.auth.keys = lib.mapAttrs (
      _: k: lib.filterAttrs (_: v: v != null) k
    ) cfg.apiKeys;

    # Whatever user and group are configured exist (NixOS would otherwise
    # refuse a user whose primary group is not defined).
    users.users.${cfg.user} = {
      isSystemUser = true;
      inherit (cfg) group;
      home = "/var/lib/claracore";
      description = "claracore LLM server";
    };
    users.groups.${cfg.group} = { };

    # /run/claracore holds the local socket and belongs to root, not to the
    # service: the service's own runtime directory is /run/claracore/daemon,
    # and systemd chowns only that at each start. (Also puts an existing
    # /run/claracore from before back to root.) Without socket activation
    # the daemon binds the socket itself and owns the directory.
    systemd.tmpfiles.rules = lib.optional cfg.socketActivation "d /run/claracore 0755 root root -";

    environment.etc."claracore/config.toml".source = configFile;
    # The CLI (`claracore ps`, `history`, `stats`, `check-config`).
    environment.systemPackages = [ cfg.package ];

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall (
      lib.unique (map tcpPort validTcp)
    );

    systemd.sockets.claracore = mkIf (cfg.socketActivation && tcpListen != [ ]) {
      description = "claracore HTTP socket";
      wantedBy = [ "sockets.target" ];
      listenStreams = tcpListen;
      # No partOf: the socket outlives service restarts, so connections
      # queue for the new daemon instead of being refused (see also the
      # service's stopIfChanged).
      socketConfig = {
        # drift:socket-http-begin
        FileDescriptorName = "http";
        Service = "claracore.service";
        NoDelay = true;
        Backlog = 1024;
        # drift:socket-http-end
      };
    };

    systemd.sockets.claracore-local = mkIf (cfg.socketActivation && unixListen != [ ]) {
      description = "claracore local socket";
      wantedBy = [ "sockets.target" ];
      listenStreams = unixListen;
      socketConfig = {
        # drift:socket-local-begin
        FileDescriptorName = "local";
        Service = "claracore.service";
        SocketUser = "root";
        SocketGroup = cfg.group;
        SocketMode = cfg.settings.socket_mode;
        DirectoryMode = "0755";
        RemoveOnStop = true;
        # drift:socket-local-end
      };
    };

    systemd.services.claracore = {
      description = "claracore local LLM server";
      after = [ "network.target" ] ++ socketUnits;
      wants = socketUnits;
      # With socket activation the first connection starts it.
      wantedBy = lib.optional (!cfg.socketActivation) "multi-user.target";

      # A new config file is a reload (SIGHUP: the daemon re-reads it, keeps
      # running models that did not change and serves on); only listener
      # changes need a restart.
      reloadTriggers = [ configFile ];
      # Restart in one step on a rebuild that must restart it. With the
      # default (stop, then start) switch-to-configuration also stops and
      # starts the socket units of a socket-activated service, which closes
      # the listeners, drops queued connections and makes a new unix socket.
      stopIfChanged = false;
      restartTriggers = [
        (builtins.hashString "sha256" (
          builtins.toJSON {
            inherit (cfg.settings) listen socket_mode;
          }
        ))
      ];

      serviceConfig = lib.mkMerge [
        {
          # drift:service-begin
          Type = "notify-reload";
          NotifyAccess = "main";
          ExecStart = "${lib.getExe cfg.package} serve --config /etc/claracore/config.toml";
          WatchdogSec = "30s";
          Restart = "on-failure";
          RestartSec = "2s";
          RestartPreventExitStatus = 78;
          KillMode = "mixed";
          TimeoutStopSec = "60s";
          TimeoutStartSec = "30s";

          User = cfg.user;
          Group = cfg.group;
          SupplementaryGroups = supplementaryGroups;
          StateDirectory = "claracore";
          StateDirectoryMode = "0750";
          ConfigurationDirectory = "claracore";
          # Not /run/claracore itself, where the local socket lives: systemd
          # would chown it and the socket in it to the service user.
          RuntimeDirectory = "claracore/daemon";
          RuntimeDirectoryMode = "0750";

          MemoryHigh = optionalSetting cfg.memoryHigh;
          MemoryMax = optionalSetting cfg.memoryMax;
          OOMPolicy = "continue";
          TasksMax = optionalSetting cfg.tasksMax;
          CPUQuota = optionalSetting cfg.cpuQuota;
          LimitNOFILE = 65536;

          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
          NoNewPrivileges = true;
          DevicePolicy = "closed";
          DeviceAllow = deviceAllow;
          PrivateDevices = acceleration == null;
          PrivateTmp = true;
          # Listeners come from the socket units and model processes listen
          # on unix sockets: no network of its own (loopback only). Without
          # socket activation the daemon binds itself and needs the host's.
          PrivateNetwork = cfg.socketActivation;
          PrivateMounts = true;
          ProtectSystem = "strict";
          ProtectHome = true;
          ProtectClock = true;
          ProtectControlGroups = true;
          ProtectHostname = true;
          ProtectKernelLogs = true;
          ProtectKernelModules = true;
          ProtectKernelTunables = true;
          ProtectProc = "invisible";
          RestrictAddressFamilies = [
            "AF_INET"
            "AF_INET6"
            "AF_UNIX"
          ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          RemoveIPC = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [
            "@system-service"
            "~@privileged"
          ];
          SystemCallErrorNumber = "EPERM";
          UMask = "0027";
          # drift:service-end

          # The units whose fds the daemon gets (both name this service).
          Sockets = socketUnits;
          EnvironmentFile = mkIf (cfg.environmentFile != null) cfg.environmentFile;
          LoadCredential = lib.mapAttrsToList (name: path: "${name}:${path}") cfg.credentials;
          ReadWritePaths = lib.optional (cfg.settings.state_dir != "/var/lib/claracore") cfg.settings.state_dir;
        }
        # Without socket activation the daemon binds unix:/run/claracore/...
        # itself, so it owns that directory too (listed after
        # claracore/daemon: the first is $RUNTIME_DIRECTORY, where the models'
        # sockets go).
        (mkIf (!cfg.socketActivation) { RuntimeDirectory = [ "claracore" ]; })
      ];
    };
  };
}
