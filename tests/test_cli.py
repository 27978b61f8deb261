from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.cli import main

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"

SECRET_CAPS = """\
server: {host: 0.0.0.0, port: 9000}
store: {url: "redis://:hunter2-store@redis.internal:6379/0", on_error: fail_open}
auth: {mode: keys, admin_token: hunter2-admin}
upstreams:
  - name: local
    base_url: http://127.0.0.1:8000/v1
    models: ["llama-*"]
  - name: openai
    base_url: https://api.openai.com/v1
    api_key: hunter2-upstream
tenants:
  - id: acme
    api_keys: [hunter2-acme-1, hunter2-acme-2]
    budget_caps: [{window: monthly, hard_limit_usd: 2000, soft_limit_usd: 1500}]
  - id: beta
cost_caps:
  default_budget_caps: [{window: hourly, hard_limit_usd: 10}]
  default_token_cap: {max_prompt_tokens: 4096}
  agents:
    - agent_id: premium-agent
      budget_caps: [{window: daily, hard_limit_usd: 500}]
    - agent_id: batch
      token_cap: {max_total_tokens: 100000}
pricing:
  models:
    my-llama-70b: {input_per_mtok: 0.59, output_per_mtok: 0.79}
  default: {input_per_mtok: 1, output_per_mtok: 2}
tokenizer:
  encodings: {"llama-*": cl100k_base}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "caps.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_check_example(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["check", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"{EXAMPLE}: OK"
    assert "  acme: 1 api key; monthly $2000" in lines
    assert (
        "  _default and unlisted agents: hourly $10 (soft $8), daily $100; tokens "
        "max_prompt_tokens=4096 max_completion_tokens=4096 max_total_tokens=8192"
    ) in lines
    assert "  premium-agent: daily $500 (soft $400); tokens max_prompt_tokens=16384" in lines
    assert "  my-llama-70b: input_per_mtok=0.59 output_per_mtok=0.79" in lines
    assert "  models not priced: refused" in lines
    assert "sk-acme-123" not in out


def test_check_prints_effective_caps_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, SECRET_CAPS)
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "hunter2" not in out
    lines = out.splitlines()
    for expected in [
        "server: 0.0.0.0:9000 (max body 10485760 bytes, 2048 connections, header timeout 10 s, "
        "keep-alive 75 s)",
        "store: redis://***@redis.internal:6379/0 (on_error fail_open, timeout 250 ms, "
        "4 connections)",
        "auth: keys, admin token set",
        "  local: http://127.0.0.1:8000/v1 models llama-*; api key not set; timeout 600 s",
        "  openai: https://api.openai.com/v1 models *; api key set; timeout 600 s",
        "  acme: 2 api keys; monthly $2000 (soft $1500)",
        "  beta: 0 api keys; no budget caps",
        "  _default and unlisted agents: hourly $10; tokens max_prompt_tokens=4096",
        "  premium-agent: daily $500; tokens max_prompt_tokens=4096",
        "  batch: hourly $10; tokens max_total_tokens=100000",
        "  other models: input_per_mtok=1 output_per_mtok=2",
        "tokenizer: llama-* -> cl100k_base",
    ]:
        assert expected in lines


def test_check_prints_tool_price_overrides_as_configured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """\
        upstreams: [{name: up, base_url: 'http://h'}]
        pricing:
          models:
            m: {input_per_mtok: 1, output_per_mtok: 2}
          tools:
            web_search: {per_call_usd: 0.025}
            my_tool: {per_call_usd: 0}
        """,
    )
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    start = lines.index("pricing overrides (USD per 1M tokens):")
    assert lines[start + 1 : start + 5] == [
        "  m: input_per_mtok=1 output_per_mtok=2",
        "  tool web_search: per_call_usd=0.025",
        "  tool my_tool: per_call_usd=0",
        "  models not priced: refused",
    ]
    # Without overrides, no tool line at all.
    path = write(tmp_path, "upstreams: [{name: up, base_url: 'http://h'}]\n")
    assert main(["check", str(path)]) == 0
    assert "tool " not in capsys.readouterr().out


def test_check_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        """\
        upstreams: [{name: up, base_url: 'http://h'}]
        tenants:
          - id: acme
            api_keys: ["sha256:hunter2-not-hex"]
        server: {port: 99999}
        """,
    )
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}:4: tenants[0].api_keys[0]: 'sha256:' must be followed by 64 hex digits",
        f"{path}:5: server.port: Input should be less than or equal to 65535",
    ]
    assert "hunter2" not in err


def test_check_yaml_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "upstreams:\n  - name: up\n    base_url: 'http://h\n")
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:4: <yaml>: ")
    assert "Traceback" not in err


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_serve_with_bad_config_exits_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "server: {port: 1}\n")
    assert main(["serve", "--config", str(path)]) == 1
    assert capsys.readouterr().err == f"{path}:1: upstreams: Field required\n"


@pytest.mark.parametrize(
    "argv",
    [[], ["launch"], ["check"], ["serve"], ["serve", "--config", "x", "--port", "65536"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: capproxy" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "check" in out
