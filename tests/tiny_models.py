"""Tiny random-weight models on disk, for tests.

    cfg = tiny_config("llama")                    # the ModelConfig the writers use
    write_hf(tmp_path / "hf", "llama")            # folder: config.json, model.safetensors, tokenizer files
    write_gguf(tmp_path / "m.gguf", "llama")      # the same weights and tokenizer as one GGUF file

The same arch, seed and dims give the same weights (`random_weights`) in both
formats, so loaders can be compared tensor by tensor. `**dims` are ModelConfig
fields: hidden, n_layers, n_heads, n_kv_heads, head_dim, ffn, vocab, norm_eps,
rope_theta, max_context, tied_embeddings, rope_scaling, sliding_window,
query_scale, final_softcap. Defaults: hidden 64, 2 layers, 4 heads, 2 KV heads,
FFN 128 (input dims multiples of 32, for block quantizers), vocab = the
tokenizer's size, TOKENIZER_SIZE (a larger vocab pads the GGUF token list as
llama.cpp does). llama is tied, qwen2 is untied with Q/K/V biases; phi3 is
untied and its files fuse qkv_proj and gate_up_proj; gemma3 is tied, has 6
layers (the 6th global, as llama.cpp fixes the pattern), head size 32 (Q wider
than hidden), a window of 8 and local RoPE base 10000, and its HF files store
norm weights minus one.

The tokenizer is a small byte-level BPE (256 byte tokens, a few merges, the
specials <|endoftext|> <|im_start|> <|im_end|>, a ChatML template) with the
pre-tokenizer of the real model family: SmolLM2's for llama (GGUF pre
"smollm"), Qwen2's for qwen2 (pre "qwen2"). bos is <|endoftext|> and eos
<|im_end|>; llama adds bos (through tokenizer.json's post-processor), qwen2 does not.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from models.config import ARCHITECTURES, ModelConfig, fused_rows
from models.gguf_loader import GGUF_GLOBAL_NAMES, PERMUTED_ARCHS, layer_names

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS, EOS = "<|endoftext|>", "<|im_end|>"
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"), ("o", "n"), ("r", "e")]
TOKENIZER_SIZE = 256 + len(MERGES) + len(SPECIALS)
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
                 " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE = {"llama": "smollm", "mistral": "smollm", "qwen2": "qwen2", "phi3": "smollm", "gemma3": "smollm"}
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
              "phi3": "Phi3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def tiny_config(arch: str = "llama", **dims) -> ModelConfig:
    d = dict(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, ffn=128, vocab=TOKENIZER_SIZE, norm_eps=1e-5,
             rope_theta=ARCHITECTURES[arch].default_rope_theta, tied_embeddings=arch not in ("qwen2", "phi3"),
             max_context=256, rope_scaling=None)
    if arch == "gemma3":
        d.update(n_layers=6, head_dim=32, norm_eps=1e-6, sliding_window=8, global_every=6, rope_local_theta=10000.0)
    d.update(dims)
    d.setdefault("head_dim", d["hidden"] // d["n_heads"])
    # GGUF stores these as float32; rounding here lets both formats carry the same values
    d["norm_eps"], d["rope_theta"] = float(np.float32(d["norm_eps"])), float(np.float32(d["rope_theta"]))
    if arch == "gemma3":  # GGUF has no key for it: llama.cpp scales by the head size
        d.setdefault("query_scale", float(d["head_dim"]))
    return ModelConfig(arch=arch, **d)


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 weights for every tensor of config, HF names and [out, in] shapes."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in config.expected_shapes().items():
        if name.endswith("norm.weight"):  # within [0.5, 2], where gemma3's stored w - 1 is exact
            a = np.clip(1 + 0.1 * rng.standard_normal(shape), 0.5, 2)
        elif name.endswith(".bias"):
            a = 0.1 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[name] = a.astype(np.float32)
    return out


def llama_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf Q/K permutation: rotate-half halves to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_tokenizer(arch: str = "llama"):
    """The tokenizers.Tokenizer both writers save (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    if arch == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    if _adds_bos(arch):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    return tok


def write_hf(folder, arch: str = "llama", seed: int = 0, dtype: str = "float32",
             weights: dict[str, np.ndarray] | None = None, **dims) -> Path:
    """An HF folder; dtype float32|float16|bfloat16; weights overrides random_weights (for broken models)."""
    config = tiny_config(arch, **dims)
    weights = random_weights(config, seed) if weights is None else weights
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(arch)
    hf_config = {
        "architectures": [HF_CLASSES[arch]],
        "model_type": "gemma3_text" if arch == "gemma3" else arch, "hidden_size": config.hidden,
        "intermediate_size": config.ffn,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tied_embeddings, "vocab_size": config.vocab,
        "max_position_embeddings": config.max_context, "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS), "torch_dtype": dtype,
    }
    if arch in ("mistral", "phi3", "gemma3"):
        hf_config["sliding_window"] = config.sliding_window
    if arch == "gemma3":
        layers = ["sliding_attention" if config.local(i) else "full_attention" for i in range(config.n_layers)]
        hf_config.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=config.query_scale,
                         rope_local_base_freq=config.rope_local_theta, final_logit_softcapping=config.final_softcap,
                         attn_logit_softcapping=None, layer_types=layers)
        weights = {n: a - np.float32(1) if n.endswith("norm.weight") else a for n, a in weights.items()}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_safetensors(folder / "model.safetensors", fuse(config, weights), dtype)
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
        "eos_token": {"content": EOS, "special": True, "lstrip": False, "rstrip": False, "normalized": False},
        "add_bos_token": _adds_bos(arch), "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder


