"""The ``capproxy`` command.

    capproxy check config.yaml                       # validate; print the effective caps
    capproxy serve --config config.yaml --port 9000  # run the proxy

Exit status: 0 on success, 1 for an invalid caps file, 2 for bad arguments. Secrets are never
printed: keys appear as a count, tokens as "set".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.config import (
    DEFAULT_AGENT,
    BudgetCap,
    ConfigError,
    Settings,
    TokenCap,
    load_settings,
)
from proxy.price_files import merge_price_files
from proxy.pricing import ModelPrice, PriceTable


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    command: int = args.run(args)
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capproxy", description="Token and USD budget caps for OpenAI-compatible APIs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True, type=Path, help="caps file (YAML)")
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=_port, help="listen port (overrides server.port)")
    serve.set_defaults(run=_serve)
    check = commands.add_parser("check", help="validate a caps file and print the effective caps")
    check.add_argument("file", type=Path, help="caps file (YAML)")
    check.set_defaults(run=_check)
    restore = commands.add_parser(
        "restore",
        help="after the store lost spend: replay journals into it, or accept the loss",
    )
    restore.add_argument("--config", required=True, type=Path, help="caps file (YAML)")
    what = restore.add_mutually_exclusive_group(required=True)
    what.add_argument("journals", nargs="*", type=Path, default=[], help="journal files")
    what.add_argument(
        "--accept-loss", action="store_true", help="go on from what the store holds now"
    )
    restore.set_defaults(run=_restore)
    prices = commands.add_parser(
        "prices", help="print the price entry each model gets, and where it comes from"
    )
    prices.add_argument("--config", required=True, type=Path, help="caps file (YAML)")
    prices.add_argument("models", nargs="+", metavar="MODEL", help="model names")
    prices.set_defaults(run=_prices)
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0-65535): {text!r}")
    return port


def _load(path: Path) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return 1
    overrides = {"host": args.host, "port": args.port}
    overrides = {name: value for name, value in overrides.items() if value is not None}
    if overrides:
        server = settings.server.model_copy(update=overrides)
        settings = settings.model_copy(update={"server": server})
    from proxy.app import run

    run(settings, config_path=args.config)
    return 0


def _check(args: argparse.Namespace) -> int:
    settings = _load(args.file)
    if settings is None:
        return 1
    print(f"{args.file}: OK")
    print("\n".join(describe(settings)))
    return 0


def _prices(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return 1
    file_prices, tiers, sources = merge_price_files(settings.pricing.files)
    table = PriceTable(
        overrides=settings.pricing.models, default=settings.pricing.default, files=file_prices
    )
    missing = 0
    for model in args.models:
        found = table.find(model)
        if found is None:
            print(f"{model}: not priced (refused)")
            missing += 1
            continue
        entry, price, origin = found
        where = f"{origin} {sources[entry]}" if origin == "price file" else origin
        via = "" if entry == model else f" as {entry}"
        print(f"{model}: {where}{via}: {_fields(_price_fields(price))}")
        for tier in tiers.get(entry, ()) if origin == "price file" else ():
            cached = (
                ""
                if tier.cached_input_per_mtok is None
                else (f" cached_input_per_mtok={tier.cached_input_per_mtok}")
            )
            print(
                f"  prompts over {tier.above_tokens} tokens: input_per_mtok={tier.input_per_mtok}"
                f"{cached} output_per_mtok={tier.output_per_mtok}"
            )
    return 1 if missing else 0


def _restore(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return 1
    if settings.store.url.get_secret_value().startswith("memory:"):
        print("restore: the store is memory://: nothing outlives the process", file=sys.stderr)
        return 1
    if not args.accept_loss and not args.journals:
        print("restore: name the journal files, or pass --accept-loss", file=sys.stderr)
        return 2
    import asyncio

    return asyncio.run(_restore_async(settings, args.journals, accept=args.accept_loss))


async def _restore_async(settings: Settings, journals: list[Path], *, accept: bool) -> int:
    from proxy.app import open_store
    from proxy.errors import StoreUnavailable
    from proxy.journal import read_entries
    from proxy.redis_store import RedisStore

    store = open_store(settings)
    assert isinstance(store, RedisStore)
    try:
        if accept:
            flagged = await store.accept_loss()
            print(f"restore: loss accepted ({', '.join(sorted(flagged)) or 'nothing was flagged'})")
            return 0
        missing = [str(p) for p in journals if not p.is_file()]
        if missing:
            print(f"restore: no such journal: {', '.join(missing)}", file=sys.stderr)
            return 1
        entries = read_entries(journals)
        report = await store.restore(entries)
        print(
            f"restore: {report.restored} entries restored for {len(report.tenants)} tenants, "
            f"{report.present} present, {report.duplicates} restored before, "
            f"{report.expired} outside the current periods, {entries.malformed} malformed lines"
        )
        return 0
    except StoreUnavailable:
        print("restore: the store did not answer", file=sys.stderr)
        return 1
    finally:
        await store.aclose()


def describe(settings: Settings) -> list[str]:
    """The effective settings and caps, one line each, without any secret."""
    server, store, auth, caps = settings.server, settings.store, settings.auth, settings.cost_caps
    auth_line = f"auth: {auth.mode}, admin token {_is_set(auth.admin_token)}"
    if auth.mode == "passthrough":
        auth_line += f", tenant hash key {_is_set(auth.tenant_hash_key)}"
    lines = [
        f"server: {server.host}:{server.port} (max body {server.max_body_bytes} bytes, "
        f"{server.max_connections} connections, header timeout "
        f"{server.request_header_timeout_s:g} s, keep-alive {server.keepalive_timeout_s:g} s)",
        f"store: {_redact(store.url.get_secret_value())} "
        f"(on_error {store.on_error}, timeout {store.timeout_ms} ms, "
        f"{store.max_connections} connections)",
        auth_line,
        f"time zone: {settings.time_zone}",
        "upstreams (first match wins):",
    ]
    for up in settings.upstreams:
        lines.append(
            f"  {up.name}: {_redact(up.base_url)} models {', '.join(up.models)}; "
            f"api key {_is_set(up.api_key)}; timeout {up.timeout_s:g} s"
        )
    lines.append("tenants (tenant-wide caps, all agents together):")
    for tenant in settings.tenants:
        keys = len(tenant.api_keys)
        lines.append(
            f"  {tenant.id}: {keys} api key{'s' if keys != 1 else ''}; "
            f"{_budget(settings.tenant_budget_caps(tenant.id))}"
        )
    if not settings.tenants:
        lines.append("  (none)")
    if caps.default_tenant_budget_caps:
        lines.append(
            "  tenants without caps of their own (and passthrough tenants): "
            f"{_budget(caps.default_tenant_budget_caps)}"
        )
    state = "" if caps.enabled else " DISABLED (cost_caps.enabled: false)"
    lines.append(f"agent caps (per tenant and agent){state}:")
    label = "" if DEFAULT_AGENT in caps.agent_ids else f"{DEFAULT_AGENT} and "
    lines.append(
        f"  {label}unlisted agents: {_caps(caps.default_budget_caps, caps.default_token_cap)}"
    )
    for agent in caps.agents:
        budget, tokens = caps.budget_caps_for(agent.agent_id), caps.token_cap_for(agent.agent_id)
        lines.append(f"  {agent.agent_id}: {_caps(budget, tokens)}")
    lines.append("pricing overrides (USD per 1M tokens):")
    for model, price in settings.pricing.models.items():
        lines.append(f"  {model}: {_fields(_price_fields(price))}")
    for price_file in settings.pricing.files:
        lines.append(f"  price file {price_file.path}: {len(price_file.prices)} models")
    for tool, tool_price in settings.pricing.tools.items():
        lines.append(f"  tool {tool}: per_call_usd={tool_price.per_call_usd}")
    default = settings.pricing.default
    lines.append(
        f"  other models: {_fields(_price_fields(default))}"
        if default
        else "  models not priced: refused"
    )
    for glob, encoding in settings.tokenizer.encodings.items():
        lines.append(f"tokenizer: {glob} -> {encoding}")
    return lines


def _price_fields(price: ModelPrice) -> dict[str, Any]:
    """A price entry's fields as the caps file set them (defaults left out)."""
    return price.model_dump(exclude_none=True, exclude_defaults=True)


