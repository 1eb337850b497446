from study_model import *  # noqa: F403 (model, tokenizer, capture hook, workload helpers)
rng = np.random.default_rng(1)
texts, codes = doc_texts(rng, 6, 6000, 14000)
res = {}
for d, text in enumerate(texts):
  for q in (fact_question(d), QUESTIONS[d % 6]):
    ctx_ids = tok(text)['input_ids']; full = tok(docqa_prompt(text, q))['input_ids']
    n = len(ctx_ids)
    with torch.no_grad(): model(torch.tensor([full]))
    Q = torch.stack([cap[i][0] for i in range(len(cap))]); K = torch.stack([cap[i][1] for i in range(len(cap))]); V = torch.stack([cap[i][2] for i in range(len(cap))])
    k, v, fq = K[:, :n], V[:, :n], Q[:, n:]  # future queries: the question tokens
    g = H // KV
    # oracle attention over context keys: [L, fut, H, n]
    kk = k.repeat_interleave(g, dim=2)
    logits = torch.einsum('lthd,lnhd->lthn', fq, kk) / math.sqrt(D)
    att = logits.softmax(-1).mean(1)  # [L, H, n]
    def recall(idx):
        return att[..., idx].sum(-1).mean().item()
    keep = n // 2
    sc = {}
    for name, cls in SELECTORS.items():
        sc[name] = cls(0.5).select(k)
    def std(s):  # [L, n, heads]
        s = s.float(); return ((s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-6)).mean((0, 2))
    def ea(mu, cov, vnorm=True):  # mu [L, heads, d]; cov [L, heads, d, d]; per kv head; returns idx
        lg = torch.einsum('lhd,lnhd->lnh', mu, k) / math.sqrt(D) + 0.5 * torch.einsum('lnhd,lhde,lnhe->lnh', k, cov, k) / D
        p = lg.softmax(1)
        if vnorm: p = p * v.norm(dim=-1)
        s = std(p.log())
        return torch.topk(s, keep).indices
    def stats(x):  # x [L, m, heads, d] -> mean/cov per head grouped to kv heads
        mu = x.mean(1); xc = x - mu[:, None]; cov = torch.einsum('lmhd,lmhe->lhde', xc, xc) / max(1, x.shape[1] - 1)
        return mu, cov
    def grp(mu, cov):  # q heads -> kv heads: average over group
        return mu.view(mu.shape[0], KV, g, D).mean(2), cov.view(cov.shape[0], KV, g, D, D).mean(2)
    mu, cov = grp(*stats(fq)); sc['EA-oracle-q'] = ea(mu, cov)
    mu, cov = grp(*stats(Q[:, n-64:n])); sc['EA-lastwin-realq'] = ea(mu, cov)
    mu, cov = stats(k[:, n-64:]); sc['EA-lastwin-keys'] = ea(mu, cov)
    sc['EA-lastwin-keys-neg'] = ea(-mu, cov)
    # self attention received from keys as pseudo-queries (causal, strided sample), max over queries
    qi = torch.arange(0, n, 8)
    lg = torch.einsum('lqhd,lnhd->lhqn', k[:, qi], k) / math.sqrt(D)
    mask = torch.arange(n)[None, :] >= qi[:, None]
    p = lg.masked_fill(mask, -1e9).softmax(-1)[..., 1:, :]  # drop query 0 (no keys before it)
    s = p.amax(2).permute(0, 2, 1)  # [L, n, heads]
    sc['selfattn-keys-max'] = torch.topk(std(s), keep).indices
    # real queries of the context itself (KVzip-ish oracle w/o repeat): max over context queries
    qq = Q[:, qi]; kk2 = k.repeat_interleave(g, 2)
    lg = torch.einsum('lqhd,lnhd->lhqn', qq, kk2) / math.sqrt(D)
    p = lg.masked_fill(mask, -1e9).softmax(-1)[..., 1:, :]
    sc['selfattn-realq-max'] = torch.topk(std(p.amax(2).permute(0, 2, 1)), keep).indices
    lg = torch.einsum('lqhd,lnhd->lhqn', Q[:, n-64:n], kk2) / math.sqrt(D)
    sc['snap-realq-lastwin'] = torch.topk(lg.softmax(-1).mean(2).permute(0,2,1).mean(-1).mean(0), keep).indices
    for name, idx in sc.items(): res.setdefault(name, []).append(recall(idx))
    print(d, n, {k_: round(v_[-1], 3) for k_, v_ in res.items()}, flush=True)
print({k_: round(float(np.mean(v_)), 3) for k_, v_ in res.items()})
