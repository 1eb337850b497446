"""The utility kept per context between re-plans must always equal one computed afresh."""

import numpy as np
import pytest
import torch

from evicpress_sglang.codecs import KVShape
from evicpress_sglang.policy import ContextTable, CostModel, Weights, build_configs
from evicpress_sglang.policy.configs import Tier
from evicpress_sglang.policy.utility import Utility

LAYOUT = KVShape(32, 0, 8, 128, torch.bfloat16)


def _table() -> ContextTable:
    return ContextTable(build_configs(["bf16", "int8", "keydiff:0.5+int4"], ["bf16", "int4+zstd"]), LAYOUT,
                        CostModel())


def _formula(table: ContextTable, w: Weights, rows: np.ndarray, now: float) -> np.ndarray:
    """The paper's utility straight from the table's public views."""
    q = table.config_quality(rows)
    u = (w.alpha * q - table.load_seconds(rows)) * table.frequency(rows, now)[:, None]
    return np.where(q < w.quality_floor - 1e-12, -np.inf, u)


def test_kept_utility_equals_a_fresh_one_after_any_sequence_of_changes():
    rng = np.random.default_rng(0)
    table = _table()
    w = Weights(alpha=1.5, quality_floor=0.85)
    kept = Utility(table, w)
    keys: list[str] = []
    now = 0.0
    for step in range(600):
        now += float(rng.uniform(0, 5))
        op = int(rng.integers(0, 9)) if keys else 0
        key = keys[int(rng.integers(0, len(keys)))] if keys else None
        if op == 0:  # a new context, sometimes below another (the table grows past its first rows)
            keys.append(f"c{step}")
            table.insert(keys[-1], int(rng.integers(64, 8192)), now, parent=key if rng.random() < 0.5 else None)
        elif op == 1 and len(keys) > 3:
            table.remove(key)
            keys.remove(key)
        elif op == 2:
            table.hit(key, now)
        elif op == 3 and table.tokens[table.row_of[key]] > 2:
            keys.append(f"s{step}")
            table.split(key, keys[-1], int(table.tokens[table.row_of[key]]) // 2)
        elif op == 4:
            table.set_quality(key, str(rng.choice(["int8", "keydiff:0.5+int4", "int4"])), float(rng.uniform(0.6, 1)))
        elif op == 5:
            table.set_stored_tokens(key, int(table.tokens[table.row_of[key]] * rng.uniform(0.3, 1.0)))
        elif op == 6:
            table.set_present_quality(table.row_of[key], float(rng.uniform(0.8, 1.0)))
        elif op == 7:  # the server re-estimates the prefill rate often (the column that is never kept)
            table.cost.prefill_s_per_token = float(rng.uniform(1e-5, 5e-5))
        elif op == 8 and rng.random() < 0.2:  # a calibration: every stored configuration's load changes
            table.cost.host_bw = float(rng.uniform(10e9, 60e9))
        if step % 7 == 0:
            rows = table.rows()
            rows = rows[rng.random(rows.size) < 0.8]  # placements price the resident rows only
            got = kept(rows, now)
            assert np.array_equal(got, Utility(table, w)(rows, now))
            assert np.allclose(got, _formula(table, w, rows, now), rtol=1e-12, atol=0)


def test_utility_inputs_are_read_only_outside_the_table():
    table = _table()
    table.insert("a", 100, 0.0)
    for column in ("tokens", "sizes", "quality", "present_quality"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(table, column)[0] = 0
    table.set_present_quality(0, 0.9)
    assert table.present_quality[0] == 0.9


def test_a_context_unused_for_weeks_keeps_its_ranking():
    """Its decayed hit counter underflows to zero; utilities must neither all tie nor turn to nan."""
    table = _table()
    table.insert("old", 4096, now=0.0)
    table.set_quality("old", "int8", 0.5)  # under the floor: must stay forbidden
    now = 3e7  # a year later
    assert table.frequency(np.array([0]), now)[0] == 0.0
    u = Utility(table, Weights(quality_floor=0.9))(np.array([0]), now)[0]
    labels = [c.label for c in table.configs]
    assert not np.isnan(u).any()
    assert u[labels.index("host:int8")] == -np.inf
    assert u[labels.index("gpu")] > u[labels.index("drop")] and table.tier_of[int(np.argmax(u))] == Tier.GPU


def test_kept_utility_of_rows_in_any_order():
    """The status endpoint prices contexts in order of frequency, not of rows."""
    table = _table()
    rng = np.random.default_rng(1)
    for i in range(10):
        table.insert(f"c{i}", int(rng.integers(64, 8192)), 0.0)
        table.set_quality(f"c{i}", "int8", float(rng.uniform(0.8, 1.0)))
    w = Weights()
    kept = Utility(table, w)
    order = np.array([0, 2, 1, 3, 5, 4, 6, 8, 7, 9])  # from the first row to the last, not in order
    assert np.array_equal(kept(order, 1.0), Utility(table, w)(order, 1.0))
    rows = table.rows()
    assert np.array_equal(kept(rows, 1.0), Utility(table, w)(rows, 1.0))
