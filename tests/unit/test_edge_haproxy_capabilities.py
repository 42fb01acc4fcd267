"""What each supported HAProxy is and answers: capabilities from the start-up probes, and every
answer sorted into success / no-op / failure, over answers recorded from the real binaries
(tests/unit/recorded/haproxy-X.Y.json, made by scripts/record_haproxy_answers.py)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from edge.haproxy.capabilities import PROBE_SERVER, Capabilities, Outcome, classify, split_batch
from edge.haproxy.process import DUPLICATE_KEY, HAProxy, Paths, RuntimeFailed, _batches, map_entries

RECORDED = Path(__file__).parent / "recorded"
VERSIONS = ("2.6", "3.0", "3.2", "3.4")
S, N, F = Outcome.SUCCESS, Outcome.NOOP, Outcome.FAILURE

# Every recorded case and what it means, on every release.
EXPECTED = {
    "addr.unchanged": N,
    "addr.ip-changed": S,
    "addr.port-changed": S,
    "addr.both-changed": S,
    "addr.unchanged-again": N,
    "addr.invalid": F,
    "addr.no-server": F,
    "addr.no-backend": F,
    "state.ready": S,
    "state.ready-again": S,
    "state.maint": S,
    "state.no-server": F,
    "weight.set": S,
    "weight.same": S,
    "weight.zero": S,
    "weight.too-big": F,
    "weight.no-server": F,
    "add-server.free": S,
    "add-server.keywords": S,
    "add-server.tls": S,
    "add-server.exists": F,
    "add-server.no-backend": F,
    "map.add": S,
    "map.add-split": S,
    "map.set": S,
    "map.del": S,
    "map.del-absent": N,
    "map.set-absent": F,
    "map.unknown": F,
    "map.prepare": S,
    "map.add-version": S,
    "map.add-version-payload": S,
    "map.commit": S,
    "map.commit-again": F,              # a version already committed
    "map.add-version-stale": S,         # HAProxy takes it (into the live version): the edge never sends it
    "map.add-version-unknown": F,
    "map.commit-unknown": F,
    "map.prepare-unknown": F,
    "ssl.new": S,
    "ssl.new-exists": F,
    "ssl.set": S,
    "ssl.commit": S,
    "ssl.crt-list-add": S,
    "ssl.set-again": S,
    "ssl.commit-again": S,
    "ssl.set-garbage": F,
    "ssl.commit-none": F,
    "ssl.del-in-use": F,
    "ssl.crt-list-del": S,
    "ssl.crt-list-del-absent": N,
    "ssl.del": S,
    "ssl.del-absent": N,
    "unknown-command": F,
}

# Adding and removing a backend at runtime: what each answer means on 3.4; before 3.4 the commands
# do not exist and every answer is a failure.
BACKENDS_34 = {
    "backend.add": S,
    "backend.add-exists": F,
    "backend.add-no-defaults": F,
    "backend.publish": S,
    "backend.publish-again": S,
    "backend.unpublish": S,
    "backend.unpublish-again": S,
    "backend.maint": S,
    "backend.precheck": S,             # only its servers in the way: they go next
    "backend.wait-srv": S,
    "backend.del-server": S,
    "backend.wait-be": S,
    "backend.del": S,                  # several lines: its servers going down, then "Backend deleted."
    "backend.del-absent": N,
    "backend.unpublish-listed": S,
    "backend.precheck-listed": F,      # the configuration names it: kept
    "backend.wait-listed": F,          # the landing page names it (nbsrv): it cannot be removed
    "backend.del-listed": F,
}

# What the probes find: (release, add backend, del backend, wait srv-removable, init-state, atomic maps,
# add server cookie)
CAPABILITIES = {
    "2.6": ((2, 6), False, False, False, False, True, False),
    "3.0": ((3, 0), False, False, True, False, True, True),
    "3.2": ((3, 2), False, False, True, True, True, True),
    "3.4": ((3, 4), True, True, True, True, True, True),
}


@functools.cache
def recorded(version: str) -> dict[str, dict]:
    data = json.loads((RECORDED / f"haproxy-{version}.json").read_text())
    return {step["label"]: step for step in data["answers"]}


@functools.cache
def caps_of(version: str) -> Capabilities:
    r = recorded(version)
    return Capabilities.from_probes(r["probe.version"]["answer"], r["probe.help"]["answer"],
                                    r["probe.wait"]["answer"], r["probe.init-state"]["answer"],
                                    r["probe.cookie"]["answer"])


@pytest.mark.parametrize("version", VERSIONS)
def test_every_case_is_recorded_for_every_release(version):
    labels = set(recorded(version))
    assert set(EXPECTED) <= labels
    assert {"probe.version", "probe.help", "probe.wait", "probe.init-state", "probe.cookie", "batch"} <= labels


@pytest.mark.parametrize("version", VERSIONS)
def test_capabilities_from_the_probes(version):
    caps = caps_of(version)
    release, add_backend, del_backend, wait_removable, init_state, atomic_maps, cookie = CAPABILITIES[version]
    assert caps.version.startswith(version + ".")
    assert caps.release == release
    assert (caps.add_backend, caps.del_backend, caps.wait_srv_removable, caps.server_init_state,
            caps.atomic_maps, caps.dynamic_servers, caps.server_cookie) == (
        add_backend, del_backend, wait_removable, init_state, atomic_maps, True, cookie)
    assert {"set server", "add map", "del map", "commit ssl cert", "show version"} <= caps.commands
    line = caps.describe()
    assert "\n" not in line and caps.version in line


def test_the_init_state_and_cookie_probes_never_add_a_server():
    for version in VERSIONS:
        for label in ("probe.init-state", "probe.cookie"):
            answer = recorded(version)[label]["answer"]
            assert PROBE_SERVER in recorded(version)[label]["command"]
            assert "New server registered" not in answer and ("init-state" in answer or "cookie" in answer)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_cookie_on_a_dynamic_server_is_refused_where_the_probe_says_so(version):
    """2.6 refuses `cookie` on `add server` (a sticky backend grows by reload there)."""
    step = recorded(version)["add-server.cookie"]
    outcome = classify(caps_of(version), step["command"], step["answer"])
    assert outcome is (S if caps_of(version).server_cookie else F), step["answer"]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_slot_added_then_filled_in_one_batch(version):
    step = recorded(version)["add-server.fill"]
    commands = step["command"].split("; ")
    answers = split_batch(commands, step["answer"])
    assert [classify(caps_of(version), c, a) for c, a in zip(commands, answers, strict=True)] == [S, S]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("label", sorted(EXPECTED))
def test_recorded_answers_are_classified(version, label):
    step = recorded(version)[label]
    assert classify(caps_of(version), step["command"], step["answer"]) is EXPECTED[label], step["answer"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("label", sorted(BACKENDS_34))
def test_backend_answers_are_classified(version, label):
    step = recorded(version)[label]
    expected = BACKENDS_34[label] if caps_of(version).add_backend else F
    assert classify(caps_of(version), step["command"], step["answer"]) is expected, step["answer"]


def test_a_new_backend_is_filled_in_one_batch_and_del_backend_goes_alone():
    step = recorded("3.4")["backend.fill"]
    commands = step["command"].split("; ")
    answers = split_batch(commands, step["answer"])
    assert [classify(caps_of("3.4"), c, a) for c, a in zip(commands, answers, strict=True)] == [S, S, S]
    deleted = recorded("3.4")["backend.del"]["answer"]
    assert len(deleted.strip().splitlines()) > 1 and split_batch(["del backend be_dyn"], deleted) is None
    assert _batches(("unpublish backend b", "wait 1ms be-removable b", "del server b/s1", "del backend b",
                     "del backend c", "add map m k v")) == [
        ("unpublish backend b",), ("wait 1ms be-removable b",), ("del server b/s1",), ("del backend b",),
        ("del backend c",), ("add map m k v",)]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_batch_is_cut_into_one_answer_per_command(version):
    step = recorded(version)["batch"]
    commands = step["command"].split("; ")
    answers = split_batch(commands, step["answer"])
    assert answers is not None and len(answers) == len(commands)
    caps = caps_of(version)
    # addr changed, ready, addr unchanged, a missing server, maint
    assert [classify(caps, c, a) for c, a in zip(commands, answers, strict=True)] == [S, S, N, F, S]


@pytest.mark.parametrize("version", VERSIONS)
def test_each_release_has_its_own_wording_for_an_unchanged_address(version):
    """The no-op text of one release is no proof of anything on another: a failure there."""
    caps = caps_of(version)
    command = "set server be_web/s1 addr 127.0.0.1 port 1"
    old = "no need to change the addr, no need to change the port by 'stats socket command'"
    assert classify(caps, command, old) is (N if version == "2.6" else F)
    assert classify(caps, command, "nothing changed") is (F if version == "2.6" else N)


def test_until_probed_the_oldest_rules_apply():
    caps = Capabilities(version="unknown")
    assert classify(caps, "set server b/s1 addr 10.0.0.1 port 80", "nothing changed") is F
    assert classify(caps, "set server b/s1 state ready", "") is S


@pytest.mark.parametrize("commands, output, expected", [
    (["a"], "\n", [""]),
    (["a"], "nothing changed\n\n", ["nothing changed"]),
    (["a", "b"], "\nx\n\n", ["", "x"]),
    (["a", "b"], "\n\n\n\n", ["", ""]),                       # trailing blank lines are fine
    (["a", "b"], "Unknown command, maybe:\n  add map\n  del map\n\n", None),   # multi-line: cannot attribute
    (["a", "b"], "x\n\n", None),                              # fewer answers than commands
    (["a"], "x\n\ny\n\n", None),                              # more answers than commands
])
def test_split_batch(commands, output, expected):
    assert split_batch(commands, output) == expected


class Answers:
    """HAProxy's runtime socket, played back from a recording: command → raw answer."""

    def __init__(self, answers: dict[str, str]):
        self.answers, self.sent, self.payloads = answers, [], []

    def __call__(self, command: str, payload: str = "", timeout: float = 10) -> str:
        self.sent.append(command)
        if payload:
            self.payloads.append(payload)
        return self.answers[command]


