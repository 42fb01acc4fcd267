"""The deployment files parse, and say what they must: global fleet units with restart policies
and quiet pre-start cleanup, valid systemd units (`systemd-analyze verify`), a Nomad system job
whose keys are Nomad's, a compose file `docker-compose config` accepts; and each program's
arguments, as systemd, fleet, compose and Nomad fill them in, go through that program's own
parser and give it what the README promises (issue 19)."""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bootstrap import settings as bootstrap_settings
from edge import settings as edge_settings
from registrator import settings as registrator_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = ("consul", "registrator-consul", "haproxy-consul")


def sections(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value)]}, keeping repeated keys and continuation lines."""
    out, current, text = {}, None, re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[(.+)\]", line.strip()):
            current = out.setdefault(m.group(1), [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return out


@pytest.mark.parametrize("kind", ["fleet", "systemd"])
@pytest.mark.parametrize("unit", UNITS)
def test_units_restart_and_clean_up_quietly(kind, unit):
    s = sections(DEPLOY / kind / f"{unit}.service")
    service = dict(s["Service"])
    assert service["Restart"] == "always" and int(service["RestartSec"]) > 0
    pre = [v for k, v in s["Service"] if k == "ExecStartPre"]
    assert pre and all("|| true" in v or v.startswith("-") for v in pre), "cleanup must not fail the unit"
    assert "docker run" in service["ExecStart"] and "--net host" in service["ExecStart"]
    if kind == "fleet":
        assert dict(s["X-Fleet"])["Global"] == "true"
    else:
        assert dict(s["Install"])["WantedBy"] == "multi-user.target"


@pytest.fixture(scope="module")
def analyze():
    path = shutil.which("systemd-analyze")
    if path is None:
        raise RuntimeError("systemd-analyze is not installed (Debian package systemd)")
    return path


@pytest.mark.parametrize("kind", ["fleet", "systemd"])
@pytest.mark.parametrize("unit", UNITS)
def test_units_pass_systemd_analyze_verify(analyze, tmp_path, kind, unit):
    copy = tmp_path / f"{unit}.service"
    shutil.copy(DEPLOY / kind / f"{unit}.service", copy)
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_systemd_analyze_does_catch_a_broken_unit(analyze, tmp_path):
    broken = tmp_path / "broken.service"
    broken.write_text("[Service]\nExecStart=relative/path --x\n")
    result = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0 or result.stderr.strip()


def test_nomad_system_job_runs_edge_and_registrator_on_the_host_network():
    job = json.loads((DEPLOY / "nomad" / "haproxy-consul.nomad.json").read_text())["Job"]
    assert job["Type"] == "system"
    tasks = {t["Name"]: t for g in job["TaskGroups"] for t in g["Tasks"]}
    assert set(tasks) == {"edge", "registrator"}
    for task in tasks.values():
        assert task["Driver"] == "docker" and task["Config"]["network_mode"] == "host"
        assert task["Config"]["args"][0] == task["Name"]
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in tasks["registrator"]["Config"]["volumes"]


def test_compose_file_has_the_three_programs():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {s["command"][0] for s in services.values()} == {"bootstrap", "registrator", "edge"}
    assert all(s["network_mode"] == "host" and s["restart"] == "always" for s in services.values())
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in services["registrator"]["volumes"]


def test_the_fleet_consul_unit_needs_etcd2_and_speaks_v2():
    """Every CoreOS machine runs etcd2 (a member or proxy of the one cluster): 127.0.0.1 is it."""
    s = sections(DEPLOY / "fleet" / "consul.service")
    assert "etcd2.service" in " ".join(v for k, v in s["Unit"] if k in ("After", "Wants"))
    assert "--etcd-api v2" in dict(s["Service"])["ExecStart"]


def test_the_systemd_units_read_their_settings_and_do_not_restart_a_configuration_error():
    """A host's own etcd would be a one-member cluster per host: the fleet's etcd comes from the
    env file; a missing file stops the start (no loop); exit 2 (bad options) is not restarted."""
    for unit in UNITS:
        s = sections(DEPLOY / "systemd" / f"{unit}.service")
        service = dict(s["Service"])
        assert dict(s["Unit"])["AssertPathExists"] == ENV_FILE and service["EnvironmentFile"] == ENV_FILE
        assert service["RestartPreventExitStatus"] == "2"
    consul = sections(DEPLOY / "systemd" / "consul.service")
    assert "etcd.service" not in str(consul["Unit"]) and "127.0.0.1:2379" not in str(consul)
    assert "--etcd ${ETCD_ENDPOINTS} --etcd-api v3" in dict(consul["Service"])["ExecStart"]


@pytest.mark.parametrize("unit", UNITS)
def test_fleet_units_do_not_restart_a_configuration_error(unit):
    assert dict(sections(DEPLOY / "fleet" / f"{unit}.service")["Service"])["RestartPreventExitStatus"] == "2"


# --- what each program gets, through its own parser ---------------------------------------------
ENV_FILE = "/etc/haproxy-consul/env"
HOST_ENV = {"HOST_IP": "10.0.0.1", "ETCD_ENDPOINTS": "http://10.0.0.1:2379", "COREOS_PRIVATE_IPV4": "10.0.0.1"}


def expand(text: str, env: dict[str, str], host: str = "t1.example.com") -> str:
    """systemd's specifiers and ${VAR}/$VAR as it fills them in (an unset variable is empty)."""
    text = text.replace("%%", "\0").replace("%H", host).replace("\0", "%")
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def program_argv(words: list[str]) -> list[str]:
    """The arguments after the image name of a `docker run … haproxy-consul PROGRAM …` line."""
    at = next(i for i, w in enumerate(words) if w == "haproxy-consul" and words[i - 1] != "--name")
    return words[at + 1:]


