from study_model import *  # noqa: F403 (model, tokenizer, capture hook, workload helpers)

from transformers.models.llama.modeling_llama import rotate_half
pre = {}
def hook2(i):
    def f(mod, args, kwargs):
        h = kwargs['hidden_states']; b, t, _ = h.shape
        pre[i] = mod.q_proj(h).view(b, t, H, D)[0]
    return f
for i, l in enumerate(model.model.layers): l.self_attn.register_forward_pre_hook(hook2(i), with_kwargs=True)
rng = np.random.default_rng(1)
texts, codes = doc_texts(rng, 6, 6000, 14000)
inv = 1.0 / (100000.0 ** (torch.arange(0, D, 2).float() / D))
g = H // KV
def calib(ids):
    with torch.no_grad(): model(torch.tensor([ids]))
    x = torch.stack([pre[i] for i in range(len(pre))])[:, 4:]  # [L, t, H, d] pre-rope
    x = x.view(x.shape[0], x.shape[1], KV, g, D).transpose(2, 3).reshape(x.shape[0], -1, KV, D)  # pool group samples
    mu = x.mean(1); xc = x - mu[:, None]; cov = torch.einsum('lmhd,lmhe->lhde', xc, xc) / x.shape[1]
    return mu, cov
# calibration from docs 4,5 (full prompts with a question)
cal = [calib(tok(docqa_prompt(texts[j], QUESTIONS[j]))['input_ids']) for j in (4, 5)]
gmu = sum(c[0] for c in cal) / 2; gcov = sum(c[1] for c in cal) / 2
def rotate_stats(mu, cov, n, F):
    p = torch.arange(n, n + F).float()
    ang = p[:, None] * inv[None]  # [F, d/2]
    c = torch.cat([ang.cos(), ang.cos()], -1).mean(0); s = torch.cat([ang.sin(), ang.sin()], -1).mean(0)
    R = torch.diag(c) + torch.diag(s) @ rot_mat
    return mu @ R.T, R @ cov @ R.T
rot_mat = torch.zeros(D, D)  # rotate_half as matrix: y = M x
for a in range(D // 2): rot_mat[a, a + D // 2] = -1; rot_mat[a + D // 2, a] = 1
res = {}
for d in range(3):
  text = texts[d]
  for q in (fact_question(d), QUESTIONS[d % 6]):
    ctx_ids = tok(text)['input_ids']; full = tok(docqa_prompt(text, q))['input_ids']; n = len(ctx_ids)
    with torch.no_grad(): model(torch.tensor([full]))
    Q = torch.stack([cap[i][0] for i in range(len(cap))]); K = torch.stack([cap[i][1] for i in range(len(cap))]); V = torch.stack([cap[i][2] for i in range(len(cap))])
    k, v, fq = K[:, :n], V[:, :n], Q[:, n:]
    kk = k.repeat_interleave(g, dim=2)
    att = (torch.einsum('lthd,lnhd->lthn', fq, kk) / math.sqrt(D)).softmax(-1).mean(1)
    recall = lambda idx: att[..., idx].sum(-1).mean().item()
    keep = n // 2
    def std(s):
        s = s.float(); return ((s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-6)).mean((0, 2))
    def ea(mu, cov, vnorm=True, covterm=True):
        lg = torch.einsum('lhd,lnhd->lnh', mu, k) / math.sqrt(D)
        if covterm: lg = lg + 0.5 * torch.einsum('lnhd,lhde,lnhe->lnh', k, cov, k) / D
        p = lg.softmax(1)
        if vnorm: p = p * v.norm(dim=-1)
        return torch.topk(std(p.log()), keep).indices
    sc = {'keydiff': SELECTORS['keydiff'](0.5).select(k)}
    for F in (32, 512):
        mu, cov = rotate_stats(gmu, gcov, n, F)
        sc[f'EA-global-F{F}'] = ea(mu, cov)
        sc[f'EA-global-F{F}-nocov'] = ea(mu, cov, covterm=False)
        sc[f'EA-global-F{F}-novnorm'] = ea(mu, cov, vnorm=False)
    for name, idx in sc.items(): res.setdefault(name, []).append(recall(idx))
    print(d, n, {k_: round(v_[-1], 3) for k_, v_ in res.items()}, flush=True)
print({k_: round(float(np.mean(v_)), 3) for k_, v_ in res.items()})
