#!/usr/bin/env python3
"""Build the one-file zipapp: python3 build_zipapp.py [-o dist/cis490fleet.pyz] [--git-commit SHA].

Prints the sha256 and path of the result (``sha256sum`` format). The same
sources at the same commit always give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the cis490fleet zipapp reproducibly.")
    parser.add_argument("-o", "--output", default=str(ROOT / "dist" / "cis490fleet.pyz"),
                        help="where to write the zipapp (default: dist/cis490fleet.pyz)")
    parser.add_argument("--git-commit", help="commit to record instead of asking git (e.g. in a source tarball)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from cis490fleet import zipbuild

    path = zipbuild.build(Path(args.output), git_commit=args.git_commit)
    print(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
