"""Block-scaled FP8 checkpoints (HF "fp8" format, written by hand in tests/checkpoints.py) load
correctly: greedy tokens equal transformers on the dequantized weights and this engine on the
dequantized checkpoint, with FP8 dequantized at load (CPU) or kept FP8 (quantization fp8, the torch
fallback on CPU); every quantization the engine cannot compute is refused with a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.model.quant.blocks import BlockFp8
from actors.model.quant.linear import Fp8Linear
from actors.model.reference import greedy_logits, greedy_reference
from actors.weights.checkpoint import CheckpointError
from actors.weights.hf_config import UnsupportedQuantizationError
from actors.weights.loader import dequantized, load_model
from tests.checkpoints import write_qwen3_moe_fp8

PROMPTS = ([5, 17, 99, 3, 64], [1, 2, 3], [120, 8, 77, 11, 42, 9], [33])
NEW = 8


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    """layout -> (fp8 dir, dequantized dir)."""
    root = tmp_path_factory.mktemp("fp8")
    return {layout: write_qwen3_moe_fp8(root / layout, layout) for layout in ("per_expert", "fused")}


def hf_greedy(path: str, prompts) -> list[list[int]]:
    import transformers as tf

    model = tf.Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_fp8_checkpoint_greedy_equals_transformers_on_the_dequantized_weights(fp8_checkpoints, layout):
    fp8_dir, dense_dir = fp8_checkpoints[layout]
    assert json.loads((Path(fp8_dir) / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    stored = load_file(str(Path(fp8_dir) / "model.safetensors"))
    scales = [t for n, t in stored.items() if n.endswith(("_scale_inv",))]
    assert scales and max(float(s.max()) for s in scales) < 0.05  # far from 1: ignoring them would show
    fp8 = load_model(fp8_dir, "float32", "cpu")  # auto on CPU: dequantized at load
    dense = load_model(dense_dir, "float32", "cpu")
    assert fp8.quantization == "none" and not any(isinstance(m, Fp8Linear) for m in fp8.model.modules())
    expected = hf_greedy(dense_dir, PROMPTS)
    for prompt, want_hf in zip(PROMPTS, expected):
        tokens, logits = greedy_logits(fp8, prompt, NEW, stop_at_eos=False)
        want, want_logits = greedy_logits(dense, prompt, NEW, stop_at_eos=False)
        assert tokens == want == want_hf
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_fp8_checkpoint_kept_fp8_computes_the_dequantized_model(fp8_checkpoints, layout):
    """quantization fp8: the checkpoint's bytes as stored (no re-quantization), the router and the
    module listed in modules_to_not_convert in float, the same tokens as the dequantized model."""
    fp8_dir, dense_dir = fp8_checkpoints[layout]
    kept = load_model(fp8_dir, "float32", "cpu", quantization="fp8")
    assert kept.quantization == "fp8"
    layers = kept.model.layers
    assert isinstance(layers[0].self_attn.q_proj, Fp8Linear) and isinstance(layers[1].mlp.down_proj, Fp8Linear)
    assert not isinstance(layers[1].self_attn.o_proj, Fp8Linear)  # not converted in the checkpoint
    assert not isinstance(layers[0].mlp.gate, Fp8Linear)  # the router: FP8 in the file, float here
    stored = load_file(str(Path(fp8_dir) / "model.safetensors"))
    q = layers[0].self_attn.q_proj
    assert torch.equal(q.weight.view(torch.uint8), stored["model.layers.0.self_attn.q_proj.weight"].view(torch.uint8))
    assert torch.equal(q.weight_scale_inv, stored["model.layers.0.self_attn.q_proj.weight_scale_inv"])
    w13 = kept.expert_groups[1].w13[0]
    assert isinstance(w13, BlockFp8) and w13.split == (160 if layout == "per_expert" else 0)
    assert kept.bytes_loaded < 0.4 * load_model(dense_dir, "float32", "cpu").bytes_loaded
    tokens, logits = greedy_logits(kept, PROMPTS[0], NEW, stop_at_eos=False)
    want, want_logits = greedy_logits(dequantized(kept), PROMPTS[0], NEW, stop_at_eos=False)
    assert tokens == want == greedy_reference(load_model(dense_dir, "float32", "cpu"), PROMPTS[0], NEW, stop_at_eos=False)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)


def test_quantization_fp8_of_a_float_checkpoint(fp8_checkpoints):
    """A float checkpoint quantized at load: every FP8-capable weight in FP8 (the layer the FP8
    checkpoint left float included), logits close to the float model's, tokens equal to its own
    dequantized reference. (Presets: tests/unit/test_fp8_presets.py.)"""
    float_dir = str(Path(fp8_checkpoints["per_expert"][0]).parent / "float")
    plain = load_model(float_dir, "float32", "cpu")
    q = load_model(float_dir, "float32", "cpu", quantization="fp8")
    assert isinstance(q.expert_groups[0].w13[0], BlockFp8) and isinstance(q.model.layers[1].self_attn.o_proj, Fp8Linear)
    tokens, logits = greedy_logits(q, PROMPTS[0], 2, stop_at_eos=False)
    _, plain_logits = greedy_logits(plain, PROMPTS[0], 2, stop_at_eos=False)
    assert float((logits[0] - plain_logits[0]).norm() / plain_logits[0].norm()) < 0.1  # e4m3 weights, first step
    assert tokens == greedy_logits(dequantized(q), PROMPTS[0], 2, stop_at_eos=False)[0]


def _variant(src: str, dst: Path, config_edit=None, tensor_edit=None) -> str:
    dst.mkdir()
    config = json.loads((Path(src) / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    if tensor_edit is None:
        (dst / "model.safetensors").symlink_to(Path(src) / "model.safetensors")
    else:
        tensors = load_file(str(Path(src) / "model.safetensors"))
        tensor_edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    return str(dst)


def _qc(**changes):
    def edit(config):
        config["quantization_config"].update(changes)
        for key in [k for k, v in changes.items() if v is None and k != "weight_block_size"]:
            config["quantization_config"].pop(key)
    return edit


@pytest.mark.parametrize("edit, needle", [
    (_qc(quant_method="gptq"), "quant_method 'gptq'"),
    (_qc(quant_method="compressed-tensors"), "quant_method 'compressed-tensors'"),
    (_qc(quant_method="awq"), "quant_method 'awq'"),
    (_qc(weight_block_size=[64, 64]), r"weight_block_size \[64, 64\]"),
    (_qc(weight_block_size=None), "per-tensor"),
    (_qc(activation_scheme="per-channel"), "activation_scheme 'per-channel'"),
    (_qc(fmt="e5m2"), "fmt 'e5m2'"),
    (_qc(expert_dtype="fp4"), "expert_dtype 'fp4'"),
    (_qc(scale_fmt="int8"), "scale_fmt 'int8'"),
])
def test_unsupported_quantization_configs_are_refused(fp8_checkpoints, tmp_path, edit, needle):
    path = _variant(fp8_checkpoints["per_expert"][0], tmp_path / "v", config_edit=edit)
    for quantization in ("auto", "none", "fp8"):
        with pytest.raises(UnsupportedQuantizationError, match=needle):
            load_model(path, "float32", "cpu", quantization=quantization)


def _drop_scale(tensors):
    del tensors["model.layers.0.mlp.experts.3.up_proj.weight_scale_inv"]


def _bad_scale_shape(tensors):
    name = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    tensors[name] = tensors[name][:, :1].contiguous()


def _e5m2(tensors):
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = tensors[name].float().to(torch.float8_e5m2)


@pytest.mark.parametrize("config_edit, tensor_edit, needle", [
    (None, _drop_scale, "experts.3.up_proj.weight is float8 but its scale .* is missing"),
    (None, _bad_scale_shape, r"q_proj.weight_scale_inv: scale shape \[1, 1\]"),
    (None, _e5m2, "float8_e5m2 weights are not supported"),
    (lambda c: c.pop("quantization_config"), None, "declares no quantization_config"),
])
def test_fp8_tensors_that_cannot_be_read_correctly_are_refused(fp8_checkpoints, tmp_path, config_edit, tensor_edit, needle):
    path = _variant(fp8_checkpoints["per_expert"][0], tmp_path / "v", config_edit, tensor_edit)
    for quantization in ("auto", "fp8"):
        with pytest.raises(CheckpointError, match=needle):
            load_model(path, "float32", "cpu", quantization=quantization)


def test_config_knob_flag_and_refusal_with_expert_workers():
    from cluster.cli.main import build_parser, overrides_from_args
    from cluster.config import MogeConfig

    assert overrides_from_args(build_parser().parse_args(["serve", "--quantization", "fp8"])) == {"model": {"quantization": "fp8"}}
    assert MogeConfig.load(env={"MOGE_MODEL__QUANTIZATION": "none"}).model.quantization == "none"
    assert MogeConfig.load(env={}).model.quantization == "auto"

    assert MogeConfig.load(env={}, model={"quantization": "fp8"}).model.quantization == "fp8"
    with pytest.raises(ValueError, match="in-process experts only"):
        MogeConfig.load(env={}, model={"quantization": "fp8"}, data_plane={"transport": "grpc"})
    with pytest.raises(ValueError):
        MogeConfig.load(env={}, model={"quantization": "int4"})