def shell(tmp_path, version: str) -> tuple[HAProxy, Answers]:
    haproxy = HAProxy("haproxy", Paths(tmp_path))
    haproxy._ask = Answers({s["command"]: s["answer"] for s in recorded(version).values()})
    return haproxy, haproxy._ask


@pytest.mark.parametrize("version", VERSIONS)
def test_the_shell_probes_then_takes_an_unchanged_address_as_a_no_op(tmp_path, version, caplog):
    haproxy, answers = shell(tmp_path, version)
    with caplog.at_level("INFO", logger="edge.haproxy"):
        caps = haproxy.probe()
    assert caps == caps_of(version) and haproxy.caps == caps
    assert [r.getMessage() for r in caplog.records] == [caps.describe()]
    step = recorded(version)["batch"]
    commands = step["command"].split("; ")
    ok = commands[:3] + commands[4:]                 # without the missing server
    answers.answers["; ".join(ok)] = step["answer"].replace("No such server.\n\n", "", 1)
    haproxy.runtime(tuple(ok))
    with pytest.raises(RuntimeFailed, match="be_web/s9 state maint: No such server"):
        haproxy.runtime(tuple(commands))


@pytest.mark.parametrize("version", VERSIONS)
def test_the_shell_judges_certificate_answers(tmp_path, version):
    haproxy, _ = shell(tmp_path, version)
    haproxy.probe()
    r = recorded(version)
    for labels in (("ssl.new", "ssl.commit", "ssl.crt-list-add"), ("ssl.crt-list-del-absent", "ssl.del-absent")):
        haproxy._ask = Answers({r[label]["command"]: r[label]["answer"] for label in labels})
        haproxy.ssl(tuple((r[label]["command"], "") for label in labels))
    haproxy._ask = Answers({r["ssl.new-exists"]["command"]: r["ssl.new-exists"]["answer"]})
    with pytest.raises(RuntimeFailed, match="already exists"):
        haproxy.ssl(((r["ssl.new-exists"]["command"], ""),))


