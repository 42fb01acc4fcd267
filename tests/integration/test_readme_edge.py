"""The edge command lines the README shows parse and render as written: each is run with
`--dry-run` added (which renders haproxy.cfg and contacts nothing), so a renamed or dropped
option breaks this test, not a user's paste."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.support.edge import REPO

pytestmark = pytest.mark.integration


def readme_edge_commands() -> list[str]:
    blocks = re.findall(r"```\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith("haproxy-consul edge ") and "…" not in command:
                commands.append(command)
    return commands


def test_the_readme_shows_the_plain_and_the_https_edge():
    commands = readme_edge_commands()
    assert any("--acme-directory" in c for c in commands) and any("--bind :80" in c for c in commands)


@pytest.mark.parametrize("command", readme_edge_commands())
def test_each_readme_edge_command_renders(command, tmp_path):
    argv = shlex.split(command)[1:]
    out = subprocess.run([sys.executable, "-m", "haproxy_consul", *argv, "--state-dir", str(tmp_path / "s"),
                          "--dry-run"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "frontend http" in out.stdout
    if "--acme-directory" in command or "--certs" in command:
        assert re.search(r"bind :443 ssl crt \S+ crt-list \S+ alpn h2,http/1.1", out.stdout)
