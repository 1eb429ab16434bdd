# Evaluates flake.nix's outputs against a stand-in nixpkgs
# (tests/nix/stub-nixpkgs.nix: the real `lib`, stub packages) to check the
# wiring only `nix flake check` would otherwise see: outputs per system, the
# overlay, the package's source file set and test flags, the checks (VM tests
# picked up from nix/tests/), the dev shell, the formatter, and the NixOS
# module the flake exports (evaluated with tests/nix/nixos-stubs.nix).
#
#   NIXPKGS_LIB=/path/to/nixpkgs.lib \
#     nix-instantiate --eval --strict --json tests/nix/eval-flake.nix
let
  lib = import ./nixpkgs-lib.nix;
  root = ../..;
  system = "x86_64-linux";

  flake = import (root + "/flake.nix");
  outputs = flake.outputs {
    self = outputs // {
      outPath = toString root;
    };
    nixpkgs = {
      inherit lib;
      outPath = toString ./stub-nixpkgs.nix;
    };
  };

  pkg = outputs.packages.${system}.default;
  shell = outputs.devShells.${system}.default;
  checks = outputs.checks.${system};
  relative = map (p: lib.removePrefix (toString root + "/") (toString p));

  # nixosModules.default in a system, as nixosSystem would import it.
  stubs = import ./nixos-stubs.nix { inherit lib; };
  evalNixos =
    extra:
    (lib.evalModules {
      modules = [
        stubs.module
        outputs.nixosModules.default
        { _module.args.pkgs = stubs.pkgs { hostSystem = system; }; }
        { services.claracore.enable = true; }
        extra
      ];
    }).config.services.claracore.package;
  moduleArgs = {
    inherit lib;
    pkgs = stubs.pkgs { };
    config = { };
  };
in
{
  inputs = builtins.attrNames flake.inputs;
  outputs = builtins.attrNames outputs;
  systems = lib.mapAttrs (_: builtins.attrNames) {
    inherit (outputs)
      packages
      apps
      checks
      devShells
      formatter
      ;
  };
  packages = builtins.attrNames outputs.packages.${system};
  sameDefault = pkg == outputs.packages.${system}.claracore;
  package = {
    inherit (pkg) pname version cargoTestFlags;
    inherit (pkg.meta) mainProgram platforms;
    cargoLock = relative [ pkg.cargoLock.lockFile ];
    sourceDirs = lib.unique (
      map (p: builtins.head (lib.splitString "/" p)) (
        relative (lib.fileset.toList (lib.fileset.fromSource pkg.src))
      )
    );
  };
  overlay = builtins.attrNames (outputs.overlays.default { callPackage = _: _: null; } { });
  app = {
    inherit (outputs.apps.${system}.default) type program;
  };
  nixosModules = builtins.attrNames outputs.nixosModules;
  moduleImports = lib.unique (
    relative (
      (outputs.nixosModules.default moduleArgs).imports
      ++ (outputs.nixosModules.claracore moduleArgs).imports
    )
  );
  modulePackage = toString (evalNixos { });
  modulePackagePriority =
    ((outputs.nixosModules.default moduleArgs).services.claracore.package).priority;
  flakePackage = toString outputs.packages.${system}.claracore;
  modulePackageOverride =
    (evalNixos { services.claracore.package = stubs.mkPkg "override" { }; }).name;
  checks = builtins.attrNames checks;
  vmTests = lib.mapAttrs (_: t: {
    inherit (t)
      testName
      testAttrs
      globalTimeout
      specialArgs
      ;
    defaults = relative t.defaults;
  }) (lib.filterAttrs (n: _: lib.hasPrefix "vm-" n) checks);
  clippy = {
    inherit (checks.clippy) buildPhase;
    sourceDirs = lib.unique (
      map (p: builtins.head (lib.splitString "/" p)) (
        relative (lib.fileset.toList (lib.fileset.fromSource checks.clippy.src))
      )
    );
  };
  # (not checks.fmt.script: it names the source's store path, which would
  # copy the tree into the store)
  unitDrift = checks.unit-drift.script;
  devShell = {
    inherit (shell) env;
    packages = map (p: p.name) shell.packages;
    python = (lib.findFirst (p: p.name == "python3-with-packages") null shell.packages).packages;
  };
  formatter = outputs.formatter.${system}.name;
}
