# The unit systemd actually loaded has the lifecycle and sandbox settings of
# systemd/claracore.service (CPU build: PrivateDevices=yes, no device
# classes), the running daemon holds no capabilities, its children carry
# oom_score_adj 500, and `systemd-analyze security` rates it under 2.0.
{
  name = "claracore-hardening";

  nodes.machine = { };

  testScript = ''
    machine.wait_for_unit("claracore.socket")
    machine.succeed("cc-chat tiny")

    expected = {
        "Type": "notify-reload",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "RestartUSec": "2s",
        "RestartPreventExitStatus": "78",
        "KillMode": "mixed",
        "WatchdogUSec": "30s",
        "TimeoutStopUSec": "1min",
        "OOMPolicy": "continue",
        "User": "claracore",
        "Group": "claracore",
        "StateDirectory": "claracore",
        "RuntimeDirectory": "claracore/daemon",
        "RuntimeDirectoryPreserve": "no",
        "UMask": "0027",
        "LimitNOFILE": "65536",
        "TasksMax": "4096",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "NoNewPrivileges": "yes",
        "DevicePolicy": "closed",
        "PrivateDevices": "yes",
        "PrivateTmp": "yes",
        "PrivateMounts": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "ProtectClock": "yes",
        "ProtectControlGroups": "yes",
        "ProtectHostname": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectProc": "invisible",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RemoveIPC": "yes",
        "SystemCallArchitectures": "native",
    }

    with subtest("systemctl show has the settings of the repository's unit"):
        shown = {}
        for line in machine.succeed(
            "systemctl show claracore.service " + " ".join(f"-p {k}" for k in expected)
            + " -p RestrictAddressFamilies -p MemoryMax -p MemoryHigh -p DeviceAllow"
        ).splitlines():
            key, _, value = line.partition("=")
            shown[key] = value
        wrong = {k: (shown.get(k), v) for k, v in expected.items() if shown.get(k) != v}
        assert not wrong, f"(shown, expected): {wrong}"
        assert set(shown["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}, shown
        assert shown["MemoryMax"] not in ("", "infinity"), shown
        assert shown["MemoryHigh"] not in ("", "infinity"), shown
        assert not any(gpu in shown["DeviceAllow"] for gpu in ("nvidia", "drm", "kfd")), shown

    with subtest("systemd loaded the units without complaints"):
        machine.fail(
            "journalctl -b -o cat --no-pager | grep -E 'claracore(-local)?\\.(service|socket):[0-9]+: '"
        )

    with subtest("the daemon runs unprivileged under seccomp; children are the OOM killer's first choice"):
        pid = machine.succeed("systemctl show -P MainPID claracore.service").strip()
        status = machine.succeed(f"cat /proc/{pid}/status")
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        assert fields["CapEff"].strip() == "0000000000000000", fields["CapEff"]
        assert fields["CapBnd"].strip() == "0000000000000000", fields["CapBnd"]
        assert fields["NoNewPrivs"].strip() == "1", fields["NoNewPrivs"]
        assert fields["Seccomp"].strip() == "2", fields["Seccomp"]
        assert machine.succeed(f"stat -c %U /proc/{pid}").strip() == "claracore"
        child = machine.succeed("cc-ps tiny pid").strip()
        assert machine.succeed(f"cat /proc/{child}/oom_score_adj").strip() == "500"
        assert machine.succeed(f"stat -c %U /proc/{child}").strip() == "claracore"

    with subtest("systemd-analyze security: exposure at most 2.0"):
        print(machine.succeed("systemd-analyze security --no-pager claracore.service"))
        machine.succeed("systemd-analyze security --no-pager --threshold=20 claracore.service")
  '';
}
