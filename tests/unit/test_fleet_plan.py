"""The fleet's pure core as tables: encodings, what a publisher writes, what a follower reads, and
each member's next move."""

from __future__ import annotations

import zlib
from dataclasses import replace
from types import MappingProxyType

import pytest

from edge.consul.fleetplan import (
    DELTA_MAX,
    FALLBACK_AFTER,
    SHARDS,
    SILENCE,
    Following,
    FormatError,
    Head,
    Published,
    Shard,
    Step,
    View,
    adopt,
    applied,
    beat,
    decode_head,
    decode_problems,
    decode_shard,
    encode_head,
    encode_problems,
    encode_shard,
    follow,
    from_kv,
    kv_value,
    next_move,
    plan_write,
    settle,
    shard_of,
    taken,
)
from edge.routing.model import Instance, Problem


def inst(service: str, n: int = 1, healthy: bool = True, tags: tuple[str, ...] = ()) -> Instance:
    return Instance(service, f"node{n}", f"{service}-{n}", f"10.0.0.{n}", 20000 + n, 80, healthy, tags)


def services(**kw: int) -> dict[str, tuple[Instance, ...]]:
    return {name: tuple(inst(name, i) for i in range(1, count + 1)) for name, count in kw.items()}


def published(svcs: dict, seq: int = 5, chain: str = "c1") -> Published:
    """KV holding `svcs` at `seq`, every shard written then."""
    members = [set() for _ in range(SHARDS)]
    for name in svcs:
        members[shard_of(name)].add(name)
    return Published(Head(chain, seq, versions=(seq,) * SHARDS), MappingProxyType(dict(svcs)),
                     tuple(frozenset(m) for m in members))


# --- encodings ----------------------------------------------------------------------------------------------
def test_shard_of_is_stable_and_in_range():
    assert shard_of("web") == zlib.crc32(b"web") % SHARDS
    assert all(0 <= shard_of(f"svc{i}") < SHARDS for i in range(1000))
    assert len({shard_of(f"svc{i}") for i in range(1000)}) == SHARDS


def test_head_round_trip_with_a_delta():
    routed = replace(inst("api", 2), meta=(("edge-route", "api.example.org/v1"),))   # the edge grammar's meta
    head = Head("c1", 70, 3, 1234, "host:1", tuple(range(SHARDS)), 4,
                {"web": (inst("web", 1, tags=("b", "a")),), "api": (routed,), "gone": None})
    back = decode_head(encode_head(head))
    assert back.delta["web"] == (inst("web", 1, tags=("a", "b")),) and back.delta["gone"] is None
    assert back.delta["api"] == (routed,)
    assert replace(back, delta=None) == replace(head, delta=None)


def test_shard_and_problems_round_trip():
    shard = Shard("c1", 9, MappingProxyType({n: i for n, i in services(a=2, b=1).items() if shard_of(n) == 3}))
    number = 3
    assert decode_shard(number, encode_shard(shard)) == shard
    problems = (Problem("web/x@n1", "port 'x' is not 1-65535"),)
    assert decode_problems(encode_problems("c1", 4, problems)) == ("c1", 4, problems)
    assert from_kv(kv_value(b"\x00\xff")) == b"\x00\xff" and from_kv(None) == b""


def _head_doc(**changes) -> bytes:
    doc = {"f": 1, "chain": "c1", "seq": 2, "beat": 0, "index": 1, "by": "x", "v": [0] * SHARDS, "pv": 0, "r": True,
           "d": None}
    doc.update(changes)
    import json
    return json.dumps(doc).encode()


