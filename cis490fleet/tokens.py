"""Secret random tokens for the coordinator's hot paths: leases, nonces, proposal ids.

``secrets.token_hex`` reads ``os.urandom``, which lets go of the GIL on every call. On a coordinator whose
handler threads, writer and Raft driver share one GIL, each claim and each peer message then waited for the
GIL to come back from another thread. OpenSSL's generator (``ssl.RAND_bytes``) is a CSPRNG seeded from the
operating system and reseeded in a forked child, and keeps the GIL for a few bytes.
"""

from __future__ import annotations

try:
    from ssl import RAND_bytes as _random_bytes
except ImportError:  # a Python built without OpenSSL (no TLS either)
    from os import urandom as _random_bytes


def token_hex(nbytes: int = 16) -> str:
    """``nbytes`` random bytes as hex, as ``secrets.token_hex``."""
    return _random_bytes(nbytes).hex()
