"""Durability on disk: the one fsync helper the tub writer and the model store share."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Make a file's (or a directory's: its entries, after renames) current contents durable; needs no free space."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
