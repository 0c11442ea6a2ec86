"""Architecture description shared by every loader and the runtime.

Every loader (GGUF, HF safetensors, our quantized file) produces a ModelConfig
and tensors named in the Hugging Face convention below, with Q/K rows in the
Hugging Face (rotate-half) RoPE order. The runtime knows nothing else, so a new
llama-family architecture is one entry in ARCHITECTURES.

Tensor names (i = layer index):
    model.embed_tokens.weight                         [vocab, hidden]
    model.layers.{i}.input_layernorm.weight           [hidden]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  [out, in]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias      [out]        (qkv_bias only)
    model.layers.{i}.post_attention_layernorm.weight  [hidden]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight   [out, in]
    model.norm.weight                                 [hidden]
    lm_head.weight                                    [vocab, hidden]  (absent when tied)
    model.mlp_rotation.signs, model.mlp_rotation.mix  [ffn], [a, a]    (rotated quantized models only:
        down_proj's inputs turn by this rotation at run time, lutkernels/rotation.py)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


MLP_SIGNS, MLP_MIX = "model.mlp_rotation.signs", "model.mlp_rotation.mix"


class ModelError(ValueError):
    """A model file or folder that cannot be used; the message is one line naming the file."""

    def __init__(self, message: str):
        # names and values quoted from a file may hold line breaks: the message stays one line
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


@dataclass(frozen=True)
class Architecture:
    qkv_bias: bool  # biases on the Q, K, V projections (qwen2)
    default_rope_theta: float


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(qkv_bias=False, default_rope_theta=10000.0),
    "mistral": Architecture(qkv_bias=False, default_rope_theta=10000.0),
    "qwen2": Architecture(qkv_bias=True, default_rope_theta=1000000.0),
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    norm_eps: float
    rope_theta: float
    tied_embeddings: bool
    max_context: int
    # HF-style rope_scaling dict ({"rope_type": "linear"|"llama3"|..., "factor": ...}) or None.
    rope_scaling: dict | None = field(default=None)

    @property
    def qkv_bias(self) -> bool:
        return ARCHITECTURES[self.arch].qkv_bias

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear weights (suffix after 'model.layers.{i}.') and their [out, in] shapes."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {
            "self_attn.q_proj.weight": (q, self.hidden),
            "self_attn.k_proj.weight": (kv, self.hidden),
            "self_attn.v_proj.weight": (kv, self.hidden),
            "self_attn.o_proj.weight": (self.hidden, q),
            "mlp.gate_proj.weight": (self.ffn, self.hidden),
            "mlp.up_proj.weight": (self.ffn, self.hidden),
            "mlp.down_proj.weight": (self.hidden, self.ffn),
        }

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the runtime needs, with its shape."""
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden),
                                              "model.norm.weight": (self.hidden,)}
        if not self.tied_embeddings:
            shapes["lm_head.weight"] = (self.vocab, self.hidden)
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (self.hidden,)
            shapes[p + "post_attention_layernorm.weight"] = (self.hidden,)
            for name, shape in self.linear_shapes().items():
                shapes[p + name] = shape
            if self.qkv_bias:
                shapes[p + "self_attn.q_proj.bias"] = (q,)
                shapes[p + "self_attn.k_proj.bias"] = (kv,)
                shapes[p + "self_attn.v_proj.bias"] = (kv,)
        return shapes


def check_mlp_rotation(config: "ModelConfig", tensors: dict, path=None) -> None:
    """A rotated model's MLP rotation, when it has one: both tensors, fitting config.ffn."""
    from lutkernels import rotation

    where = f"{path}: " if path is not None else ""
    present = [n in tensors for n in (MLP_SIGNS, MLP_MIX)]
    if any(present) and not all(present):
        raise ModelError(f"{where}an MLP rotation needs both {MLP_SIGNS} and {MLP_MIX}")
    if all(present):
        try:
            rotation.check(tensors[MLP_SIGNS], tensors[MLP_MIX], config.ffn)
        except ValueError as e:
            raise ModelError(where + str(e)) from None


def check_architecture(arch: str, path) -> Architecture:
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ModelError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[arch]


_SIZES = ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "max_context")
TENSORS_PER_LAYER = 9  # at least: two norms and seven linear layers


def check_config(config: ModelConfig, path, n_tensors: int) -> None:
    """What a file's config could lie about, before anything is sized by it: positive integer sizes,
    a layer count that the file's n_tensors tensors can hold, even heads that GQA groups divide,
    finite floats."""
    check_architecture(config.arch, path)
    for name in _SIZES:
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ModelError(f"{path}: {name} is {v!r}, expected a positive integer")
    if config.n_layers * TENSORS_PER_LAYER > n_tensors:
        raise ModelError(f"{path}: {config.n_layers} layers need at least {config.n_layers * TENSORS_PER_LAYER} "
                         f"tensors, the file has {n_tensors}")
    if config.n_heads % config.n_kv_heads or config.head_dim % 2:
        raise ModelError(f"{path}: {config.n_heads} heads in {config.n_kv_heads} KV groups of head size "
                         f"{config.head_dim}: need a whole number of heads per group and an even head size")
    for name, low in (("norm_eps", 0.0), ("rope_theta", 1.0)):
        v = getattr(config, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < low:
            raise ModelError(f"{path}: {name} is {v!r}, expected a finite number of at least {low}")
    if not isinstance(config.tied_embeddings, bool):
        raise ModelError(f"{path}: tied_embeddings is {config.tied_embeddings!r}, expected true or false")
    if config.rope_scaling is not None and not isinstance(config.rope_scaling, dict):
        raise ModelError(f"{path}: rope_scaling is {config.rope_scaling!r}, expected an object")


def check_tensors(config: ModelConfig, tensors: dict, path) -> None:
    """Every expected tensor present with the expected shape; one-line error otherwise."""
    for name, shape in config.expected_shapes().items():
        if name not in tensors:
            raise ModelError(f"{path}: missing tensor {name}")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ModelError(f"{path}: tensor {name} has shape {got}, config says {shape}")
