{
  description = "claracore: serves local LLMs through on-demand llama.cpp llama-server processes";

  # Pinned in flake.lock to nixos-unstable 567a49d1913ce81ac6e9582e3553dd90a955875f
  # (2026-06-16), the revision and narHash nix-community/lanzaboote's flake.lock
  # locks. `nix flake update` moves it.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      pkgsFor = lib.genAttrs systems (
        system:
        import nixpkgs {
          inherit system;
          overlays = [ self.overlays.default ];
        }
      );
      forAllSystems = f: lib.genAttrs systems (system: f pkgsFor.${system});
    in
    {
      overlays.default = final: _prev: {
        claracore = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (pkgs: {
        inherit (pkgs) claracore;
        default = pkgs.claracore;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = lib.getExe pkgs.claracore;
          meta.description = "claracore daemon and CLI (`nix run . -- serve --config FILE`)";
        };
      });

      # nix/module.nix with this flake's own claracore as the package's
      # default, built with the nixpkgs pinned here: the system's nixpkgs may
      # have a Rust older than Cargo.toml's rust-version. (nix/module.nix on
      # its own uses pkgs.claracore, else builds nix/package.nix with the
      # system's nixpkgs.) services.claracore.package still overrides it.
      nixosModules = {
        claracore =
          { lib, pkgs, ... }:
          {
            _file = "${toString ./flake.nix}#nixosModules.claracore";
            imports = [ ./nix/module.nix ];
            services.claracore.package = lib.mkDefault (
              self.packages.${pkgs.stdenv.hostPlatform.system}.claracore
                or (pkgs.callPackage ./nix/package.nix { })
            );
          };
        default = self.nixosModules.claracore;
      };

      checks = forAllSystems (pkgs: import ./nix/checks.nix { inherit pkgs; });

      devShells = forAllSystems (pkgs: {
        default =
          let
            python = pkgs.python3.withPackages (ps: [
              ps.gguf
              ps.numpy
              ps.prometheus-client
            ]);
            tinyModel = pkgs.callPackage ./nix/tests/lib/tiny-model.nix { };
          in
          pkgs.mkShell {
            inputsFrom = [ pkgs.claracore ];
            packages = [
              pkgs.cargo
              pkgs.clippy
              pkgs.rustfmt
              pkgs.rust-analyzer
              pkgs.llama-cpp
              python
              pkgs.sqlite
              pkgs.nixfmt
            ];
            # What tests/tools/setup-test-deps.sh would otherwise build:
            # `cargo test` runs the integration tests straight away.
            env = {
              CLARACORE_TEST_LLAMA_SERVER = lib.getExe' pkgs.llama-cpp "llama-server";
              CLARACORE_TEST_MODEL = "${tinyModel}";
              CLARACORE_TEST_PYTHON = lib.getExe python;
              RUST_SRC_PATH = "${pkgs.rustPlatform.rustLibSrc}";
            };
          };
      });

      # nixfmt (RFC 166 style) run by treefmt over the whole tree: since Nix
      # 2.25 `nix fmt` passes no paths, and plain nixfmt would then wait for
      # a file on stdin.
      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);
    };
}