def _caps(budget: Sequence[BudgetCap], tokens: TokenCap | None) -> str:
    return f"{_budget(budget)}; {_tokens(tokens)}"


def _budget(caps: Sequence[BudgetCap]) -> str:
    if not caps:
        return "no budget caps"
    return ", ".join(
        f"{cap.window} ${cap.hard_limit_usd}"
        + (f" (soft ${cap.soft_limit_usd})" if cap.soft_limit_usd is not None else "")
        for cap in caps
    )


def _tokens(cap: TokenCap | None) -> str:
    limits = cap.model_dump(exclude_none=True) if cap else {}
    return f"tokens {_fields(limits)}" if limits else "no token cap"


def _fields(values: Mapping[str, object], prefix: str = "") -> str:
    """``name=value`` pairs; a nested entry (a tier's prices) as ``tier.name=value``."""
    return " ".join(
        _fields(value, f"{prefix}{name}.")
        if isinstance(value, Mapping)
        else f"{prefix}{name}={value}"
        for name, value in values.items()
    )


def _is_set(secret: object) -> str:
    return "set" if secret is not None else "not set"


def _redact(url: str) -> str:
    """``url`` without its user info and query, which may hold credentials."""
    parts = urlsplit(url)
    _, at, host = parts.netloc.rpartition("@")
    return f"{parts.scheme}://{'***@' if at else ''}{host}{parts.path}" + (
        "?***" if parts.query else ""
    )
