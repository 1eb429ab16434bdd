# services.claracore.memoryMax bounds the whole service: a model that does
# not fit is OOM-killed by the kernel, claracore stays up (same PID, no
# restart), reports the model failed with the reason, and serves the next
# request. (-c 524288 gives the tiny model a KV cache of about 290 MB.)
{
  name = "claracore-limits";

  nodes.machine =
    { tinyModel, ... }:
    {
      services.claracore = {
        memoryMax = "128M";
        memoryHigh = null;
        settings.scheduler.max_loaded = 2;
        models.hog = {
          model = tinyModel;
          args = [
            "-c"
            "524288"
            "-t"
            "1"
          ];
        };
      };
    };

  testScript = ''
    def prop(name):
        return machine.succeed(f"systemctl show -P {name} claracore.service").strip()

    machine.wait_for_unit("claracore.socket")
    machine.succeed("cc-chat tiny")
    pid = prop("MainPID")

    with subtest("MemoryMax is the cgroup's memory.max"):
        assert prop("MemoryMax") == str(128 * 1024 * 1024), prop("MemoryMax")
        assert machine.succeed("cat /sys/fs/cgroup/system.slice/claracore.service/memory.max").strip() == str(128 * 1024 * 1024)

    with subtest("the model that does not fit fails instead of being served"):
        machine.fail("cc-chat hog")
        machine.wait_until_succeeds("test \"$(cc-ps hog state)\" = failed", timeout=120)
        machine.succeed("journalctl -k -o cat --no-pager | grep -E 'Killed process [0-9]+ \\(llama-server\\)'")
        last_error = machine.succeed("cc-ps hog last_error").strip()
        print(f"hog last_error: {last_error}")
        assert "oom" in last_error.lower() or "memory" in last_error.lower(), last_error

    with subtest("claracore survived the OOM kill and serves the next request"):
        assert prop("ActiveState") == "active"
        assert prop("MainPID") == pid, "the daemon was restarted"
        assert prop("NRestarts") == "0"
        machine.succeed("cc-chat tiny")
  '';
}
