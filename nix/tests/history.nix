# Every request becomes a row in /var/lib/claracore/history.db (the
# service's StateDirectory), readable with sqlite3; the rows survive a
# restart, a stop commits what is queued, and the CLI reads them back.
{
  name = "claracore-history";

  nodes.machine = { };

  testScript = ''
    import json

    db = "/var/lib/claracore/history.db"

    def sql(query):
        # As the service user: a root-owned -wal/-shm file would lock it out.
        return machine.succeed(f"runuser -u claracore -- sqlite3 -json {db} \"{query}\"").strip()

    def count():
        return json.loads(sql("select count(*) as n from requests"))[0]["n"]

    machine.wait_for_unit("claracore.socket")
    for _ in range(3):
        machine.succeed("cc-chat tiny")

    with subtest("each request is a row with the usage the client saw"):
        machine.wait_until_succeeds(f"test $(runuser -u claracore -- sqlite3 {db} 'select count(*) from requests') -ge 3")
        rows = json.loads(sql(
            "select endpoint, model, status, outcome, completion_tokens, latency_ms from requests order by id"
        ))
        assert len(rows) == 3, rows
        for row in rows:
            assert row["endpoint"] == "/v1/chat/completions", row
            assert row["model"] == "tiny", row
            assert row["status"] == 200 and row["outcome"] == "ok", row
            assert row["completion_tokens"] > 0 and row["latency_ms"] > 0, row
        events = json.loads(sql("select event from model_events where model = 'tiny'"))
        assert {"event": "ready"} in events, events

    with subtest("the state directory belongs to the service user"):
        assert machine.succeed("stat -c '%U %G %a' /var/lib/claracore").split() == ["claracore", "claracore", "750"]
        assert machine.succeed(f"stat -c '%U' {db}").strip() == "claracore"
        machine.fail(f"stat -c '%A' {db} | grep -q '^.......r'")  # not world-readable (UMask=0027)

    with subtest("rows survive a restart, and new ones follow"):
        machine.succeed("systemctl restart claracore.service")
        assert count() == 3
        machine.succeed("cc-chat tiny")
        machine.wait_until_succeeds(f"test $(runuser -u claracore -- sqlite3 {db} 'select count(*) from requests') -eq 4")

    with subtest("a stop right after a request commits its row"):
        machine.succeed("cc-chat tiny && systemctl stop claracore.service")
        assert count() == 5

    with subtest("the CLI reads the history back (starting the service on the way)"):
        out = machine.succeed("claracore history --host unix:/run/claracore/claracore.sock --model tiny")
        assert "tiny" in out, out
        machine.succeed("runuser -u claracore -- sqlite3 " + db + " 'pragma integrity_check' | grep -qx ok")
  '';
}
