"""What the HAProxy the edge drives is and accepts, learned once at start; what its answers mean.

The edge supports several HAProxy releases (2.6, 3.0, 3.2, 3.4: see the README). What differs
between them is decided here and nowhere else:

- `Capabilities.from_probes()` turns the answers of a few harmless runtime-API probes into one
  frozen value: the version (`show version`), the commands this build lists (`help`), the
  conditions `wait` knows (`wait -h`), whether `add server` knows `init-state` (an `add server`
  with an invalid `init-state` value: refused either way, but the refusal tells whether the keyword
  exists) and whether it takes `cookie` (the same probe with `cookie` first: 2.6 refuses that
  keyword for a dynamic server before it reads the rest). The process shell
  (edge.haproxy.process) sends `PROBES` and logs `describe()` in one line; the apply strategies
  (spare backends, growth with `add server`, `add backend`, atomic map swaps) read their facts
  from this value, never from a version check of their own.
- `classify()` sorts every answer of every command the edge sends into success, no-op (HAProxy
  already had what was asked: 3.x answers `nothing changed` to a `set server … addr` with the
  address and port the server has, 2.6 `no need to change the addr, no need to change the port`)
  and failure, per command and per release. An answer no rule knows is a failure, so a wording
  the edge has never seen costs a reload, never a silently wrong state.
  `split_batch()` cuts the output of a `;`-joined batch into one answer per command; a command
  whose answer can run over several lines (`del backend`), or whose failure must stop the commands
  after it (`wait`: HAProxy runs the rest of a batch whatever an answer said), is sent on its own
  instead (`alone()`).

Pure: values in, values out. The rules were written from answers recorded from each release
(tests/unit/recorded/, `scripts/record_haproxy_answers.py`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

# Sent once at start, in this order; the answers go to `Capabilities.from_probes`. The last one
# is completed with a backend name from `show backend` (see `init_state_probe`, `cookie_probe`).
PROBES = ("show version", "help", "wait -h", "show backend")
PROBE_SERVER = "haproxy-consul-probe"


def init_state_probe(backend: str) -> str:
    """Refused on every release (`?` is no valid state), so nothing is ever added; the refusal
    says whether `init-state` is a keyword of `add server` here."""
    return f"add server {backend}/{PROBE_SERVER} 0.0.0.0:0 init-state ?"


def cookie_probe(backend: str) -> str:
    """Refused on every release too (the same invalid `init-state`); a refusal that got as far as
    `init-state` says `add server` took the `cookie` before it (a sticky backend's slots)."""
    return f"add server {backend}/{PROBE_SERVER} 0.0.0.0:0 cookie {PROBE_SERVER} init-state ?"


@dataclass(frozen=True)
class Capabilities:
    version: str                                  # as `show version` answers, e.g. 3.0.11-1+deb13u4
    release: tuple[int, int] = (0, 0)             # (major, minor) of `version`
    commands: frozenset[str] = frozenset()        # the runtime commands `help` lists, e.g. "add backend"
    wait_conditions: frozenset[str] = frozenset() # what `wait` can wait for, e.g. "srv-removable"
    server_init_state: bool = False               # `add server … init-state up|down|…`
    server_cookie: bool = False                   # `add server … cookie VALUE` (not on 2.6)

    @classmethod
    def from_probes(cls, version: str, help_text: str, wait_help: str, init_state: str,
                    cookie: str = "") -> Capabilities:
        text = next((line.strip() for line in version.splitlines() if line.strip()), "unknown")
        m = re.match(r"(\d+)\.(\d+)", text)
        return cls(
            version=text,
            release=(int(m.group(1)), int(m.group(2))) if m else (0, 0),
            commands=_listed_commands(help_text),
            wait_conditions=frozenset(re.findall(r"^\s*-\s+([a-z][a-z-]*)\s", wait_help, re.M)),
            server_init_state="'init-state' expects" in init_state,
            server_cookie="init-state" in cookie,
        )

    # --- facts the apply strategies choose by ------------------------------------------------
    @property
    def dynamic_servers(self) -> bool:
        return {"add server", "del server"} <= self.commands

    @property
    def add_backend(self) -> bool:
        """`add backend NAME from DEFAULTS` + `publish backend` (3.4)."""
        return {"add backend", "publish backend"} <= self.commands

    @property
    def del_backend(self) -> bool:
        return {"del backend", "unpublish backend"} <= self.commands and "be-removable" in self.wait_conditions

    @property
    def wait_srv_removable(self) -> bool:
        """`wait DELAY srv-removable BE/SRV` before a `del server` (3.0+)."""
        return "srv-removable" in self.wait_conditions

    @property
    def atomic_maps(self) -> bool:
        """`prepare map` / `add map @VER` / `commit map @VER` swap a map's contents at once."""
        return {"prepare map", "commit map"} <= self.commands

    def describe(self) -> str:
        """The one line logged at start."""
        def yes(flag: bool) -> str:
            return "yes" if flag else "no"
        grow = ("full backends grow live (add server"
                + ("" if self.server_cookie else "; sticky ones by reload: no cookie on a dynamic server") + ")"
                if self.dynamic_servers else "full backends grow by reload")
        vhosts = ("through their own backends (add backend, del backend; spare backends if refused)"
                  if self.add_backend else "through spare backends (--spare-backends)")
        return (f"HAProxy {self.version}: add/del backend {yes(self.add_backend)}/{yes(self.del_backend)}, "
                f"dynamic servers {yes(self.dynamic_servers)}, wait srv-removable {yes(self.wait_srv_removable)}, "
                f"add server init-state {yes(self.server_init_state)}, add server cookie {yes(self.server_cookie)}, "
                f"atomic maps {yes(self.atomic_maps)}; "
                f"an unchanged server address answers {_unchanged_addr(self)!r} (a no-op); "
                f"instance churn goes live through server slots (set server), {grow}, new and removed vhosts "
                f"{vhosts}, else by reload")


def _listed_commands(help_text: str) -> frozenset[str]:
    """`  add backend <backend>   : add a new backend` → "add backend"."""
    found = set()
    for line in help_text.splitlines():
        if not line.startswith("  "):
            continue
        words = []
        for token in line.split():
            if token[0] in "<[{(:@" or token.endswith(":"):
                break
            words.append(token)
        if words:
            found.add(" ".join(words))
    return frozenset(found)


class Outcome(enum.Enum):
    SUCCESS = "success"
    NOOP = "no-op"         # HAProxy already had what was asked
    FAILURE = "failure"


@dataclass(frozen=True)
class Rule:
    command: re.Pattern          # which commands it is about
    answer: re.Pattern           # fullmatch on the answer, trailing blank lines removed
    outcome: Outcome
    since: tuple[int, int] = (0, 0)       # releases it applies to: since <= release < until
    until: tuple[int, int] = (999, 0)


def _rule(command: str, answer: str, outcome: Outcome, since=(0, 0), until=(999, 0)) -> Rule:
    return Rule(re.compile(command), re.compile(answer), outcome, since, until)


S, N = Outcome.SUCCESS, Outcome.NOOP
_IP = r"IP changed from '[^']*' to '[^']*'"
_PORT = r"port changed from '[^']*' to '[^']*'"
_BY = r" by 'stats socket command'"
_ADDR = r"set server \S+ addr \S+ port \d+"
_NO_CHANGE_26 = "no need to change the addr, no need to change the port"
_NO_CHANGE_30 = "nothing changed"

RULES: tuple[Rule, ...] = (
    # set server … addr A port P
    _rule(_ADDR, rf"{_IP}(, {_PORT}|, no need to change the port)?{_BY}|no need to change the addr, {_PORT}{_BY}", S,
          until=(3, 0)),
    _rule(_ADDR, re.escape(_NO_CHANGE_26) + _BY, N, until=(3, 0)),
    _rule(_ADDR, rf"{_IP}(, {_PORT})?{_BY}|{_PORT}{_BY}", S, since=(3, 0)),
    _rule(_ADDR, re.escape(_NO_CHANGE_30), N, since=(3, 0)),
    # add server BE/SRV ADDR:PORT [keywords]: a full backend's new slots (edge.routing.growth)
    _rule(r"add server \S+ \S+( .*)?", r"New server registered\.", S),
    # a route's own backend added and removed at runtime (3.4, edge.routing.dynamic); `del backend`
    # answers with the messages of its servers going down first: sent alone (`ALONE`), judged whole
    _rule(r"add backend \S+ from \S+", r"New backend registered\.", S),
    _rule(r"(un)?publish backend \S+", r"Backend (un)?published\.", S),
    _rule(r"wait \d+(ms|s)? (srv|be)-removable \S+", r"Done\.", S),
    # the edge's check before it deletes a backend's servers (edge.routing.dynamic): nothing but
    # those servers is in the way; the configuration naming the backend (the landing page's
    # `nbsrv`) is a failure, answered first, and the backend is kept
    _rule(r"wait 1ms be-removable \S+", r"Failed\. Only a backend without server can be deleted\.", S),
    _rule(r"del server \S+", r"Server deleted\.", S),
    _rule(r"del backend \S+", r"(?s)(.*\n)?Backend deleted\.", S),
    _rule(r"del backend \S+", r"No such backend\.", N),
    # set server … state ready|maint|drain: silent when it worked, also when the state was already so
    _rule(r"set server \S+ state (ready|maint|drain)", r"", S),
    # set server … weight W (a route's per-instance weights): silent when it worked, also unchanged
    _rule(r"set server \S+ weight \d+", r"", S),
    # maps (routers, the ACME HTTP-01 challenges): silent when they worked
    _rule(r"(add|set|del) map \S+ \S+( \S+)?", r"", S),
    _rule(r"del map \S+ \S+", r"Key not found\.", N),
    # spares.map is read by the bundled templates' pages only (edge.routing.maps): a template of
    # one's own that never loads it does without the names, not without live changes
    _rule(r"(add|set|del) map spares\.map \S+( \S+)?", r"Unknown map identifier\. Please use #<id> or <file>\.", N),
    # an atomic swap (edge.routing.maps): a new version, filled, then committed; since 2.4
    _rule(r"prepare map \S+", r"New version created: \d+", S),
    _rule(r"add map @\d+ \S+( \S+ \S+)?", r"", S),       # one entry, or a payload of entries
    _rule(r"commit map @\d+ \S+", r"", S),
    # certificates (`ssl()`: one command per connection)
    _rule(r"new ssl cert \S+", r"New empty certificate store '[^\n]*'!", S),
    _rule(r"set ssl cert \S+", r"Transaction created for certificate [^\n]*!", S),
    _rule(r"commit ssl cert \S+", r"Committing [^\n]*\nSuccess!", S),
    _rule(r"add ssl crt-list \S+ \S+", r"Inserting certificate '[^\n]*' in crt-list '[^\n]*'\.\nSuccess!", S),
    _rule(r"del ssl crt-list \S+ \S+", r"Entry '[^\n]*' deleted in crtlist '[^\n]*'!", S),
    _rule(r"del ssl crt-list \S+ \S+", r"Can't delete the entry: certificate '[^\n]*' can't be found in crt-list "
          r"'[^\n]*'!", N),
    _rule(r"del ssl cert \S+", r"Certificate '[^\n]*' deleted!", S),
    _rule(r"del ssl cert \S+", r"Can't remove the certificate: certificate '[^\n]*' doesn't exist!", N),
)


def _unchanged_addr(caps: Capabilities) -> str:
    return _NO_CHANGE_30 if caps.release >= (3, 0) else _NO_CHANGE_26


def classify(caps: Capabilities, command: str, answer: str) -> Outcome:
    """The meaning of `answer` to `command` on this HAProxy; unknown answers are failures."""
    text = "\n".join(line.rstrip() for line in answer.strip("\n").splitlines()).strip()
    for rule in RULES:
        if (rule.since <= caps.release < rule.until and rule.command.fullmatch(command)
                and rule.answer.fullmatch(text)):
            return rule.outcome
    return Outcome.FAILURE


# Sent on their own, each answer judged whole: `del backend` (its answer can run over several
# lines), `wait` (a backend's servers are deleted only once HAProxy said they can be: in a batch,
# the commands after a failed wait would run anyway).
ALONE = ("del backend ", "wait ")


def alone(command: str) -> bool:
    return command.startswith(ALONE)


def split_batch(commands: Sequence[str], output: str) -> list[str] | None:
    """The output of `c1; c2; …` → one answer per command, or None when it does not line up.

    Every command the edge batches answers one line or nothing, each answer followed by an empty
    line: "IP changed …\n\n" then "\n" for an address change then a state change. Output of
    another shape (an unexpected multi-line answer) cannot be attributed: None, a failure."""
    lines = output.removesuffix("\n").split("\n")
    answers, i = [], 0
    for _ in commands:
        if i < len(lines) and lines[i].strip() == "":
            answers.append("")
            i += 1
        elif i + 1 < len(lines) and lines[i + 1].strip() == "":
            answers.append(lines[i].strip())
            i += 2
        else:
            return None
    if any(line.strip() for line in lines[i:]):
        return None
    return answers
