"""Ray Serve LLM's own ingress in front of our server class: `ray.serve.llm.build_openai_app` with
`LLMConfig(server_cls=AttentionReplica)` serves tiny-moge and a tiny Qwen3-MoE checkpoint, and the
official openai client gets the same greedy tokens as from our own app (`moge serve`), streamed and
whole; errors keep their 4xx.

Ray Serve LLM 2.60 imports its OpenAI models from vLLM or SGLang when `ray.serve.llm` is imported;
`bash scripts/setup.sh dev,rayllm` installs the narrowest thing that satisfies it (SGLang's wheel
without its engine dependencies, docs/architecture.md "Two ingresses"); scripts/test.sh installs it,
so CI runs this file. Without it this file skips.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

try:
    from ray.serve.llm import LLMConfig, LLMServingArgs, build_openai_app
except ImportError as e:  # vLLM or SGLang's protocol models are missing
    pytest.skip(f"ray.serve.llm is not importable here ({str(e).splitlines()[0][:160]}); "
                "install the rayllm extra: bash scripts/setup.sh dev,rayllm", allow_module_level=True)

import openai

from actors.model.reference import greedy_reference
from cluster.serve.app import AttentionReplica
from tests.checkpoints import write_qwen3_moe

PROMPT = "Ray Serve LLM in front of"


def llm_config(model_id: str, source: str) -> LLMConfig:
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": source},
        server_cls=AttentionReplica,
        engine_kwargs={"model": {"device": "cpu", "dtype": "float32"}, "engine": {"max_num_seqs": 4, "num_kv_blocks": 128}},
        deployment_config={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
    )


@pytest.fixture(scope="module")
def ray_llm(moge_server, tmp_path_factory):
    from ray import serve

    qwen = write_qwen3_moe(tmp_path_factory.mktemp("qwen3moe"))
    # both models behind one of Ray's ingresses, as a Ray Serve LLM user serves several
    configs = [llm_config("tiny-moge", "preset:tiny-moge"), llm_config("tiny-qwen3-moe", qwen)]
    serve.run(build_openai_app(LLMServingArgs(llm_configs=configs)), name="rayllm", route_prefix="/rayllm")
    url = moge_server.base_url.rstrip("/") + "/rayllm/v1"
    try:
        yield {"tiny-moge": url, "tiny-qwen3-moe": url, "qwen_dir": qwen}
    finally:
        serve.delete("rayllm")


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("model", ["tiny-moge", "tiny-qwen3-moe"])
def test_ray_serve_llm_gives_the_reference_tokens_whole_and_streamed(ray_llm, moge_server, model):
    from actors.weights.loader import load_model

    source = "preset:tiny-moge" if model == "tiny-moge" else ray_llm["qwen_dir"]
    reference = load_model(source, "float32", "cpu", name=model)
    # the tiny Qwen3-MoE has 128 ids and no tokenizer of its own: prompt it with token ids
    prompt = reference.tokenizer.encode(PROMPT) if model == "tiny-moge" else [5, 17, 33, 2, 90]
    expected = greedy_reference(reference, prompt, 12, stop_at_eos=False)
    c = client(ray_llm[model])
    assert sorted(m.id for m in c.models.list().data) == ["tiny-moge", "tiny-qwen3-moe"]
    extra = {"ignore_eos": True, "return_token_ids": True}
    whole = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)
    assert whole.choices[0].model_extra["token_ids"] == expected and whole.usage.completion_tokens == 12
    streamed = [t for chunk in c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                                   stream=True, extra_body=extra)
                for choice in chunk.choices for t in choice.model_extra.get("token_ids") or []]
    assert streamed == expected
    if model == "tiny-moge":  # the same tokens and text as our own ingress gives, and chat
        ours = moge_server.openai().completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                                       extra_body={"ignore_eos": True})
        assert ours.choices[0].text == whole.choices[0].text
        chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
                                         temperature=0)
        chunks = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=6, temperature=0, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == chat.choices[0].message.content


def test_ray_serve_llm_keeps_our_4xx(ray_llm):
    c = client(ray_llm["tiny-moge"])
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-moge", prompt="x", max_tokens=4, logit_bias={"99999999": 1})
    assert "vocabulary" in str(e.value)