@pytest.mark.parametrize("raw, words", [
    (b"not json", "head"),
    (_head_doc(f=2), "format 2"),
    (_head_doc(v=[0] * 3), "versions"),
    (_head_doc(v=[3] + [0] * (SHARDS - 1)), "versions"),          # a shard newer than head
    (_head_doc(chain=""), "versions"),
    (_head_doc(d={"web": [["n1", "web-1", "not-an-ip", 80, 80, True, [], []]]}), "not usable"),
    (_head_doc(d={"web": [["n1", "web-1", "10.0.0.1", 0, 80, True, [], []]]}), "not usable"),
    (_head_doc(d={"Bad Name\n": [["n1", "x", "10.0.0.1", 80, 80, True, [], []]]}), "cannot be a route"),
    (_head_doc(d={"web": [["n1", "web-1", "10.0.0.1", "80", 80, True, [], []]]}), "head"),   # wrong type
    (_head_doc(d={"web": [["n1", "web-1", "10.0.0.1", 80, 80, True, []]]}), "head"),         # no meta
    (_head_doc(d={"web": [["n1", "web-1", "10.0.0.1", 80, 80, True, [], [["owner", "x"]]]]}), "service meta"),
])
def test_a_head_another_program_wrote_is_refused_not_emptied(raw, words):
    with pytest.raises(FormatError, match=words):
        decode_head(raw)


@pytest.mark.parametrize("raw, words", [
    (b"plain", "shard 3"),
    (zlib.compress(b'{"f":1,"chain":"c1","seq":1,"s":{"svc0":[]}}'), "another shard"),
    (zlib.compress(b'{"f":9,"chain":"c1","seq":1,"s":{}}'), "format 9"),
])
def test_a_bad_shard_is_refused(raw, words):
    with pytest.raises(FormatError, match=words):
        decode_shard(3 if shard_of("svc0") != 3 else 4, raw)


# --- the publisher ------------------------------------------------------------------------------------------
def test_nothing_to_write_when_kv_says_the_same():
    svcs = services(web=2, api=1)
    assert plan_write(published(svcs), dict(svcs), (), 99, "me") is None


def test_a_forced_write_moves_seq_with_an_empty_delta():
    svcs = services(web=2)
    new, write = plan_write(published(svcs), svcs, (), 99, "me", force=True)
    assert write.head.seq == 6 and dict(write.head.delta) == {} and not write.shards
    assert new.head == write.head


def test_one_changed_service_writes_its_shard_and_a_delta():
    svcs = services(web=2, api=1)
    changed = {**svcs, "web": services(web=3)["web"]}
    new, write = plan_write(published(svcs), changed, (), 99, "me")
    assert new.services is not published(svcs).services and "web" in new.members[shard_of("web")]
    k = shard_of("web")
    assert list(write.shards) == [k] and write.shards[k].version == 6
    assert write.head.versions[k] == 6 and all(v == 5 for i, v in enumerate(write.head.versions) if i != k)
    assert dict(write.head.delta) == {"web": changed["web"]} and write.head.index == 99
    assert new.services["web"] == changed["web"] and new.services["api"] == svcs["api"]
    assert write.problems is None and write.head.problems_version == 0


def test_a_removed_service_is_a_null_in_the_delta_and_gone_from_its_shard():
    svcs = services(web=2, api=1)
    _, write = plan_write(published(svcs), {"api": svcs["api"]}, (), 99, "me")
    assert dict(write.head.delta) == {"web": None}
    assert "web" not in write.shards[shard_of("web")].services


def test_problems_are_written_with_their_own_version():
    svcs = services(web=1)
    problems = (Problem("x", "y"),)
    new, write = plan_write(published(svcs), svcs, problems, 99, "me")
    assert write.problems == problems and write.head.problems_version == 6 and not write.shards
    assert plan_write(new, svcs, problems, 100, "me") is None


def test_a_large_delta_is_left_to_the_shards():
    many = {f"svc{i}": (inst(f"svc{i}"),) for i in range(400)}
    _, write = plan_write(published({}), many, (), 1, "me")
    assert len(encode_head(replace(write.head, delta={n: many[n] for n in many}))) > DELTA_MAX
    assert write.head.delta is None and set(write.shards) == {shard_of(n) for n in many}


