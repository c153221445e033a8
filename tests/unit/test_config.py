"""cluster/config.py: defaults < YAML < MOGE_ environment < explicit overrides, and refusal of bad
values with a message naming the knob."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.config import MogeConfig


def write(tmp_path, text: str):
    path = tmp_path / "moge.yaml"
    path.write_text(text)
    return path


def test_defaults_serve_the_tiny_preset_on_loopback():
    cfg = MogeConfig.load(env={})
    assert cfg.model.source == "preset:tiny-moge"
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8000
    assert cfg.server.api_keys == []


def test_yaml_then_env_then_overrides(tmp_path):
    path = write(tmp_path, "server:\n  port: 9000\n  max_n: 3\nengine:\n  max_num_seqs: 4\n")
    env = {"MOGE_SERVER__PORT": "9100", "MOGE_ENGINE__KV_BLOCK_SIZE": "32", "UNRELATED": "x"}
    cfg = MogeConfig.load(path, env=env, server={"port": 9200})
    assert cfg.server.port == 9200  # override beats env beats YAML
    assert cfg.server.max_n == 3  # YAML kept where nothing overrides it
    assert cfg.engine.max_num_seqs == 4
    assert cfg.engine.kv_block_size == 32  # env parsed as YAML scalars: an int, not "32"
    assert MogeConfig.load(path, env=env).server.port == 9100


def test_env_values_are_yaml_so_lists_and_nested_sections_work():
    env = {
        "MOGE_SERVER__API_KEYS": '["k1", "k2"]',
        "MOGE_ELASTIC__POLICY__NAME": "utilisation",
        "MOGE_SERVER__NUM_REPLICAS": "auto",
    }
    cfg = MogeConfig.load(env=env)
    assert cfg.server.api_keys == ["k1", "k2"]
    assert cfg.elastic.policy.name == "utilisation"
    assert cfg.server.num_replicas == "auto"


def test_env_without_section_separator_is_ignored():
    assert MogeConfig.load(env={"MOGE_PORT": "1"}).server.port == 8000


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"server": {"port": 70000}}, "port"),
        ({"server": {"prot": 1}}, "prot"),  # typo: unknown keys are refused, not ignored
        ({"server": {"num_replicas": "many"}}, "num_replicas"),
        ({"server": {"min_replicas": 5, "max_replicas": 2}}, "min_replicas"),
        ({"elastic": {"policy": {"min_devices": 4, "max_devices": 2}}}, "min_devices"),
        ({"engine": {"kv_cache_fraction": 1.5}}, "kv_cache_fraction"),
        ({"model": {"dtype": "int3"}}, "dtype"),
        ({"data_plane": {"step_lane": True}, "elastic": {"local_groups": True}}, "local_groups"),
        ({"data_plane": {"transport": "grpc", "per_step": "lane"}, "elastic": {"local_groups": True}}, "local_groups"),
        ({"data_plane": {"per_step": "lane"}}, "needs expert workers"),
        ({"data_plane": {"transport": "collective", "per_step": "stream"}}, "needs data_plane.transport grpc"),
        ({"data_plane": {"ping_pong": True}}, "ping_pong"),
        ({"elastic": {"local_groups": True}}, "local_groups"),
        ({"data_plane": {"transport": "grpc", "per_step": "stream", "step_lane": True}}, "step_lane"),
    ],
)
def test_bad_values_are_refused_naming_the_knob(overrides, needle):
    with pytest.raises(ValidationError) as info:
        MogeConfig.load(env={}, **overrides)
    assert needle in str(info.value)


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="mapping"):
        MogeConfig.load(write(tmp_path, "- a\n- b\n"), env={})


def test_empty_yaml_is_the_defaults(tmp_path):
    assert MogeConfig.load(write(tmp_path, ""), env={}) == MogeConfig()


def test_yaml_round_trip(tmp_path):
    cfg = MogeConfig.load(env={}, server={"port": 1234, "api_keys": ["a"]}, data_plane={"transport": "grpc"})
    again = MogeConfig.load(write(tmp_path, cfg.to_yaml()), env={})
    assert again == cfg


def test_a_dumped_config_validates_back_unchanged():
    """The Serve app ships the config to replicas as a JSON dict; nothing may change on the way."""
    cfg = MogeConfig.load(env={}, server={"num_replicas": "auto", "max_replicas": 3})
    assert MogeConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_the_replica_plan_resolves_the_modes_once():
    from cluster.replica.plan import plan_of

    plain = plan_of(MogeConfig.load(env={}))
    assert (plain.mode, plain.remote, plain.ping_pong) == ("inprocess", False, False)
    grpc = MogeConfig.load(env={}, model={"device": "cpu"}, data_plane={"transport": "grpc", "per_step": "stream"})
    plan = plan_of(grpc)
    assert (plan.mode, plan.carrier, plan.per_step, plan.local_groups) == ("static", "grpc", "stream", False)
    assert plan.ping_pong is False and plan.warm_fallback is True  # auto: measured to pay nowhere yet; CPU: warm
    elastic = MogeConfig.load(env={}, model={"device": "cpu"}, elastic={"redis_url": "redis://127.0.0.1:1"},
                              data_plane={"transport": "collective", "step_lane": True, "ping_pong": True})
    plan = plan_of(elastic)
    assert (plan.mode, plan.per_step, plan.ping_pong) == ("elastic", "lane", True)  # the older name still works
    with pytest.raises(ValueError, match="control plane"):
        plan_of(MogeConfig.load(env={}, data_plane={"transport": "grpc"}, elastic={"local_groups": True}))
