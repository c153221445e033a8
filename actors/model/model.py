"""The decoder: embeddings, pre-norm attention + MoE blocks, LM head. One device, no Ray.

Shape legend: T = tokens in the step, B = sequences, D = hidden, V = vocab, H / Hkv = query / KV
heads, Dh = head dim, N = routed experts, K = experts kept per token.

    h = embed(ids)                                          [T, D]
    for layer l:
        h = h + attn(norm_in(h)); x = norm_post(h)          paged KV cache
        ids, w = router(x)                                  x [T, D], ids/w [T, K]
        routed = experts.dispatch(l, x, ids, w).wait()      [T, D], wherever the experts are
        h = h + routed + shared(x)                          (dense layers: h + mlp(x))
    logits = lm_head(norm(h[last token of each sequence]))  [B, V] float32

The routed experts are not part of this module: `self.experts` is any ExpertCompute, swapped by
whoever distributes the model. The per-layer pieces are public so a ping-pong runner can interleave
two micro-batches (attention of one while the experts of the other are away).

On CUDA the elementwise tails run as fused Triton kernels (actors/model/kernels/: add + RMSNorm,
q/k norm + RoPE + KV write, SiLU-and-multiply, router softmax + top-K/G), decode attention reads the
paged cache through the block table, and nothing in a step waits on the host, so a decode step can be
captured in a CUDA graph (actors/engine/graphs/). Everywhere else the plain torch code below runs.
Which of the two is chosen once, when the weights are in place (`choose_kernels`, called by the
loader), never per call.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from actors.model import kernels
from actors.model.attention import AttentionPlan, paged_attention, plan_attention
from actors.model.expert_compute import ExpertCompute
from actors.model.kv_cache import PagedKVCache
from actors.model.config import ModelConfig
from actors.model.routing import route, route_fused
from actors.model.step_batch import StepBatch


class Linear(nn.Module):
    """nn.Linear without the init pass: weights always come from a loader (and random init on the
    meta device would drag in torch's slow reference-op imports)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.batch_invariant():
            from actors.model.kernels import invariant

            return invariant.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = False  # choose_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from actors.model.kernels.norm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_forward(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (h + delta, norm(h + delta)): the residual add and the next norm in one pass."""
        if self.fused:
            from actors.model.kernels.norm import add_rms_norm

            return add_rms_norm(h, delta, self.weight, self.eps)
        h = h + delta
        return h, self(h)


class Rotary:
    """RoPE, rotate-half convention (HF Llama / Qwen / Mixtral). Not a module on purpose: the
    frequencies stay float32 when the model is cast to bf16."""

    def __init__(self, head_dim: int, theta: float) -> None:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.inv_freq = 1.0 / theta**exponents  # built on cpu even under a meta-device context

    def on(self, device: torch.device) -> torch.Tensor:
        """inv_freq [Dh/2] float32 on device (moved once, before any CUDA-graph capture)."""
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return self.inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        self.on(positions.device)
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Dh]; cos, sin [T, Dh]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): dense MLP layers and shared experts."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, inner)
        self.up_proj = Linear(dim, inner)
        self.down_proj = Linear(inner, dim)
        self.fused = False  # choose_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.batch_invariant():
            from actors.model.kernels import invariant

            fused = self.__dict__.get("fused_gate_up")  # kernels/invariant.py fuse_projections
            gate, up = invariant.fused_linear(x, fused) if fused else (self.gate_proj(x), self.up_proj(x))
            return self.down_proj(invariant.silu_mul(gate, up))
        if self.fused:
            from actors.model.kernels.activation import silu_mul

            return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = Linear(d, self.heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = Linear(d, self.kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = Linear(d, self.kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = Linear(self.heads * self.head_dim, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.fused = False  # choose_kernels: the fused RoPE + KV write and paged decode kernels

    def forward(
        self, x: torch.Tensor, layer: int, batch: StepBatch, kv: PagedKVCache, step: "_StepContext"
    ) -> torch.Tensor:
        t = x.shape[0]
        fused = self.__dict__.get("fused_qkv") if kernels.batch_invariant() else None
        if fused:  # one matmul (kernels/invariant.py fuse_projections)
            from actors.model.kernels import invariant

            q, k, v = invariant.fused_linear(x, fused)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, self.heads, self.head_dim)
        k = k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        if self.fused:
            from actors.model.kernels.rope import qk_rope_store

            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else (None, None, 0.0)
            qk_rope_store(q, k, v, batch.positions, step.inv_freq, *norms, kv.k[layer], kv.v[layer], batch.slot_mapping)
        else:
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, step.cos, step.sin), apply_rotary(k, step.cos, step.sin)
            kv.store(layer, k, v, batch.slot_mapping)
        out = paged_attention(q, layer, batch, kv, step, self.head_dim**-0.5, self.fused)  # [T, H, Dh]
        return self.o_proj(out.reshape(t, self.heads * self.head_dim))


class MoEBlock(nn.Module):
    """Everything of an MoE layer except the routed experts: router, scale, shared expert."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Linear(cfg.hidden_size, cfg.n_experts)  # router, [N, D]
        if cfg.router_scale:
            self.router_scale = nn.Parameter(torch.ones(cfg.n_experts))  # [N]
        if cfg.shared_intermediate_size:
            self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_intermediate_size)
        if cfg.shared_expert_gate:
            self.shared_expert_gate = Linear(cfg.hidden_size, 1)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        if not hasattr(self, "shared_expert"):
            return None
        y = self.shared_expert(x)
        if hasattr(self, "shared_expert_gate"):
            gate = self.shared_expert_gate(x)
            if kernels.batch_invariant() and not kernels.fused(x):
                from actors.model.kernels import invariant

                y = invariant.sigmoid(gate) * y
            else:
                y = torch.sigmoid(gate) * y
        return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp = MoEBlock(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)


class _StepContext:
    """Per-step values every layer shares, each built on first use: RoPE tables and the attention
    plan for the torch path; the fused kernels need neither."""

    def __init__(self, batch: StepBatch, rotary: Rotary, block_size: int, dtype: torch.dtype) -> None:
        self.batch, self.rotary, self.block_size, self.dtype = batch, rotary, block_size, dtype
        self.inv_freq = rotary.on(batch.positions.device)

    @functools.cached_property
    def plan(self) -> AttentionPlan:
        return plan_attention(self.batch, self.block_size)

    @functools.cached_property
    def _cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary.cos_sin(self.batch.positions, self.dtype)

    @property
    def cos(self) -> torch.Tensor:
        return self._cos_sin[0]

    @property
    def sin(self) -> torch.Tensor:
        return self._cos_sin[1]


class MoGEModel(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: ExpertCompute | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, layer) for layer in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.experts = experts
        self._route = route  # choose_kernels: route_fused on CUDA
        self._steps: dict[int, _StepContext] = {}  # two slots: the ping-pong micro-batches

    def choose_kernels(self) -> bool:
        """The fused Triton kernels or the torch code, for every op of the model, once: where the
        weights are and what kernels.fused says there (MOGE_FUSED_KERNELS, Triton installed).
        Call again after moving the model or switching kernels (tests, benchmarks). -> fused."""
        on = kernels.fused(self.embed_tokens.weight)
        norms = [self.norm]
        for block in self.layers:
            norms += [block.input_layernorm, block.post_attention_layernorm]
            attn = block.self_attn
            attn.fused = on and kernels.power_of_two(attn.head_dim)
            if attn.qk_norm:
                norms += [attn.q_norm, attn.k_norm]
            mlp = block.mlp
            swiglu = getattr(mlp, "shared_expert", None) if block.is_moe else mlp
            if swiglu is not None:
                swiglu.fused = on
        for norm in norms:
            norm.fused = on
        self._route = route_fused if on else route
        return on

    # ---- per-layer pieces -------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> h [T, D]."""
        return self.embed_tokens(input_ids)

    @torch.no_grad()
    def attention_block(
        self, layer: int, h: torch.Tensor, batch: StepBatch, kv: PagedKVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (h + attention(input_norm(h)), post_attention_norm of that) [T, D] each; writes this
        step's K/V for `layer`."""
        block = self.layers[layer]
        step = self._step_context(batch, kv.block_size, h.dtype)
        attn = block.self_attn(block.input_layernorm(h), layer, batch, kv, step)
        return block.post_attention_layernorm.add_forward(h, attn)

    @torch.no_grad()
    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """x_normed [T, D] -> (topk_ids [T, K], topk_weights [T, K] float32); (None, None) for a
        dense layer: nothing to dispatch."""
        block = self.layers[layer]
        if not block.is_moe:
            return None, None
        moe: MoEBlock = block.mlp
        logits, scale = moe.gate(x), getattr(moe, "router_scale", None)
        return self._route(self.cfg, logits, scale)

    @torch.no_grad()
    def finish_moe(
        self, layer: int, h: torch.Tensor, x_normed: torch.Tensor, routed: torch.Tensor | None
    ) -> torch.Tensor:
        """h + routed + shared(x_normed); for a dense layer (routed None) h + mlp(x_normed)."""
        block = self.layers[layer]
        if not block.is_moe:
            return h + block.mlp(x_normed)
        shared = block.mlp.shared(x_normed)
        out = routed if shared is None else routed + shared
        return h + out

    @torch.no_grad()
    def head(self, h: torch.Tensor, logits_index: torch.Tensor) -> torch.Tensor:
        """-> logits [B, V] float32 of the rows logits_index."""
        return self.lm_head(self.norm(h[logits_index])).float()

    # ---- whole step ---------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, batch: StepBatch, kv: PagedKVCache) -> torch.Tensor:
        self._steps.pop(id(batch), None)  # a reused (CUDA-graph) batch object gets fresh step values
        h = self.embed(batch.input_ids)
        for layer in range(self.cfg.num_layers):
            h, x = self.attention_block(layer, h, batch, kv)
            ids, weights = self.route(layer, x)
            routed = None if ids is None else self.experts.dispatch(layer, x, ids, weights).wait()
            h = self.finish_moe(layer, h, x, routed)
        return self.head(h, batch.logits_index)

    def _step_context(self, batch: StepBatch, block_size: int, dtype: torch.dtype) -> _StepContext:
        step = self._steps.get(id(batch))
        if step is None or step.batch is not batch:  # the stored ref keeps id(batch) from being reused
            step = _StepContext(batch, self.rotary, block_size, dtype)
            if len(self._steps) >= 2:
                self._steps.pop(next(iter(self._steps)))
            self._steps[id(batch)] = step
        return step
