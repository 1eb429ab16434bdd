# A stand-in for nixpkgs, for tests/nix/eval-flake.nix: `import nixpkgs {
# inherit system; overlays = ...; }` in flake.nix lands here. The real `lib`
# (from $NIXPKGS_LIB, a nixpkgs lib checkout) and stub packages: enough for
# flake.nix, nix/package.nix, nix/checks.nix, nix/tests/default.nix and
# nix/tests/lib/tiny-model.nix to evaluate. Nothing is built.
{
  system,
  overlays ? [ ],
  ...
}:
let
  lib = import ./nixpkgs-lib.nix;

  mkPkg =
    name: attrs:
    {
      type = "derivation";
      inherit name;
      outPath = "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
      outputs = [ "out" ];
      meta = { };
    }
    // attrs;

  base = final: {
    inherit lib system;
    config = { };

    callPackage =
      f: args:
      let
        fn = if builtins.isFunction f then f else import f;
      in
      fn (builtins.intersectAttrs (lib.functionArgs fn) final // args);

    rustPlatform = {
      buildRustPackage =
        attrs:
        let
          drv = mkPkg "${attrs.pname}-${attrs.version}" (
            attrs
            // attrs.passthru or { }
            // {
              nativeBuildInputs = attrs.nativeBuildInputs or [ ];
              overrideAttrs = f: mkPkg "${attrs.pname}-overridden" (drv // f drv);
            }
          );
        in
        drv;
      rustLibSrc = mkPkg "rust-lib-src" { };
    };

    runCommand =
      name: env: script:
      mkPkg name (env // { inherit script; });

    mkShell = attrs: mkPkg "nix-shell" attrs;

    python3 = mkPkg "python3" {
      meta.mainProgram = "python3";
      withPackages =
        f:
        mkPkg "python3-with-packages" {
          meta.mainProgram = "python3";
          packages = map (p: p.name) (
            f {
              gguf = mkPkg "gguf" { };
              numpy = mkPkg "numpy" { };
              prometheus-client = mkPkg "prometheus-client" { };
            }
          );
        };
    };

    llama-cpp = mkPkg "llama-cpp" {
      meta.mainProgram = "llama";
      src = mkPkg "llama-cpp-source" { };
    };

    # The test file itself is a plain attribute set: name, nodes, testScript.
    testers.runNixOSTest =
      test:
      let
        file = import (builtins.head test.imports);
      in
      mkPkg "vm-test-${file.name}" {
        inherit (test) globalTimeout;
        testName = file.name;
        testAttrs = builtins.attrNames file;
        defaults = map toString test.defaults.imports;
        specialArgs = builtins.attrNames test.node.specialArgs;
      };
  }
  // lib.genAttrs [
    "cargo"
    "clippy"
    "rustfmt"
    "rust-analyzer"
    "sqlite"
    "nixfmt"
    "nixfmt-tree"
  ] (name: mkPkg name { meta.mainProgram = name; });
in
lib.fix (lib.foldl' (acc: overlay: lib.extends overlay acc) base overlays)
