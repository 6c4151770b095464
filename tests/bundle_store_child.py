"""A process that changes a model store and SIGKILLs itself at a chosen checkpoint (tests/test_bundle_store.py).

    python tests/bundle_store_child.py STORE OPERATION [SOURCE] --kill-at N

OPERATION is install (SOURCE: a bundle directory), promote, rollback, discard or recover. The store calls
its checkpoint hook at each step; this process prints every checkpoint it passes (one per line, flushed)
and kills itself with SIGKILL at the N-th (0-based); N = -1 runs to the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from agent.bundle.store import CHECKPOINTS, ModelStore


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("store", type=Path)
    parser.add_argument("operation", choices=("install", "promote", "rollback", "discard", "recover"))
    parser.add_argument("source", type=Path, nargs="?")
    parser.add_argument("--kill-at", type=int, default=-1)
    args = parser.parse_args()
    passed = 0

    def checkpoint(point: str) -> None:
        nonlocal passed
        assert point in CHECKPOINTS, point
        print(point, flush=True)
        if passed == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        passed += 1

    store = ModelStore(args.store, checkpoint=checkpoint)
    if args.operation == "install":
        store.install(args.source)
    elif args.operation == "promote":
        store.promote()
    elif args.operation == "rollback":
        store.rollback()
    elif args.operation == "discard":
        store.discard_staged()
    else:
        store.recover()
    return 0


if __name__ == "__main__":
    sys.exit(main())
