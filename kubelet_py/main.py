"""Entry point of `hpk-kubelet`. Logging is configured here and nowhere else."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hpk import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpk-kubelet")
    parser.add_argument("--version", action="version", version=f"hpk-kubelet {__version__}")
    parser.parse_args(argv)
    print("hpk-kubelet: the pod provider is not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
