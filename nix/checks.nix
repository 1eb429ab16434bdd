# `nix flake check`: the package (with its unit tests), clippy, rustfmt, the
# unit-file drift check, and every NixOS VM test in nix/tests/ as `vm-<name>`.
{ pkgs }:
let
  inherit (pkgs) lib claracore;

  withClippyConfig = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      (lib.fileset.fromSource claracore.src)
      (lib.fileset.maybeMissing ../clippy.toml)
    ];
  };

  vmTests = import ./tests { inherit pkgs; };
in
{
  package = claracore;

  clippy = claracore.overrideAttrs (old: {
    pname = "claracore-clippy";
    src = withClippyConfig;
    nativeBuildInputs = old.nativeBuildInputs ++ [ pkgs.clippy ];
    # No postBuild hooks: cargo's install hook expects a release build.
    buildPhase = ''
      runHook preBuild
      cargo clippy --all-targets --offline --locked -- -D warnings
    '';
    installPhase = "touch $out";
    doCheck = false;
    doInstallCheck = false;
  });

  fmt =
    pkgs.runCommand "claracore-fmt"
      {
        nativeBuildInputs = [
          pkgs.cargo
          pkgs.rustfmt
        ];
      }
      ''
        export CARGO_HOME=$TMPDIR/cargo-home
        cp -r ${claracore.src} src && chmod -R u+w src && cd src
        cargo fmt --check
        touch $out
      '';

  # The module's service/socket settings against systemd/*.service|socket,
  # without evaluating anything (the same check tests/nix/check.sh runs).
  unit-drift =
    pkgs.runCommand "claracore-unit-drift"
      {
        nativeBuildInputs = [ pkgs.python3 ];
        src = lib.fileset.toSource {
          root = ../.;
          fileset = lib.fileset.unions [
            ../systemd
            ./module.nix
            ../tests/nix/nixcheck.py
          ];
        };
      }
      ''
        cd $src
        python3 tests/nix/nixcheck.py static
        touch $out
      '';
}
// lib.mapAttrs' (name: test: lib.nameValuePair "vm-${name}" test) vmTests