def test_a_new_chain_writes_every_shard_without_a_delta():
    svcs = services(web=1)
    _, write = plan_write(Published(Head("new", 0)), svcs, (), 1, "me")
    assert set(write.shards) == set(range(SHARDS)) and write.head.delta is None
    assert write.head.versions == (1,) * SHARDS


def test_dirty_shards_are_rewritten_by_the_next_write():
    svcs = services(web=1, api=1)
    kv = replace(published(svcs), dirty=frozenset({shard_of("api")}))
    new, write = plan_write(kv, {**svcs, "web": services(web=2)["web"]}, (), 1, "me")
    assert set(write.shards) == {shard_of("web"), shard_of("api")} and not new.dirty


def test_a_beat_moves_the_counter_and_drops_the_delta():
    svcs = services(web=1)
    kv, _ = plan_write(published(svcs), services(web=2), (), 1, "me")
    kv2, head = beat(kv, "me")
    assert head.beat == kv.head.beat + 1 and head.seq == kv.head.seq and head.delta is None
    assert kv2.head == head and len(encode_head(head)) < 700
    assert follow(Following("c1", 5, (5,) * SHARDS, 0), head) == Step("shards", (shard_of("web"),))


# --- what a new publisher starts from -------------------------------------------------------------------------
def _shards_of(kv: Published, version: int | None = None, chain: str = "c1") -> dict[int, Shard]:
    return {k: Shard(chain, version or kv.head.versions[k], kv.shard(k)) for k in range(SHARDS)}


def test_taking_the_lock_keeps_the_publication_and_marks_it_not_ready():
    head = Head("c1", 5, beat=2, publisher="old", versions=(5,) * SHARDS)
    assert taken(head, "new", "fresh") == replace(head, beat=3, publisher="new", ready=False)
    assert taken(None, "new", "fresh") == Head("fresh", 0, publisher="new", ready=False)


def test_the_first_write_after_taking_over_is_ready_and_beats_before_it_are_not():
    svcs = services(web=1)
    kv = replace(published(svcs), head=taken(published(svcs).head, "new", "x"))
    assert not beat(kv, "new")[1].ready
    assert plan_write(kv, svcs, (), 1, "new", force=True)[1].head.ready


def test_a_new_publisher_continues_a_complete_chain():
    kv = published(services(web=2, api=1))
    started = adopt(kv.head, _shards_of(kv), None, "fresh")
    assert started.head.chain == "c1" and started.head.seq == 5 and started.services == kv.services
    assert not started.dirty


@pytest.mark.parametrize("what", ["missing shard", "older shard", "other chain", "missing problems", "no head",
                                  "never published"])
def test_a_new_publisher_starts_a_new_chain_when_kv_is_incomplete(what):
    kv = published(services(web=2))
    head, shards, problems = kv.head, _shards_of(kv), None
    if what == "missing shard":
        del shards[shard_of("web")]
    elif what == "older shard":
        shards[shard_of("web")] = replace(shards[shard_of("web")], version=4)
    elif what == "other chain":
        shards[shard_of("web")] = replace(shards[shard_of("web")], chain="c0")
    elif what == "missing problems":
        head = replace(head, problems_version=3)
    elif what == "no head":
        head = None
    else:
        head = Head("c1", 0)
    started = adopt(head, shards, problems, "fresh")
    assert started.head == Head("fresh", 0) and not started.services


def test_a_shard_newer_than_head_is_rewritten_by_the_first_write():
    kv = published(services(web=2))
    shards = _shards_of(kv)
    shards[shard_of("web")] = replace(shards[shard_of("web")], version=6)     # its head write was refused
    started = adopt(kv.head, shards, None, "fresh")
    assert started.dirty == {shard_of("web")}


# --- the follower ---------------------------------------------------------------------------------------------
HEAD = Head("c1", 10, versions=tuple(10 if k % 2 else 3 for k in range(SHARDS)), problems_version=2,
            delta=MappingProxyType({}))
