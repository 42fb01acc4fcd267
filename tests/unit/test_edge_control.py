"""The control loop's decisions, against a recording fake HAProxy."""

import threading
import time
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import pytest

from edge import control, templates_source
from edge.consul.watch import Snapshot
from edge.haproxy import writer
from edge.haproxy.capabilities import Capabilities
from edge.haproxy.process import ConfigInvalid, Paths, RuntimeFailed, StateDirError
from edge.routing import dynamic
from edge.routing.model import Instance
from edge.routing.plan import ServedSlot
from edge.routing.render import Listeners
from edge.routing.spares import SparePool

FREE_SPARE = "    description spare backend, free at the last reload"
TEMPLATES = dict(templates_source.load(templates_source.bundled()))


class FakeHAProxy:
    def __init__(self):
        self.paths = Paths(Path("/nonexistent"))
        self.calls = []
        self.fail_install = None
        self.fail_runtime = None
        self.disk_full = False
        self.serving: list[ServedSlot] = []      # what `show servers state` says
        self.mapped: dict[str, dict[str, str]] = {}   # what `show map` says, for the maps it names
        self.caps = Capabilities(version="2.6.12", release=(2, 6))   # what the probe found: no `prepare map`

    def served(self):
        return tuple(self.serving)

    def maps(self, names):
        return {name: self.mapped[name] for name in names if name in self.mapped}

    def install(self, rendered):
        if self.disk_full:
            raise StateDirError("cannot stage: [Errno 28] No space left on device")
        if self.fail_install:
            raise ConfigInvalid(self.fail_install)
        self.calls.append(("install", rendered["haproxy.cfg"]))

    def write_config(self, rendered):
        if self.disk_full:
            raise StateDirError("cannot write: [Errno 28] No space left on device")
        self.calls.append(("write", rendered["haproxy.cfg"]))

    def runtime(self, commands):
        if self.fail_runtime:
            raise RuntimeFailed(self.fail_runtime)
        self.calls.append(("runtime", commands))

    def running(self):
        return True

    def reload(self):
        self.calls.append(("reload",))
        return 1234

    def kinds(self):
        return [c[0] for c in self.calls]


def snap(*ports_by_service):
    services = {}
    for service, ports in ports_by_service:
        services[service] = tuple(Instance(service, "n1", f"{service}-{p}", "10.0.0.1", p, 80, True) for p in ports)
    return Snapshot(MappingProxyType(services), (), 1)


@pytest.fixture
def edge(monkeypatch):
    monkeypatch.setattr(control, "QUIET", 0.0)
    fake = FakeHAProxy()
    e = control.Edge(fake, Listeners(":80", ":8404", "/s", ("x.org",)), TEMPLATES, threading.Event())
    e.on_snapshot(snap(("web", [8001])))
    e.step()
    assert fake.kinds() == ["install", "reload"]
    fake.calls.clear()
    return e


def test_instance_churn_is_runtime_then_the_file(edge):
    edge.on_snapshot(snap(("web", [8001, 8002])))
    edge.step()
    assert edge.haproxy.kinds() == ["runtime"]
    edge.flush()                                          # the file follows at once when asked
    assert edge.haproxy.kinds() == ["runtime", "write"]
    assert edge.haproxy.calls[0][1] == ("set server be_web-80/s2 addr 10.0.0.1 port 8002",
                                        "set server be_web-80/s2 state ready")
    assert "server s2 10.0.0.1:8002" in edge.haproxy.calls[1][1]


def test_file_write_waits_for_quiet_inputs(monkeypatch, edge):
    monkeypatch.setattr(writer, "QUIET", 10.0)
    edge.on_snapshot(snap(("web", [8001, 8002])))
    edge.step()
    edge.writer.step()
    assert edge.haproxy.kinds() == ["runtime"]            # a burst is still arriving
    monkeypatch.setattr(writer, "MAX_DELAY", 0.0)
    edge.writer.step()
    assert edge.haproxy.kinds() == ["runtime", "write"]   # but never later than MAX_DELAY