def test_the_shell_sends_batches_that_fit_the_cli_buffer(tmp_path):
    haproxy, _ = shell(tmp_path, "3.0")
    haproxy.probe()
    sent = []
    haproxy._ask = lambda cmd, payload="", timeout=10: sent.append(cmd) or "\n" * (cmd.count(";") + 1)
    commands = tuple(f"set server be_{i:04d}/s1 state maint" for i in range(600))
    haproxy.runtime(commands)
    assert len(sent) > 1 and all(len(b) < 8000 for b in sent)
    assert [c for b in sent for c in b.split("; ")] == list(commands)



@pytest.mark.parametrize("version", VERSIONS)
def test_show_map_is_read_as_entries(version):
    r = recorded(version)
    assert map_entries(r["map.show"]["answer"]) == {"a.example": "be_web", "r1": "300|be_a|1000|be_b"}
    assert map_entries(r["map.show-unknown"]["answer"]) is None
    assert list(map_entries(r["map.show-committed"]["answer"])) == [f"{c}.example" for c in "defgh"]


def test_a_key_held_twice_with_different_values_differs_from_any_value():
    assert map_entries("0x1 a be_1\n0x2 a be_2\n0x3 b be_3\n\n") == {"a": DUPLICATE_KEY, "b": "be_3"}
    assert map_entries("0x1 a be_1\n0x2 a be_1\n\n") == {"a": "be_1"}
    with pytest.raises(RuntimeFailed):
        map_entries("Permission denied\n\n")


