"""What a stored context is, independent of any one process's tree: a hash of the token
prefix it continues, a hash of its own tokens, and a fingerprint of the KV layout.

A blob written to disk carries these, so a later process (after a restart, or another
server on the same directory) finds it by content: when a request's match ends at
position ``a``, any stored blob whose prefix hash is that of the request's first ``a``
tokens and whose own hash matches the request's next tokens continues the match, whether
or not its ancestors were stored too. A blob of another model, layout or tensor-parallel
shard has another fingerprint and is never served.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

from ..codecs import KVShape


def layout_fingerprint(model: str, layout: KVShape, page_size: int, tp_rank: int, tp_size: int) -> str:
    """Model, layers, KV heads, head_dim, dtype, page size and TP shard, as one short hex string."""
    text = (f"{model}|L{layout.layers}|H{layout.heads}|D{layout.head_dim}|{layout.dtype}|P{page_size}"
            f"|tp{tp_rank}/{tp_size}")
    return xxhash.xxh3_64_hexdigest(text.encode())


def token_hash(extra_key: str | None, tokens: Sequence[int]) -> str:
    """128-bit hash of a token run (with the request namespace ``extra_key``)."""
    h = xxhash.xxh3_128()
    h.update((extra_key or "").encode() + b"\0")
    h.update(array("q", tokens).tobytes())
    return h.hexdigest()


def model_name() -> str:
    """The served model's path, as SGLang's server arguments have it (``unknown`` outside a server)."""
    try:
        from sglang.srt.runtime_context import get_server_args

        return str(get_server_args().model_path)
    except Exception:  # noqa: BLE001 - no server context (tests, tools): the layout alone identifies it
        return "unknown"
