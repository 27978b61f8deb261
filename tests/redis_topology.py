"""Throwaway Redis Cluster and Sentinel topologies on loopback, for fault tests.

``RedisCluster`` runs N masters with R replicas each; ``SentinelSet`` runs a primary, a
replica and three sentinels. Both are context managers: ``start()`` on enter, ``close()``
on exit (SIGKILL every process, remove the temp dir). A failed ``start()`` cleans up after
itself. As safety nets, an ``atexit`` hook kills whatever is still running, and on Linux
each server gets SIGKILL when the (main thread of the) test process dies.

Admin commands go through a tiny blocking RESP2 client (``command``), one connection per
call, so that the helpers never hold connections to nodes that tests kill.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

HOST = "127.0.0.1"
CLUSTER_SLOTS = 16384

Reply = str | int | None | list["Reply"]
Arg = str | int


class ReplyError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


# --- a minimal RESP2 client ---------------------------------------------------------------


def _encode(args: Sequence[Arg]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read(f: IO[bytes]) -> Reply | ReplyError:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by server")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return ReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = f.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed by server")
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        size = int(rest)
        if size < 0:
            return None
        items: list[Reply] = []
        for _ in range(size):
            item = _read(f)
            if isinstance(item, ReplyError):
                raise item
            items.append(item)
        return items
    raise ConnectionError(f"bad RESP reply: {line!r}")


def commands(port: int, *cmds: Sequence[Arg], timeout: float = 2.0) -> list[Reply]:
    """Send ``cmds`` on one fresh connection to ``127.0.0.1:port``; raise the first error."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"".join(_encode(c) for c in cmds))
        with sock.makefile("rb") as f:
            replies = [_read(f) for _ in cmds]
    for reply in replies:
        if isinstance(reply, ReplyError):
            raise reply
    return [r for r in replies if not isinstance(r, ReplyError)]


def command(port: int, *args: Arg, timeout: float = 2.0) -> Reply:
    """One command on a fresh connection to ``127.0.0.1:port``."""
    return commands(port, args, timeout=timeout)[0]


def text(reply: Reply) -> str:
    if not isinstance(reply, str):
        raise TypeError(f"expected a string reply, got {reply!r}")
    return reply


def info(port: int, section: str = "default") -> dict[str, str]:
    """``INFO section`` (or ``CLUSTER INFO`` for ``section='cluster-info'``) as a dict."""
    args: tuple[Arg, ...] = ("CLUSTER", "INFO") if section == "cluster-info" else ("INFO", section)
    fields: dict[str, str] = {}
    for line in text(command(port, *args)).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def role(port: int) -> str:
    """``master``, ``slave`` or ``sentinel`` (from ``ROLE``)."""
    reply = command(port, "ROLE")
    assert isinstance(reply, list)
    return text(reply[0])


def _pairs(reply: Reply) -> dict[str, str]:
    """A flat ``[k1, v1, k2, v2, ...]`` reply (as from ``SENTINEL REPLICAS``) as a dict."""
    assert isinstance(reply, list)
    return {text(reply[i]): str(reply[i + 1]) for i in range(0, len(reply) - 1, 2)}


# --- ports and processes ------------------------------------------------------------------


_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()
_handed_out: set[int] = set()


def _kill_leftovers() -> None:
    with _live_lock:
        procs = list(_live)
        _live.clear()
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)


atexit.register(_kill_leftovers)


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a ``preexec_fn`` that has the child SIGKILLed when this process dies.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only used when
    spawning from the main thread (servers started from a worker thread rely on atexit)."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)

    return preexec


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_port(*, with_bus: bool = False) -> int:
    """A free loopback port below the usual ephemeral range (and never 6379).

    With ``with_bus`` the cluster bus port (``port + 10000``) must be free too. Ports this
    process handed out before are never reused, so that a killed node's port stays its own.
    Another process may still grab the port before redis-server binds it: callers retry."""
    rng = random.SystemRandom()
    for _ in range(1000):
        # Below Linux's ephemeral range (32768+) for both ports, so that outgoing
        # connections of other processes do not take a killed node's port before it restarts.
        port = rng.randrange(12000, 22000)
        if port in _handed_out or port in (6379, 16379):
            continue
        if _bindable(port) and (not with_bus or _bindable(port + 10000)):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free loopback port pair found")


