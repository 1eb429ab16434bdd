# Stand-ins for the parts of NixOS and nixpkgs that nix/module.nix touches,
# for evaluating it with nixpkgs' `lib` alone (tests/nix/eval-module.nix,
# tests/nix/eval-flake.nix). Where NixOS checks a value, the stub checks it
# the same way, so that what NixOS would refuse is refused here too:
#
#   - unit names (after, wants, wantedBy, ...) have NixOS's unit-name type;
#   - serviceConfig carries NixOS's checkService (Type= and Restart= from
#     its lists: Restart=on-watchdog is refused there, so here too);
#   - unit settings merge as NixOS's unitOption does (lists concatenate;
#     a mix of list and non-list definitions is a list);
#   - stopIfChanged, restartIfChanged, reloadIfChanged exist on services
#     only, as in NixOS (not on sockets);
#   - users: NixOS's assertions that a user's primary group is defined,
#     that it is a system user or a normal user, and that its group is set.
#
# Written from NixOS's documented behaviour (nixos/lib/systemd-lib.nix,
# systemd-unit-options.nix, config/users-groups.nix), not copied.
{ lib }:
let
  inherit (lib) mkOption types;

  # A derivation that is never built: `derivation` gives its outPath the
  # string context a real package has (nix-instantiate --eval only computes
  # the paths), so `builtins.hasContext` and string interpolation behave as
  # with nixpkgs. `seed` changes the path, as inputs change a real output.
  mkPkg =
    name: attrs:
    derivation {
      inherit name;
      system = "stub";
      builder = "stub";
      seed = attrs.seed or "";
    }
    // {
      meta = { };
    }
    // removeAttrs attrs [ "seed" ];

  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";

  unitOption = types.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (def: builtins.isList def.value) defs' then
        lib.concatMap (def: lib.toList def.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };

  # checkService: the value one definition gives (mkIf/mkOverride unwrapped,
  # as NixOS's checkUnitConfig does), against NixOS's lists.
  oneOf =
    key: allowed: attrs:
    lib.optional (
      attrs ? ${key} && !builtins.elem attrs.${key} allowed
    ) "Systemd Service field `${key}' cannot have value `${toString attrs.${key}}'.";
  checkService =
    attrs:
    let
      defs = lib.mapAttrs (
        _: v:
        if builtins.elem (v._type or "") [
          "override"
          "if"
        ] then
          v.content
        else
          v
      ) attrs;
      errors =
        oneOf "Type" [
          "exec"
          "simple"
          "forking"
          "oneshot"
          "dbus"
          "notify"
          "notify-reload"
          "idle"
        ] defs
        ++ oneOf "Restart" [
          "no"
          "on-success"
          "on-failure"
          "on-abnormal"
          "on-abort"
          "always"
        ] defs;
    in
    if errors == [ ] then true else builtins.trace (lib.concatStringsSep "\n" errors) false;

  unitNames = mkOption {
    type = types.listOf unitNameType;
    default = [ ];
  };
  commonUnitOptions = {
    description = mkOption {
      type = types.singleLineStr;
      default = "";
    };
    documentation = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    wantedBy = unitNames;
    requiredBy = unitNames;
    after = unitNames;
    before = unitNames;
    wants = unitNames;
    requires = unitNames;
    bindsTo = unitNames;
    partOf = unitNames;
    conflicts = unitNames;
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
  boolOption =
    default:
    mkOption {
      type = types.bool;
      inherit default;
    };

  module =
    { config, ... }:
    {
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
              options = commonUnitOptions // {
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
                  type = types.addCheck (types.attrsOf unitOption) checkService;
                  default = { };
                };
                restartIfChanged = boolOption true;
                reloadIfChanged = boolOption false;
                stopIfChanged = boolOption true;
              };
            }
          );
        };
        systemd.sockets = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule {
              options = commonUnitOptions // {
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
        systemd.tmpfiles.rules = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        users.users = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule (
              { name, ... }:
              {
                options = {
                  name = mkOption {
                    type = types.str;
                    default = name;
                  };
                  isSystemUser = boolOption false;
                  isNormalUser = boolOption false;
                  uid = mkOption {
                    type = types.nullOr types.int;
                    default = null;
                  };
                  group = mkOption {
                    type = types.str;
                    default = "";
                  };
                  extraGroups = mkOption {
                    type = types.listOf types.str;
                    default = [ ];
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
            )
          );
        };
        users.groups = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule {
              options.gid = mkOption {
                type = types.nullOr types.int;
                default = null;
              };
            }
          );
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

      # What NixOS asserts about every user (config/users-groups.nix).
      config.assertions = lib.concatLists (
        lib.mapAttrsToList (name: user: [
          {
            assertion = user.group == "" || config.users.groups ? ${user.group};
            message = "The following users have a primary group that is undefined: ${name}";
          }
          {
            assertion = user.isSystemUser != user.isNormalUser;
            message = "Exactly one of users.users.${name}.isSystemUser and users.users.${name}.isNormalUser must be set.";
          }
          {
            assertion = user.group != "";
            message = "users.users.${name}.group is unset.";
          }
        ]) config.users.users
      );
    };

  # A stand-in `pkgs`: nixpkgs' config (`nixpkgs.config`) and platforms,
  # formats.toml, runCommand, llama-cpp, claracore.
  pkgs =
    {
      nixpkgsConfig ? { },
      buildSystem ? "x86_64-linux",
      hostSystem ? "x86_64-linux",
    }:
    let
      platform = system: {
        inherit system;
        # As nixpkgs' canExecute, for the systems used here.
        canExecute = other: other.system == system;
      };
      llamaCpp = mkPkg "llama-cpp" {
        meta.mainProgram = "llama";
        src = mkPkg "llama-cpp-source" { };
        override =
          args:
          let
            flags = lib.mapAttrsToList (k: v: if v then k else "no-${k}") args;
          in
          mkPkg "llama-cpp-${lib.concatStringsSep "-" flags}" {
            meta.mainProgram = "llama";
          };
      };
    in
    {
      config = nixpkgsConfig;
      stdenv = {
        buildPlatform = platform buildSystem;
        hostPlatform = platform hostSystem;
      };
      claracore = mkPkg "claracore" { meta.mainProgram = "claracore"; };
      coreutils = mkPkg "coreutils" { meta.mainProgram = "coreutils"; };
      gnugrep = mkPkg "gnugrep" { meta.mainProgram = "grep"; };
      writeShellScript =
        name: text:
        mkPkg name {
          seed = text;
          inherit text;
        };
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
in
{
  inherit mkPkg module pkgs;
}
