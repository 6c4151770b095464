"""Keylime's own code, in process, for the attestation tests (keylime==7.14.3 from the test extra).

keylime/signing.py imports ``gpg`` at import time and no wheel of it exists: the tests use Debian's python3-gpg
(./dev.sh test installs it), made visible to the virtualenv through a directory holding only a link to it, so
nothing else of Debian's dist-packages leaks in. Without it the Keylime tests skip with that reason.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

DEBIAN_GPG = Path("/usr/lib/python3/dist-packages/gpg")
LOGGING_CONF = Path(__file__).parent / "fixtures" / "keylime" / "logging.conf"


def _expose_debian_gpg() -> str:
    try:
        importlib.import_module("gpg")
        return ""
    except ImportError:
        pass
    if not DEBIAN_GPG.is_dir():
        return "Debian's python3-gpg is not installed (keylime/signing.py imports gpg; ./dev.sh test installs it)"
    shim = Path(tempfile.mkdtemp(prefix="debian-gpg-"))
    (shim / "gpg").symlink_to(DEBIAN_GPG)
    sys.path.append(str(shim))
    try:
        importlib.import_module("gpg")
    except ImportError as exc:
        return f"Debian's python3-gpg does not load in this interpreter: {exc}"
    return ""


def keylime_ima() -> ModuleType:
    """``keylime.ima.ima``, or a skip naming what is missing."""
    os.environ.setdefault("KEYLIME_LOGGING_CONFIG", str(LOGGING_CONF))
    problem = _expose_debian_gpg()
    if problem:
        pytest.skip(problem)
    return importlib.import_module("keylime.ima.ima")  # the test extra pins keylime==7.14.3: missing is a failure
