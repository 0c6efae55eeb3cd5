"""Helpers shared by the tests: the repository root and the package on sys.path."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(HERE)
if PACKAGE_ROOT not in sys.path:
    sys.path.insert(0, PACKAGE_ROOT)


def repo_root() -> str:
    """$FERRY_REPO, else the first directory above this file holding the golden vectors."""
    env = os.environ.get("FERRY_REPO")
    if env:
        return env
    d = HERE
    while True:
        if os.path.isfile(os.path.join(d, "tests", "fixtures", "protocol", "index.json")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            raise RuntimeError("cannot find the ferry repository: set FERRY_REPO")
        d = parent
