# services.claracore.enable with one model: a chat request through the
# socket-activated service is answered by a real llama-server, the CLI works
# over the local socket, and the child's output is in the journal under
# MODEL=.
{
  name = "claracore-basic";

  nodes.machine = { };

  testScript = ''
    import json

    machine.wait_for_unit("sockets.target")

    with subtest("a chat completion is answered by llama-server through the socket"):
        reply = json.loads(machine.succeed("cc-chat tiny-chat"))
        assert reply["object"] == "chat.completion", reply
        assert reply["choices"][0]["message"]["role"] == "assistant", reply
        assert reply["usage"]["completion_tokens"] > 0, reply
        machine.succeed("systemctl is-active claracore.service")
        machine.succeed("pgrep -u claracore -x llama-server")
        assert machine.succeed("cc-ps tiny state").strip() == "ready"

    with subtest("the generated config is the one in /etc, and valid"):
        machine.succeed("claracore check-config --strict /etc/claracore/config.toml")
        machine.succeed("grep -q '^llama_server = \"/nix/store/.*/bin/llama-server\"' /etc/claracore/config.toml")

    with subtest("the local unix socket: root's, mode 0660, group claracore, serves the CLI"):
        def owners():
            return {
                path: machine.succeed(f"stat -c '%a %U %G' {path}").strip()
                for path in ("/run/claracore", "/run/claracore/claracore.sock", "/run/claracore/daemon")
            }
        # The socket and its directory are root's; the service owns only
        # its runtime directory below them (systemd chowns that at start).
        expected = {
            "/run/claracore": "755 root root",
            "/run/claracore/claracore.sock": "660 root claracore",
            "/run/claracore/daemon": "750 claracore claracore",
        }
        assert owners() == expected, owners()
        machine.succeed("systemctl restart claracore.service && cc-chat tiny")
        assert owners() == expected, owners()
        out = machine.succeed("claracore ps --host unix:/run/claracore/claracore.sock")
        assert "tiny" in out, out
        models = json.loads(machine.succeed(
            "curl -sSf --unix-socket /run/claracore/claracore.sock http://localhost/v1/models"
        ))
        assert [m["id"] for m in models["data"]] == ["tiny"], models

    with subtest("the journal has llama-server's own lines with MODEL= and CHILD_PID="):
        pid = machine.succeed("cc-ps tiny pid").strip()
        machine.wait_until_succeeds(
            "journalctl -u claracore.service MODEL=tiny CHILD_PID=" + pid + " -o cat --no-pager | grep -q ."
        )
        machine.succeed("journalctl -u claracore.service MODEL=tiny -o cat --no-pager | grep -q 'child ready'")

    with subtest("readiness and status reach systemd"):
        status = machine.succeed("systemctl show -P StatusText claracore.service")
        assert "models loaded" in status, status
  '';
}