def _redis_binary(name: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        raise RuntimeError(f"{name} not found on PATH: these tests need a real Redis")
    return binary


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> float:
    """Poll ``condition`` (connection errors count as False) until true; return seconds."""
    start = time.monotonic()
    deadline = start + timeout
    last_error: Exception | None = None
    while True:
        try:
            if condition():
                return time.monotonic() - start
        except (OSError, ReplyError, ValueError, TypeError, AssertionError) as e:
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)


class _Topology:
    """Temp dir, process table and lifecycle shared by the topologies."""

    _prefix = "capproxy-redis-topology-"

    def __init__(self) -> None:
        self.binary = _redis_binary("redis-server")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._argv: dict[int, list[str]] = {}
        self._killed_at: dict[int, float] = {}
        self.pids: list[int] = []
        """Every pid this topology ever spawned (for leak checks)."""
        self.start_seconds: float | None = None

    @property
    def dir(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("topology not started")
        return Path(self._tmp.name)

    def log_path(self, port: int) -> Path:
        return self.dir / f"redis-{port}.log"

    def _base_args(self, port: int) -> list[str]:
        return [
            "--port",
            str(port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
            # A replica's full sync would otherwise wait 5s for more replicas to join.
            "--repl-diskless-sync-delay",
            "0",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.log_path(port)),
        ]

    def _spawn(self, port: int, argv: list[str]) -> None:
        if port in self._procs:
            raise RuntimeError(f"port {port} is already running")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
            preexec_fn=_die_with_parent(),
        )
        with _live_lock:
            _live.add(proc)
        self._procs[port] = proc
        self._argv[port] = argv
        self.pids.append(proc.pid)

    def _wait_ping(self, port: int, timeout: float = 10) -> bool:
        """True once ``port`` answers PING; False if its process exited first."""
        proc = self._procs[port]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if command(port, "PING", timeout=0.5) == "PONG":
                    return True
            except (OSError, ReplyError):
                pass
            if proc.poll() is not None:
                return False
            time.sleep(0.01)
        raise TimeoutError(f"redis-server on port {port} did not answer PING in {timeout}s")

    def _start_with_retry(
        self, make_argv: Callable[[int], list[str]], *, with_bus: bool = False
    ) -> int:
        """Spawn a server on a fresh port, retrying on another port if it cannot bind."""
        for _ in range(5):
            port = pick_port(with_bus=with_bus)
            self._spawn(port, make_argv(port))
            if self._wait_ping(port):
                return port
            tail = _log_tail(self.log_path(port))
            self._forget(port)
            if "in use" not in tail and "bind" not in tail.lower():
                raise RuntimeError(f"redis-server on port {port} exited:\n{tail}")
        raise RuntimeError("redis-server could not bind a free port after 5 tries")

    def _spawn_many(
        self, count: int, make_argv: Callable[[int], list[str]], *, with_bus: bool = False
    ) -> list[int]:
        """Spawn ``count`` servers at once, then wait for them (retrying bind failures)."""
        ports = []
        for _ in range(count):
            port = pick_port(with_bus=with_bus)
            self._spawn(port, make_argv(port))
            ports.append(port)
        result = []
        for port in ports:
            if self._wait_ping(port):
                result.append(port)
            else:
                tail = _log_tail(self.log_path(port))
                self._forget(port)
                if "in use" not in tail and "bind" not in tail.lower():
                    raise RuntimeError(f"redis-server on port {port} exited:\n{tail}")
                result.append(self._start_with_retry(make_argv, with_bus=with_bus))
        return result

    def _reap(self, port: int) -> None:
        proc = self._procs.pop(port, None)
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait(timeout=10)
        with _live_lock:
            _live.discard(proc)

    def _forget(self, port: int) -> None:
        """Drop a server that never came up (so that ``heal`` does not restart it)."""
        self._reap(port)
        self._argv.pop(port, None)

    def is_running(self, port: int) -> bool:
        proc = self._procs.get(port)
        return proc is not None and proc.poll() is None

    @property
    def live_ports(self) -> list[int]:
        return [p for p in self._procs if self.is_running(p)]

    def kill(self, port: int) -> None:
        """SIGKILL the server on ``port`` (its port and data dir are kept for ``restart``)."""
        if port not in self._procs:
            raise KeyError(f"no server of this topology runs on port {port}")
        self._killed_at[port] = time.monotonic()
        self._reap(port)

    def _respawn(self, port: int) -> None:
        if self.is_running(port):
            return
        self._reap(port)
        self._spawn(port, self._argv[port])
        if not self._wait_ping(port):
            raise RuntimeError(
                f"redis-server on port {port} did not restart:\n{_log_tail(self.log_path(port))}"
            )

    def flushall_node(self, port: int) -> None:
        command(port, "FLUSHALL")

    @property
    def killed_ports(self) -> list[int]:
        """Ports of servers that were started once and are not running now."""
        return [p for p in self._argv if not self.is_running(p)]

    def restart(self, port: int, timeout: float = 30) -> float:
        raise NotImplementedError

    def wait_ready(self, timeout: float = 30) -> float:
        raise NotImplementedError

    def heal(self, timeout: float = 30) -> float:
        """Restart every killed server and wait until the topology is healthy; return seconds.
        Cheap when nothing was killed, so fixtures may call it before each test."""
        began = time.monotonic()
        for port in self.killed_ports:
            self._respawn_for_heal(port)
        self.wait_ready(timeout)
        return time.monotonic() - began

    def _respawn_for_heal(self, port: int) -> None:
        self._respawn(port)

    def _start(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._tmp is not None:
            return
        self._tmp = tempfile.TemporaryDirectory(prefix=self._prefix)
        began = time.monotonic()
        try:
            self._start()
        except BaseException as e:
            logs = "\n".join(
                f"--- {p.name}:\n{_log_tail(p, 8)}" for p in sorted(self.dir.glob("*.log"))
            )
            self.close()
            if isinstance(e, Exception) and logs:
                e.add_note(logs)
            raise
        self.start_seconds = time.monotonic() - began

    def close(self) -> None:
        for port in list(self._procs):
            self._reap(port)
        self._argv.clear()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.cleanup()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- Redis Cluster ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNode:
    """One line of ``CLUSTER NODES``."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    link_state: str
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "noaddr", "handshake"})

    def serves(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


def parse_cluster_nodes(raw: str) -> list[ClusterNode]:
    nodes = []
    for line in raw.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@")[0]
        slots = []
        for item in parts[8:]:
            if item.startswith("["):  # a slot being migrated or imported
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        nodes.append(
            ClusterNode(
                node_id=parts[0],
                port=int(address.rpartition(":")[2]),
                flags=frozenset(parts[2].split(",")),
                master_id=None if parts[3] == "-" else parts[3],
                link_state=parts[7],
                slots=tuple(sorted(slots)),
            )
        )
    return nodes


@dataclass(frozen=True)
class _KilledMaster:
    node_id: str
    slots: tuple[tuple[int, int], ...]
    replica_ids: frozenset[str]


class RedisCluster(_Topology):
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, on loopback.

    Ports are picked in 12000-21999 so that each bus port (port + 10000) is free as well.
    Failover is tuned to be quick: node timeout ``node_timeout_ms`` (1 s) and replica
    validity factor 0 (a replica may always be promoted)."""

    _prefix = "capproxy-redis-cluster-"

    def __init__(self, masters: int = 3, replicas: int = 0, *, node_timeout_ms: int = 1000) -> None:
        super().__init__()
        self.cli = _redis_binary("redis-cli")
        self.n_masters = masters
        self.n_replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        """Every node's port, in creation order (the first ``masters`` were created masters)."""
        self._killed_masters: dict[int, _KilledMaster] = {}

    def _argv_for(self, port: int) -> list[str]:
        return [
            self.binary,
            *self._base_args(port),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--cluster-replica-validity-factor",
            "0",
        ]

    def _start(self) -> None:
        total = self.n_masters * (1 + self.n_replicas)
        self.ports = self._spawn_many(total, self._argv_for, with_bus=True)
        out = subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"{HOST}:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.n_replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if out.returncode != 0 or "All 16384 slots covered" not in out.stdout:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({out.returncode}):\n{out.stdout}{out.stderr}"
            )
        self._wait_created()

    # --- queries

    @property
    def seed_url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` of the first live master (by port)."""
        return f"redis://{HOST}:{self.masters()[0]}/0"

    def _via(self, via: int | None) -> int:
        if via is not None:
            return via
        live = self.live_ports
        if not live:
            raise RuntimeError("no cluster node is running")
        return live[0]

    def nodes(self, via: int | None = None) -> list[ClusterNode]:
        """``CLUSTER NODES`` as seen by ``via`` (default: the first live node)."""
        return parse_cluster_nodes(text(command(self._via(via), "CLUSTER", "NODES")))

    def masters(self, via: int | None = None) -> list[int]:
        """Ports of the live masters, sorted."""
        return sorted(
            n.port
            for n in self.nodes(via)
            if n.is_master and not n.failed and self.is_running(n.port)
        )

    def replicas(self, master: int | None = None, via: int | None = None) -> list[int]:
        """Ports of the live replicas (of ``master``'s port, if given), sorted."""
        nodes = self.nodes(via)
        ids = {n.node_id: n.port for n in nodes}
        return sorted(
            n.port
            for n in nodes
            if not n.is_master
            and not n.failed
            and self.is_running(n.port)
            and (master is None or (n.master_id is not None and ids.get(n.master_id) == master))
        )

    def keyslot(self, key: str) -> int:
        reply = command(self._via(None), "CLUSTER", "KEYSLOT", key)
        assert isinstance(reply, int)
        return reply

    def master_for_key(self, key: str) -> int:
        """Port of the (live) master serving ``key``'s slot."""
        slot = self.keyslot(key)
        for node in self.nodes():
            if node.is_master and not node.failed and node.serves(slot):
                return node.port
        raise LookupError(f"no live master serves slot {slot}")

    # --- health

    def _healthy(self, replicas_expected: int | None = None) -> bool:
        live = set(self.live_ports)
        ids: dict[str, int] = {}
        reference: frozenset[tuple[int, bool, int | None, tuple[tuple[int, int], ...]]] | None
        reference = None
        for port in live:
            cinfo = info(port, "cluster-info")
            if cinfo.get("cluster_state") != "ok":
                return False
            if cinfo.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
                return False
            view = self.nodes(port)
            by_port = {n.port: n for n in view}
            if any(p not in by_port or by_port[p].failed for p in live):
                return False
            ids.update({n.node_id: n.port for n in view})
            # Every live node must see the same roles, replication links and slot owners
            # (a node's own line included: it catches a node that has not converted yet).
            signature = frozenset(
                (n.port, n.is_master, ids.get(n.master_id or ""), n.slots)
                for n in view
                if n.port in live
            )
            if reference is None:
                reference = signature
            elif signature != reference:
                return False
        if reference is None:
            return False
        served = sum(hi - lo + 1 for _, is_master, _, s in reference if is_master for lo, hi in s)
        if served != CLUSTER_SLOTS:
            return False
        replicas = [port for port, is_master, _, _ in reference if not is_master]
        if replicas_expected is not None and len(replicas) != replicas_expected:
            return False
        for port in replicas:
            repl = info(port, "replication")
            if repl.get("role") != "slave" or repl.get("master_link_status") != "up":
                return False
        return True

    def wait_ready(self, timeout: float = 30) -> float:
        """Wait until every live node says cluster_state:ok, all nodes agree on the slot map,
        all 16384 slots are served, and every live replica's link to its master is up."""
        return wait_until(self._healthy, timeout, "a healthy cluster")

    def _wait_created(self, timeout: float = 30) -> float:
        expected = self.n_masters * self.n_replicas
        return wait_until(
            lambda: self._healthy(expected), timeout, f"a healthy cluster with {expected} replicas"
        )

    def wait_replicated(self, timeout: float = 10) -> None:
        """Wait until every live replica has caught up with its master's current offset."""
        targets = {m: int(info(m, "replication")["master_repl_offset"]) for m in self.masters()}

        def caught_up() -> bool:
            for master, offset in targets.items():
                for replica in self.replicas(master):
                    if int(info(replica, "replication").get("slave_repl_offset", -1)) < offset:
                        return False
            return True

        wait_until(caught_up, timeout, "replicas to catch up")

    # --- faults

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``; if it was a master, remember it for wait_failover."""
        nodes: list[ClusterNode] = []
        with contextlib.suppress(OSError, ReplyError, RuntimeError):
            nodes = self.nodes(self._first_other(port))
        me = next((n for n in nodes if n.port == port), None)
        if me is not None and me.is_master:
            self._killed_masters[port] = _KilledMaster(
                node_id=me.node_id,
                slots=me.slots,
                replica_ids=frozenset(n.node_id for n in nodes if n.master_id == me.node_id),
            )
        super().kill(port)

    def _first_other(self, port: int) -> int:
        for p in self.live_ports:
            if p != port:
                return p
        raise RuntimeError("no other live node")

    def wait_failover(self, old_master_port: int, timeout: float = 30) -> float:
        """Wait until a replica of the killed master serves its slots in every live node's
        view and the cluster is healthy again; return seconds since ``kill()``."""
        killed = self._killed_masters.get(old_master_port)
        if killed is None:
            raise KeyError(f"port {old_master_port} was not a master killed with kill()")

        def promoted() -> bool:
            new_port: int | None = None
            for port in self.live_ports:
                view = {n.node_id: n for n in self.nodes(port)}
                old = view.get(killed.node_id)
                if old is None or "fail" not in old.flags:
                    return False
                heirs = [
                    n
                    for i, n in view.items()
                    if i in killed.replica_ids and n.is_master and n.slots == killed.slots
                ]
                if len(heirs) != 1 or (new_port is not None and heirs[0].port != new_port):
                    return False
                new_port = heirs[0].port
            return new_port is not None and role(new_port) == "master" and self._healthy()

        wait_until(promoted, timeout, f"failover of master {old_master_port}")
        return time.monotonic() - self._killed_at[old_master_port]

    def restart(self, port: int, timeout: float = 30) -> float:
        """Start a killed node again (same port and nodes.conf) and wait until the cluster is
        healthy; a master that lost its slots rejoins as a replica. Returns seconds."""
        began = time.monotonic()
        self._respawn(port)
        self._killed_masters.pop(port, None)
        self.wait_ready(timeout)
        return time.monotonic() - began

    def _respawn_for_heal(self, port: int) -> None:
        self._killed_masters.pop(port, None)
        self._respawn(port)

    def flushall(self) -> None:
        """FLUSHALL on every live master."""
        for port in self.masters():
            self.flushall_node(port)


# --- Sentinel -----------------------------------------------------------------------------


class SentinelSet(_Topology):
    """One primary, one replica and ``sentinels`` sentinels monitoring ``service_name``."""

    _prefix = "capproxy-redis-sentinel-"

    def __init__(
        self,
        service_name: str = "mymaster",
        *,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        super().__init__()
        self.service_name = service_name
        self.n_sentinels = sentinels
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.data_ports: list[int] = []
        """Ports of the data nodes, in creation order (initially the primary, then the replica)."""
        self.sentinel_ports: list[int] = []
        self._primary = 0
        self._old_primary: int | None = None

    def _data_argv(self, port: int, replicaof: int | None) -> list[str]:
        argv = [self.binary, *self._base_args(port)]
        if replicaof is not None:
            argv += ["--replicaof", HOST, str(replicaof)]
        return argv

    def _sentinel_argv(self, port: int) -> list[str]:
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {port}",
                    f"bind {HOST}",
                    "daemonize no",
                    f"dir {self.dir}",
                    f"logfile {self.log_path(port)}",
                    f"sentinel monitor {self.service_name} {HOST} {self._primary} {self.quorum}",
                    f"sentinel down-after-milliseconds {self.service_name} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.service_name} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {self.service_name} 1",
                    "",
                ]
            )
        )
        return [self.binary, str(conf), "--sentinel"]

    def _start(self) -> None:
        self._primary = self._start_with_retry(lambda p: self._data_argv(p, None))
        replica = self._start_with_retry(lambda p: self._data_argv(p, self._primary))
        self.data_ports = [self._primary, replica]
        self.sentinel_ports = self._spawn_many(self.n_sentinels, self._sentinel_argv)
        self.wait_ready()

    # --- queries

    @property
    def sentinel_nodes(self) -> list[str]:
        """``127.0.0.1:port`` of every sentinel (dead ones included)."""
        return [f"{HOST}:{p}" for p in self.sentinel_ports]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every sentinel, as ``redis.asyncio.sentinel.Sentinel`` takes."""
        return [(HOST, p) for p in self.sentinel_ports]

    def _live_sentinels(self) -> list[int]:
        return [p for p in self.sentinel_ports if self.is_running(p)]

    def _master_addr(self, sentinel: int) -> int:
        reply = command(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
        assert isinstance(reply, list) and len(reply) == 2
        return int(text(reply[1]))

    def primary_port(self) -> int:
        """The primary's port, as the first sentinel that answers reports it."""
        for sentinel in self._live_sentinels():
            with contextlib.suppress(OSError, ReplyError, AssertionError):
                return self._master_addr(sentinel)
        raise RuntimeError("no sentinel answered")

    def replica_ports(self) -> list[int]:
        """Live data nodes that are replicas of the current primary (per ROLE/INFO)."""
        primary = self.primary_port()
        out = []
        for port in self.data_ports:
            if port == primary or not self.is_running(port):
                continue
            with contextlib.suppress(OSError, ReplyError):
                if info(port, "replication").get("master_port") == str(primary):
                    out.append(port)
        return out

    # --- health

    def _healthy(self) -> bool:
        sentinels = self._live_sentinels()
        primary = self._master_addr(sentinels[0])
        if not self.is_running(primary) or role(primary) != "master":
            return False
        replicas = [p for p in self.data_ports if p != primary and self.is_running(p)]
        run_ids: dict[int, str] = {}
        for port in replicas:
            repl = info(port, "replication")
            if repl.get("master_port") != str(primary) or repl.get("master_link_status") != "up":
                return False
            run_ids[port] = info(port, "server")["run_id"]
        for sentinel in sentinels:
            if self._master_addr(sentinel) != primary:
                return False
            reply = command(sentinel, "SENTINEL", "REPLICAS", self.service_name)
            assert isinstance(reply, list)
            known = {int(r["port"]): r for r in map(_pairs, reply) if "s_down" not in r["flags"]}
            for port in replicas:
                # The sentinel must have INFO from this very process (run_id) showing it
                # replicating from the primary.
                seen = known.get(port)
                if (
                    seen is None
                    or seen.get("runid") != run_ids[port]
                    or seen.get("master-port") != str(primary)
                    or seen.get("master-link-status") != "ok"
                ):
                    return False
            reply = command(sentinel, "SENTINEL", "SENTINELS", self.service_name)
            assert isinstance(reply, list)
            peers = {int(s["port"]) for s in map(_pairs, reply) if "s_down" not in s["flags"]}
            if not set(sentinels) - {sentinel} <= peers:
                return False
            if not text(command(sentinel, "SENTINEL", "CKQUORUM", self.service_name)).startswith(
                "OK"
            ):
                return False
        return True

    def wait_ready(self, timeout: float = 30) -> float:
        """Wait until the primary is a master, every live replica's link to it is up, and every
        live sentinel agrees on it, knows the live replicas and the other sentinels."""
        return wait_until(self._healthy, timeout, "a healthy sentinel set")

    # --- faults

    def kill_primary(self) -> int:
        """SIGKILL the current primary; return its port."""
        port = self.primary_port()
        self._old_primary = port
        self.kill(port)
        return port

    def wait_failover(self, timeout: float = 30) -> float:
        """Wait until every live sentinel reports a new primary and it answers ROLE as master;
        return seconds since ``kill_primary()``."""
        old = self._old_primary
        if old is None:
            raise RuntimeError("kill_primary() was not called")

        def switched() -> bool:
            ports = {self._master_addr(s) for s in self._live_sentinels()}
            if len(ports) != 1 or old in ports:
                return False
            return role(ports.pop()) == "master"

        wait_until(switched, timeout, f"sentinels to fail over from {old}")
        return time.monotonic() - self._killed_at[old]

    def _respawn_for_heal(self, port: int) -> None:
        self._prepare_restart(port, as_replica=True)
        self._respawn(port)

    def _prepare_restart(self, port: int, *, as_replica: bool) -> None:
        if as_replica and port in self.data_ports and not self.is_running(port):
            primary = self.primary_port()
            if primary != port:
                self._argv[port] = self._data_argv(port, primary)

    def restart(self, port: int, timeout: float = 30, *, as_replica: bool = True) -> float:
        """Start a killed data node or sentinel again and wait until the set is healthy.

        With ``as_replica`` a data node restarts as a replica of the current primary (about
        0.1s). Without it, an old primary comes back as a master and it is left to the
        sentinels to demote it, which takes them 10-20s (INFO period and role-change grace)."""
        began = time.monotonic()
        self._prepare_restart(port, as_replica=as_replica)
        self._respawn(port)
        self.wait_ready(timeout)
        return time.monotonic() - began


__all__ = [
    "ClusterNode",
    "RedisCluster",
    "ReplyError",
    "SentinelSet",
    "command",
    "commands",
    "info",
    "parse_cluster_nodes",
    "pick_port",
    "role",
    "text",
    "wait_until",
]
