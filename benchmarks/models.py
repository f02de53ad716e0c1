"""Parameter sets for the benchmark, built in code from real architectures' shapes.

Nothing is downloaded: each function lists ``(name, shape)`` for every parameter of
the model as its reference implementation registers them (torchvision for
ResNet-50 and ViT-B/16, Hugging Face ``transformers`` for GPT-2 and TinyLlama).
BatchNorm running statistics are buffers, not parameters, and are left out, as
the EMA libraries compared here average parameters.
"""
from typing import Callable, Dict, List, Tuple

Shape = Tuple[int, ...]
ParamSpec = List[Tuple[str, Shape]]


def resnet50() -> ParamSpec:
    """torchvision ``resnet50()``: 161 tensors, 25,557,032 parameters."""
    spec: ParamSpec = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    in_ch = 64
    for layer, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        out_ch = width * 4  # Bottleneck.expansion
        for b in range(blocks):
            pre = f"layer{layer}.{b}"
            spec += [
                (f"{pre}.conv1.weight", (width, in_ch, 1, 1)),
                (f"{pre}.bn1.weight", (width,)), (f"{pre}.bn1.bias", (width,)),
                (f"{pre}.conv2.weight", (width, width, 3, 3)),
                (f"{pre}.bn2.weight", (width,)), (f"{pre}.bn2.bias", (width,)),
                (f"{pre}.conv3.weight", (out_ch, width, 1, 1)),
                (f"{pre}.bn3.weight", (out_ch,)), (f"{pre}.bn3.bias", (out_ch,)),
            ]
            if b == 0:
                spec += [
                    (f"{pre}.downsample.0.weight", (out_ch, in_ch, 1, 1)),
                    (f"{pre}.downsample.1.weight", (out_ch,)),
                    (f"{pre}.downsample.1.bias", (out_ch,)),
                ]
            in_ch = out_ch
    spec += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return spec


def gpt2_small() -> ParamSpec:
    """Hugging Face ``GPT2LMHeadModel`` (gpt2): 148 tensors, 124,439,808 parameters.

    ``lm_head.weight`` is tied to ``transformer.wte.weight`` and counted once, as
    ``model.parameters()`` yields it once.
    """
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    spec: ParamSpec = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (ctx, d))]
    for i in range(layers):
        pre = f"transformer.h.{i}"
        spec += [
            (f"{pre}.ln_1.weight", (d,)), (f"{pre}.ln_1.bias", (d,)),
            (f"{pre}.attn.c_attn.weight", (d, 3 * d)), (f"{pre}.attn.c_attn.bias", (3 * d,)),
            (f"{pre}.attn.c_proj.weight", (d, d)), (f"{pre}.attn.c_proj.bias", (d,)),
            (f"{pre}.ln_2.weight", (d,)), (f"{pre}.ln_2.bias", (d,)),
            (f"{pre}.mlp.c_fc.weight", (d, 4 * d)), (f"{pre}.mlp.c_fc.bias", (4 * d,)),
            (f"{pre}.mlp.c_proj.weight", (4 * d, d)), (f"{pre}.mlp.c_proj.bias", (d,)),
        ]
    spec += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return spec


