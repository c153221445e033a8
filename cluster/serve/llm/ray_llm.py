"""What Ray Serve LLM's protocol needs from the server half, and nothing else of Ray's LLM library
is imported anywhere but here (lazily: `ray.serve.llm` cannot be imported at all without vLLM or
SGLang's protocol models, see docs/architecture.md "Two ingresses").

    from ray.serve.llm import LLMConfig, LLMServingArgs, build_openai_app
    from cluster.serve.app import AttentionReplica
    app = build_openai_app(LLMServingArgs(llm_configs=[LLMConfig(
        model_loading_config={"model_id": "tiny-moge", "model_source": "preset:tiny-moge"},
        server_cls=AttentionReplica,
        engine_kwargs={"model": {"device": "cpu"}, "engine": {"max_num_seqs": 8}},  # a MogeConfig dict
    )]))

- `config_of(llm_config)`: the MogeConfig dict of a replica: engine_kwargs, with the model source
  and served id from model_loading_config. The elastic controller comes with it exactly as in our own
  app (a remote transport plus elastic.redis_url in engine_kwargs: the replicas start it).
- `answer_for_ray`: Ray's ingress calls chat/completions/tokenize/detokenize with a handle in
  stream mode and expects, per its OpenAiIngress: an `ErrorResponse` first for an error (it
  answers its `code` as the status), a response object for a whole answer, or lists of SSE strings
  for a stream (one list per piece: our pieces already coalesce outputs, no extra timer).
- `deployment_options_for(llm_config)`: the deployment options of our own builder (admission-sized
  max_ongoing_requests, resources), then the LLMConfig's deployment_config on top, and the
  placement group: one bundle for the replica (its accelerator), or placement_group_config's.
"""

from __future__ import annotations

import copy
from typing import Any, AsyncIterator

from cluster.serve.ingress.pieces import RequestContext


def config_of(llm_config: Any) -> dict[str, Any]:
    config = copy.deepcopy(dict(llm_config.engine_kwargs or {}))
    loading = llm_config.model_loading_config
    model = config.setdefault("model", {})
    model.setdefault("source", getattr(loading, "model_source", None) or loading.model_id)
    model.setdefault("name", loading.model_id)
    return config


def _request_dict(request: Any) -> dict[str, Any]:
    """Ray validated the body with vLLM's or SGLang's model; ours validates it again, strictly,
    from the fields the client actually sent."""
    if isinstance(request, dict):
        return request
    return request.model_dump(exclude_unset=True, mode="json")


def _ray_models():
    from ray.llm._internal.serve.core.configs import openai_api_models as m

    return m


def _error(status: int, body: bytes) -> Any:
    import json

    m = _ray_models()
    err = json.loads(body)["error"]
    return m.ErrorResponse(error=m.ErrorInfo(message=err["message"], type=err["type"], param=err.get("param"),
                                             code=status))


_WHOLE = {"/v1/chat/completions": "ChatCompletionResponse", "/v1/completions": "CompletionResponse",
          "/tokenize": "TokenizeResponse", "/detokenize": "DetokenizeResponse"}


async def answer_for_ray(server: Any, route: str, request: Any) -> AsyncIterator[Any]:
    """One Ray Serve LLM call through the same server half as our own ingress."""
    import json

    async for piece in server.run(route, _request_dict(request), RequestContext()):
        if piece.status != 200:
            yield _error(piece.status, piece.data)
            return
        if piece.stream:
            if piece.data:
                yield [event + "\n\n" for event in piece.data.decode().split("\n\n") if event]
            continue
        if piece.final:
            body = json.loads(piece.data)
            if route == "/detokenize":  # vLLM's and SGLang's name for the text
                body.setdefault("text", body.get("prompt"))
            yield getattr(_ray_models(), _WHOLE[route]).model_validate(body)


def deployment_options_for(llm_config: Any) -> dict[str, Any]:
    from cluster.config import MogeConfig
    from cluster.serve.serve_options import deployment_options

    config = MogeConfig.load(**config_of(llm_config))
    opts = deployment_options(config)
    opts.update(copy.deepcopy(llm_config.deployment_config or {}))
    actor = opts.setdefault("ray_actor_options", {})
    pg = llm_config.placement_group_config or {}
    if pg.get("placement_group_bundles"):
        opts["placement_group_bundles"] = pg["placement_group_bundles"]
        opts["placement_group_strategy"] = pg.get("placement_group_strategy", "PACK")
    else:  # the replica's own bundle; expert workers are the controller's actors, placed on their own
        bundle = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0)}
        bundle.update(actor.get("resources", {}))
        opts["placement_group_bundles"] = [bundle]
        opts["placement_group_strategy"] = "STRICT_PACK"
    if "autoscaling_config" in opts and "num_replicas" in opts:
        opts.pop("num_replicas")
    if llm_config.runtime_env:
        actor["runtime_env"] = {**actor.get("runtime_env", {}), **llm_config.runtime_env}
    return opts
