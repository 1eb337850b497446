"""Collects the run JSONs of this folder into table.md (one row per selector, ratio and seed)."""

import json
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    lines = ["| run | seed | selector | ratio | F1 | identical | fact acc | code tokens kept | fact sentence kept | s/config |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in sorted(HERE.glob("run*.json")):
        d = json.loads(f.read_text())
        seed = d["args"]["seed"]
        lines.append(f"| {f.stem} | {seed} | full KV ({d['questions']} questions, {d['docs']} docs) | 0 | 1.000 | 100% | "
                     f"{d['reference_fact_acc']:.0%} | | | |")
        for r in d["runs"]:
            ck = f"{r['code_tokens_kept']:.2f}" if "code_tokens_kept" in r else "-"
            sk = f"{r['fact_sentence_kept']:.2f}" if "fact_sentence_kept" in r else "-"
            lines.append(f"| {f.stem} | {seed} | `{r['selector']}` | {r['ratio']} | {r['f1']:.3f} | {r['identical']:.0%} | "
                         f"{r['fact_acc']:.0%} | {ck} | {sk} | {r['wall_s']:.0f} |")
    (HERE / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