def vit_b16() -> ParamSpec:
    """torchvision ``vit_b_16()``: 152 tensors, 86,567,656 parameters."""
    d, mlp, layers, patches = 768, 3072, 12, (224 // 16) ** 2 + 1
    spec: ParamSpec = [
        ("class_token", (1, 1, d)),
        ("conv_proj.weight", (d, 3, 16, 16)), ("conv_proj.bias", (d,)),
        ("encoder.pos_embedding", (1, patches, d)),
    ]
    for i in range(layers):
        pre = f"encoder.layers.encoder_layer_{i}"
        spec += [
            (f"{pre}.ln_1.weight", (d,)), (f"{pre}.ln_1.bias", (d,)),
            (f"{pre}.self_attention.in_proj_weight", (3 * d, d)),
            (f"{pre}.self_attention.in_proj_bias", (3 * d,)),
            (f"{pre}.self_attention.out_proj.weight", (d, d)),
            (f"{pre}.self_attention.out_proj.bias", (d,)),
            (f"{pre}.ln_2.weight", (d,)), (f"{pre}.ln_2.bias", (d,)),
            (f"{pre}.mlp.0.weight", (mlp, d)), (f"{pre}.mlp.0.bias", (mlp,)),
            (f"{pre}.mlp.3.weight", (d, mlp)), (f"{pre}.mlp.3.bias", (d,)),
        ]
    spec += [("encoder.ln.weight", (d,)), ("encoder.ln.bias", (d,)),
             ("heads.head.weight", (1000, d)), ("heads.head.bias", (1000,))]
    return spec


def many_small(count: int = 2000, numel: int = 1024) -> ParamSpec:
    """2000 tensors of 1024 elements: per-tensor overhead dominates."""
    return [(f"t{i}", (numel,)) for i in range(count)]


def many_tiny(count: int = 10_000) -> ParamSpec:
    """10,000 tensors of 0 to 5 elements: the update is nearly all per-tensor host work."""
    return [(f"t{i}", (i % 6,)) for i in range(count)]


def many_empty(count: int = 10_000) -> ParamSpec:
    """10,000 empty tensors: an update's host cost alone (time / 10,000 = cost per tensor,
    what a GPU user pays on every step before the kernel runs)."""
    return [(f"t{i}", (0,)) for i in range(count)]


def llama(d: int, inter: int, layers: int, vocab: int, kv: int) -> ParamSpec:
    """A Llama-2-architecture decoder (grouped-query attention with ``kv`` key/value
    features, SwiGLU MLP of width ``inter``, RMSNorm weights, untied head), as Hugging Face
    ``LlamaForCausalLM`` registers its parameters."""
    spec: ParamSpec = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        pre = f"model.layers.{i}"
        spec += [
            (f"{pre}.self_attn.q_proj.weight", (d, d)),
            (f"{pre}.self_attn.k_proj.weight", (kv, d)),
            (f"{pre}.self_attn.v_proj.weight", (kv, d)),
            (f"{pre}.self_attn.o_proj.weight", (d, d)),
            (f"{pre}.mlp.gate_proj.weight", (inter, d)),
            (f"{pre}.mlp.up_proj.weight", (inter, d)),
            (f"{pre}.mlp.down_proj.weight", (d, inter)),
            (f"{pre}.input_layernorm.weight", (d,)),
            (f"{pre}.post_attention_layernorm.weight", (d,)),
        ]
    spec += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    return spec


LLAMA_1B = dict(d=2048, inter=5632, layers=22, vocab=32000, kv=256)


def llama_1b() -> ParamSpec:
    """TinyLlama-1.1B (Llama 2 architecture, grouped-query attention, untied head):
    201 tensors, 1,100,048,384 parameters. Behind ``--large``: about 4.4 GB per fp32 copy."""
    return llama(**LLAMA_1B)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora(spec: ParamSpec, rank: int, targets=LORA_TARGETS) -> List[Tuple[str, Shape, bool]]:
    """A LoRA layout of ``spec``: every tensor frozen, and adapters ``lora_A`` (rank x in)
    and ``lora_B`` (out x rank) beside each 2-D weight of a ``targets`` module (peft's
    names, without its adapter name). ``(name, shape, trainable)`` for each tensor."""
    out = [(n, s, False) for n, s in spec]
    for n, s in spec:
        mod = n[:-len(".weight")] if n.endswith(".weight") else None
        if mod is not None and len(s) == 2 and mod.rsplit(".", 1)[-1] in targets:
            out += [(f"{mod}.lora_A.weight", (rank, s[1]), True),
                    (f"{mod}.lora_B.weight", (s[0], rank), True)]
    return out


def build_module(layout, dtype, device):
    """An ``nn.Module`` holding a parameter under each dotted name of ``layout``
    (``(name, shape)`` or ``(name, shape, trainable)``; default trainable), uninitialized
    (``torch.empty``; on ``device="meta"`` nothing is allocated)."""
    import torch
    from torch import nn

    root = nn.Module()
    for entry in layout:
        name, shape = entry[0], entry[1]
        trainable = entry[2] if len(entry) > 2 else True
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(
            torch.empty(shape, dtype=dtype, device=device), requires_grad=trainable))
    return root


def tiny() -> ParamSpec:
    """A few odd-sized tensors (and a scalar) for tests: not a real model."""
    return [("w0", (7, 5)), ("b0", (5,)), ("w1", (33, 17)), ("b1", (17,)), ("scale", ()),
            ("emb", (129, 3))]


# Timed by the calling thread's CPU time (runner._clock): nothing but host work runs.
HOST_COST_MODELS = ("many_empty",)

MODELS: Dict[str, Tuple[Callable[[], ParamSpec], str]] = {
    "resnet50": (resnet50, "ResNet-50"),
    "gpt2_small": (gpt2_small, "GPT-2 small"),
    "vit_b16": (vit_b16, "ViT-B/16"),
    "many_small": (many_small, "2000 x 1024"),
    "many_tiny": (many_tiny, "10,000 x 0..5"),
    "many_empty": (many_empty, "10,000 empty (host cost, thread CPU time)"),
    "llama_1b": (llama_1b, "TinyLlama-1.1B"),
    "tiny": (tiny, "tiny (tests)"),
}


def spec(name: str) -> ParamSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name][0]()


def label(name: str) -> str:
    return MODELS[name][1]


def numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
