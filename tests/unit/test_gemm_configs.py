"""The GEMM path/tile table (actors/model/kernels/gemm/configs.py): defaults are valid tiles, the
environment overrides, a tuned entry replaces the default only when valid."""

from __future__ import annotations

import pytest

from actors.model.kernels.gemm import configs
from actors.model.kernels.gemm.configs import Tile


@pytest.mark.parametrize("op", configs.OPS)
@pytest.mark.parametrize("mode", configs.MODES)
def test_default_tiles_are_valid_for_every_shape(op, mode):
    for rows in (1, 16, 17, 64, 300):
        for n in (64, 768, 5120):
            t = configs.default_tile(op, mode, rows, n, 64)
            assert configs.valid_tile(op, mode, t), (op, mode, rows, n, t)


def test_env_overrides_and_tuned_entries(monkeypatch):
    assert configs.setting("gemv_max_tokens") == configs.DEFAULTS["gemv_max_tokens"]
    monkeypatch.setenv("MOGE_GEMM_GEMV_MAX_TOKENS", "32")
    monkeypatch.setenv("MOGE_GEMM_BF16_GROUPED", "triton")
    assert configs.setting("gemv_max_tokens") == 32 and configs.setting("bf16_grouped") == "triton"
    key = configs.tile_key("dense", "w8a8", 5120, 5120, 100)
    assert key == "dense/w8a8/5120x5120/128"  # tokens round up to their bucket
    good, bad = [64, 32, 128, 4, 3], [64, 32, 96, 4, 3]  # BLOCK_K must divide 128 in FP8 modes
    monkeypatch.setattr(configs, "_tuned", lambda: {"tiles": {key: good}})
    assert configs.tile("dense", "w8a8", 5120, 5120, 100, 100) == Tile(*good)
    monkeypatch.setattr(configs, "_tuned", lambda: {"tiles": {key: bad}})
    assert configs.tile("dense", "w8a8", 5120, 5120, 100, 100) == configs.default_tile("dense", "w8a8", 100, 5120, 1)
