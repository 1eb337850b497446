import json

import torch

from evicpress_sglang.kv_sample import load_causal_lm
from evicpress_sglang.model import _unpermute, prepare_model


def test_converted_model_answers_paris(smollm2_dir):
    model, tok = load_causal_lm(str(smollm2_dir))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_prepare_is_idempotent_and_complete(smollm2_dir):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    assert prepare_model() == smollm2_dir
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (30, 3, 64)


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter permutes rows as below; ours must undo exactly that."""
    heads, rows, cols = 3, 3 * 8, 5
    w = torch.arange(rows * cols).reshape(rows, cols).numpy()
    permuted = w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert (_unpermute(permuted, heads) == w).all()