def test_a_slow_render_waits_for_longer_quiet_and_is_at_most_twenty_renders_late(monkeypatch, edge):
    clock = [1000.0]
    monkeypatch.setattr(writer, "time", SimpleNamespace(monotonic=lambda: clock[0], perf_counter=time.perf_counter))
    edge.writer.render_s = 0.5                            # 10,000 routes
    edge.on_snapshot(snap(("web", [8001, 8002])))
    edge.step()
    clock[0] += 1.0                                        # quiet for 20 x QUIET, only 2 renders' time
    edge.writer.step()
    assert edge.haproxy.kinds() == ["runtime"]
    clock[0] += 1.0                                        # 4 renders' time
    edge.writer.step()
    assert edge.haproxy.kinds() == ["runtime", "write"]
    edge.writer.render_s = 0.5
    edge.on_snapshot(snap(("web", [8001])))
    edge.step()
    for _ in range(9):                                     # inputs keep arriving...
        clock[0] += 1.0
        edge.on_snapshot(snap(("web", [8001, 8002 + _ % 2])))
        edge.step()
        edge.writer.step()
    assert edge.haproxy.kinds().count("write") == 1
    clock[0] += 1.0                                        # ...but 20 renders' time is the longest wait
    edge.writer.step()
    assert edge.haproxy.kinds().count("write") == 2


def test_a_full_backend_grows_live_with_add_server_then_the_file_declares_the_new_slots(edge):
    edge.haproxy.caps = Capabilities("2.6.12", (2, 6), frozenset({"add server", "del server", "set server"}))
    edge.on_snapshot(snap(("web", [8001, 8002, 8003, 8004, 8005])))
    edge.step()
    assert edge.haproxy.kinds() == ["runtime"] and edge.reloads == 1
    commands = edge.haproxy.calls[0][1]
    assert commands[:4] == tuple(f"add server be_web-80/s{i} 0.0.0.0:0" for i in (5, 6, 7, 8))
    edge.flush()
    config = edge.haproxy.calls[1][1]
    assert "server s5 10.0.0.1:8005\n" in config and "server s8 0.0.0.0:0 disabled\n" in config


def test_until_haproxy_was_probed_a_full_backend_grows_by_reload(edge):
    edge.on_snapshot(snap(("web", [8001, 8002, 8003, 8004, 8005])))
    edge.step()
    assert edge.haproxy.kinds() == ["install", "reload"]


def test_unchanged_snapshot_does_nothing(edge):
    edge.on_snapshot(snap(("web", [8001])))
    edge.step()
    assert edge.haproxy.calls == []


def test_new_vhost_reloads(edge):
    edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))
    edge.step()
    assert edge.haproxy.kinds() == ["install", "reload"]
    assert edge.reloads == 2
    assert edge.live.names == ("api-80", "web-80")


def test_refused_configuration_keeps_the_live_table_and_is_not_retried_until_something_changes(edge):
    live = edge.live
    edge.haproxy.fail_install = "no"
    attempts = []
    edge.haproxy.install = lambda rendered: (attempts.append(1), FakeHAProxy.install(edge.haproxy, rendered))
    edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))
    edge.step()
    edge.step()
    assert edge.haproxy.calls == [] and edge.live is live and len(attempts) == 1
    edge.haproxy.fail_install = None
    edge.on_snapshot(snap(("web", [8001]), ("api", [9001, 9002])))
    edge.step()
    assert edge.haproxy.kinds() == ["install", "reload"] and len(attempts) == 2


def test_runtime_failure_falls_back_to_a_reload(edge):
    edge.haproxy.fail_runtime = "No such server."
    edge.on_snapshot(snap(("web", [8001, 8002])))
    edge.step()
    assert edge.haproxy.kinds() == ["install", "reload"]
    assert edge.live.get("web-80").healthy == 2


def test_template_change_applies_only_when_valid(edge):
    bad = {**TEMPLATES, "haproxy.cfg.j2": "{{ nope }}"}
    edge.on_templates(bad)
    edge.step()
    assert edge.haproxy.calls == [] and edge.templates == TEMPLATES
    good = {**TEMPLATES, "haproxy.cfg.j2": TEMPLATES["haproxy.cfg.j2"] + "\n# v2\n"}
    edge.on_templates(good)
    edge.step()
    assert edge.haproxy.kinds() == ["install", "reload"]
    assert edge.templates == good and edge.haproxy.calls[0][1].endswith("# v2\n")


