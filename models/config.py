"""Architecture description shared by every loader and the runtime.

Every loader (GGUF, HF safetensors, our quantized file) produces a ModelConfig
and tensors named in the Hugging Face convention below, with Q/K rows in the
Hugging Face (rotate-half) RoPE order. The runtime knows nothing else, so a new
llama-family architecture is one entry in ARCHITECTURES, plus ModelConfig fields for what
it adds (sliding windows, gemma3's norms, query scale, RoPE bases and logit soft-cap).

Tensor names (i = layer index):
    model.embed_tokens.weight                         [vocab, hidden]
    model.layers.{i}.input_layernorm.weight           [hidden]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  [out, in]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias      [out]        (qkv_bias only)
    model.layers.{i}.post_attention_layernorm.weight  [hidden]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight   [out, in]
    model.layers.{i}.pre_feedforward_layernorm.weight, post_feedforward_layernorm.weight  [hidden]
        (sandwich-norm architectures, gemma3: post_attention_layernorm then normalises the attention
        output and pre_feedforward_layernorm the MLP input)
    model.layers.{i}.self_attn.{q,k}_norm.weight      [head_dim]  (qk_norm only: RMSNorm per head)
    model.norm.weight                                 [hidden]
    lm_head.weight                                    [vocab, hidden]  (absent when tied)
Every norm weight is the factor the normalised values are multiplied by: gemma3's HF
checkpoints store factor - 1, and hf_loader adds the 1 (as llama.cpp's converter does).
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
    # gemma3: RMSNorm after attention and after the MLP too, RMSNorm of each q and k head before
    # RoPE, GELU (tanh approximation) gating, embeddings scaled by sqrt(hidden)
    gemma: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(qkv_bias=False, default_rope_theta=10000.0),
    "mistral": Architecture(qkv_bias=False, default_rope_theta=10000.0),
    "qwen2": Architecture(qkv_bias=True, default_rope_theta=1000000.0),
    "phi3": Architecture(qkv_bias=False, default_rope_theta=10000.0),
    "gemma3": Architecture(qkv_bias=False, default_rope_theta=1000000.0, gemma=True),
}
GEMMA_LAYER_NORMS = ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


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
    # attention sees the last sliding_window positions (the current one included) only; None: all
    sliding_window: int | None = None
    # every global_every-th layer (i + 1 divisible) attends to all positions and the others through
    # the window, with RoPE base rope_local_theta (gemma3); None: every layer through the window
    global_every: int | None = None
    rope_local_theta: float | None = None
    query_scale: float | None = None  # scores scaled by query_scale ** -0.5 (gemma3); None: head_dim
    final_softcap: float | None = None  # logits = c * tanh(logits / c) (gemma3, when its config sets it)

    @property
    def qkv_bias(self) -> bool:
        return ARCHITECTURES[self.arch].qkv_bias

    @property
    def gemma(self) -> bool:
        return ARCHITECTURES[self.arch].gemma

    def local(self, i: int) -> bool:
        """Whether layer i attends through the sliding window."""
        return self.sliding_window is not None and (self.global_every is None or (i + 1) % self.global_every != 0)

    def window(self, i: int) -> int | None:
        return self.sliding_window if self.local(i) else None

    @property
    def llama_forward(self) -> bool:
        """Whether the model computes what the llama forward of the quantizers' calibration,
        rotation, block tuning and budget (engine/quant) computes."""
        return not self.gemma and self.sliding_window is None and self.final_softcap is None

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
            if self.gemma:
                shapes.update({p + n: (self.hidden,) for n in GEMMA_LAYER_NORMS})
                shapes.update({p + n: (self.head_dim,) for n in QK_NORMS})
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


def global_every(windowed: list[bool], path, what: str) -> int:
    """ModelConfig.global_every of a per-layer pattern (True: the layer attends through the window),
    which must be every n-th layer global (none global: n beyond the last layer)."""
    glob = [i for i, w in enumerate(windowed) if not w]
    every = glob[0] + 1 if glob else len(windowed) + 1
    if glob != list(range(every - 1, len(windowed), every)):
        raise ModelError(f"{path}: unsupported: {what} that is not every n-th layer global")
    return every


def check_architecture(arch: str, path) -> Architecture:
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ModelError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[arch]


_SIZES = ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "max_context")
TENSORS_PER_LAYER = 9  # at least: two norms and seven linear layers (six tensors where fused)


def check_config(config: ModelConfig, path, n_tensors: int) -> None:
    """What a file's config could lie about, before anything is sized by it: positive integer sizes,
    a layer count that the file's n_tensors tensors can hold, even heads that GQA groups divide,
    finite floats."""
    check_architecture(config.arch, path)
    for name in _SIZES:
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ModelError(f"{path}: {name} is {v!r}, expected a positive integer")
    per_layer = TENSORS_PER_LAYER - 3 if config.arch in FUSED_ARCHS else TENSORS_PER_LAYER
    if config.n_layers * per_layer > n_tensors:
        raise ModelError(f"{path}: {config.n_layers} layers need at least {config.n_layers * per_layer} "
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
    for name in ("sliding_window", "global_every"):
        v = getattr(config, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ModelError(f"{path}: {name} is {v!r}, expected a positive integer or none")
    for name in ("rope_local_theta", "query_scale", "final_softcap"):
        v = getattr(config, name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                              or v <= 0):
            raise ModelError(f"{path}: {name} is {v!r}, expected a positive number or none")


def check_tensors(config: ModelConfig, tensors: dict, path) -> None:
    """Every expected tensor present with the expected shape; one-line error otherwise."""
    for name, shape in config.expected_shapes().items():
        if name not in tensors:
            raise ModelError(f"{path}: missing tensor {name}")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ModelError(f"{path}: tensor {name} has shape {got}, config says {shape}")


# phi3 checkpoints fuse projections that the runtime keeps apart: fused tensor (suffix after
# model.layers.{i}.) -> its parts, in row order, as Phi3's modeling code splits them
FUSED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                       "self_attn.v_proj.weight"),
         "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
FUSED_ARCHS = {"phi3"}


def fused_rows(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """For an architecture with fused tensors: runtime name -> (fused name, first row, end row)."""
    if config.arch not in FUSED_ARCHS:
        return {}
    shapes, out = config.linear_shapes(), {}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            row = 0
            for part in parts:
                out[p + part] = (p + fused, row, row + shapes[part][0])
                row += shapes[part][0]
    return out


def check_fused(config: ModelConfig, shapes: dict[str, tuple[int, ...]], path) -> None:
    """Each fused tensor present with exactly the rows of its parts and the parts' width."""
    expected, ends = config.expected_shapes(), {}
    for part, (fused, _, end) in fused_rows(config).items():
        ends[fused] = (max(end, ends.get(fused, (0, 0))[0]), expected[part][1])
    for fused, (rows, width) in ends.items():
        if fused not in shapes:
            raise ModelError(f"{path}: missing tensor {fused}")
        if tuple(shapes[fused]) != (rows, width):
            raise ModelError(f"{path}: tensor {fused} has shape {tuple(shapes[fused])}, config says {(rows, width)}")
