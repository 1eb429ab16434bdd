# A configuration switch that must restart claracore.service restarts the
# service alone: with stopIfChanged = false switch-to-configuration does not
# stop and start the socket units of a socket-activated service, so both
# listeners stay up (the same unix socket inode, never inactive) and
# connections queue for the new daemon. `systemctl restart` keeps them too,
# and the local socket stays root:claracore through all of it.
{
  name = "claracore-rebuild-restart";

  nodes.machine = {
    system.switch.enable = true;
    # Any change to [Service] but the config file is a restart.
    specialisation.restart.configuration = {
      systemd.services.claracore.environment.CLARACORE_TEST_GENERATION = "2";
    };
  };

  testScript =
    { nodes, ... }:
    let
      base = nodes.machine.system.build.toplevel;
    in
    ''
      sockets = ("claracore.socket", "claracore-local.socket")

      def prop(unit, name):
          return machine.succeed(f"systemctl show -P {name} {unit}").strip()

      def socket_state():
          return {
              "inode": machine.succeed("stat -c %i /run/claracore/claracore.sock").strip(),
              "owner": machine.succeed("stat -c '%a %U %G' /run/claracore/claracore.sock").strip(),
              "entered": [prop(s, "ActiveEnterTimestampMonotonic") for s in sockets],
          }

      def switch(toplevel):
          out = machine.succeed(f"{toplevel}/bin/switch-to-configuration test 2>&1")
          print(out)
          acted = {}
          for line in out.splitlines():
              for verb in ("stopping", "restarting", "reloading", "starting"):
                  prefix = f"{verb} the following units: "
                  if line.startswith(prefix):
                      acted[verb] = line[len(prefix):].split(", ")
          return acted

      machine.wait_for_unit("claracore.socket")
      machine.succeed("cc-chat tiny")
      pid = prop("claracore.service", "MainPID")
      before = socket_state()
      assert before["owner"] == "660 root claracore", before

      with subtest("a switch that restarts claracore.service leaves its sockets alone"):
          acted = switch("${base}/specialisation/restart")
          assert "claracore.service" in acted.get("restarting", []), acted
          for verb in ("stopping", "starting", "restarting"):
              for s in sockets:
                  assert s not in acted.get(verb, []), acted
          machine.wait_for_unit("claracore.service")
          assert prop("claracore.service", "MainPID") != pid, "not restarted"
          machine.succeed("systemctl show -P Environment claracore.service | grep -q CLARACORE_TEST_GENERATION=2")

      with subtest("the sockets stayed up: same inode, never left active, still root's"):
          machine.succeed("systemctl is-active " + " ".join(sockets))
          after = socket_state()
          assert after == before, (before, after)
          machine.succeed("cc-chat tiny")
          machine.succeed("curl -sSf --unix-socket /run/claracore/claracore.sock http://x/v1/models")

      with subtest("systemctl restart claracore.service keeps them too"):
          pid = prop("claracore.service", "MainPID")
          machine.succeed("systemctl restart claracore.service")
          assert prop("claracore.service", "MainPID") != pid
          assert socket_state() == before, socket_state()
          machine.succeed("cc-chat tiny")

      with subtest("switching back restarts it again, the sockets still untouched"):
          acted = switch("${base}")
          assert "claracore.service" in acted.get("restarting", []), acted
          assert socket_state() == before, socket_state()
          machine.succeed("cc-chat tiny")
    '';
}