def test_reload_waits_for_a_burst_to_settle(monkeypatch, edge):
    monkeypatch.setattr(control, "QUIET", 10.0)          # inputs keep "arriving"
    edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))
    edge.step()
    assert edge.haproxy.calls == []                       # held back while the burst goes on...
    monkeypatch.setattr(control, "MAX_DELAY", 0.0)
    edge.step()
    assert edge.haproxy.kinds() == ["install", "reload"]  # ...but never longer than MAX_DELAY


def test_apply_reload_mode_reloads_on_every_change(monkeypatch):
    monkeypatch.setattr(control, "QUIET", 0.0)
    fake = FakeHAProxy()
    e = control.Edge(fake, Listeners(":80", ":8404", "/s", ("x.org",)), TEMPLATES, threading.Event(), apply="reload")
    e.on_snapshot(snap(("web", [8001])))
    e.step()
    e.on_snapshot(snap(("web", [8001, 8002])))
    e.step()
    assert fake.kinds() == ["install", "reload", "install", "reload"]
    assert "runtime" not in fake.kinds()


def test_a_full_state_dir_keeps_haproxy_serving_runtime_changes_applying_and_retries(monkeypatch, edge, caplog):
    caplog.set_level("INFO")
    clock = [1000.0]
    monkeypatch.setattr(control.time, "monotonic", lambda: clock[0])
    edge.haproxy.disk_full = True
    edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))         # needs a reload: the write fails
    edge.step()
    edge.step()                                                       # not retried before RETRY
    assert edge.haproxy.calls == [] and edge.live.names == ("web-80",)
    edge.on_snapshot(snap(("web", [8001, 8002]), ("api", [9001])))   # an instance change meanwhile goes live
    edge.step()
    assert edge.haproxy.kinds() == ["runtime"] and edge.live.names == ("web-80",)
    assert edge.live.get("web-80").healthy == 2
    edge.haproxy.calls.clear()
    errors = [r for r in caplog.records if "No space left" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelname == "ERROR"       # said once per outage
    edge.haproxy.disk_full = False
    clock[0] += control.RETRY
    edge.step()
    assert edge.haproxy.kinds() == ["install", "reload"] and edge.live.names == ("api-80", "web-80")
    assert any("takes writes again" in r.getMessage() for r in caplog.records)


def test_a_full_state_dir_during_runtime_changes_keeps_the_file_dirty_until_it_can_write(monkeypatch, edge):
    clock = [1000.0]
    monkeypatch.setattr(control.time, "monotonic", lambda: clock[0])
    edge.haproxy.disk_full = True
    edge.on_snapshot(snap(("web", [8001, 8002])))
    edge.step()
    edge.flush()
    assert edge.haproxy.kinds() == ["runtime"]                        # live, the file not yet written
    edge.haproxy.disk_full = False
    edge.writer.step()
    assert edge.haproxy.kinds() == ["runtime"]                        # waits RETRY before trying again
    clock[0] += control.RETRY + control.MAX_DELAY
    edge.writer.step()
    assert edge.haproxy.kinds() == ["runtime", "write"]


def test_while_a_reload_is_held_back_instance_changes_of_existing_routes_go_live(edge):
    edge.haproxy.fail_install = "refused"
    edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))          # refused: api-80 cannot be added
    edge.step()
    edge.on_snapshot(snap(("web", [8002]), ("api", [9001])))          # web's instance moves
    edge.step()
    assert edge.haproxy.kinds() == ["runtime"]
    assert edge.haproxy.calls[0][1] == ("set server be_web-80/s1 addr 10.0.0.1 port 8002",
                                        "set server be_web-80/s1 state ready")
    assert edge.live.names == ("web-80",)
    edge.haproxy.calls.clear()
    edge.on_snapshot(snap(("api", [9001])))                           # web is gone: its slots go to maintenance
    edge.step()
    assert edge.haproxy.calls == [("runtime", ("set server be_web-80/s1 state maint",))]


def slots_of(backend, *servers, size=4):
    """A backend's slots as HAProxy shows them: (address, port, ready) per used slot, the rest free."""
    used = [ServedSlot(backend, f"s{i + 1}", a, p, r) for i, (a, p, r) in enumerate(servers)]
    return used + [ServedSlot(backend, f"s{i + 1}", "0.0.0.0", 0, False) for i in range(len(used), size)]


