"""Compile protos/etcdproxy/etcdpb/*.proto into the etcdproxy.etcdpb package.

Run from anywhere: ``python protos/generate.py`` writes the generated modules next to
etcdproxy/etcdpb/__init__.py; ``python protos/generate.py --check`` regenerates into a
temporary directory and exits 1 if the committed files differ (CI runs this).
The proto files import each other as ``etcdproxy/etcdpb/x.proto``, so protoc emits
``from etcdproxy.etcdpb import x_pb2`` and no generated file is ever edited afterwards.
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("etcdproxy") / "etcdpb"
SOURCES = ["kv", "auth", "version", "rpc", "v3election", "v3lock"]


def generate(out: Path) -> None:
    include = str(Path(protoc.__file__).parent / "_proto")
    for name in SOURCES:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PACKAGE / f"{name}.proto"),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {name}.proto")


def generated_files(base: Path) -> list[Path]:
    return sorted(p.relative_to(base) for p in (base / PACKAGE).glob("*_pb2*.py*"))


def main() -> int:
    if "--check" in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            fresh, committed = generated_files(Path(tmp)), generated_files(ROOT)
            stale = [
                str(p) for p in fresh if p not in committed or not filecmp.cmp(Path(tmp) / p, ROOT / p, shallow=False)
            ]
            stale += [str(p) for p in committed if p not in fresh]
        if stale:
            print("generated code is out of date, run python protos/generate.py:", *stale, sep="\n  ")
            return 1
        print("generated code is current")
        return 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
