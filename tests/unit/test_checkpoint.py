"""Reading checkpoints: only the asked-for groups' tensors are read; per-expert, fused and sharded
layouts give the same weights; config errors are clear."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from actors.weights.checkpoint import CheckpointError, CheckpointReader, load_attention_part, load_expert_groups
from actors.weights.hf_config import UnsupportedModelError, config_from_dict, read_config
from actors.weights.loader import load_model
from actors.model.reference import greedy_reference
from tests.unit.conftest import PANGU_TINY_CONFIG, write_checkpoint


def test_loading_groups_1_and_3_reads_only_their_tensors(pangu_checkpoint):
    path, tensors = pangu_checkpoint
    cfg = read_config(path)
    reader = CheckpointReader(path)
    groups = load_expert_groups(path, cfg, [3, 1], torch.float32, "cpu", reader)
    assert sorted(groups) == [1, 3]

    wanted = {e for g in (1, 3) for e in cfg.experts_of_group(g)}
    read_experts = {int(n.split(".experts.")[1].split(".")[0]) for n in reader.tensors_read}
    assert read_experts == wanted
    expected_bytes = sum(
        t.numel() * t.element_size()
        for n, t in tensors.items()
        if ".experts." in n and int(n.split(".experts.")[1].split(".")[0]) in wanted
    )
    assert reader.bytes_read == expected_bytes == sum(g.nbytes for g in groups.values())

    # the stacked weights are exactly the checkpoint's experts, gate rows before up rows
    g3 = groups[3]
    e = g3.first_expert + 2
    assert g3.first_expert == 12
    torch.testing.assert_close(g3.w13[0][2, : cfg.moe_intermediate_size], tensors[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"])
    torch.testing.assert_close(g3.w13[0][2, cfg.moe_intermediate_size :], tensors[f"model.layers.0.mlp.experts.{e}.up_proj.weight"])
    torch.testing.assert_close(g3.w2[1][2], tensors[f"model.layers.1.mlp.experts.{e}.down_proj.weight"])
    assert 2 not in g3.w13  # dense layer


def test_attention_part_reads_no_routed_expert(pangu_checkpoint):
    path, tensors = pangu_checkpoint
    reader = CheckpointReader(path)
    state = load_attention_part(path, read_config(path), torch.float32, "cpu", reader)
    assert not any(".experts." in n for n in reader.tensors_read)
    assert state["layers.0.mlp.router_scale"].shape == (16,)  # Pangu's [1, N] flattened
    remote = load_model(str(path), dtype="float32", device="cpu", experts=object())
    assert remote.expert_groups == {} and remote.expert_bytes == 0
    assert remote.attention_bytes == sum(
        t.numel() * t.element_size() for n, t in tensors.items() if ".experts." not in n
    )


def test_sharded_checkpoint_with_index_gives_the_same_tokens(pangu_checkpoint, tmp_path):
    path, tensors = pangu_checkpoint
    sharded = write_checkpoint(tmp_path / "sharded", PANGU_TINY_CONFIG, tensors, shards=3)
    assert len(list(sharded.glob("*.safetensors"))) == 3
    prompt = [1, 2, 3, 4, 5]
    one = greedy_reference(load_model(str(path), "float32", "cpu"), prompt, 5, stop_at_eos=False)
    three = greedy_reference(load_model(str(sharded), "float32", "cpu"), prompt, 5, stop_at_eos=False)
    assert one == three
    (sharded / "model.safetensors.index.json").unlink()  # the scan of *.safetensors finds them too
    assert greedy_reference(load_model(str(sharded), "float32", "cpu"), prompt, 5, stop_at_eos=False) == one


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_layout_loads_like_per_expert_and_slices_groups(hf_moe_checkpoints, tmp_path, family):
    ckpt = hf_moe_checkpoints[family]
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(ckpt.path / "config.json", fused / "config.json")
    # transformers 5's in-memory names: mlp.experts.gate_up_proj [E, 2I, D], mlp.experts.down_proj [E, D, I]
    state = {n: t.contiguous() for n, t in ckpt.model.state_dict().items()}
    assert any(n.endswith("experts.gate_up_proj") for n in state)
    save_file(state, str(fused / "model.safetensors"))

    per_expert = load_model(str(ckpt.path), "float32", "cpu")
    from_fused = load_model(str(fused), "float32", "cpu")
    for g, weights in per_expert.expert_groups.items():
        for layer in weights.w13:
            assert torch.equal(weights.w13[layer], from_fused.expert_groups[g].w13[layer])
            assert torch.equal(weights.w2[layer], from_fused.expert_groups[g].w2[layer])
    prompt = [7, 8, 9]
    assert greedy_reference(per_expert, prompt, 6, stop_at_eos=False) == greedy_reference(
        from_fused, prompt, 6, stop_at_eos=False
    )

    cfg = read_config(fused)
    reader = CheckpointReader(fused)
    one = load_expert_groups(fused, cfg, [1], torch.float32, "cpu", reader)
    whole = sum(state[n].numel() * 4 for n in state if ".experts." in n)
    assert reader.bytes_read == one[1].nbytes == whole // cfg.n_groups  # a slice, not whole tensors


def test_top_k_checkpoint_can_be_resharded_into_groups(hf_moe_checkpoints):
    loaded = load_model(str(hf_moe_checkpoints["qwen3_moe"].path), "float32", "cpu", n_groups=2)
    assert loaded.cfg.n_groups == 2 and sorted(loaded.expert_groups) == [0, 1]
    assert loaded.expert_groups[1].w13[0].shape[0] == 4


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(UnsupportedModelError, match="not supported"):
        config_from_dict({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(UnsupportedModelError, match="RoPE scaling"):
        config_from_dict({**PANGU_TINY_CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    (tmp_path / "config.json").write_text(json.dumps(PANGU_TINY_CONFIG))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        CheckpointReader(tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        load_expert_groups(tmp_path, read_config(tmp_path), [9], torch.float32, "cpu")


def test_shape_mismatch_names_the_tensor(pangu_checkpoint, tmp_path):
    _, tensors = pangu_checkpoint
    bad = dict(tensors)
    bad["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    path = write_checkpoint(tmp_path / "bad", PANGU_TINY_CONFIG, bad)
    with pytest.raises(CheckpointError, match="layers.1.self_attn.q_proj.weight"):
        load_model(str(path), "float32", "cpu")
