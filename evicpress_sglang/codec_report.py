"""What each codec costs on a given model: size, error and speed on that model's real KV."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .codecs import KVShape, codec_names, get_codec
from .kv_sample import real_kv
from .timing import best_seconds


@dataclass
class CodecRow:
    codec: str
    ratio: float  # bf16 bytes / stored bytes
    k_rel_l2: float
    v_rel_l2: float
    encode_gbps: float  # GB of uncompressed KV per second
    decode_gbps: float


def _rel_l2(ref: torch.Tensor, got: torch.Tensor) -> float:
    return ((ref.float() - got.float()).norm() / ref.float().norm()).item()


def measure(k: torch.Tensor, v: torch.Tensor, names: list[str] | None = None, repeats: int = 3) -> list[CodecRow]:
    raw = KVShape.of(k).raw_nbytes
    rows = []
    for name in names or codec_names():
        codec = get_codec(name)
        enc = codec.encode(k, v)
        out_k, out_v = torch.empty_like(k), torch.empty_like(v)
        codec.decode(enc, out_k, out_v)
        t_enc = best_seconds(lambda: codec.encode(k, v), repeats)
        t_dec = best_seconds(lambda: codec.decode(enc, out_k, out_v), repeats)
        rows.append(
            CodecRow(name, raw / enc.nbytes, _rel_l2(k, out_k), _rel_l2(v, out_v), raw / t_enc / 1e9, raw / t_dec / 1e9)
        )
    return rows


def report(model_dir: Path, tokens: int, device: str, as_json: bool) -> str:
    import json

    k, v = real_kv(model_dir, tokens, device=device)
    rows = measure(k, v)
    if as_json:
        return json.dumps(
            {"model": str(model_dir), "tokens": tokens, "device": device, "shape": list(k.shape),
             "codecs": [asdict(r) for r in rows]},
            indent=1,
        )
    lines = [
        f"model {model_dir.name}: KV of {tokens} tokens, {list(k.shape)} per K/V, {k.dtype}, on {device}",
        f"{'codec':<12}{'ratio':>7}{'K rel-L2':>10}{'V rel-L2':>10}{'enc GB/s':>10}{'dec GB/s':>10}",
    ]
    for r in rows:
        lines.append(
            f"{r.codec:<12}{r.ratio:>7.2f}{r.k_rel_l2:>10.4f}{r.v_rel_l2:>10.4f}{r.encode_gbps:>10.2f}{r.decode_gbps:>10.2f}"
        )
    return "\n".join(lines)