AT_9 = Following("c1", 9, tuple(9 if k % 2 else 3 for k in range(SHARDS)), 2)


@pytest.mark.parametrize("state, head, kind, shards, problems", [
    (None, HEAD, "full", tuple(range(SHARDS)), True),
    (replace(AT_9, chain="c0"), HEAD, "full", tuple(range(SHARDS)), True),
    (replace(AT_9, seq=11), HEAD, "stale", (), False),
    (replace(AT_9, seq=10), HEAD, "same", (), False),
    (AT_9, HEAD, "delta", (), False),
    (AT_9, replace(HEAD, delta=None), "shards", tuple(range(1, SHARDS, 2)), False),
    (replace(AT_9, seq=8), HEAD, "shards", tuple(range(1, SHARDS, 2)), False),       # a gap
    (replace(AT_9, problems_version=1), HEAD, "shards", tuple(range(1, SHARDS, 2)), True),
])
def test_what_a_follower_reads_for_a_head(state, head, kind, shards, problems):
    assert follow(state, head) == Step(kind, shards, problems)


def test_settle_keeps_current_shards_and_names_the_late_ones():
    head = Head("c1", 10, versions=(10, 0, 7) + (0,) * (SHARDS - 3))
    read = {0: Shard("c1", 10, MappingProxyType({})), 1: Shard("c0", 99, MappingProxyType({"x": ()})),
            2: Shard("c1", 6, MappingProxyType({}))}
    late, usable = settle(head, (0, 1, 2), read)
    assert late == (2,)
    assert usable[0] is read[0] and usable[1].services == {} and usable[1].chain == "c1"   # never written: empty
    assert settle(head, (2,), {}) == ((2,), {})                                            # missing: late


def test_applied_takes_the_versions_of_what_was_read():
    head = replace(HEAD, delta=None)
    shards = {1: Shard("c1", 12, MappingProxyType({}))}
    after = applied(AT_9, head, Step("shards", (1,)), shards)
    assert after.seq == 10 and after.versions[1] == 12 and after.versions[3] == AT_9.versions[3]
    assert applied(AT_9, HEAD, Step("delta"), {}) == Following("c1", 10, HEAD.versions, 2)


# --- the next move ------------------------------------------------------------------------------------------
LIVE = dict(usable=True, holder=True, quiet=0.5, without=0.0)


@pytest.mark.parametrize("view, move", [
    (View("publisher", holder=True, ours=True), "stay"),
    (View("publisher", holder=True, ours=False), "step-down"),
    (View("publisher", holder=False), "step-down"),
    (View("follower", **LIVE), "stay"),
    (View("follower"), "acquire"),                                     # no head, nobody holds it
    (View("follower", usable=True), "acquire"),                        # released
    (View("follower", can_publish=False), "fallback"),                 # nobody publishes and we may not
    (View("follower", usable=True, holder=True, quiet=SILENCE, without=SILENCE), "depose"),
    (View("follower", usable=True, holder=True, quiet=SILENCE, without=SILENCE, can_publish=False), "stay"),
    (View("follower", usable=True, holder=True, quiet=SILENCE, without=FALLBACK_AFTER), "fallback"),
    (View("follower", holder=True, quiet=0.5, without=FALLBACK_AFTER), "fallback"),   # a head we cannot read
    (View("fallback", **LIVE, newer=True), "follow"),
    (View("fallback", **LIVE, newer=False), "stay"),                   # not caught up yet
    (View("fallback", holder=True, quiet=0.5, newer=True), "stay"),    # unreadable
    (View("fallback", usable=True, holder=True, quiet=SILENCE, newer=True), "depose"),
    (View("fallback", usable=True), "acquire"),
    (View("fallback", can_publish=False), "stay"),
])
def test_next_move(view, move):
    assert next_move(view) == move
