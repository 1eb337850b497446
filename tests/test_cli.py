import json

from evicpress_sglang.cli import main


def test_codecs_command_reports_every_codec_on_real_kv(smollm2_dir, capsys):
    assert main(["codecs", "--model", str(smollm2_dir), "--tokens", "96", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["codec"]: r for r in report["codecs"]}
    assert report["shape"] == [30, 96, 3, 64]
    assert rows["bf16"]["k_rel_l2"] == 0 and rows["bf16+zstd"]["v_rel_l2"] == 0
    assert rows["int2"]["ratio"] > rows["int4"]["ratio"] > rows["int8"]["ratio"] > 1.5
    assert 0 < rows["int8"]["k_rel_l2"] < rows["int4"]["k_rel_l2"] < rows["int2"]["k_rel_l2"]
    assert all(r["encode_gbps"] > 0 and r["decode_gbps"] > 0 for r in rows.values())