def unit_argv(kind: str, unit: str, env: dict[str, str]) -> list[str]:
    start = dict(sections(DEPLOY / kind / f"{unit}.service")["Service"])["ExecStart"]
    words = shlex.split(start)
    if words[:2] == ["/bin/sh", "-c"]:                 # the shell sees the variables, systemd the rest
        words = shlex.split(expand(words[2], env))
    else:
        words = [expand(w, env) for w in words]
    return program_argv(words)


def parse_program(argv: list[str]):
    program, args = argv[0], argv[1:]
    environ = {"BOOTSTRAP_MACHINE_ID": "m1"}
    return {"bootstrap": bootstrap_settings.parse, "edge": edge_settings.parse,
            "registrator": registrator_settings.parse}[program](args, environ)


def check_programs(settings: dict) -> None:
    """What the README promises every deployment gives its programs."""
    boot, edge, reg = settings["bootstrap"], settings["edge"], settings["registrator"]
    assert boot.advertise == "10.0.0.1" and boot.etcd in (("http://10.0.0.1:2379",), ("http://127.0.0.1:2379",))
    assert boot.dns_resolved and boot.dns_target == ("127.0.0.1", 8600)
    assert "-client=127.0.0.1" in boot.agent_args and "-ui" in boot.agent_args and "-bind=10.0.0.1" in boot.agent_args
    assert edge.consul_ui_bind == "10.0.0.1:8500" and edge.consul_ui_server == "127.0.0.1:8500"
    assert reg.ip == "10.0.0.1" and str(reg.consul.address) == "http://127.0.0.1:8500"


@pytest.mark.parametrize("kind", ["fleet", "systemd"])
def test_unit_lines_give_each_program_what_it_needs(kind):
    settings = {}
    for unit in UNITS:
        s = parse_program(unit_argv(kind, unit, HOST_ENV))
        settings[PROGRAM[unit]] = s
    check_programs(settings)
    if kind == "systemd":
        assert settings["bootstrap"].etcd == ("http://10.0.0.1:2379",)       # the fleet's etcd, not a local one


@pytest.mark.parametrize("kind, unset", [("systemd", "HOST_IP"), ("systemd", "ETCD_ENDPOINTS"),
                                         ("fleet", "COREOS_PRIVATE_IPV4")])
@pytest.mark.parametrize("unit", UNITS)
def test_an_unset_setting_is_exit_2_which_the_units_do_not_restart(kind, unset, unit, capsys):
    env = {k: v for k, v in HOST_ENV.items() if k != unset}
    argv = unit_argv(kind, unit, env)
    if unset == "ETCD_ENDPOINTS" and argv[0] != "bootstrap":
        return                                                              # only bootstrap reads it
    with pytest.raises(SystemExit) as exc:
        parse_program(argv)
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()[-1]) > 20       # one line that says why


PROGRAM = {"consul": "bootstrap", "registrator-consul": "registrator", "haproxy-consul": "edge"}


@pytest.mark.parametrize("kind", ["fleet", "systemd"])
@pytest.mark.parametrize("unit", UNITS)
def test_units_run_the_image_make_image_tags(kind, unit):
    """`make image` tags haproxy-consul:latest, which is what a bare `haproxy-consul` runs."""
    start = dict(sections(DEPLOY / kind / f"{unit}.service")["Service"])["ExecStart"]
    assert re.search(rf"\shaproxy-consul {PROGRAM[unit]}\s", start), start


