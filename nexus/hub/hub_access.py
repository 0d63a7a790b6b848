"""Can this process upload to the Hugging Face Hub? Checked before `nexus push` touches the network for real.

Two checks, each failing with one line (an ``OSError`` subclass, which the CLI prints as one red line, exit 2):

1. a token: ``HF_TOKEN`` or the one ``hf auth login`` (``huggingface-cli login``) stored; none -> `HubTokenMissing`;
2. the network: a TCP connection to the Hub's endpoint (``HF_ENDPOINT``, default ``https://huggingface.co``) within
   ``timeout`` seconds; ``HF_HUB_OFFLINE=1`` or no connection -> `HubUnreachable`. Then ``whoami`` with the token:
   a rejected token -> `HubTokenMissing`, any other failure -> `HubUnreachable`.

Example::

    from nexus.hub.hub_access import check_hub_access
    user = check_hub_access()        # "my-user", or raises with one line saying what to do
"""

import socket
from urllib.parse import urlparse


class HubTokenMissing(PermissionError):
    """No usable Hugging Face token."""


class HubUnreachable(ConnectionError):
    """The Hub cannot be reached from here (offline, firewall, HF_HUB_OFFLINE)."""


LOGIN_HINT = "run `hf auth login` (or set HF_TOKEN) with a token that has write access"


def hub_endpoint():
    from huggingface_hub import constants

    return constants.ENDPOINT


def check_hub_access(timeout=5.0, endpoint=None):
    """Return the Hub user name the token belongs to, or raise `HubTokenMissing` / `HubUnreachable` (one line)."""
    from huggingface_hub import constants, get_token

    token = get_token()
    if not token:
        raise HubTokenMissing(f"no Hugging Face token found: {LOGIN_HINT}")
    endpoint = endpoint or hub_endpoint()
    if constants.HF_HUB_OFFLINE:
        raise HubUnreachable(f"HF_HUB_OFFLINE is set, so nothing can be uploaded to {endpoint}; unset it and retry")
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise HubUnreachable(f"cannot reach {endpoint} ({host}:{port}: {exc.strerror or exc}); check the network "
                             "connection (or HF_ENDPOINT) and retry") from None
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint).whoami(token=token)
    except Exception as exc:  # noqa: BLE001  (any failure here becomes one line, never a traceback)
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubTokenMissing(f"the Hugging Face token was rejected by {endpoint} (HTTP {status}): "
                                  f"{LOGIN_HINT}") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HubUnreachable(f"{endpoint} did not answer the token check: {type(exc).__name__}: {first}") from None
    return info.get("name") if isinstance(info, dict) else None
