"""Is the Hugging Face Hub reachable? Answered in seconds, so offline runs fail fast.

Without HF_HUB_OFFLINE=1, huggingface_hub retries an unreachable Hub for ~23 s before giving up;
a plain TCP connect to the endpoint tells the same thing at once.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from huggingface_hub import constants


def hub_reachable(timeout_s: float = 3.0) -> bool:
    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows: let huggingface_hub try
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False
