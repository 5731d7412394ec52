"""Is the Hugging Face Hub reachable? Asked once per process, so that an offline machine decides locally at once
instead of after the hub clients' retries (about 26 s per file)."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub's host cannot be resolved or connected to within ``timeout``."""
    if any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_ENV):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True
