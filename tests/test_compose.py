"""docker-compose.yml runs what the README says: capproxy built from this repository's
Dockerfile, serving a caps file of this repository against the compose Redis, which keeps its
data (append-only file), never evicts keys and reports its health; volumes are named and
declared, and the journal volume is writable by the image's user."""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


class Mount:
    """One entry of a service's ``volumes``, short (``src:dst[:mode]``) or long syntax."""

    def __init__(self, entry: object) -> None:
        if isinstance(entry, str):
            parts = entry.split(":")
            assert 2 <= len(parts) <= 3, f"volume {entry!r}: expected source:target[:mode]"
            self.source, self.target = parts[0], parts[1]
            self.read_only = len(parts) == 3 and "ro" in parts[2].split(",")
        else:
            assert isinstance(entry, dict), f"volume {entry!r}"
            self.source, self.target = str(entry["source"]), str(entry["target"])
            self.read_only = bool(entry.get("read_only", False))

    @property
    def named(self) -> bool:
        """A named volume, not a path on the host."""
        return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.source) is not None


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"no service {name!r} in docker-compose.yml"
    found = services[name]
    assert isinstance(found, dict)
    return found


def argv(command: object) -> list[str]:
    """A ``command``/``entrypoint``/healthcheck ``test`` as a list of words."""
    if isinstance(command, str):
        return shlex.split(command)
    assert isinstance(command, list), f"command {command!r}"
    return [str(word) for word in command]


def mounts(svc: dict[str, Any]) -> list[Mount]:
    return [Mount(entry) for entry in svc.get("volumes", [])]


def declared_volumes() -> set[str]:
    return set(compose().get("volumes") or {})


def dockerfile_instruction(name: str) -> list[str]:
    """The words of the Dockerfile's (last) ``name`` instruction, exec or shell form."""
    text = (ROOT / "Dockerfile").read_text()
    matches = re.findall(rf"^{name}\s+(.+)$", text, flags=re.MULTILINE)
    assert matches, f"no {name} in the Dockerfile"
    value = matches[-1].strip()
    if value.startswith("["):
        words = yaml.safe_load(value)  # an exec-form JSON array is YAML too
        assert isinstance(words, list)
        return [str(word) for word in words]
    return shlex.split(value)


def capproxy_argv() -> list[str]:
    """What the capproxy container runs after the image's entrypoint."""
    command = service("capproxy").get("command")
    return argv(command) if command is not None else dockerfile_instruction("CMD")


def option(words: list[str], name: str) -> str | None:
    """The value of ``--name value`` (or ``--name=value``) in ``words``."""
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def host_path(svc: dict[str, Any], container_path: str) -> Path:
    """The file of this repository that a bind mount shows at ``container_path``."""
    path = PurePosixPath(container_path)
    binds = [m for m in mounts(svc) if not m.named and path.is_relative_to(m.target)]
    assert binds, f"{container_path} is not on a bind mount of this repository"
    mount = max(binds, key=lambda m: len(PurePosixPath(m.target).parts))
    source = (COMPOSE.parent / mount.source).resolve()
    assert source.is_relative_to(ROOT), f"{mount.source} is outside the repository"
    return source / path.relative_to(mount.target)


def caps_path() -> Path:
    config = option(capproxy_argv(), "--config")
    assert config is not None, "capproxy runs without --config"
    return host_path(service("capproxy"), config)


