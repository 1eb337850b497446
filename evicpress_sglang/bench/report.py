"""Turn replay results into the bench's figures: one summary per policy, a table, plots.

Quality of an answer is its agreement with the answer the same request got from the
reference pass (a server whose cache never evicts): token F1 between the two greedy
answers, and whether they are identical. Planted-fact questions are also scored against
their ground truth, and the agreement is also given apart for them and for the other questions:
a token selector can keep what open questions read and still lose a planted fact (issue 24's GPU
runs: ``expected`` against ``keydiff``). A request whose agreement is below ``quality_floor``
counts as a floor violation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..profiler.scores import token_f1


def _pct(x: np.ndarray, q: float) -> float | None:
    return float(np.percentile(x, q)) if x.size else None


def hist_percentile(bounds: list[str], counts: list[int], q: float) -> float | None:
    """The ``q``-th percentile of a histogram of cumulative counts (``bounds``: each bucket's
    upper bound, as status gives them): the bound of the first bucket that reaches it, so at
    the histogram's resolution and never below the true value; None if it counts nothing."""
    total = sum(counts)
    if total <= 0:
        return None
    seen = 0
    for bound, n in zip(bounds, counts):
        seen += n
        if seen >= q / 100 * total:
            return float(bound)
    return float(bounds[-1])


def summarize(policy: str, results: list[dict], reqs: list, wall_s: float, status: dict | None = None,
              reference: dict[int, str] | None = None, quality_floor: float = 0.9) -> dict:
    """The figures of one policy's replay (``reqs`` are the workload's BenchRequests)."""
    ok = [r for r in results if "error" not in r]
    ttft = np.array([r["ttft_s"] for r in ok], dtype=float)
    e2e = np.array([r["e2e_s"] for r in ok], dtype=float)
    prompt = sum(r["prompt_tokens"] or 0 for r in ok)
    cached = sum(r["cached_tokens"] or 0 for r in ok)
    out = {
        "policy": policy, "requests": len(results), "errors": len(results) - len(ok),
        "ttft_s": {"p50": _pct(ttft, 50), "p90": _pct(ttft, 90), "p99": _pct(ttft, 99),
                   "mean": float(ttft.mean()) if ttft.size else None},
        "e2e_s": {"p50": _pct(e2e, 50), "p99": _pct(e2e, 99), "mean": float(e2e.mean()) if e2e.size else None},
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else None,
        "output_tokens_per_s": sum(r["completion_tokens"] or 0 for r in ok) / wall_s if wall_s > 0 else None,
        "prompt_tokens": prompt, "reused_tokens": cached, "reuse_rate": cached / prompt if prompt else 0.0,
        "wall_s": wall_s,
    }
    if status is not None:  # the evicpress backend says where reused tokens came from
        stats = status["stats"]
        loaded = stats.get("hit_tokens", {})
        out["tiers"] = {"gpu": max(0, cached - sum(loaded.values())), **loaded}
        out["loads"] = stats.get("hits", {})
        out["stores"] = stats.get("stores", {})
        out["bytes_loaded"] = sum(stats.get("bytes_loaded", {}).values())
        out["bytes_stored"] = stats.get("stored_bytes")
        out["compression_ratio"] = stats.get("compression_ratio")
    truth = {r.id: r.truth for r in reqs if r.truth}
    facts = [truth[r["id"]] in r["text"] for r in ok if r["id"] in truth]
    out["fact_accuracy"] = float(np.mean(facts)) if facts else None
    if reference:
        scored = [r for r in ok if r["id"] in reference]
        f1 = np.array([token_f1(r["text"], reference[r["id"]]) for r in scored])
        same = [r["text"] == reference[r["id"]] for r in scored]
        out["quality"] = float(f1.mean()) if f1.size else None
        is_fact = np.array([r["id"] in truth for r in scored], dtype=bool)
        out["quality_facts"] = float(f1[is_fact].mean()) if is_fact.any() else None
        out["quality_other"] = float(f1[~is_fact].mean()) if (~is_fact).any() else None
        out["identical_answers"] = float(np.mean(same)) if same else None
        out["floor_violations"] = int((f1 < quality_floor).sum())
    return out


def table(summaries: list[dict], baseline: str = "stock") -> str:
    """Markdown: one row per policy; speed-ups are mean and p50 TTFT relative to ``baseline``."""
    base = next((s for s in summaries if s["policy"] == baseline), None)

    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"

    def ratio(s, key):
        if base is None or not s["ttft_s"][key] or base["ttft_s"][key] is None:
            return "-"
        return f"{base['ttft_s'][key] / s['ttft_s'][key]:.2f}x"

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = ["| policy | TTFT p50 ms | p90 | p99 | mean | vs stock (mean / p50) | e2e mean ms | req/s | reused | "
            "quality (F1 vs ref) | F1 facts / other | identical | fact acc. | floor viol. | failed |",
            "| --- " * 15 + "|"]
    for s in summaries:
        t = s["ttft_s"]
        rows.append(f"| {s['policy']} | {ms(t['p50'])} | {ms(t['p90'])} | {ms(t['p99'])} | {ms(t['mean'])} | "
                    f"{ratio(s, 'mean')} / {ratio(s, 'p50')} | {ms(s['e2e_s']['mean'])} | "
                    f"{num(s['throughput_rps'], '.2f')} | {s['reuse_rate']:.0%} | {num(s.get('quality'), '.3f')} | "
                    f"{num(s.get('quality_facts'), '.3f')} / {num(s.get('quality_other'), '.3f')} | "
                    f"{num(s.get('identical_answers'), '.0%')} | {num(s.get('fact_accuracy'), '.0%')} | "
                    f"{s.get('floor_violations', '-')} | {s['errors']}/{s['requests']} |")
    return "\n".join(rows)


