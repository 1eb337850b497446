"""The shared part of the two studies: SmolLM2 (real weights, converted by
`evicpress-sglang model prepare`) under HF transformers on the CPU, with a hook that captures
every layer's post-RoPE Q, K and V of the last forward pass in `cap[layer]`."""
import sys, math, torch, numpy as np
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from evicpress_sglang.bench.workload import doc_texts, docqa_prompt, fact_question, QUESTIONS
from evicpress_sglang.codecs.drop import SELECTORS
from evicpress_sglang.model import cache_dir
torch.set_num_threads(2)
P = str(cache_dir() / 'smollm2-135m-instruct')
tok = AutoTokenizer.from_pretrained(P); model = AutoModelForCausalLM.from_pretrained(P, torch_dtype=torch.float32).eval()
cfg = model.config; H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
cap = {}
def hook(i):
    def f(mod, args, kwargs):
        h = kwargs['hidden_states']; cos, sin = kwargs['position_embeddings']
        b, t, _ = h.shape
        q = mod.q_proj(h).view(b, t, H, D).transpose(1, 2); k = mod.k_proj(h).view(b, t, KV, D).transpose(1, 2)
        v = mod.v_proj(h).view(b, t, KV, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        cap[i] = (q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1))  # [t, heads, d]
    return f
for i, l in enumerate(model.model.layers): l.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
