# Evaluates flake.nix's outputs against a stand-in nixpkgs
# (tests/nix/stub-nixpkgs.nix: the real `lib`, stub packages) to check the
# wiring only `nix flake check` would otherwise see: outputs per system, the
# overlay, the package's source file set and test flags, the checks (VM tests
# picked up from nix/tests/), the dev shell and the formatter.
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
  moduleFile = relative [ outputs.nixosModules.default ];
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