def test_what_haproxy_serves_is_compared_with_the_applied_table_and_put_back(edge, caplog):
    edge.haproxy.serving = slots_of("be_web-80", ("10.0.0.1", 8001, True))
    edge.reconcile("periodic check")
    assert edge.haproxy.calls == []                                   # the same: nothing to do
    edge.haproxy.serving = slots_of("be_web-80", ("10.0.0.1", 8001, False))   # lost behind the edge's back
    edge.reconcile("periodic check")
    assert edge.haproxy.calls == [("runtime", ("set server be_web-80/s1 addr 10.0.0.1 port 8001",
                                               "set server be_web-80/s1 state ready"))]
    assert "HAProxy does not serve the table the edge applied (periodic check)" in caplog.text
    edge.haproxy.calls.clear()
    edge.haproxy.serving = slots_of("be_other-80", ("10.0.0.1", 8001, True))  # another configuration
    edge.reconcile("after HAProxy restarted")
    assert edge.haproxy.kinds() == ["install", "reload"]


def test_the_checker_compares_on_its_own_thread_and_a_result_for_a_replaced_table_is_dropped(edge, caplog):
    """The loop hands the comparison to edge.haproxy.checker (0.3 s at 10,000 routes) and puts back
    what it found at its next round, unless the live table changed meanwhile."""
    thread = threading.Thread(target=edge.checker.run, daemon=True)
    thread.start()
    edge._wake.clear()
    try:
        edge.haproxy.serving = slots_of("be_web-80", ("10.0.0.1", 8001, False))   # lost behind the edge's back
        edge.checker.request(edge.live, "periodic check")
        assert edge._wake.wait(5)                                    # the result wakes the loop
        checked = edge.checker.take()
        assert checked.table is edge.live and not checked.plan.empty
        edge.on_snapshot(snap(("web", [8001, 8002])))                # meanwhile: another change applied
        edge.step()
        edge.haproxy.calls.clear()
        edge._put_back(checked)
        assert edge.haproxy.calls == [] and "does not serve" not in caplog.text   # compared with an old table
        edge.checker.request(edge.live, "periodic check")
        wait = time.monotonic() + 5
        while (checked := edge.checker.take()) is None and time.monotonic() < wait:
            time.sleep(0.01)
        edge._put_back(checked)
        assert "HAProxy does not serve the table the edge applied (periodic check)" in caplog.text
        assert edge.haproxy.kinds() == ["runtime"]
    finally:
        edge.stop.set()
        thread.join(5)


@pytest.fixture
def spare_edge(monkeypatch):
    monkeypatch.setattr(control, "QUIET", 0.0)
    fake = FakeHAProxy()
    e = control.Edge(fake, Listeners(":80", ":8404", "/s", ("x.org",), spares=SparePool(1, 4)), TEMPLATES,
                     threading.Event())
    e.on_snapshot(snap(("web", [8001])))
    e.step()
    fake.calls.clear()
    return e


def test_a_new_vhost_takes_a_spare_live_and_the_file_declares_it(spare_edge):
    spare_edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))
    spare_edge.step()
    assert spare_edge.haproxy.kinds() == ["runtime"] and spare_edge.reloads == 1
    assert spare_edge.haproxy.calls[0][1][-1] == "add map hosts.map api-80.x.org be_spare_1"
    spare_edge.flush()
    assert "backend be_spare_1\n    # A spare" in spare_edge.haproxy.calls[1][1]
    spare_edge.on_snapshot(snap(("web", [8001])))       # removed: the spare is free again, no reload
    spare_edge.step()
    assert spare_edge.haproxy.calls[2] == ("runtime", ("del map hosts.map api-80.x.org",
                                                       "del map spares.map be_spare_1",
                                                       "set server be_spare_1/s1 state maint"))


def test_the_pool_exhausted_is_a_reload_that_gives_every_route_its_own_backend(spare_edge):
    spare_edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))
    spare_edge.step()
    spare_edge.on_snapshot(snap(("web", [8001]), ("api", [9001]), ("cdn", [9101])))
    spare_edge.step()
    assert spare_edge.haproxy.kinds() == ["runtime", "install", "reload"]
    assert [r.backend for r in spare_edge.live.routes] == ["be_api-80", "be_cdn-80", "be_web-80"]
    assert "backend be_spare_1\n" + FREE_SPARE in spare_edge.haproxy.calls[1][1]