@pytest.fixture
def caps(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The caps file compose serves, loaded as a container without secrets would."""
    for name in ("OPENAI_API_KEY", "CAPPROXY_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return load_settings(caps_path())


def test_the_file_is_plain_compose() -> None:
    data = compose()
    assert "version" not in data  # obsolete in the Compose specification
    assert {"capproxy", "redis"} <= set(data["services"])


def test_capproxy_is_built_from_this_repositorys_dockerfile() -> None:
    build = service("capproxy")["build"]
    spec = {"context": build} if isinstance(build, str) else build
    assert isinstance(spec, dict)
    context = (COMPOSE.parent / str(spec.get("context", "."))).resolve()
    assert context == ROOT
    assert (context / str(spec.get("dockerfile", "Dockerfile"))).is_file()
    # The command is the arguments of the image's entrypoint, capproxy.
    assert dockerfile_instruction("ENTRYPOINT") == ["capproxy"]
    assert capproxy_argv()[0] == "serve"


def test_capproxy_serves_a_caps_file_of_the_repository_against_the_redis_service(
    caps: Settings,
) -> None:
    assert caps_path().is_file()
    assert caps_path().is_relative_to(ROOT)
    url = urlsplit(caps.store.url.get_secret_value())
    assert url.scheme == "redis"
    assert url.hostname == "redis"  # the service name
    assert url.port in (None, 6379)
    assert caps.store.mode == "standalone"
    assert caps.store.sentinel is None
    # It listens on every interface of the container, on the port compose publishes.
    words = capproxy_argv()
    host = option(words, "--host") or caps.server.host
    port = int(option(words, "--port") or caps.server.port)
    assert host == "0.0.0.0"
    published = [str(p) for p in service("capproxy").get("ports", [])]
    assert any(p.split("/")[0].rsplit(":", 1)[-1] == str(port) for p in published), published
    caps_mount = [m for m in mounts(service("capproxy")) if not m.named]
    assert all(m.read_only for m in caps_mount)


def test_capproxy_gets_the_upstream_key_from_the_environment(caps: Settings) -> None:
    environment = service("capproxy").get("environment", [])
    if isinstance(environment, dict):
        value = environment.get("OPENAI_API_KEY")
        assert value is None or re.fullmatch(r"\$\{OPENAI_API_KEY(:?-[^}]*)?\}", str(value))
    else:
        assert "OPENAI_API_KEY" in environment  # no value: taken from compose's environment
    assert caps.upstreams[0].api_key is None  # read from ${OPENAI_API_KEY:-}, unset here


def test_capproxy_starts_once_redis_is_healthy() -> None:
    depends = service("capproxy")["depends_on"]
    assert isinstance(depends, dict)
    assert depends["redis"]["condition"] == "service_healthy"
    test = argv(service("redis")["healthcheck"]["test"])
    assert "redis-cli" in test
    assert "ping" in test


def test_redis_keeps_its_data_and_never_evicts() -> None:
    redis = service("redis")
    assert str(redis["image"]).split(":")[0] == "redis"
    assert str(redis["image"]).split(":")[1].split(".")[0] == "7"
    words = argv(redis["command"])
    assert words[0] == "redis-server"
    assert option(words, "--appendonly") == "yes"
    assert option(words, "--appendfsync") in ("everysec", "always")
    assert option(words, "--maxmemory-policy") == "noeviction"
    assert option(words, "--save") != ""  # nothing turns persistence off
    data = [m for m in mounts(redis) if m.target == "/data"]
    assert len(data) == 1
    assert data[0].named
    assert data[0].source in declared_volumes()


def test_the_journal_is_on_a_named_volume_the_image_user_can_write(caps: Settings) -> None:
    if caps.journal is None:
        pytest.skip("the compose caps file keeps no journal")
    folder = PurePosixPath(str(caps.journal.path)).parent
    capproxy = service("capproxy")
    volume = next(
        (m for m in mounts(capproxy) if m.named and folder.is_relative_to(m.target)), None
    )
    assert volume is not None, f"{folder} is not on a named volume"
    assert volume.source in declared_volumes()
    assert not volume.read_only
    # A new named volume belongs to root: a one-shot service hands it to the image's user
    # before capproxy starts.
    user = re.search(r"--uid\s+(\d+)", (ROOT / "Dockerfile").read_text())
    assert user is not None
    uid = user[1]

    def hands_over(svc: dict[str, Any]) -> bool:
        words = argv(svc.get("command", []))
        targets = {m.target for m in mounts(svc) if m.source == volume.source}
        return (
            words[:1] == ["chown"]
            and len(words) >= 3
            and words[1].split(":")[0] == uid
            and words[-1] in targets
        )

    services = compose()["services"]
    helpers = [name for name, svc in services.items() if name != "capproxy" and hands_over(svc)]
    assert helpers, f"no service gives the {volume.source} volume to uid {uid}"
    conditions = {capproxy["depends_on"][name]["condition"] for name in helpers}
    assert conditions == {"service_completed_successfully"}
