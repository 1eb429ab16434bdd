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
    name: m:
    let
      file = modelFile m;
    in
    lib.filterAttrs (_: v: v != null && v != [ ] && v != { }) (
      removeAttrs m [ "source" ]
      // {
        # A path literal is copied into the store; a string is used as is.
        model =
          if file == null then
            null
          else if builtins.isPath file then
            "${file}"
          else
            toString file;
        # The folder scan would serve a fetched file a second time under
        # its own name; a table's alias of that name takes its place.
        aliases =
          m.aliases
          ++ lib.optional (
            m.source != null && folderName m != name && !builtins.elem (folderName m) m.aliases
          ) (folderName m);
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

  # Models folders and the Ollama store: what the daemon reads, and what
  # its unit must open for that. ProtectSystem=strict leaves every path
  # readable but /home, /root and /run/user, which ProtectHome=true hides;
  # the state directories are the service's own already.
  stateDirs = lib.unique [
    "/var/lib/claracore"
    cfg.settings.state_dir
  ];
  isUnder = dirs: p: lib.any (d: p == d || lib.hasPrefix "${d}/" p) dirs;
  homeDirs = [
    "/home"
    "/root"
    "/run/user"
  ];
  modelReadPaths = lib.filter (p: !isUnder ([ builtins.storeDir ] ++ stateDirs) p) (
    # (`settings` leaves unset keys out: see its `apply`.)
    map toString ((cfg.settings.models_dir or [ ]) ++ lib.optional (cfg.settings ? ollama_models) cfg.settings.ollama_models)
  );
  homeModelPaths = lib.filter (isUnder homeDirs) modelReadPaths;
  otherModelPaths = lib.filter (p: !isUnder homeDirs p) modelReadPaths;

  # Models with a `source`: fetched by claracore-fetch-NAME into modelsDir.
  sourced = lib.filterAttrs (_: m: m.source != null) cfg.models;
  # A pull of hf.co/USER/REPO/DIR/FILE.gguf lands as modelsDir/FILE.gguf
  # (in modelsDir/<name>/ instead when the repository has a projector).
  sourceDest = m: "${cfg.modelsDir}/${baseNameOf m.source.file}";
  # The name the folder scan gives that file (src/sources/folder.rs).
  folderName = m: lib.toLower (lib.removeSuffix ".gguf" (baseNameOf m.source.file));
  isSplitPart = file: builtins.match ".*-[0-9]{5}-of-[0-9]{5}[.]gguf" file != null;
  # The GGUF a model serves: its `model`, else the file its source fetches.
  modelFile =
    m:
    if m.model != null then
      m.model
    else if m.source != null && m.cmd == null && cfg.modelsDir != null then
      sourceDest m
    else
      null;
  # The state directory is the service's own (StateDirectory=); any other
  # models folder is made by tmpfiles for the fetch units to write into.
  modelsDirInState = cfg.modelsDir != null && isUnder [ "/var/lib/claracore" ] cfg.modelsDir;

  # The daemon's hardening settings the fetch units share (not its
  # Type=, watchdog, sockets, private network or devices).
  sharedHardening = [
    "CapabilityBoundingSet"
    "AmbientCapabilities"
    "NoNewPrivileges"
    "PrivateTmp"
    "PrivateMounts"
    "ProtectSystem"
    "ProtectHome"
    "ProtectClock"
    "ProtectControlGroups"
    "ProtectHostname"
    "ProtectKernelLogs"
    "ProtectKernelModules"
    "ProtectKernelTunables"
    "ProtectProc"
    "RestrictNamespaces"
    "RestrictRealtime"
    "RestrictSUIDSGID"
    "LockPersonality"
    "MemoryDenyWriteExecute"
    "SystemCallArchitectures"
    "SystemCallFilter"
    "SystemCallErrorNumber"
    "UMask"
  ];

  fetchScript =
    name: m:
    let
      s = m.source;
      # Where the file must end up: `model` when given (the subfolder of a
      # repository with a projector, say), else modelsDir/FILE.
      dest = toString (modelFile m);
      sidecar = "${dirOf dest}/.${baseNameOf dest}.source";
      sha256sum = lib.getExe' pkgs.coreutils "sha256sum";
      grep = lib.getExe' pkgs.gnugrep "grep";
    in
    pkgs.writeShellScript "claracore-fetch-${name}" ''
      set -euo pipefail
      # In place and recorded by an earlier pull as this hash (which that
      # pull verified): nothing to do, no network needed.
      if [ -f ${lib.escapeShellArg dest} ] && ${grep} -qi ${lib.escapeShellArg "\"sha256\": \"${s.sha256}\""} ${lib.escapeShellArg sidecar} 2>/dev/null; then
        exit 0
      fi
      ${lib.getExe cfg.package} pull ${lib.escapeShellArg "hf.co/${s.hf}/${s.file}"} \
        --dir ${lib.escapeShellArg cfg.modelsDir} --revision ${lib.escapeShellArg s.revision}
      if [ ! -f ${lib.escapeShellArg dest} ]; then
        echo "claracore-fetch-${name}: the pull did not put ${s.file} at ${dest}: where ${s.hf} has a projector, the pair goes to a subfolder of ${cfg.modelsDir}; set services.claracore.models.${name}.model (and --mmproj in args) to those paths" >&2
        exit 65
      fi
      # The pull checked the hub's hash; this is the one declared. On a
      # mismatch (the revision moved, say) the file must not be served, and
      # fetching it again would give the same: exit 65, not restarted.
      if ! echo ${lib.escapeShellArg "${s.sha256}  ${dest}"} | ${sha256sum} -c -; then
        rm -f ${lib.escapeShellArg dest} ${lib.escapeShellArg sidecar}
        echo "claracore-fetch-${name}: ${s.hf}/${s.file} at ${s.revision} is not the declared sha256 ${s.sha256}; removed it. Pin source.revision to a commit, or update source.sha256" >&2
        exit 65
      fi
    '';

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
        source = mkOption {
          default = null;
          example = literalExpression ''
            {
              hf = "Qwen/Qwen2.5-7B-Instruct-GGUF";
              file = "qwen2.5-7b-instruct-q4_k_m.gguf";
              sha256 = "…";  # 64 hex digits, the file's SHA-256 (the hub shows it)
              revision = "main";
            }
          '';
          description = ''
            Where the GGUF of model `${name}` comes from: a oneshot unit,
            `claracore-fetch-${name}.service`, runs
            `claracore pull hf.co/HF/FILE --dir <modelsDir> --revision REVISION`
            as the service user at boot (and when the source changes), then
            checks the file against `sha256` (`sha256sum -c`); it retries on
            failure (no network yet, say) every 30 s. Needs
            `services.claracore.modelsDir`; `model` then defaults to
            `<modelsDir>/<basename of FILE>`. The daemon does not wait for it:
            the file appears through the watched folder, and until then a
            request for the model fails to load it. Gated repositories need
            `services.claracore.hfTokenFile`.

            The alternative is a fixed-output derivation as `model`:
            `model = pkgs.fetchurl { url = "https://huggingface.co/USER/REPO/resolve/REV/FILE"; hash = "sha256-…"; };`
            The build then fetches and checks the file, `check-config --strict`
            sees it, and it is served read-only from the store; but a
            multi-GB file then lives in the Nix store (copied with the
            closure to every machine deployed to, and kept until garbage
            collected with every generation that names it).
          '';
          type = types.nullOr (
            types.submodule {
              options = {
                hf = mkOption {
                  type = types.strMatching "[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*";
                  example = "Qwen/Qwen2.5-7B-Instruct-GGUF";
                  description = "The Hugging Face repository, `USER/REPO`.";
                };
                file = mkOption {
                  type = types.strMatching "([^/.][^/]*/)*[^/.][^/]*[.]gguf";
                  example = "qwen2.5-7b-instruct-q4_k_m.gguf";
                  description = "The GGUF's path in the repository (one file, not the part of a split model).";
                };
                sha256 = mkOption {
                  type = types.strMatching "[0-9a-f]{64}";
                  description = "The file's SHA-256, hex (the hub lists it as the file's LFS `oid`).";
                };
                revision = mkOption {
                  type = types.str;
                  default = "main";
                  example = "3c4f2e9a1b0d8e7f6a5b4c3d2e1f0a9b8c7d6e5f";
                  description = ''
                    A branch, tag or commit. A commit keeps `sha256` true
                    when the branch moves on.
                  '';
                };
              };
            }
          );
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

    modelsDir = mkOption {
      type = types.nullOr externalPath;
      default = null;
      example = "/var/lib/claracore/models";
      description = ''
        The models folder: added to `settings.models_dir` (watched, every
        GGUF in it served), where `models.<name>.source` fetches to and
        `sudo -u claracore claracore pull REF --dir DIR` writes. The daemon
        only reads it. Under `/var/lib/claracore` it is the service's own
        state directory and needs nothing more; elsewhere it is created
        (mode 0750, owned by the service user) and made writable for the
        fetch units only (`ReadWritePaths=`). Under `/home`, `/root` or
        `/run/user`, which the unit's `ProtectHome=` hides, it is bound
        into the units' view (`BindReadOnlyPaths=`/`BindPaths=` with
        `ProtectHome=tmpfs`). Not in the Nix store.
      '';
    };

    ollamaModels = mkOption {
      type = types.nullOr externalPath;
      default = null;
      example = "/var/lib/ollama/models";
      description = ''
        An Ollama store (the folder with `manifests/` and `blobs/`) served
        read-only in place: becomes `settings.ollama_models`, and the unit
        gets it read-only (bound in with `ProtectHome=tmpfs` when under
        `/home`, where the rest of the home directory stays hidden). The
        service user must be able to read its files (e.g. add `claracore`
        to the store owner's group); note that a store under
        `/var/lib/private` (`DynamicUser=`) is not reachable.
      '';
    };

    hfTokenFile = mkOption {
      type = types.nullOr externalPath;
      default = null;
      example = "/run/secrets/hf-token";
      description = ''
        A file holding a Hugging Face token, for `models.<name>.source` in
        gated or private repositories: handed to the fetch units as the
        credential `hf_token` (`LoadCredential=`). Not in the Nix store.
      '';
    };

    hfEndpoint = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://hf-mirror.example.org";
      description = "`HF_ENDPOINT` for the fetch units: a mirror or an air-gapped hub; `null`: huggingface.co.";
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
      # TOML has no null: the new keys, when unset, stay out of the file.
      apply =
        s:
        let
          defaults = lib.filterAttrs (_: v: v != null && v != [ ]) s.models_defaults;
        in
        removeAttrs s (
          lib.optional (s.models_dir == [ ]) "models_dir"
          ++ lib.optional (s.ollama_models == null) "ollama_models"
          ++ [ "models_defaults" ]
        )
        // lib.optionalAttrs (defaults != { }) { models_defaults = defaults; };
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
          models_dir = mkOption {
            type = types.coercedTo types.path lib.singleton (types.listOf types.path);
            default = [ ];
            example = [
              "/var/lib/claracore/models"
              "/srv/gguf"
            ];
            description = ''
              Folders (absolute paths) whose every `*.gguf` is a model, named
              after its file stem in lower case; they are watched (inotify),
              so a file copied in or placed by `claracore pull` is served
              without a reload. A path or a list. The daemon needs to read
              them; the unit is opened for that (see `modelsDir`). Set
              `services.claracore.modelsDir` for the folder that pulls and
              `models.<name>.source` write to.
            '';
          };
          ollama_models = mkOption {
            type = types.nullOr types.path;
            default = null;
            example = "/var/lib/ollama/models";
            description = ''
              An Ollama store served read-only in place, under Ollama's names.
              Set `services.claracore.ollamaModels` rather than this: it also
              opens the path in the unit.
            '';
          };
          models_defaults = mkOption {
            default = { };
            description = ''
              What the models of `models_dir` and `ollama_models` get; a
              `models.<name>` of the same name (or alias) replaces the found
              model altogether.
            '';
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                args = mkOption {
                  type = types.listOf types.str;
                  default = [ ];
                  example = [
                    "-c"
                    "4096"
                  ];
                  description = "Extra llama-server arguments.";
                };
                ttl = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  example = "10m";
                  description = "Idle time before unloading; `null` inherits `scheduler.idle_ttl`.";
                };
                group = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  example = "small";
                  description = "Their group: models in one group replace each other.";
                };
              };
            };
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

  config = mkIf cfg.enable (lib.mkMerge [ {
    assertions =
      lib.mapAttrsToList (name: m: {
        assertion = (modelFile m == null) != (m.cmd == null);
        message = "services.claracore.models.${name}: set exactly one of `model` (a GGUF file, or `source` to fetch one) and `cmd` (a full argv).";
      }) cfg.models
      ++ lib.mapAttrsToList (name: _: {
        assertion = cfg.modelsDir != null;
        message = "services.claracore.models.${name}.source needs services.claracore.modelsDir, the folder it is fetched into (e.g. \"/var/lib/claracore/models\").";
      }) sourced
      ++ lib.mapAttrsToList (name: m: {
        assertion = !isSplitPart m.source.file;
        message = "services.claracore.models.${name}.source.file: ${m.source.file} is one part of a split model, which one sha256 cannot cover; give its `model` and fetch the parts with `claracore pull`.";
      }) sourced
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
    services.claracore.settings.models_dir = lib.optional (cfg.modelsDir != null) cfg.modelsDir;
    services.claracore.settings.ollama_models = mkIf (cfg.ollamaModels != null) cfg.ollamaModels;
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
    systemd.tmpfiles.rules =
      lib.optional cfg.socketActivation "d /run/claracore 0755 root root -"
      # A models folder outside the state directory, for pulls to write to.
      ++ lib.optional (
        cfg.modelsDir != null && !modelsDirInState
      ) "d ${cfg.modelsDir} 0750 ${cfg.user} ${cfg.group} -";

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
        # Models folders and the Ollama store, read-only. ProtectSystem=strict
        # already leaves other paths readable, but naming them says so and
        # keeps them read-only should that change ("-": a store not there
        # yet does not fail the start). /home, /root and /run/user are
        # hidden by ProtectHome=true, which no ReadOnlyPaths= undoes: there
        # ProtectHome=tmpfs gives an empty home in which only these are
        # bound (read-only), which ProtectHome=read-only would not (it
        # shows every home directory).
        (mkIf (otherModelPaths != [ ]) { ReadOnlyPaths = map (p: "-${p}") otherModelPaths; })
        (mkIf (homeModelPaths != [ ]) {
          ProtectHome = lib.mkForce "tmpfs";
          BindReadOnlyPaths = map (p: "-${p}") homeModelPaths;
        })
      ];
    };

  }
  {
    # One oneshot per model with a `source`. Nothing of the daemon requires
    # or waits for them (no Before=: with socket activation the first
    # client would otherwise wait out a multi-GB download), so a rebuild
    # that adds or changes a source starts only its fetch unit; the file
    # appears through the watched folder.
    systemd.services = lib.mapAttrs' (
      name: m:
      lib.nameValuePair "claracore-fetch-${name}" {
        description = "claracore: fetch model ${name} (${m.source.hf}/${m.source.file})";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        # The retries below may outlast the default start limit.
        unitConfig.StartLimitIntervalSec = 0;
        serviceConfig = lib.mkMerge [
          (lib.getAttrs sharedHardening config.systemd.services.claracore.serviceConfig)
          {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = fetchScript name m;
            # No network or full disk yet: try again. 65: the file is not
            # the declared one, which another try would not change.
            Restart = "on-failure";
            RestartSec = "30s";
            RestartPreventExitStatus = 65;
            User = cfg.user;
            Group = cfg.group;
            PrivateDevices = true;
            DevicePolicy = "closed";
            # Its own network (the hub), unlike the daemon.
            PrivateNetwork = false;
            RestrictAddressFamilies = [
              "AF_INET"
              "AF_INET6"
              "AF_UNIX"
            ];
            Environment = lib.optional (cfg.hfEndpoint != null) "HF_ENDPOINT=${cfg.hfEndpoint}";
            LoadCredential = lib.optional (cfg.hfTokenFile != null) "hf_token:${cfg.hfTokenFile}";
          }
          # The one place it writes.
          (
            if modelsDirInState then
              {
                StateDirectory = "claracore";
                StateDirectoryMode = "0750";
              }
            else if isUnder homeDirs cfg.modelsDir then
              {
                ProtectHome = lib.mkForce "tmpfs";
                BindPaths = [ cfg.modelsDir ];
              }
            else
              { ReadWritePaths = [ cfg.modelsDir ]; }
          )
        ];
      }
    ) (lib.filterAttrs (_: _: cfg.modelsDir != null) sourced);
  }
  ]);
}