def test_a_failed_spare_step_converges_by_one_reload_onto_own_backends(spare_edge):
    spare_edge.haproxy.fail_runtime = "No such backend."
    spare_edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))
    spare_edge.step()
    assert spare_edge.haproxy.kinds() == ["install", "reload"]
    assert spare_edge.live.get("api-80").backend == "be_api-80"
    assert "backend be_api-80\n" in spare_edge.haproxy.calls[0][1]
    assert "backend be_spare_1\n" + FREE_SPARE in spare_edge.haproxy.calls[0][1]


def test_a_host_haproxy_kept_on_a_spare_after_a_failed_step_is_unmapped_before_another_route_takes_it(
        spare_edge, caplog):
    """Issue 16: a runtime step applied in HAProxy but failed for the edge (its answers lost), and
    the fallback reload failed too. HAProxy maps api-80 to the spare the edge thinks free: the next
    new vhost would take that spare and get api-80's traffic too. The reconcile puts the map back."""
    fake = spare_edge.haproxy
    fake.fail_runtime, fake.fail_install = "answers do not line up", "haproxy -c: no such file"
    spare_edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))
    spare_edge.step()
    assert spare_edge.live.get("api-80") is None                  # the edge believes nothing changed...
    fake.fail_runtime = fake.fail_install = None
    fake.serving = slots_of("be_web-80", ("10.0.0.1", 8001, True)) + slots_of("be_spare_1", ("10.0.0.1", 9001, True))
    fake.mapped = {"hosts.map": {"web-80.x.org": "be_web-80", "api-80.x.org": "be_spare_1"}}   # ...HAProxy does
    spare_edge.reconcile("periodic check")
    assert fake.calls == [("runtime", ("del map hosts.map api-80.x.org", "set server be_spare_1/s1 state maint"))]
    assert "hosts.map: api-80.x.org -> be_spare_1 in HAProxy, (none) in the table" in caplog.text
    fake.calls.clear()
    fake.mapped = {"hosts.map": {"web-80.x.org": "be_web-80"}}
    spare_edge.on_snapshot(snap(("web", [8001]), ("cdn", [9101])))   # the next vhost takes the spare alone
    spare_edge.step()
    assert fake.calls[-1][1][-1] == "add map hosts.map cdn-80.x.org be_spare_1"


def test_a_map_haproxy_lacks_is_a_reload(edge):
    edge.haproxy.serving = slots_of("be_web-80", ("10.0.0.1", 8001, True))
    edge.haproxy.mapped = {"hosts.map": None}
    edge.reconcile("after HAProxy restarted")
    assert edge.haproxy.kinds() == ["install", "reload"]


def test_taking_one_of_the_last_spares_is_logged_once(spare_edge, caplog):
    spare_edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))
    spare_edge.step()
    spare_edge.on_snapshot(snap(("web", [8001]), ("api", [9001, 9002])))   # churn on the spare: no new warning
    spare_edge.step()
    assert [r.getMessage() for r in caplog.records if "running low" in r.getMessage()] == [
        "spare backends running low: 0 of 1 free (a reload refills the pool once Consul is quiet)"]


def test_a_vhost_first_seen_with_no_healthy_instance_after_an_empty_initial_sync_is_mapped_live(monkeypatch):
    """Issue 16 (the image test): initial sync with no route; the service registers with its check
    critical, then it passes. Its spare is mapped when the route appears, then filled: it answers."""
    monkeypatch.setattr(control, "QUIET", 0.0)
    fake = FakeHAProxy()
    e = control.Edge(fake, Listeners(":80", ":8404", "/s", ("x.org",), spares=SparePool(32, 4)), TEMPLATES,
                     threading.Event())
    e.on_snapshot(Snapshot(MappingProxyType({}), (), 11))
    e.step()
    assert fake.kinds() == ["install", "reload"]
    critical = Instance("nginx", "t1", "t1:nginx1:80", "127.0.0.1", 32768, 80, False)
    e.on_snapshot(Snapshot(MappingProxyType({"nginx": (critical,)}), (), 12))
    e.step()
    assert fake.calls[2] == ("runtime", ("add map spares.map be_spare_1 nginx-80",
                                         "add map hosts.map nginx-80.x.org be_spare_1"))
    e.on_snapshot(Snapshot(MappingProxyType({"nginx": (Instance("nginx", "t1", "t1:nginx1:80", "127.0.0.1", 32768,
                                                                 80, True),)}), (), 13))
    e.step()
    assert fake.calls[3] == ("runtime", ("set server be_spare_1/s1 addr 127.0.0.1 port 32768",
                                         "set server be_spare_1/s1 state ready"))
    assert e.reloads == 1 and e.live.get("nginx-80").backend == "be_spare_1"


