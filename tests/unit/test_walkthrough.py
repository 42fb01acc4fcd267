"""The README's walkthrough blocks: found by their markers, rewritten for one machine by the
documented substitutions, and every image they run has a stand-in."""

import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import walkthrough_blocks as wb  # noqa: E402

README = (REPO / "README.md").read_text()
SOCK, MID = "/tmp/dk-x/docker.sock", "/tmp/w/machine-id-t2"
PATHS = {"/var/run/docker.sock": SOCK, "/etc/machine-id": MID, "/run/systemd/resolved.conf.d": "/tmp/w/resolved-t2",
         "/run/dbus": "/tmp/w/dbus-t2"}


def test_the_readme_walks_from_make_image_to_reading_the_catalog():
    blocks = wb.blocks(README)
    assert blocks[0].text == "make image\n" and blocks[0].hosts == ("t1",)
    assert "/v1/catalog/service/redis" in blocks[-1].text and "nginx-80.t$n.example.com" in blocks[-1].text
    runs = [line for b in blocks for line in b.text.splitlines()]
    assert runs.count("docker run -dP nginx") == 2 and runs.count("docker run -dP redis") == 1
    where = {re.search(r"haproxy-consul (\w+)", b.text).group(1): b.hosts for b in blocks
             if re.search(r"haproxy-consul (edge|bootstrap|registrator)", b.text)}
    assert where == {"bootstrap": wb.HOSTS, "edge": wb.HOSTS, "registrator": ("t1",)}


@pytest.mark.parametrize("line, as_t2", [
    ("--etcd http://10.0.0.1:2379", "--etcd http://127.0.0.1:2379"),              # another host's address
    ('curl http://10.0.0.$n/', 'curl http://127.0.0.$n/'),
    ("-client=127.0.0.1", "-client=127.1.0.2"),                                     # its own loopback:
    ("--bind :80 --admin-bind 127.0.0.1:8404", "--bind 127.0.0.2:80 --admin-bind 127.1.0.2:8404"),  # apart
    ('--advertise "$HOST_IP" -- -bind="$HOST_IP"', '--advertise "$HOST_IP" -- -bind="$HOST_IP"'),  # 127.0.0.2
    ("-client=0.0.0.0", "-client=127.0.0.2"),
    ("10.0.0.10 and 110.0.0.1", "127.0.0.10 and 110.0.0.1"),                        # whole addresses only
    ("docker run -d --name edge --net host haproxy-consul", "docker run -d --name edge-t2 --net host haproxy-consul"),
    ("docker run -d --name etcd \\\n  etcd --name t1", "docker run -d --name etcd-t2 \\\n  etcd --name t1"),
    ("-v consul-data:/var/lib/consul", "-v consul-data-t2:/var/lib/consul"),         # a named volume
    ("-v /srv/data:/data", "-v /srv/data:/data"),                                   # a host path is not
    ("-v /etc/machine-id:/etc/machine-id:ro", f"-v {MID}:/etc/machine-id:ro"),
    ("-v /var/run/docker.sock:/var/run/docker.sock:ro", f"-v {SOCK}:/var/run/docker.sock:ro"),
    ("-v /run/systemd/resolved.conf.d:/run/systemd/resolved.conf.d -v /run/dbus:/run/dbus:ro",
     "-v /tmp/w/resolved-t2:/run/systemd/resolved.conf.d -v /tmp/w/dbus-t2:/run/dbus:ro"),
    ("-v /run/dbus/x:/y", "-v /run/dbus/x:/y"),                                    # only the whole path
    ('--group-add "$(stat -c %g /var/run/docker.sock)"', f'--group-add "$(stat -c %g {SOCK})"'),
    ('--domain "$(hostname -f)" -node="$(hostname -s)"', '--domain "t2.example.com" -node="t2"'),
    ("make image", "make image"),
])
def test_substitutions_as_host_t2(line, as_t2):
    assert wb.on_host(line, "t2", PATHS) == as_t2


def test_every_marked_block_is_found_and_a_bad_marker_is_an_error():
    text = "x\n<!-- walkthrough: each host -->\n```sh\necho a\n\necho b\n```\n<!-- walkthrough: t1 -->\n```\nc\n```\n"
    assert wb.blocks(text) == (wb.Block(3, wb.HOSTS, "echo a\n\necho b\n"), wb.Block(9, ("t1",), "c\n"))
    for bad in ("<!-- walkthrough: t4 -->\n```\nx\n```\n", "<!-- walkthrough: t1 -->\nno fence\n",
                "<!-- walkthrough: t1 -->\n```\nnever closed\n"):
        with pytest.raises(wb.BadMarker):
            wb.blocks(bad)


VALUE_OPTIONS = {"--name", "--net", "--restart", "-v", "--group-add", "--user", "-e", "-p", "--stop-timeout"}


def images_run(text: str):
    """The image of every `docker run` in a block."""
    for command in text.replace("\\\n", " ").splitlines():
        words = shlex.split(command)
        if words[:2] != ["docker", "run"]:
            continue
        i = 2
        while words[i].startswith("-"):
            i += 2 if words[i] in VALUE_OPTIONS else 1
        yield words[i] if ":" in words[i] else f"{words[i]}:latest"


def test_every_image_the_blocks_run_has_a_stand_in():
    import walkthrough
    images = {image for block in wb.blocks(README) for image in images_run(block.text)}
    assert images - {"haproxy-consul:latest"} == set(walkthrough.stand_ins())


def test_names_are_what_a_rewritten_block_creates_so_leftovers_can_be_removed():
    text = wb.on_host("docker run -d --name consul \\\n  -v consul-data:/var/lib/consul -v /etc/machine-id:/x \\\n"
                      "  haproxy-consul bootstrap -- -node=x\ndocker run -dP nginx\n", "t3", PATHS)
    assert wb.names(text) == (("consul-t3",), ("consul-data-t3",))
