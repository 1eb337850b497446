"""Serving requests from token-dropped contexts: logical tokens vs physical KV slots.

A context loaded back from a token-dropping codec is a radix node whose key is its
``n`` original tokens but whose value is only the ``m`` slots of the kept tokens, which
keep their original rotary positions. SGLang sizes everything about a request (extend
lengths, ``req_to_token`` rows, allocation) from ``len(prefix_indices)`` and the
request's token array, so a request whose matched path runs through such nodes is
given a *physical* view while it is scheduled:

* its token array loses ``n - m`` tokens inside the dropped prefix (they are never fed
  to the model: only tokens after the prefix are), so every SGLang length agrees with
  the slots it holds;
* its positions are shifted by ``offset = n - m`` (:func:`shift_positions`, an AFTER
  hook on ``ForwardBatch.init_new``), so new tokens take the positions that follow the
  *original* prefix length;
* the cache inserts its KV under the logical tokens (:class:`RequestView` keeps them).

The view is rebuilt at every match (a request re-matched after a retraction, or after
the dropped node went away, starts from its logical tokens again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Off only in the deliberately broken variant that shows what wrong positions cost
#: (setting ``shift_positions``); set by the cache in the scheduler process.
SHIFT = True


@dataclass
class RequestView:
    logical: object  # the request's original ``origin_input_ids``
    logical_prefix: int  # tokens of the matched path down to ``anchor``
    physical_prefix: int  # slots of that path
    anchor: object  # the deepest token-dropped node on the path (locked while the request runs)
    logprob_start_len: int | None

    @property
    def offset(self) -> int:
        return self.logical_prefix - self.physical_prefix


def view_of(req) -> RequestView | None:
    return getattr(req, "evp_view", None)


def to_physical(req, logical_prefix: int, physical_prefix: int, anchor) -> RequestView:
    """Give ``req`` (in its logical state) the physical view of a path whose first
    ``logical_prefix`` tokens are held by ``physical_prefix`` slots."""
    logical = req.origin_input_ids
    start = getattr(req, "logprob_start_len", None)
    view = RequestView(logical, logical_prefix, physical_prefix, anchor, start)
    req.origin_input_ids = logical[:physical_prefix] + logical[logical_prefix:]
    req.full_untruncated_fill_ids = req.origin_input_ids + req.output_ids
    if start is not None and start >= logical_prefix:  # the match never goes past it
        req.logprob_start_len = start - view.offset
    req.evp_view = view
    req.evp_pos_offset = view.offset
    return view


def restore_logical(req) -> RequestView | None:
    """Undo :func:`to_physical`; returns the view that was removed (None if there was none)."""
    view = view_of(req)
    if view is None:
        return None
    req.origin_input_ids = view.logical
    req.full_untruncated_fill_ids = view.logical + req.output_ids
    if view.logprob_start_len is not None:
        req.logprob_start_len = view.logprob_start_len
    req.evp_view = None
    req.evp_pos_offset = 0
    return view


def logical_tokens(req, physical_len: int):
    """The logical tokens whose KV the first ``physical_len`` slots of ``req`` hold."""
    view = view_of(req)
    if view is None:
        return (req.origin_input_ids + req.output_ids)[:physical_len]
    return (view.logical + req.output_ids)[: physical_len + view.offset]


def shift_positions(forward_batch, batch) -> None:
    """Add each request's offset to the positions SGLang computed from slot counts."""
    offsets = [getattr(r, "evp_pos_offset", 0) for r in batch.reqs]
    if not SHIFT or not any(offsets) or forward_batch.positions is None:
        return
    pos = forward_batch.positions
    per_req = torch.tensor(offsets, dtype=pos.dtype).to(pos.device, non_blocking=True)
    mode = forward_batch.forward_mode
    if mode.is_decode():
        forward_batch.positions = pos + per_req
    elif mode.is_extend():
        lens = forward_batch.extend_seq_lens
        forward_batch.positions = pos + torch.repeat_interleave(per_req, lens.to(pos.device), output_size=pos.numel())
    else:
        raise NotImplementedError(f"evicpress: token-dropped contexts cannot run in {mode} batches")