def test_the_route_a_spare_serves_is_a_metric_until_a_reload_frees_it(monkeypatch):
    """HAProxy's own metrics keep the name be_spare_K until a reload: edge_spare_route says which route
    it serves."""
    from edge.metrics import EdgeMetrics
    monkeypatch.setattr(control, "QUIET", 0.0)
    metrics = EdgeMetrics()
    e = control.Edge(FakeHAProxy(), Listeners(":80", ":8404", "/s", ("x.org",), spares=SparePool(1, 4)), TEMPLATES,
                     threading.Event(), metrics=metrics)
    e.on_snapshot(snap(("web", [8001])))
    e.step()
    e.on_snapshot(snap(("web", [8001]), ("api", [9001])))
    e.step()
    assert 'edge_spare_route{backend="be_spare_1",route="api-80"} 1.0' in metrics.text().decode()
    e.on_snapshot(snap(("web", [8001]), ("api", [9001]), ("cdn", [9101])))    # exhausted: a reload frees it
    e.step()
    assert "edge_spare_route{" not in metrics.text().decode()


V34 = Capabilities("3.4.7", (3, 4), frozenset({"add server", "del server", "set server", "add backend", "del backend",
                                              "publish backend", "unpublish backend"}),
                   frozenset({"srv-removable", "be-removable"}), True, True)


def test_on_3_4_a_new_vhost_gets_its_own_backend_live_and_a_removed_one_is_deleted(spare_edge, caplog):
    spare_edge.haproxy.caps = V34
    caplog.set_level("INFO", logger="edge")
    spare_edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))
    spare_edge.step()
    assert spare_edge.haproxy.kinds() == ["runtime"] and spare_edge.reloads == 1
    assert spare_edge.haproxy.calls[0][1][0] == "add backend be_api-80 from routes"
    assert spare_edge.live.get("api-80").dynamic and spare_edge.listeners.spares.free(spare_edge.live) == (1,)
    spare_edge.on_snapshot(snap(("web", [8001])))
    spare_edge.step()
    assert spare_edge.haproxy.kinds() == ["runtime", "runtime", "runtime"]
    assert spare_edge.haproxy.calls[2][1][-1] == "del backend be_api-80"
    assert spare_edge.live.get("api-80") is None
    assert "deleted the backend of removed route api-80 live (del backend)" in caplog.text


def test_on_3_4_a_backend_haproxy_will_not_delete_stays_retired(spare_edge, caplog):
    spare_edge.haproxy.caps = V34
    spare_edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))
    spare_edge.step()
    runtime = spare_edge.haproxy.runtime

    def refuse_deletion(commands):
        if commands[0].startswith("unpublish backend"):
            raise RuntimeFailed("wait 1ms be-removable be_api-80: Failed. This proxy cannot be removed",
                                ("wait 1ms be-removable be_api-80",))
        runtime(commands)
    spare_edge.haproxy.runtime = refuse_deletion
    spare_edge.on_snapshot(snap(("web", [8001])))
    spare_edge.step()
    assert spare_edge.live.get("api-80").retired and spare_edge.reloads == 1
    assert "kept the empty backend of removed route api-80 (tried again later" in caplog.text
    retired = spare_edge.live.get("api-80")
    spare_edge.haproxy.runtime = runtime                     # the client's connection closed
    spare_edge.reconcile("periodic check")
    assert spare_edge.live.get("api-80") is None
    assert ("runtime", dynamic.delete_commands(retired, V34)) in spare_edge.haproxy.calls


