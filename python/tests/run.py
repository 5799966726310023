"""Runs the test_* functions of python/tests without pytest: python3 python/tests/run.py [-k NAME]."""

import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _support  # noqa: E402


def main(argv):
    pattern = argv[argv.index("-k") + 1] if "-k" in argv else ""
    passed = failed = skipped = 0
    for path in sorted(HERE.glob("test_*.py")):
        try:
            module = importlib.import_module(path.stem)
        except _support.Skip as e:
            print(f"SKIP {path.stem}: {e}")
            skipped += 1
            continue
        for name in sorted(n for n in dir(module) if n.startswith("test_") and pattern in n):
            start = time.perf_counter()
            try:
                getattr(module, name)()
            except _support.Skip as e:
                print(f"SKIP {path.stem}::{name}: {e}")
                skipped += 1
            except Exception:
                print(f"FAIL {path.stem}::{name}")
                traceback.print_exc()
                failed += 1
            else:
                print(f"ok   {path.stem}::{name} ({time.perf_counter() - start:.2f}s)")
                passed += 1
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
