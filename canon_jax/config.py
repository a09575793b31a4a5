"""Model configuration: one typed, validated object for every architecture (Llama, GLA5, GDN2, Mamba2, with and
without Canon layers; docs/models.md describes the models).

Every bad value raises ``ValueError`` naming the field, at construction time (``ModelConfig(...)`` validates itself).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pallas_kernels.implementations import ATTENTION_IMPLS, KERNEL_IMPLS

__all__ = ["ModelConfig", "ARCHS", "CANON_LETTERS"]

ARCHS = ("llama", "gla", "gdn", "mamba2")
# Letters allowed in ``canon_set`` per architecture. Lower-case ``b`` is the linear architectures' own short conv
# (non-residual, SiLU); upper-case ``B`` is a residual Canon inside the mixer (docs/models.md, "Linear models").
CANON_LETTERS = {"llama": "ABCD", "gla": "AbBCD", "gdn": "AbBCD", "mamba2": "AbBCD"}
DTYPES = ("float32", "bfloat16", "float16")
# none; full (save only each block's input); save_dots (keep matmul outputs); save_canon_attn (keep only the Canon
# outputs and the token mixer's core output: attention / linear recurrence): canon_jax.models.causal_lm.REMAT_POLICIES
REMAT = ("none", "full", "save_dots", "save_canon_attn")
INIT_SCHEMES = ("auto", "lingua", "hf", "torch")


def _err(name, msg):
    return ValueError(f"ModelConfig.{name}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a causal LM.

    Shared fields apply to every ``arch``; fields under "linear models" apply to ``gla``/``gdn``/``mamba2`` only.
    ``None`` means "derive the default" (see :meth:`ffn_dim`, :attr:`kv_heads`, :attr:`head_size`).
    """

    arch: str = "llama"
    vocab_size: int = 512
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    multiple_of: int = 256
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 4096

    # Canon layers
    canon_set: str = ""
    canon_kernel: int = 4
    canon_residual: bool = True
    canon_activation: bool = False
    canon_bias: bool = False
    # reset the conv history (and mask attention) at segment boundaries when segment ids are given; off by default,
    # as in the official training, which lets both run across packed documents (docs/models.md, "The Canon layer")
    segment_aware: bool = False

    # attention (llama)
    qk_norm: bool = False
    rope_dim: int | None = None  # None = full RoPE, 0 = NoPE, else partial RoPE on the first rope_dim channels
    rope_theta: float = 10000.0
    rope_version: str = "huggingface"  # "huggingface" (rotate-half) or "lingua" (interleaved pairs)
    # training/prefill attention kernel (decoding with a KV cache always uses XLA): auto = splash on TPU, cuDNN on
    # NVIDIA GPUs, the blocked XLA path elsewhere; see canon_jax.ops.attention
    attention_impl: str = "auto"

    # initialisation of embeddings, MLP and head (the linear mixers own their inits; docs/models.md, "Linear models"):
    #   "lingua": trunc-normal fan^-1/2 (what the released Llama models used);
    #   "hf":     N(0, initializer_range) (the official GLA5/GDN2 HF classes);
    #   "torch":  PyTorch nn.Linear default U(+-1/sqrt(fan_in)), embedding N(0, initializer_range) (official Mamba2);
    #   "auto":   the official choice for the arch: llama -> lingua, gla/gdn -> hf, mamba2 -> torch.
    init_scheme: str = "auto"
    initializer_range: float | None = None  # None: 0.1 for mamba2 (official config default), else 0.02

    # linear models (gla / gdn / mamba2; docs/models.md, "Linear models")
    expand_k: float = 1.0
    expand_v: float = 2.0
    gate_low_rank: int = 16
    output_gate_rank: int = 16
    gate_logit_normalizer: float = 16.0
    conv_size: int = 4  # the architecture's own short conv (Canon-b)
    linear_chunk_size: int = 64
    ssm_state_size: int = 64  # Mamba2; Part 4.1's playground uses 64, the 1B recipes 128
    ssm_groups: int = 1
    mamba_head_dim: int | None = None  # default 2d / num_heads
    mamba_chunk_size: int = 256
    use_mlp: bool = True  # Mamba2 without the gated MLP when False

    # numerics and compilation
    dtype: str = "float32"  # compute dtype; parameters stay in param_dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    # with remat "full" or "save_dots", the Canon positions whose input and output are recomputed in the backward pass
    # (with the norm just before them) from what the model without Canon keeps anyway: one more depthwise conv per
    # site; "" keeps both. "auto": "ABC" for Llama compiled for TPU, "" elsewhere, the lowest memory measured on each
    # (docs/scaling.md, "Canon's memory").
    canon_recompute: str = "auto"
    kernel_impl: str = "auto"  # impl= passed to the ops: one of pallas_kernels.common.KERNEL_IMPLS

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------------------------------------------------------
    def validate(self):
        if self.arch not in ARCHS:
            raise _err("arch", f"unknown architecture {self.arch!r}; choose one of {ARCHS}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len", "multiple_of"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _err(name, f"must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise _err("num_heads", f"{self.num_heads} heads do not divide hidden_size {self.hidden_size}")
        if self.num_kv_heads is not None:
            if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
                raise _err(
                    "num_kv_heads", f"{self.num_kv_heads} kv heads must be >= 1 and divide num_heads {self.num_heads}"
                )
        if self.head_dim is not None and self.head_dim < 1:
            raise _err("head_dim", f"must be >= 1, got {self.head_dim}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise _err("intermediate_size", f"must be >= 1, got {self.intermediate_size}")
        if not self.norm_eps > 0:
            raise _err("norm_eps", f"must be > 0, got {self.norm_eps}")
        # Canon
        allowed = CANON_LETTERS[self.arch]
        if not isinstance(self.canon_set, str):
            raise _err("canon_set", f"must be a string of letters from {allowed!r}, got {self.canon_set!r}")
        bad = sorted(set(self.canon_set) - set(allowed))
        if bad:
            raise _err("canon_set", f"letters {bad} are not valid for arch={self.arch!r}; valid letters: {allowed!r}")
        if self.canon_kernel < 1:
            raise _err("canon_kernel", f"kernel size K must be >= 1, got {self.canon_kernel}")
        if self.conv_size < 1:
            raise _err("conv_size", f"must be >= 1, got {self.conv_size}")
        # RoPE
        if self.rope_version not in ("huggingface", "lingua"):
            raise _err("rope_version", f"must be 'huggingface' or 'lingua', got {self.rope_version!r}")
        if self.rope_dim is not None:
            if self.rope_dim < 0 or self.rope_dim % 2:
                raise _err("rope_dim", f"must be a non-negative even number (0 = NoPE), got {self.rope_dim}")
            if self.rope_dim > self.head_size:
                raise _err("rope_dim", f"{self.rope_dim} exceeds head_dim {self.head_size}")
        elif self.arch == "llama" and self.head_size % 2:
            raise _err("head_dim", f"full RoPE needs an even head_dim, got {self.head_size}")
        if not self.rope_theta > 0:
            raise _err("rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.init_scheme not in INIT_SCHEMES:
            raise _err("init_scheme", f"must be one of {INIT_SCHEMES}, got {self.init_scheme!r}")
        if self.initializer_range is not None and not self.initializer_range > 0:
            raise _err("initializer_range", f"must be > 0, got {self.initializer_range}")
        if self.dtype not in DTYPES:
            raise _err("dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.param_dtype not in DTYPES:
            raise _err("param_dtype", f"must be one of {DTYPES}, got {self.param_dtype!r}")
        if self.remat not in REMAT:
            raise _err("remat", f"must be one of {REMAT}, got {self.remat!r}")
        if not isinstance(self.canon_recompute, str) or (
            self.canon_recompute != "auto" and set(self.canon_recompute) - set("ABCD")
        ):
            raise _err(
                "canon_recompute", f"must be 'auto' or a string of the letters 'ABCD', got {self.canon_recompute!r}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise _err("attention_impl", f"must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.kernel_impl not in KERNEL_IMPLS:
            raise _err("kernel_impl", f"must be one of {KERNEL_IMPLS}, got {self.kernel_impl!r}")
        # linear models
        if self.arch != "llama":
            for name in ("gate_low_rank", "output_gate_rank", "linear_chunk_size", "ssm_groups", "mamba_chunk_size"):
                v = getattr(self, name)
                if v < 1:
                    raise _err(name, f"must be >= 1, got {v}")
            if self.ssm_state_size < 1:
                raise _err("ssm_state_size", f"state size must be > 0, got {self.ssm_state_size}")
            if not self.expand_k > 0 or not self.expand_v > 0:
                raise _err("expand_k", f"expand_k/expand_v must be > 0, got {self.expand_k}/{self.expand_v}")
            if not self.gate_logit_normalizer > 0:
                raise _err("gate_logit_normalizer", f"must be > 0, got {self.gate_logit_normalizer}")
            for name in ("expand_k", "expand_v"):
                width = self.hidden_size * getattr(self, name)
                if width != int(width):
                    raise _err(name, f"hidden_size * {name} = {width} is not a whole number of channels")
            for name, width in (("expand_k", self.key_dim), ("expand_v", self.value_dim)):
                if width % self.num_heads:
                    raise _err(name, f"width {width} is not divisible by num_heads {self.num_heads}")
            if self.arch == "mamba2":
                if self.num_heads % self.ssm_groups:
                    raise _err("ssm_groups", f"{self.ssm_groups} groups must divide num_heads {self.num_heads}")
                if self.mamba_head_dim is not None and self.mamba_head_dim * self.num_heads != 2 * self.hidden_size:
                    raise _err(
                        "mamba_head_dim", f"num_heads*mamba_head_dim must equal 2*hidden_size={2 * self.hidden_size}"
                    )
                if (2 * self.hidden_size) % self.num_heads:
                    raise _err(
                        "num_heads",
                        f"{self.num_heads} heads do not divide the Mamba2 inner width {2 * self.hidden_size}",
                    )
                if not self.use_mlp and set(self.canon_set) & set("CD"):
                    raise _err("canon_set", "Canon C/D need the MLP (use_mlp=True) for arch='mamba2'")

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def canon_letters(self) -> frozenset:
        return frozenset(self.canon_set)

    def has_canon(self, letter: str) -> bool:
        return letter in self.canon_set

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def effective_rope_dim(self) -> int:
        return self.head_size if self.rope_dim is None else self.rope_dim

    @property
    def resolved_init_scheme(self) -> str:
        """The init scheme after resolving ``"auto"`` to the official release's choice for ``arch``."""
        if self.init_scheme != "auto":
            return self.init_scheme
        return {"llama": "lingua", "gla": "hf", "gdn": "hf", "mamba2": "torch"}[self.arch]

    @property
    def init_std(self) -> float:
        """``initializer_range`` with its per-arch default (0.1 for Mamba2 as the official config, else 0.02)."""
        if self.initializer_range is not None:
            return self.initializer_range
        return 0.1 if self.arch == "mamba2" else 0.02

    @property
    def key_dim(self) -> int:
        return int(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:
        return int(self.hidden_size * self.expand_v)

    def ffn_dim(self) -> int:
        """Gated-MLP width: explicit, else lingua's rounding for Llama (int(8d/3) up to multiple_of), 2d for linear."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.arch != "llama":
            return 2 * self.hidden_size
        hidden = int(2 * (4 * self.hidden_size) / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)
