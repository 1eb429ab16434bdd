# systemd owns the listeners: nothing of claracore runs until the first
# connection, concurrent first requests share one daemon and one child, and
# the sockets outlive restarts and stops of the service.
{
  name = "claracore-socket-activation";

  nodes.machine = { };

  testScript = ''
    def state():
        return machine.succeed("systemctl show -P ActiveState claracore.service").strip()

    machine.wait_for_unit("multi-user.target")
    machine.wait_for_unit("claracore.socket")
    machine.wait_for_unit("claracore-local.socket")

    with subtest("after boot systemd listens and the service has not started"):
        assert state() == "inactive", state()
        machine.fail("pgrep -x claracore")
        machine.succeed("ss -Hltn 'sport = :5800' | grep -q LISTEN")
        machine.succeed("test -S /run/claracore/claracore.sock")

    with subtest("concurrent first requests start one daemon and one llama-server"):
        machine.succeed(
            "pids=; for i in 1 2 3 4 5; do cc-chat tiny > /tmp/r$i & pids=\"$pids $!\"; done; "
            "for p in $pids; do wait $p; done"
        )
        assert state() == "active", state()
        assert machine.succeed("pgrep -cx llama-server").strip() == "1"
        assert "claracore.socket" in machine.succeed("systemctl show -P TriggeredBy claracore.service")

    with subtest("the daemon took both sockets by name instead of binding"):
        machine.succeed("journalctl -u claracore.service FD_NAME=http -o cat --no-pager | grep -q 'socket-activated listener'")
        machine.succeed("journalctl -u claracore.service FD_NAME=local -o cat --no-pager | grep -q 'socket-activated listener'")

    with subtest("a restart keeps the sockets listening and the next request is served"):
        machine.succeed("systemctl restart claracore.service")
        machine.succeed("systemctl is-active claracore.socket claracore-local.socket")
        machine.succeed("cc-chat tiny")

    with subtest("stopped, the service starts again on the next connection, also on the unix socket"):
        machine.succeed("systemctl stop claracore.service")
        assert state() == "inactive", state()
        machine.succeed("test -S /run/claracore/claracore.sock")
        machine.succeed(
            "curl -sSf --unix-socket /run/claracore/claracore.sock http://localhost/v1/models"
            " | jq -e '.data[0].id == \"tiny\"'"
        )
        assert state() == "active", state()
  '';
}
