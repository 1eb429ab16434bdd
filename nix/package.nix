# The claracore daemon and CLI, built from this repository's Cargo.lock.
#
# Tests: only the unit tests (`cargo test --lib --bins`). The integration
# tests in tests/*.rs start a real llama-server, a Python fake upstream and
# real sockets, or need a PID-1 systemd; they run in tests/run.sh and, under
# Nix, as the NixOS VM tests in nix/tests/.
{
  lib,
  rustPlatform,
}:
let
  cargoToml = lib.importTOML ../Cargo.toml;
  # tests/ is part of the source because Cargo.toml names benches under it
  # and the integration tests must compile for clippy (tests/nix/ is not
  # Rust, so editing it does not rebuild the package); systemd/ carries the
  # example config checked below.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.difference (lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../migrations
      ../tests
      ../systemd
    ]) ../tests/nix;
  };
in
rustPlatform.buildRustPackage {
  pname = "claracore";
  inherit (cargoToml.package) version;
  inherit src;

  cargoLock.lockFile = ../Cargo.lock;

  cargoTestFlags = [
    "--lib"
    "--bins"
  ];

  postInstall = ''
    install -Dm0644 systemd/config.example.toml $out/share/doc/claracore/config.example.toml
  '';

  # The binary runs and accepts the example config the repository ships.
  doInstallCheck = true;
  installCheckPhase = ''
    runHook preInstallCheck
    $out/bin/claracore version | grep -Fx "claracore ${cargoToml.package.version}"
    $out/bin/claracore check-config systemd/config.example.toml
    runHook postInstallCheck
  '';

  passthru = {
    inherit src;
  };

  meta = {
    inherit (cargoToml.package) description;
    license = lib.licenses.mit;
    mainProgram = "claracore";
    # Process groups, PR_SET_PDEATHSIG, sd_notify and journald: Linux only.
    platforms = lib.platforms.linux;
  };
}