def test_on_3_4_add_backend_refused_is_one_reload_then_new_vhosts_take_spares(spare_edge, caplog):
    spare_edge.haproxy.caps = V34

    def refuse(commands):
        raise RuntimeFailed("add backend be_api-80 from routes: Unknown command", (commands[0],))
    spare_edge.haproxy.runtime = refuse
    spare_edge.on_snapshot(snap(("web", [8001]), ("api", [9001])))
    spare_edge.step()
    assert spare_edge.haproxy.kinds() == ["install", "reload"] and not spare_edge.live.get("api-80").dynamic
    assert "HAProxy refused add backend: new vhosts take spare backends from now on" in caplog.text
    spare_edge.haproxy.runtime = FakeHAProxy.runtime.__get__(spare_edge.haproxy)
    spare_edge.on_snapshot(snap(("web", [8001]), ("api", [9001]), ("cdn", [9101])))
    spare_edge.step()
    assert spare_edge.live.get("cdn-80").backend == "be_spare_1" and spare_edge.reloads == 2


def test_a_change_is_applied_while_the_writer_renders_the_one_before(monkeypatch, edge):
    rendering, release = threading.Event(), threading.Event()
    real = writer.render

    def slow_render(*args):
        rendering.set()
        assert release.wait(5)
        return real(*args)
    monkeypatch.setattr(writer, "render", slow_render)
    monkeypatch.setattr(writer, "QUIET", 0.0)
    thread = threading.Thread(target=edge.writer.run, daemon=True)
    thread.start()
    try:
        edge.on_snapshot(snap(("web", [8001, 8002])))
        edge.step()
        assert rendering.wait(5)                               # the writer renders the first change...
        edge.on_snapshot(snap(("web", [8001, 8002, 8003])))
        edge.step()                                            # ...and the next one goes live meanwhile
        assert edge.haproxy.kinds() == ["runtime", "runtime"]
    finally:
        release.set()
        edge.stop.set()
        thread.join(5)
    edge.flush()
    assert "server s3 10.0.0.1:8003" in edge.haproxy.calls[-1][1]


def test_a_background_write_never_replaces_a_newer_reloads_files(monkeypatch, edge):
    real = writer.render

    def render_then_reload(*args):
        rendered = real(*args)
        edge.on_snapshot(snap(("web", [8001, 8002]), ("api", [9001])))   # a new vhost: a reload...
        edge.step()                                                      # ...installs during the render
        return rendered
    edge.on_snapshot(snap(("web", [8001, 8002])))
    edge.step()
    monkeypatch.setattr(writer, "render", render_then_reload)
    edge.flush()
    assert edge.haproxy.kinds() == ["runtime", "install", "reload"]      # the older render not written
    assert not edge.writer.dirty


def chained(previous, *ports_by_service, changed):
    """The next snapshot of a source that knows what it changed since `previous`."""
    return replace(snap(*ports_by_service), changed=frozenset(changed), after=previous.serial)


def test_the_changed_sets_of_coalesced_snapshots_add_up(edge):
    base = edge._base
    first = chained(base, ("web", [8001, 8002]), changed={"web"})
    edge.on_snapshot(first)
    edge.on_snapshot(chained(first, ("web", [8001, 8002]), ("api", [9001]), changed={"api"}))   # latest wins
    edge.step()
    assert edge.haproxy.kinds() == ["install", "reload"]
    assert edge.live.names == ("api-80", "web-80") and len(edge.live.get("web-80").servers) == 2


@pytest.mark.parametrize("after, applied", [
    ("previous", []),             # follows the last snapshot: its word is taken, web is not looked at
    (-1, ["runtime"]),            # another source's (or after one the edge never saw): all compared
])
def test_a_snapshot_that_follows_the_last_one_is_trusted_for_what_changed(edge, after, applied):
    previous = edge._snapshot
    edge.on_snapshot(replace(snap(("web", [8001, 8002])), changed=frozenset(),
                             after=previous.serial if after == "previous" else after))
    edge.step()
    assert edge.haproxy.kinds() == applied


def test_changes_arriving_while_a_step_runs_are_kept_for_the_next(monkeypatch, edge):
    base = edge._base
    first = chained(base, ("web", [8001, 8002]), changed={"web"})
    second = chained(first, ("web", [8001, 8002]), ("api", [9001]), changed={"api"})
    real = edge._apply

    def apply_then_receive(table, plan):
        real(table, plan)
        edge.on_snapshot(second)                   # arrives while the first is being applied
    edge.on_snapshot(first)
    monkeypatch.setattr(edge, "_apply", apply_then_receive)
    edge.step()
    monkeypatch.setattr(edge, "_apply", real)
    edge.step()
    assert edge.live.names == ("api-80", "web-80")
