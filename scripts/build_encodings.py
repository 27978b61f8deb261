"""Rebuild ``proxy/encodings/*.tiktoken.gz`` from the npm package ``tiktoken``.

    npm pack tiktoken && tar xzf tiktoken-*.tgz          # unpacks to ./package
    .venv/bin/python scripts/build_encodings.py package  # add --write to replace the files

Each ``encoders/<name>.json`` holds a ``bpe_ranks`` string of lines
``<key> <first rank> <b64 token> <b64 token> ...`` (ranks consecutive from the first).
Writing ``"<b64 token> <rank>\\n"`` in rank order gives OpenAI's ``.tiktoken`` file byte for
byte; the result must match the sha256 pinned in ``proxy.tokens.ENCODINGS``. The gzip wrapper
is deterministic (level 9, no name, mtime 0). Without ``--write`` the script only checks that
the shipped files decompress to the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

from proxy.tokens import ENCODINGS

OUT_DIR = Path(__file__).resolve().parent.parent / "proxy" / "encodings"


def tiktoken_file(encoder_json: Path) -> tuple[bytes, dict[str, int]]:
    """The ``.tiktoken`` bytes and special tokens described by one npm encoder JSON."""
    spec = json.loads(encoder_json.read_text(encoding="utf-8"))
    ranked: list[tuple[int, str]] = []
    for line in spec["bpe_ranks"].split("\n"):
        if not line:
            continue
        _key, first, *tokens = line.split(" ")
        ranked.extend((int(first) + i, token) for i, token in enumerate(tokens))
    ranked.sort()
    data = "".join(f"{token} {rank}\n" for rank, token in ranked).encode("ascii")
    return data, dict(spec["special_tokens"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, help="unpacked npm tiktoken package directory")
    parser.add_argument("--write", action="store_true", help="replace the shipped .gz files")
    args = parser.parse_args(argv)
    failed = False
    for name, pinned in ENCODINGS.items():
        data, special = tiktoken_file(args.package / "encoders" / f"{name}.json")
        digest = hashlib.sha256(data).hexdigest()
        if digest != pinned.sha256 or special != pinned.special_tokens:
            print(f"{name}: sha256 {digest} or special tokens differ from proxy.tokens")
            failed = True
            continue
        target = OUT_DIR / f"{name}.tiktoken.gz"
        if args.write:
            target.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
            print(f"{name}: wrote {target}")
        elif not target.exists() or gzip.decompress(target.read_bytes()) != data:
            print(f"{name}: {target} is stale (run with --write)")
            failed = True
        else:
            print(f"{name}: {target} is up to date")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
