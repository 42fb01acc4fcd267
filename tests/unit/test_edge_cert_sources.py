"""edge.tls.sources: the KV source against an in-memory KV. Nothing new costs a list of names (not
every bundle again), and a set is handed on only when it changed."""

from __future__ import annotations

import threading

import pytest

from edge.tls.sources import KVSource
from tests.support.fake_kv import FakeKV
from tests.support.procs import wait_until
from tests.support.tlsgen import make_ca

CA = make_ca()


@pytest.fixture
def source():
    kv, stop = FakeKV(), threading.Event()
    published, tokens = [], []
    kv.put("p/certs/web", CA.bundle(["web.a.example"]))
    src = KVSource(kv, "p/certs", lambda name, certs: published.append(certs), tokens.append, stop, wait=0.02)
    thread = threading.Thread(target=src.run, daemon=True)
    thread.start()
    wait_until(lambda: published, 5, what="the first set")
    yield kv, published, tokens
    stop.set()
    thread.join(5)


def test_long_polls_without_news_read_no_values(source):
    kv, published, _ = source
    lists, key_reads = kv.lists, kv.key_reads
    wait_until(lambda: kv.key_reads >= key_reads + 10, 5, what="ten long-poll timeouts")
    assert kv.lists == lists and len(published) == 1


def test_a_certificate_change_is_read_and_handed_on_once(source):
    kv, published, _ = source
    kv.put("p/certs/api", CA.bundle(["api.a.example"]))
    wait_until(lambda: len(published) == 2, 5, what="the new set")
    assert [c.name for c in published[-1].certs] == ["kv/api", "kv/web"]
    kv.put("p/certs/broken", "not a bundle")
    wait_until(lambda: len(published) == 3, 5, what="the set with a refusal")
    assert published[-1].refused == ("kv/broken",) and published[-1].certs == published[-2].certs


def test_writes_beside_the_certificates_hand_on_no_set(source):
    kv, published, tokens = source
    kv.put("p/certs/_acme/challenges/tok-1", "tok-1.thumb")
    kv.put("p/certs/_acme/state/web.a.example", "{}")
    wait_until(lambda: tokens and tokens[-1] == {"tok-1": "tok-1.thumb"}, 5, what="the challenge")
    lists = kv.lists
    wait_until(lambda: kv.key_reads > 5, 5, what="more long polls")
    assert len(published) == 1 and kv.lists == lists and tokens == [{}, {"tok-1": "tok-1.thumb"}]
