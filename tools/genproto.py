"""Generates the Python code of the protos, or checks that the committed code is current."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = "payments"


def generate(out: Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    # protoc finds the mypy_grpc plugin on PATH, next to this interpreter.
    env_path = f"{Path(sys.executable).parent}"
    subprocess.run(command, check=True, env={"PATH": env_path})
    for folder in [out / PACKAGE, *(p for p in (out / PACKAGE).rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    (out / PACKAGE / "py.typed").touch()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = tree(fresh / PACKAGE), tree(ROOT / PACKAGE)
        stale = sorted(
            name
            for name in want | have
            if name not in want
            or name not in have
            or not filecmp.cmp(fresh / PACKAGE / name, ROOT / PACKAGE / name, shallow=False)
        )
    if stale:
        print("generated code is out of date with protos/; run `make gen`:", file=sys.stderr)
        for name in stale:
            print(f"  {PACKAGE}/{name}", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the code is stale")
    args = parser.parse_args()
    if args.check:
        return check()
    shutil.rmtree(ROOT / PACKAGE, ignore_errors=True)
    generate(ROOT)
    print(f"generated {PACKAGE}/ from protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
