# Every *.nix file beside this one is a NixOS VM test: one scenario, just
# `name`, `nodes` and `testScript`. Each is wrapped here, once, with
# runNixOSTest, a global timeout, the claracore module and a machine that
# serves the tiny test model (lib/machine.nix). Helpers live in lib/.
{ pkgs }:
let
  inherit (pkgs) lib;

  tinyModel = pkgs.callPackage ./lib/tiny-model.nix { };

  runTest =
    file:
    pkgs.testers.runNixOSTest {
      imports = [ file ];
      globalTimeout = 15 * 60;
      defaults.imports = [
        ../module.nix
        ./lib/machine.nix
      ];
      node.specialArgs = { inherit tinyModel; };
    };

  testFiles = lib.filterAttrs (
    name: type: type == "regular" && lib.hasSuffix ".nix" name && name != "default.nix"
  ) (builtins.readDir ./.);
in
lib.mapAttrs' (
  file: _: lib.nameValuePair (lib.removeSuffix ".nix" file) (runTest (./. + "/${file}"))
) testFiles