def test_compose_and_nomad_run_the_image_make_image_tags():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"].values()
    job = json.loads((DEPLOY / "nomad" / "haproxy-consul.nomad.json").read_text())["Job"]
    nomad = [t["Config"]["image"] for g in job["TaskGroups"] for t in g["Tasks"]]
    assert {s["image"] for s in compose} | set(nomad) == {"haproxy-consul"}


# --- compose: the tool's own check, then the programs' parsers ----------------------------------
COMPOSE_ENV = {"HOST_IP": "10.0.0.1", "ETCD": "http://10.0.0.1:2379", "DOMAIN": "t1.example.com"}


@pytest.fixture(scope="module")
def compose():
    for argv in (["docker-compose"], ["docker", "compose"]):
        if shutil.which(argv[0]) and subprocess.run([*argv, "version"], capture_output=True).returncode == 0:
            return argv
    raise RuntimeError("docker-compose is not installed (Debian package docker-compose): run `make deps`")


def compose_config(compose, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("HOST_IP", "ETCD", "DOMAIN", "EXPECT")}
    return subprocess.run([*compose, "-f", str(DEPLOY / "docker-compose.yml"), "config"], capture_output=True,
                          text=True, env={**base, **env}, timeout=60)


def test_compose_config_accepts_the_file_and_gives_each_program_what_it_needs(compose):
    out = compose_config(compose, COMPOSE_ENV)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    check_programs({s["command"][0]: parse_program(s["command"]) for s in services.values()})
    assert services["consul"]["stop_grace_period"] == "30s" and services["consul"]["user"] == "root"


@pytest.mark.parametrize("unset", ["HOST_IP", "ETCD", "DOMAIN"])
def test_compose_refuses_to_start_without_a_setting_and_names_it(compose, unset):
    out = compose_config(compose, {k: v for k, v in COMPOSE_ENV.items() if k != unset})
    assert out.returncode != 0 and unset in out.stderr


# --- Nomad: its job's keys and the task arguments -----------------------------------------------
# The keys of Nomad's API job (api.Job, api.TaskGroup, api.Task, …) this file may use, and the
# docker driver's options it uses; anything else is a typo Nomad would reject or ignore.
NOMAD_KEYS = {
    "Job": {"ID", "Name", "Type", "Datacenters", "TaskGroups", "Priority", "Region", "Constraints", "Meta"},
    "TaskGroup": {"Name", "Count", "RestartPolicy", "Tasks", "Constraints", "Meta"},
    "RestartPolicy": {"Attempts", "Interval", "Delay", "Mode"},
    "Task": {"Name", "Driver", "Config", "User", "Resources", "Env", "KillTimeout", "Meta"},
    "Resources": {"CPU", "MemoryMB"},
    "docker": {"image", "network_mode", "args", "volumes", "mount", "group_add"},
}
NOMAD_NODE = {"${node.unique.name}": "t1.example.com", "${attr.unique.network.ip-address}": "10.0.0.1"}


def test_nomad_job_uses_only_nomads_keys_and_types():
    job = json.loads((DEPLOY / "nomad" / "haproxy-consul.nomad.json").read_text())
    assert set(job) == {"Job"} and set(job["Job"]) <= NOMAD_KEYS["Job"]
    assert job["Job"]["Type"] in ("service", "system", "batch", "sysbatch")
    for group in job["Job"]["TaskGroups"]:
        assert set(group) <= NOMAD_KEYS["TaskGroup"] and group["Count"] in (0, 1)   # a system job: 0 or 1
        policy = group["RestartPolicy"]
        assert set(policy) <= NOMAD_KEYS["RestartPolicy"] and policy["Mode"] in ("delay", "fail")
        assert all(isinstance(policy[k], int) and policy[k] >= 10**9 for k in ("Interval", "Delay"))   # ns
        for task in group["Tasks"]:
            assert set(task) <= NOMAD_KEYS["Task"] and set(task["Resources"]) <= NOMAD_KEYS["Resources"]
            assert task["Driver"] == "docker" and set(task["Config"]) <= NOMAD_KEYS["docker"]
            assert all(isinstance(a, str) for a in task["Config"]["args"])


def test_nomad_tasks_give_each_program_what_it_needs():
    job = json.loads((DEPLOY / "nomad" / "haproxy-consul.nomad.json").read_text())["Job"]
    for task in (t for g in job["TaskGroups"] for t in g["Tasks"]):
        args = [NOMAD_NODE.get(a, a) for a in task["Config"]["args"]]
        args = [a.replace("${attr.unique.network.ip-address}", "10.0.0.1") for a in args]
        s = parse_program(args)
        if task["Name"] == "edge":
            assert s.consul_ui_bind == "10.0.0.1:8500" and s.domains == ("t1.example.com",)
        else:
            assert s.ip == "10.0.0.1" and s.hostname == "t1.example.com"
