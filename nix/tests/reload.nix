# A configuration switch that only changes models reloads the running
# daemon (SIGHUP, Type=notify-reload) instead of restarting it: same PID,
# the unchanged model keeps its llama-server, the new model is served, and
# switching back removes it again.
{
  name = "claracore-reload";

  nodes.machine =
    { tinyModel, ... }:
    {
      system.switch.enable = true;
      specialisation.more-models.configuration = {
        services.claracore.settings.scheduler.max_loaded = 2;
        services.claracore.models.second = {
          model = tinyModel;
          args = [
            "-c"
            "256"
            "-t"
            "1"
          ];
          aliases = [ "tiny-b" ];
        };
      };
    };

  testScript =
    { nodes, ... }:
    let
      base = nodes.machine.system.build.toplevel;
    in
    ''
      def prop(name):
          return machine.succeed(f"systemctl show -P {name} claracore.service").strip()

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
      pid = prop("MainPID")
      tiny_pid = machine.succeed("cc-ps tiny pid").strip()
      machine.fail("cc-chat second")

      with subtest("a switch that adds a model reloads claracore.service"):
          acted = switch("${base}/specialisation/more-models")
          assert "claracore.service" in acted.get("reloading", []), acted
          for verb in ("stopping", "restarting", "starting"):
              assert "claracore.service" not in acted.get(verb, []), acted
          assert prop("MainPID") == pid, "the daemon was restarted"
          assert prop("NRestarts") == "0"
          machine.succeed("journalctl -u claracore.service -o cat --no-pager | grep -q 'configuration reloaded'")

      with subtest("the new model is served, the unchanged one kept its process"):
          machine.succeed("cc-chat second")
          machine.succeed("cc-chat tiny-b")
          assert machine.succeed("cc-ps tiny pid").strip() == tiny_pid, "tiny was restarted"

      with subtest("switching back removes the model, again by a reload"):
          acted = switch("${base}")
          assert "claracore.service" in acted.get("reloading", []), acted
          assert prop("MainPID") == pid, "the daemon was restarted"
          machine.fail("cc-chat second")
          machine.wait_until_fails("pgrep -f 'llama-server.* -c 25[6]'")
          machine.succeed("cc-chat tiny")
    '';
}
