"""The shape of a model: one dataclass for every supported family.

Families:
  moge       Pangu Pro MoE style: global softmax over N experts, top-(K/G) kept per group,
             no renormalisation, optional learned per-expert router scale.
  mixtral    top-k over N, softmax over the kept logits (renormalised).
  qwen2_moe  top-k over softmax(N), optional renormalisation, shared expert with a sigmoid gate.
  qwen3_moe  like qwen2_moe without the shared expert, with per-head RMSNorm on q and k.

For top-k families a "group" is a contiguous shard of n_experts // n_groups experts; n_groups is a
deployment choice there, a property of the model for moge.
"""

from __future__ import annotations

from dataclasses import dataclass, field, asdict, replace

FAMILIES = ("moge", "mixtral", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    n_experts: int
    n_groups: int
    top_k: int
    moe_intermediate_size: int
    # dense MLP width for layers listed in dense_layers (and "intermediate_size" in HF configs)
    intermediate_size: int = 0
    shared_intermediate_size: int = 0  # 0 = no shared expert
    shared_expert_gate: bool = False  # qwen2_moe: sigmoid(gate(x)) * shared(x)
    router_scale: bool = False  # moge: learned per-expert multiplier on kept scores
    renormalize: bool = False  # mixtral / qwen*_moe norm_topk_prob
    qk_norm: bool = False  # qwen3_moe
    attention_bias: bool = False  # q/k/v bias (qwen2_moe, moge)
    o_bias: bool = False  # o_proj bias (moge)
    dense_layers: tuple[int, ...] = ()  # layers whose MLP is dense (mlp_only_layers)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    architecture: str = ""  # HF architectures[0], kept for naming and re-export
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.n_experts % self.n_groups:
            raise ValueError(f"n_experts={self.n_experts} is not divisible by n_groups={self.n_groups}")
        if self.family == "moge" and self.top_k % self.n_groups:
            raise ValueError(f"MoGE needs top_k ({self.top_k}) divisible by n_groups ({self.n_groups})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @property
    def experts_per_group(self) -> int:
        return self.n_experts // self.n_groups

    @property
    def k_per_group(self) -> int:
        """MoGE: experts kept per group per token (K/G)."""
        return self.top_k // self.n_groups

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers and self.n_experts > 0

    def experts_of_group(self, group: int) -> range:
        start = group * self.experts_per_group
        return range(start, start + self.experts_per_group)

    def with_groups(self, n_groups: int) -> "ModelConfig":
        """Re-shard a top-k model into n_groups contiguous groups (MoGE groups are fixed)."""
        if self.family == "moge" and n_groups != self.n_groups:
            raise ValueError("a MoGE model's groups are part of the model and cannot be changed")
        return replace(self, n_groups=n_groups)

    def to_dict(self) -> dict:
        return asdict(self)
