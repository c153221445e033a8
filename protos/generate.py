"""The one command that turns protos/*.proto into Python: `python protos/generate.py [--force]`.

Generated modules (`<name>_pb2.py`, `<name>_pb2_grpc.py`) are gitignored; `protos/__init__.py` calls
`ensure_generated()` so a fresh checkout (or a Ray worker on another node) builds them on first import.
Protoc runs with the repository root as include path, so the generated gRPC module imports its
messages as `from protos import <name>_pb2` and works from any working directory.
Files are produced in a temporary directory and moved in with os.replace, so concurrent first
imports (several Ray workers on one node) never see a half-written module.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_FILES = sorted(PACKAGE_DIR.glob("*.proto"))


def _outputs(proto: Path) -> list[Path]:
    stem = proto.stem
    return [PACKAGE_DIR / f"{stem}_pb2.py", PACKAGE_DIR / f"{stem}_pb2_grpc.py"]


def is_stale(proto: Path) -> bool:
    src_mtime = proto.stat().st_mtime
    return any(not out.exists() or out.stat().st_mtime < src_mtime for out in _outputs(proto))


def generate(force: bool = False) -> list[Path]:
    """Compile every stale .proto of the package; returns the files written."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # a runtime image without grpcio-tools: tell the user which command fixes it
        raise RuntimeError(
            "protos: generated modules are missing and grpcio-tools is not installed; "
            "run `pip install grpcio-tools` then `python protos/generate.py`"
        ) from exc
    import grpc_tools

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    written: list[Path] = []
    for proto in PROTO_FILES:
        if not force and not is_stale(proto):
            continue
        with tempfile.TemporaryDirectory(prefix="moge-protoc-") as tmp:
            staged = Path(tmp) / PACKAGE_DIR.name
            staged.mkdir()
            shutil.copy2(proto, staged / proto.name)
            rc = protoc.main([
                "grpc_tools.protoc",
                f"-I{tmp}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"{PACKAGE_DIR.name}/{proto.name}",
            ])
            if rc != 0:
                raise RuntimeError(f"protoc failed on {proto} (exit {rc})")
            for out in _outputs(proto):
                os.replace(staged / out.name, out)
                written.append(out)
    return written


def ensure_generated() -> None:
    if any(is_stale(p) for p in PROTO_FILES):
        generate()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    for path in generate(force="--force" in args):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