def sustained_rate(points: list[tuple[float, float]], target: float) -> tuple[float | None, str]:
    """The highest arrival rate at which a policy's TTFT stays within ``target``.

    ``points`` are (arrival rate, TTFT) from runs of the same workload at several rates
    (TTFT inf for a run with failed requests). Between the last rate that meets the
    target and the first that does not, the rate is interpolated linearly. Returns
    (rate, "=") or, when every rate meets it, (highest rate, ">="): the sweep did not
    reach the policy's limit; (None, "<") when even the lowest rate misses it.
    """
    points = sorted(points)
    if not points or points[0][1] > target:
        return None, "<"
    for (r0, t0), (r1, t1) in zip(points, points[1:]):
        if t1 > target:
            if not np.isfinite(t1):
                return r0, "="
            return r0 + (target - t0) * (r1 - r0) / (t1 - t0), "="
    return points[-1][0], ">="


def sweep_table(by_rate: dict[float, list[dict]], target: float, metric: str = "mean",
                baseline: str = "stock") -> tuple[str, dict]:
    """Requests/s at equal TTFT: one row per policy with its ``metric`` TTFT at every rate
    and the highest rate that keeps it within ``target`` seconds (ratio to ``baseline``)."""
    rates = sorted(by_rate)
    policies = list(dict.fromkeys(s["policy"] for r in rates for s in by_rate[r]))
    curves = {}
    for name in policies:
        pts = [(r, s["ttft_s"][metric] if not s["errors"] and s["ttft_s"][metric] is not None else float("inf"))
               for r in rates for s in by_rate[r] if s["policy"] == name]
        rate, bound = sustained_rate(pts, target)
        curves[name] = {"ttft_s": dict(pts), "sustained_rps": rate, "bound": bound}
    base = curves.get(baseline, {})
    base = base.get("sustained_rps") if base.get("bound") == "=" else None  # a ratio needs the baseline's limit
    head = (f"| policy | {' | '.join(f'TTFT {metric} ms @ {r:g} req/s' for r in rates)} | "
            f"req/s within {target * 1000:.0f} ms | vs {baseline} |")
    rows = [head, "| --- " * (len(rates) + 3) + "|"]
    for name, c in curves.items():
        cells = " | ".join("-" if r not in c["ttft_s"] else "failed" if not np.isfinite(c["ttft_s"][r])
                           else f"{c['ttft_s'][r] * 1000:.0f}" for r in rates)
        bound = {"=": "", ">=": ">= ", "<": "< "}[c["bound"]]
        rate = f"< {rates[0]:g}" if c["sustained_rps"] is None else f"{bound}{c['sustained_rps']:.2f}"
        ratio = "-"
        if base and c["sustained_rps"] is not None:
            ratio = f"{bound}{c['sustained_rps'] / base:.2f}x"
        rows.append(f"| {name} | {cells} | {rate} | {ratio} |")
    return "\n".join(rows), curves


def plots(summaries: list[dict], out: Path, title: str) -> list[Path]:
    """TTFT p50/p99 per policy; TTFT vs quality; where reused tokens came from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["policy"] for s in summaries]
    x = np.arange(len(names))
    written = []

    def save(fig, ax, name: str, ylabel: str, per_policy: bool = True) -> None:
        if per_policy:
            ax.set_xticks(x, names, rotation=30, ha="right")
            ax.legend()
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    for i, key in enumerate(("p50", "p99")):
        ax.bar(x + (i - 0.5) * 0.4, [1000 * (s["ttft_s"][key] or 0) for s in summaries], 0.4, label=f"TTFT {key}")
    save(fig, ax, "ttft.png", "ms")

    with_quality = [s for s in summaries if s.get("quality") is not None]
    if with_quality:
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in with_quality:
            ax.scatter(1000 * s["ttft_s"]["mean"], s["quality"])
            ax.annotate(s["policy"], (1000 * s["ttft_s"]["mean"], s["quality"]), fontsize=8)
        ax.set_xlabel("mean TTFT (ms)")
        save(fig, ax, "ttft_vs_quality.png", "quality (token F1 vs reference answer)", per_policy=False)

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    bottom = np.zeros(len(names))
    for tier in ("gpu", "host", "disk"):
        share = np.array([(s.get("tiers", {}).get(tier, s["reused_tokens"] if tier == "gpu" else 0))
                          / max(1, s["prompt_tokens"]) for s in summaries])
        ax.bar(x, share, 0.6, bottom=bottom, label=tier)
        bottom += share
    save(fig, ax, "hit_rate_per_tier.png", "share of prompt tokens reused")
    return written