@pytest.mark.parametrize("version", VERSIONS)
def test_the_shell_fills_in_the_version_prepare_map_answers(tmp_path, version):
    from edge.routing.maps import swap_commands
    haproxy, answers = shell(tmp_path, version)
    haproxy.probe()
    r = recorded(version)
    hosts = r["map.prepare"]["command"].split()[-1]
    entries = {f"h{i:05}.example": "be_web" for i in range(1000)}    # ~19 kB: two payloads
    payload = [f"add map @1 {hosts}"]
    answers.answers[r["map.commit"]["command"]] = r["map.commit"]["answer"]    # not the later commit-again
    haproxy.runtime(("set server be_web/s1 state ready", *swap_commands(hosts, entries)))
    assert answers.sent[-5:] == ["set server be_web/s1 state ready", r["map.prepare"]["command"],
                                 *payload * 2, r["map.commit"]["command"]]
    payloads = answers.payloads[-2:]
    assert all(len(p) < 12000 for p in payloads)
    assert "\n".join(payloads).splitlines() == [f"{k} be_web" for k in sorted(entries)]
    answers.answers[r["map.prepare"]["command"]] = r["map.prepare-unknown"]["answer"]
    with pytest.raises(RuntimeFailed, match="Unknown map identifier"):
        haproxy.runtime(tuple(swap_commands(hosts, {"d.example": "be_web"})))
    with pytest.raises(RuntimeFailed, match="no prepare map"):
        haproxy.runtime((f"commit map @next {hosts}",))


@pytest.mark.parametrize("version", VERSIONS)
def test_a_template_without_the_spares_map_costs_the_names_not_the_live_change(version):
    caps, unknown = caps_of(version), recorded(version)["map.unknown"]["answer"]
    assert classify(caps, "add map spares.map be_spare_1 api-80", unknown) is N
    assert classify(caps, "del map spares.map be_spare_1", unknown) is N
    assert classify(caps, "add map hosts.map api-80.t.example be_spare_1", unknown) is F


def test_the_shell_sends_del_backend_alone_and_judges_its_whole_answer(tmp_path):
    haproxy, answers = shell(tmp_path, "3.4")
    haproxy.probe()
    r = recorded("3.4")
    answers.answers["unpublish backend be_dyn; del server be_dyn/s1"] = \
        r["backend.unpublish"]["answer"] + r["backend.del-server"]["answer"]
    haproxy.runtime(("unpublish backend be_dyn", "del server be_dyn/s1", "del backend be_dyn"))
    assert answers.sent[-2:] == ["unpublish backend be_dyn; del server be_dyn/s1", "del backend be_dyn"]
    answers.answers["del backend be_listed"] = r["backend.del-listed"]["answer"]
    with pytest.raises(RuntimeFailed, match="cannot be removed") as failed:
        haproxy.runtime(("del backend be_listed",))
    assert failed.value.commands == ("del backend be_listed",)
