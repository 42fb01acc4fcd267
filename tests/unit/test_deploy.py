"""The deployment files parse, and say what they must: global fleet units with restart policies
and quiet pre-start cleanup, valid systemd units, a Nomad system job, a compose file."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

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


@pytest.mark.parametrize("kind, etcd_unit, api", [
    ("fleet", "etcd2.service", "v2"),        # CoreOS's etcd2: only the v2 keys API
    ("systemd", "etcd.service", "v3"),       # Debian's etcd-server 3.4
])
def test_consul_units_name_the_etcd_they_need_and_speak_its_api(kind, etcd_unit, api):
    s = sections(DEPLOY / kind / "consul.service")
    unit = s["Unit"]
    assert etcd_unit in " ".join(v for k, v in unit if k == "After")
    assert etcd_unit in " ".join(v for k, v in unit if k == "Wants")
    assert f"--etcd-api {api}" in dict(s["Service"])["ExecStart"]


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
