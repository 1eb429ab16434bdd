# `systemctl stop` lets a stream in flight finish, then stops every child:
# no llama-server is left, the cgroup is gone, the result is success. A
# SIGKILLed daemon takes its children with it and is restarted; stopping the
# sockets too leaves nothing listening.
{
  name = "claracore-stop";

  nodes.machine = { };

  testScript = ''
    def prop(name):
        return machine.succeed(f"systemctl show -P {name} claracore.service").strip()

    machine.wait_for_unit("claracore.socket")
    machine.succeed("cc-chat tiny")
    machine.succeed("pgrep -x llama-server")

    with subtest("a stop drains the stream in flight, then no llama-server is left"):
        machine.succeed(
            "curl -sSN -m 120 -H 'content-type: application/json' "
            "-d '{\"model\":\"tiny\",\"stream\":true,\"max_tokens\":256,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}' "
            "http://127.0.0.1:5800/v1/chat/completions > /tmp/stream.out 2>&1 &"
        )
        machine.wait_until_succeeds("grep -q '^data: ' /tmp/stream.out")
        machine.succeed("systemctl stop claracore.service")
        machine.wait_until_succeeds("grep -qF 'data: [DONE]' /tmp/stream.out", timeout=30)
        machine.fail("pgrep -x llama-server")
        machine.fail("pgrep -x claracore")
        assert prop("Result") == "success", prop("Result")
        assert prop("ExecMainStatus") == "0", prop("ExecMainStatus")
        machine.succeed("test ! -e /sys/fs/cgroup/system.slice/claracore.service")

    with subtest("a SIGKILLed daemon leaves no orphan and is restarted"):
        machine.succeed("cc-chat tiny")
        child = machine.succeed("cc-ps tiny pid").strip()
        old = prop("MainPID")
        machine.succeed("systemctl kill --kill-whom=main --signal=SIGKILL claracore.service")
        # At once: PR_SET_PDEATHSIG, not systemd's SIGKILL after TimeoutStopSec.
        machine.wait_until_fails(f"kill -0 {child}", timeout=10)
        machine.wait_until_succeeds(
            f"p=$(systemctl show -P MainPID claracore.service); [ $p != 0 ] && [ $p != {old} ]"
        )
        machine.wait_until_succeeds("systemctl is-active claracore.service")
        assert prop("NRestarts") == "1", prop("NRestarts")
        machine.succeed("cc-chat tiny")

    with subtest("stopping the sockets and the service leaves nothing running or listening"):
        machine.succeed("systemctl stop claracore.socket claracore-local.socket claracore.service")
        machine.fail("pgrep -x llama-server")
        machine.fail("pgrep -x claracore")
        machine.fail("ss -Hltn 'sport = :5800' | grep -q .")
        machine.succeed("test ! -e /run/claracore/claracore.sock")
  '';
}