def fuse(config: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """phi3's files: q/k/v and gate/up concatenated into qkv_proj and gate_up_proj, as its checkpoints store them."""
    parts = fused_rows(config)
    if not parts:
        return weights
    out = {n: a for n, a in weights.items() if n not in parts}
    for fused in dict.fromkeys(f for f, _, _ in parts.values()):
        out[fused] = np.concatenate([weights[p] for p, (f, _, _) in parts.items() if f == fused])
    return out


def write_safetensors(path, tensors: dict[str, np.ndarray], dtype: str = "float32") -> Path:
    """A .safetensors file of float tensors stored as float32|float16|bfloat16 (bf16 rounded to nearest even)."""
    codes = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, np.float32)
        if dtype == "bfloat16":
            bits = a.view(np.uint32)
            blob = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
        else:
            blob = a.astype("<f4" if dtype == "float32" else "<f2").tobytes()
        header[name] = {"dtype": codes[dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # as the reference writer does, so the data stays aligned
    path = Path(path)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return path


def rewrite_safetensors_header(path, edit) -> None:
    """Apply edit(header dict) to a .safetensors file and write it back with the same tensor bytes:
    how tests make files whose header lies."""
    path = Path(path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])


def write_gguf(path, arch: str = "llama", seed: int = 0, qtype: str = "F32",
               weights: dict[str, np.ndarray] | None = None, **dims) -> Path:
    """The write_hf model as GGUF, laid out as llama.cpp's converter does (llama Q/K rows permuted).

    qtype (a GGMLQuantizationType name: F32, F16, Q8_0, Q4_0, ...) applies to the
    2-D weights; norms and biases stay F32, as in llama.cpp's files.
    """
    config = tiny_config(arch, **dims)
    weights = random_weights(config, seed) if weights is None else weights
    tok = tiny_tokenizer(arch)
    qt = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_context)
    w.add_embedding_length(config.hidden)
    w.add_feed_forward_length(config.ffn)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_vocab_size(config.vocab)
    if config.sliding_window is not None:
        w.add_sliding_window(config.sliding_window)
    if config.final_softcap is not None:
        w.add_float32(f"{arch}.final_logit_softcapping", config.final_softcap)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    if config.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(config.rope_scaling["rope_type"]))
        w.add_rope_scaling_factor(config.rope_scaling["factor"])
        if "original_max_position_embeddings" in config.rope_scaling:
            w.add_rope_scaling_orig_ctx_len(config.rope_scaling["original_max_position_embeddings"])

    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    pad = config.vocab - len(tokens)  # llama.cpp pads the list up to the embedding's rows
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(GGUF_PRE[arch])
    w.add_token_list(tokens + [f"[PAD{len(tokens) + i}]" for i in range(pad)])
    w.add_token_types(types + [gguf.TokenType.USER_DEFINED] * pad)
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(tok.token_to_id(BOS))
    w.add_eos_token_id(tok.token_to_id(EOS))
    w.add_add_bos_token(_adds_bos(arch))
    w.add_chat_template(CHAT_TEMPLATE)

    for name, a in fuse(config, weights).items():
        a = np.ascontiguousarray(a, np.float32)
        if arch in PERMUTED_ARCHS and (".q_proj." in name or ".k_proj." in name):
            a = llama_permute(a, config.n_heads if ".q_proj." in name else config.n_kv_heads)
        if a.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_tensor_name(name, arch), gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(gguf_tensor_name(name, arch), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str:
    """Inverse of models.gguf_loader.hf_tensor_name."""
    base, _, kind = hf_name.rpartition(".")
    for g, h in GGUF_GLOBAL_NAMES.items():
        if base == h:
            return f"{g}.{kind}"
    _, _, i, rest = base.split(".", 3)  # model.layers.{i}.<rest>
    return f"blk.{i}.{next(g for g, h in layer_names(arch).items() if h == rest)}.{kind}"


def _adds_bos(arch: str) -> bool:
    return arch != "qwen2"


def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode: the printable character standing for each byte, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars
