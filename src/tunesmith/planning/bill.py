"""The memory bill: pure arithmetic on a model's config for one training setup, line by line.

Every line carries its formula and the precision regime it assumes. The peak is not the sum of all
lines: gradients, activations and the optimizer's temporaries live at different moments of a step,
so the bill adds up each moment (phase) and the total is the largest one.

Regimes (`precision`):

- ``fp32``: weights, gradients, AdamW moments and activations in fp32. What `tunesmith train` does
  when bf16 is off (this CPU: no AMX, so `train.bf16: auto` is off). 4 + 4 + 8 = 16 B per trainable
  parameter, 4 B per frozen one.
- ``amp``: what `tunesmith train` does with `train.bf16` on: fp32 weights, gradients and moments
  (16 B per trainable parameter), bf16 autocast activations. Autocast saves a bf16 copy of every
  weight it multiplies for the backward pass (2 B per linear parameter).
- ``bf16``: textbook mixed precision (DeepSpeed, FSDP MixedPrecision, the guide): bf16 weights and
  gradients, an fp32 master copy and fp32 moments: 2 + 2 + 4 + 4 + 4 = 16 B per trainable
  parameter, 2 B per frozen one. Adapters stay fp32 (PEFT upcasts them): 4 + 4 + 8 = 16 B.
- ``pure-bf16``: everything bf16, no master copy: 2 + 2 + 2 + 2 = 8 B per trainable parameter.

Activations are the tensors autograd saves for the backward pass, enumerated per decoder layer
for the transformers implementation of each family (see `activations`); tests compare the count
with what autograd really saves on small models of each family.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..config import MethodConfig
from ..errors import TunesmithError
from .spec import LinearSpec, ModelSpec

KiB, MiB, GiB = 1024, 1024**2, 1024**3

PRECISIONS = ("fp32", "amp", "bf16", "pure-bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "galore")
LOSSES = ("selective", "full")
LAYOUTS = ("padding_free", "padded")
REGIME_TEXT = {
    "fp32": "fp32 weights, gradients, AdamW moments and activations (tunesmith train with bf16 off)",
    "amp": "fp32 weights, gradients and moments; bf16 autocast activations (tunesmith train with bf16 on)",
    "bf16": "bf16 weights and gradients, fp32 master copy and moments (DeepSpeed/FSDP mixed precision)",
    "pure-bf16": "bf16 weights, gradients and AdamW moments, no master copy",
}
NF4_BLOCK = 64  # bitsandbytes 4-bit block size (one absmax per 64 weights)
NESTED_BLOCK = 256  # double quantization: one fp32 absmax per 256 first-level absmax bytes
BNB8_BLOCK, BNB8_MIN = 256, 4096  # bitsandbytes 8-bit optimizers: block size, smaller tensors stay 32-bit
CUDA_CONTEXT = int(0.75 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, outside max_memory_allocated
# torch's CPU runtime once training runs: 13 MiB of OpenMP pools and library state, plus GEMM packing
# buffers that grow with the widest matmul (hidden x 16384 x 4 B); both measured on this machine
CPU_RUNTIME_BASE = 13 * MiB
CPU_GEMM_BUFFER = 16384 * 4
CHUNK_TOKENS = 1024
GALORE_DEFAULT_TARGETS = ("self_attn", "mlp")


@dataclass
class Setup:
    """Everything about a run except the model and the method."""

    seq_len: int = 2048
    batch: int = 1
    grad_accum: int = 1
    precision: str = "fp32"
    checkpointing: bool = False
    optimizer: str = "adamw"
    devices: int = 1
    zero: int = 0
    loss: str = "selective"  # selective: tunesmith's chunked loss over supervised rows; full: transformers' loss
    chunk_tokens: int = CHUNK_TOKENS
    supervised_share: float = 1.0  # share of next-token targets that carry loss (selective loss only)
    layout: str = "padding_free"  # padding_free: the micro batch in one row (tunesmith's default); padded
    padded: Optional[bool] = None  # padded layout: rows of different lengths (a mask); default: batch > 1
    device: str = "cpu"  # cpu | cuda: dropout masks, runtime overhead
    fused_lora: bool = True  # train.fused_lora: LoRA branches keep x, a 1-byte mask and A x (methods/fused_lora.py)
    packed_attention: bool = True  # padding-free rows: one causal sdpa call per example, no mask (train/attention.py)

    def validate(self) -> "Setup":
        def bad(msg: str):
            raise TunesmithError(msg)

        if self.precision not in PRECISIONS:
            bad(f"precision '{self.precision}': use one of {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer '{self.optimizer}': use one of {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES:
            bad(f"loss '{self.loss}': use selective or full")
        if self.layout not in LAYOUTS:
            bad(f"layout '{self.layout}': use padding_free or padded")
        if self.device not in ("cpu", "cuda"):
            bad(f"device '{self.device}': use cpu or cuda")
        for name in ("seq_len", "batch", "grad_accum", "devices", "chunk_tokens"):
            if getattr(self, name) < 1:
                bad(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.zero not in (0, 1, 2, 3):
            bad(f"zero stage {self.zero}: use 0 (DDP), 1, 2 or 3 (= FSDP full sharding)")
        if not 0 < self.supervised_share <= 1:
            bad("supervised_share must be in (0, 1]")
        return self

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch

    @property
    def is_padded(self) -> bool:
        """Does attention get a mask? Padded rows of different lengths, or several examples in one row."""
        if self.layout == "padding_free":
            return self.batch > 1
        return self.batch > 1 if self.padded is None else self.padded

    @property
    def rows(self) -> tuple[int, int]:
        """(rows, row length) of the micro batch as the model sees it."""
        return (1, self.tokens) if self.layout == "padding_free" else (self.batch, self.seq_len)

    @property
    def supervised(self) -> int:
        """Next-token targets that carry loss (each example's first token predicts nothing)."""
        return max(1, int(self.batch * (self.seq_len - 1) * self.supervised_share))


@dataclass
class Line:
    key: str
    label: str
    bytes: int
    formula: str
    assumes: str
    why: str
    phases: tuple[str, ...] = ()

    @property
    def gib(self) -> float:
        return self.bytes / GiB


@dataclass
class Bill:
    model: str
    method: str
    setup: dict
    spec: dict
    total_params: int
    trainable_params: int
    trainable_detail: str
    lines: list[Line]
    phases: dict[str, int]
    peak_phase: str
    peak: int  # what the measurement sees: max over phases (+ CPU runtime on CPU)
    total: int  # peak + overhead not seen by the measurement (CUDA context)
    budget: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.budget is None else self.total <= self.budget

    def line(self, key: str) -> Line:
        for l in self.lines:
            if l.key == key:
                return l
        raise KeyError(key)

    def as_dict(self) -> dict:
        d = {
            "model": self.model,
            "method": self.method,
            "setup": self.setup,
            "spec": self.spec,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "trainable_detail": self.trainable_detail,
            "lines": [{**asdict(l), "gib": round(l.gib, 4)} for l in self.lines],
            "phases": {k: {"bytes": v, "gib": round(v / GiB, 4)} for k, v in self.phases.items()},
            "peak_phase": self.peak_phase,
            "peak_bytes": self.peak,
            "total_bytes": self.total,
            "total_gib": round(self.total / GiB, 3),
            "budget_bytes": self.budget,
            "fits": self.fits,
            "notes": self.notes,
        }
        return d


# ---- sizes ------------------------------------------------------------------------------------
def parse_size(text) -> int:
    """'24GiB', '24GB', '24g', '512MiB', 24 (GiB) -> bytes. GB means GiB here, as on GPU spec sheets."""
    if isinstance(text, (int, float)):
        return int(text * GiB)
    s = str(text).strip().lower().replace(" ", "")
    units = {"tib": 1024**4, "tb": 1024**4, "t": 1024**4, "gib": GiB, "gb": GiB, "g": GiB,
             "mib": MiB, "mb": MiB, "m": MiB, "kib": KiB, "kb": KiB, "k": KiB, "b": 1, "": GiB}
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            number = s[: len(s) - len(unit)] if unit else s
            try:
                return int(float(number) * units[unit])
            except ValueError:
                break
    raise TunesmithError(f"budget '{text}': write a size such as 24GiB, 80GB or 512MiB")


def fmt_bytes(n: float) -> str:
    n = float(n)
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    if abs(n) >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{int(n)} B"


def fmt_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


# ---- which parameters train -------------------------------------------------------------------
@dataclass
class Trainability:
    """What a method trains: base parameter names, and adapters per targeted linear."""

    kind: str  # full | freeze | adapter
    base_names: set[str]
    adapter: Optional[str] = None  # lora | dora | vera | adalora
    targets: tuple[LinearSpec, ...] = ()
    r: int = 0
    dropout: bool = False
    adapter_params: int = 0
    detail: str = ""
    fusable: bool = False  # plain LoRA on full-precision linears: train.fused_lora applies

    def layer_trains(self, spec: ModelSpec, i: int) -> bool:
        prefix = f"model.layers.{i}."
        return any(n.startswith(prefix) for n in self.base_names)

    def trains(self, name: str) -> bool:
        return name in self.base_names

    def adapted(self, lin: LinearSpec) -> bool:
        return any(t.path == lin.path for t in self.targets)


def target_linears(spec: ModelSpec, target_modules) -> tuple[LinearSpec, ...]:
    """PEFT's matching: `all-linear` is every linear but the lm_head; a name matches a module whose
    dotted path is that name or ends with '.' + name."""
    if target_modules == "all-linear" or target_modules is None:
        return spec.linears
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen = tuple(l for l in spec.linears if any(n == l.name or n == l.path or l.path.endswith("." + n) for n in names))
    if not chosen:
        raise TunesmithError(
            f"method.target_modules = {names!r} matches no linear layer of this model; its linear layers are "
            f"{', '.join(l.name for l in spec.linears)}"
        )
    return chosen


def trainability(spec: ModelSpec, m: MethodConfig) -> Trainability:
    names = [n for n, _ in spec.named_parameters()]
    L = spec.layers
    if m.name in ("full", "galore"):
        return Trainability("full", set(names), detail="every parameter")
    if m.name == "freeze":
        if m.trainable_modules:
            chosen = {n for n in names if any(key in n for key in m.trainable_modules)}
            if not chosen:
                raise TunesmithError(
                    f"method.trainable_modules = {m.trainable_modules} matches no parameter; names look like {names[1]}"
                )
            return Trainability("freeze", chosen, detail=f"parameters whose name contains {', '.join(m.trainable_modules)}")
        k = m.trainable_layers or 2
        if k > L:
            raise TunesmithError(f"method.trainable_layers = {k} but the model has {L} layers")
        prefixes = tuple(f"model.layers.{i}." for i in range(L - k, L))
        return Trainability("freeze", {n for n in names if n.startswith(prefixes)}, detail=f"the last {k} of {L} layers")
    targets = target_linears(spec, m.target_modules)
    per_layer = 0
    kind = {"lora": "lora", "loraplus": "lora", "qlora": "lora", "dora": "dora", "vera": "vera", "adalora": "adalora"}[m.name]
    r = m.init_r if kind == "adalora" else m.r
    for t in targets:
        if kind == "vera":
            per_layer += r + t.out_features  # lambda_d (r) and lambda_b (d_out); A, B are shared frozen buffers
        elif kind == "adalora":
            per_layer += r * (t.in_features + t.out_features) + r  # A, B and the singular values E
        else:
            per_layer += r * (t.in_features + t.out_features) + (t.out_features if kind == "dora" else 0)
    formula = {
        "lora": "r x (d_in + d_out)",
        "dora": "r x (d_in + d_out) + d_out (magnitude)",
        "vera": "r + d_out (scaling vectors d and b)",
        "adalora": "init_r x (d_in + d_out) + init_r",
    }[kind]
    detail = f"{L} layers x [{', '.join(t.name for t in targets)}]: {formula} per module, r={r}"
    return Trainability("adapter", set(), kind, targets, r, m.dropout > 0, per_layer * L, detail,
                        fusable=m.name in ("lora", "loraplus"))


def adapter_tensors(tr: Trainability) -> list[int]:
    """Sizes of the trainable tensors one decoder layer's adapters add."""
    out: list[int] = []
    for t in tr.targets:
        if tr.adapter == "vera":
            out += [tr.r, t.out_features]
        else:
            out += [tr.r * t.in_features, t.out_features * tr.r]
            if tr.adapter == "dora":
                out.append(t.out_features)
            if tr.adapter == "adalora":
                out.append(tr.r)
    return out


def trainable_count(spec: ModelSpec, m: MethodConfig) -> int:
    t = trainability(spec, m)
    if t.kind == "adapter":
        return t.adapter_params
    sizes = dict(spec.named_parameters())
    return sum(math.prod(sizes[n]) for n in t.base_names)


def lora_count(hidden: int, rank: int, layers: int, modules: int = 1) -> int:
    """The guide's square-matrix formula done right: r x (d + d) per module, per layer."""
    return rank * 2 * hidden * modules * layers


# ---- activations ------------------------------------------------------------------------------
@dataclass
class _Ctx:
    spec: ModelSpec
    tr: Trainability
    setup: Setup
    ab: int  # bytes of a saved matmul-path activation
    nb: int  # bytes of a saved norm input (the residual stream)
    mask_b: int  # dropout: CPU saves a float noise tensor, CUDA a bool mask


def _ctx(spec: ModelSpec, tr: Trainability, setup: Setup) -> _Ctx:
    ab = 4 if setup.precision == "fp32" else 2
    nb = 4  # fp32 residual (amp) / the fp32 upcast RMSNorm saves (bf16)
    mask_b = ab if setup.device == "cpu" else 1
    if setup.precision == "amp" and setup.device == "cpu":
        mask_b = 4  # dropout runs outside autocast on the fp32 stream
    return _Ctx(spec, tr, setup, ab, nb, mask_b)


def _norm(c: _Ctx, T: int, x_rg: bool, w_trains: bool, out: dict, tag: str) -> bool:
    """RMSNorm: pow/mul save x and 1/rms when x needs a gradient; weight * x_hat saves x_hat for the weight."""
    h = c.spec.hidden
    if x_rg:
        out[f"{tag} input"] = out.get(f"{tag} input", 0) + T * h * c.nb
        out["norm statistics"] = out.get("norm statistics", 0) + T * 4
    if w_trains:
        out[f"{tag} normalized"] = out.get(f"{tag} normalized", 0) + T * h * c.ab
    if c.spec.model_type == "gemma2" and (x_rg or w_trains):
        out["norm statistics"] = out.get("norm statistics", 0) + h * 4  # Gemma scales by (1 + weight)
    return x_rg or w_trains


def _add(out: dict, key: str, n: int) -> None:
    out[key] = out.get(key, 0) + n


def _linear(c: _Ctx, T: int, lin: LinearSpec, x_rg: bool, layer: int, out: dict) -> tuple[bool, bool]:
    """Saved tensors of one linear (and its adapter). Returns (output needs grad, input must be kept)."""
    tr = c.tr
    w_trains = tr.trains(f"model.layers.{layer}.{lin.path}.weight")
    keep_input = w_trains  # dW = dY^T X needs X
    adapted = tr.adapter is not None and tr.adapted(lin)
    if adapted:
        r, d_in, d_out = tr.r, lin.in_features, lin.out_features
        if tr.adapter == "vera":
            # dropout(x) -> x A^T (frozen A) -> * d -> B (frozen) -> * b: saves xA (for d) and the B output (for b)
            if tr.dropout and x_rg:
                _add(out, "adapter dropout masks", T * d_in * c.mask_b)
            _add(out, "adapter low-rank outputs", T * r * c.ab + T * d_out * c.ab)
        elif tr.fusable and c.setup.fused_lora:
            # one Function per layer: x (shared with every projection that reads it), the mask, A x
            keep_input = True
            if tr.dropout:
                _add(out, "adapter dropout masks", T * d_in)  # bool
            _add(out, "adapter low-rank outputs", T * r * c.ab)
        else:
            if tr.dropout:
                _add(out, "adapter dropout outputs", T * d_in * c.ab)  # lora_A saves its (dropped-out) input
                if x_rg:
                    _add(out, "adapter dropout masks", T * d_in * c.mask_b)
            else:
                keep_input = True
            _add(out, "adapter low-rank outputs", T * r * c.ab)  # lora_B saves A x
            if tr.adapter == "dora":
                # the magnitude's gradient needs the base and the LoRA result; the (detached) weight
                # norm and the scale are d_out vectors
                _add(out, "DoRA base and LoRA results", (2 * T * d_out + 3 * d_out) * c.ab)
            if tr.adapter == "adalora":
                _add(out, "adapter low-rank outputs", r * d_in * c.ab)  # A * E
    return (x_rg or w_trains or adapted), keep_input


def _layer(c: _Ctx, T: int, i: int, rg_in: bool) -> tuple[dict, bool]:
    """Bytes autograd saves in decoder layer i for T tokens; and whether its output needs a gradient."""
    s = c.spec
    st = c.setup
    out: dict[str, int] = {}
    lin = {l.name: l for l in s.linears}
    p = f"model.layers.{i}."
    norm_tr = lambda name: c.tr.trains(f"{p}{name}.weight")  # noqa: E731
    # attention block
    y_rg = _norm(c, T, rg_in, norm_tr("input_layernorm"), out, "attention norm")
    keep_y = False
    if s.fused_qkv:
        qkv_rg, k_in = _linear(c, T, lin["qkv_proj"], y_rg, i, out)
        keep_y |= k_in
        attn_rg = qkv_rg
        rgs = [qkv_rg] * 3
    else:
        rgs = []
        for name in ("q_proj", "k_proj", "v_proj"):
            rg, k_in = _linear(c, T, lin[name], y_rg, i, out)
            rgs.append(rg)
            keep_y |= k_in
        attn_rg = any(rgs)
    if keep_y:
        _add(out, "linear inputs", T * s.hidden * c.ab)
    q_w, kv_w = s.heads * s.head_dim, s.kv_heads * s.head_dim
    b, n = st.rows
    packed = st.layout == "padding_free" and st.packed_attention and s.attention == "sdpa"
    masked = st.is_padded and not packed  # packed rows: each example alone, causal, no mask
    repeat = s.kv_heads < s.heads and (s.attention == "eager" or masked)
    kv_saved = q_w if repeat else kv_w
    if attn_rg and s.attention == "sdpa":
        # the flash kernel's backward keeps q and k (after RoPE), v, the output and the logsumexp
        _add(out, "attention q, k, v, output", T * (q_w + 2 * kv_saved + q_w) * c.ab)
        _add(out, "attention logsumexp", T * s.heads * 4)
        if masked:
            _add(out, "attention mask", b * n * n * c.ab)
    elif attn_rg:
        # eager: scores = q k^T keeps k (for dq) and q (for dk); softmax (and tanh soft-capping) keep
        # the b x heads x s x s scores; probs @ v keeps v (and probs, already kept)
        q_rg, k_rg, v_rg = rgs if not s.fused_qkv else (attn_rg,) * 3
        s_rg = q_rg or k_rg
        kept = (T * q_w if q_rg else 0) + (T * q_w if k_rg else 0) + (T * q_w if s_rg else 0)
        _add(out, "attention q, k, v, output", kept * c.ab)
        probs = b * s.heads * n * n
        if s_rg:
            _add(out, "attention scores (s x s)", probs * 4 + (probs * c.ab if c.ab != 4 else 0))
            if s.attn_softcap:
                _add(out, "attention scores (s x s)", probs * c.ab)  # tanh soft-capping saves its output
        elif v_rg:
            _add(out, "attention scores (s x s)", probs * c.ab)
    o_rg, o_keep = _linear(c, T, lin["o_proj"], attn_rg, i, out)
    if o_keep and (s.attention == "eager" or s.fused_qkv or (packed and st.batch > 1)):
        # else sdpa's saved output is that input (same storage); packed rows concatenate the examples' outputs
        _add(out, "linear inputs", T * q_w * c.ab)
    if "post_attention_layernorm" in s.norms and s.model_type == "gemma2":
        o_rg = _norm(c, T, o_rg, norm_tr("post_attention_layernorm"), out, "post-attention norm")
    h1_rg = rg_in or o_rg
    # MLP block
    pre_mlp = "pre_feedforward_layernorm" if s.model_type == "gemma2" else "post_attention_layernorm"
    y2_rg = _norm(c, T, h1_rg, norm_tr(pre_mlp), out, "mlp norm")
    I = s.intermediate
    keep_y2 = False
    if s.fused_gate_up:
        gu_rg, k_in = _linear(c, T, lin["gate_up_proj"], y2_rg, i, out)
        keep_y2 |= k_in
        g_rg = u_rg = gu_rg
        if gu_rg:
            _add(out, "mlp gate/up/act", T * 2 * I * c.ab + T * I * c.ab)  # gate_up storage + act(gate)
    else:
        g_rg, k1 = _linear(c, T, lin["gate_proj"], y2_rg, i, out)
        u_rg, k2 = _linear(c, T, lin["up_proj"], y2_rg, i, out)
        keep_y2 |= k1 or k2
        saved = (T * I if g_rg else 0) + (T * I if u_rg else 0) + (T * I if g_rg else 0)  # g, act(g), u
        if saved:
            _add(out, "mlp gate/up/act", saved * c.ab)
    if keep_y2:
        _add(out, "linear inputs", T * s.hidden * c.ab)
    p_rg = g_rg or u_rg
    d_rg, d_keep = _linear(c, T, lin["down_proj"], p_rg, i, out)
    if d_keep:
        _add(out, "linear inputs", T * I * c.ab)
    if s.model_type == "gemma2":
        d_rg = _norm(c, T, d_rg, norm_tr("post_feedforward_layernorm"), out, "post-mlp norm")
    return out, (h1_rg or d_rg)


def effective_loss(spec: ModelSpec, tr: Trainability, setup: Setup) -> str:
    """tunesmith falls back to transformers' full loss for AdaLoRA (its regulariser lives in the
    model's forward) and for models with logit soft-capping (Gemma 2)."""
    if setup.loss == "full" or spec.final_softcap or tr.adapter == "adalora":
        return "full"
    return "selective"


@dataclass
class Activations:
    saved: int  # everything saved at the end of the forward pass (log-softmax included)
    per_layer: dict  # breakdown of one middle layer
    layer_bytes: int  # one middle layer (what checkpointing recomputes at a time)
    checkpoint_inputs: int
    head: int  # final norm, lm_head input, rope tables, indices
    logits_saved: int  # full: log-softmax output (and soft-capping); selective: the gradients it keeps
    logits_transient: int  # the loss's buffers on top of the saved ones at its worst moment
    formula: str
    loss: str = "selective"


def activations(spec: ModelSpec, tr: Trainability, setup: Setup) -> Activations:
    c = _ctx(spec, tr, setup)
    T = setup.tokens
    # Does the input of layer 0 need a gradient? Only if the embedding trains, or PEFT's
    # enable_input_require_grads under checkpointing.
    embed_tr = tr.trains("model.embed_tokens.weight")
    rg = embed_tr or (setup.checkpointing and tr.kind != "full")
    layer_sets = []
    outs = []
    for i in range(spec.layers):
        out, rg = _layer(c, T, i, rg)
        outs.append(out)
        layer_sets.append(sum(out.values()))
    middle = outs[spec.layers // 2]
    # final norm + head
    head: dict[str, int] = {}
    lm_tr = tr.trains("lm_head.weight") or (spec.tied and embed_tr)
    loss = effective_loss(spec, tr, setup)
    y_rg = _norm(c, T, rg, tr.trains("model.norm.weight"), head, "final norm")
    if lm_tr and loss == "full":
        _add(head, "lm_head input", T * spec.hidden * c.ab)
    _add(head, "rope tables", 2 * setup.rows[1] * spec.head_dim * c.ab)
    _add(head, "token ids", T * 8 * (2 if embed_tr else 1))  # the loss keeps the labels; the embedding its ids
    head_bytes = sum(head.values())
    V, h = spec.vocab, spec.hidden
    if loss == "full":
        # transformers' loss: log-softmax (fp32) of every position is saved; its backward adds the nll
        # gradient and the log-softmax gradient, two more fp32 tokens x vocab buffers
        logits_saved = T * V * 4 + (T * V * c.ab if spec.final_softcap else 0)
        logits_transient = 2 * T * V * 4
    else:
        # tunesmith's selective loss: the gradients for the hidden rows (and the lm_head) are built in
        # the forward pass and saved; per chunk of C rows: logits, logits - lse and exp(...) (3 C x V fp32)
        N = setup.supervised
        C = min(setup.chunk_tokens, N)
        logits_saved = N * h * c.ab + (V * h * 4 if lm_tr else 0)
        logits_transient = N * h * c.ab + 3 * C * V * 4 + (V * h * 4 if lm_tr else 0)
    if setup.checkpointing:
        ckpt = spec.layers * T * spec.hidden * c.nb
        layer_max = max(layer_sets)
        saved = ckpt + head_bytes + logits_saved
        formula = (f"checkpointing: layers x tokens x hidden x {c.nb} B = {spec.layers} x {T} x {spec.hidden} x {c.nb} "
                   f"(each layer's input) + one layer recomputed in backward ({fmt_bytes(layer_max)})")
    else:
        ckpt, layer_max = 0, max(layer_sets)
        saved = sum(layer_sets) + head_bytes + logits_saved
        per_tok = layer_max / T
        formula = (f"sum over {spec.layers} layers of the tensors autograd saves (one middle layer: "
                   f"{per_tok:,.0f} B/token x {T} tokens = {fmt_bytes(layer_max)})")
    return Activations(saved, middle, layer_max, ckpt, head_bytes, logits_saved, logits_transient, formula, loss)


# ---- the bill ---------------------------------------------------------------------------------
def _nf4_bytes(n: int, double_quant: bool) -> int:
    blocks = -(-n // NF4_BLOCK)
    if double_quant:
        nested = -(-blocks // NESTED_BLOCK)
        return -(-n // 2) + blocks + nested * 4 + 4 + 256 * 4 + 16 * 4  # + offset, nested code, NF4 map
    return -(-n // 2) + blocks * 4 + 16 * 4


def _galore_targets(spec: ModelSpec, m: MethodConfig) -> tuple[LinearSpec, ...]:
    if m.target_modules == "all-linear":
        return spec.linears
    return target_linears(spec, m.target_modules)


def compute_bill(model, method: MethodConfig | dict | str | None = None, setup: Setup | None = None,
                 budget=None) -> Bill:
    """The memory bill of training `model` with `method` under `setup` (see Setup)."""
    from .spec import load_spec

    spec = load_spec(model)
    if method is None:
        method = MethodConfig()
    elif isinstance(method, str):
        method = MethodConfig(name=method)
    elif isinstance(method, dict):
        method = MethodConfig(**method)
    setup = (setup or Setup()).validate()
    if method.name == "galore":
        setup.optimizer = "galore"
    elif setup.optimizer == "galore":
        raise TunesmithError("optimizer galore is method galore: set --method galore (GaLore trains full-rank weights)")
    tr = trainability(spec, method)
    p = setup.precision
    named = spec.named_parameters()
    sizes = {n: math.prod(s) for n, s in named}
    total = spec.total_params
    lines: list[Line] = []
    notes: list[str] = []
    N, Z = setup.devices, setup.zero

    # trainable parameters ------------------------------------------------------------------------
    if tr.kind == "adapter":
        n_train = tr.adapter_params
        train_tensors = adapter_tensors(tr) * spec.layers
    else:
        n_train = sum(sizes[n] for n in tr.base_names)
        train_tensors = [sizes[n] for n in tr.base_names]
    n_frozen = total - (n_train if tr.kind != "adapter" else 0)
    adapter_fp32 = tr.kind == "adapter"
    w_b = 4 if p in ("fp32", "amp") else 2  # bytes of a base weight
    tw_b = 4 if adapter_fp32 else w_b  # bytes of a trainable weight
    g_b = tw_b if p != "bf16" else (4 if adapter_fp32 else 2)
    master_b = 4 if (p == "bf16" and not adapter_fp32) else 0
    mom_b = 2 if p == "pure-bf16" else 4

    # weights --------------------------------------------------------------------------------------
    if method.name == "qlora":
        quant = [(n, sizes[n]) for n, _ in named if n.startswith("model.layers.") and n.endswith("proj.weight")]
        q_params = sum(v for _, v in quant)
        q_bytes = sum(_nf4_bytes(v, method.double_quant) for _, v in quant)
        other = total - q_params
        w_bytes = q_bytes + other * w_b + n_train * tw_b
        dq = "double-quantized" if method.double_quant else "fp32"
        wformula = (f"{fmt_count(q_params)} linear weights in 4-bit {method.quant_type.upper()}: 0.5 B + {dq} absmax "
                    f"per {NF4_BLOCK} ({'1 B + 4 B per 256 blocks' if method.double_quant else '4 B'}) = {fmt_bytes(q_bytes)}; "
                    f"{fmt_count(other)} others (embeddings, norms{', lm_head' if not spec.tied else ''}) x {w_b} B; "
                    f"{fmt_count(n_train)} adapter x {tw_b} B")
        wassume = f"bitsandbytes NF4 storage; non-linear weights at {'fp32' if w_b == 4 else 'bf16'}"
    else:
        w_bytes = n_frozen * w_b + n_train * tw_b
        wformula = f"{fmt_count(total)} base parameters x {w_b} B"
        if tr.kind == "adapter":
            wformula += f" + {fmt_count(n_train)} adapter x {tw_b} B"
        wassume = REGIME_TEXT[p]
    shard_w = ""
    if Z >= 3 and N > 1:
        w_bytes = -(-w_bytes // N)
        shard_w = f"; / {N} devices (ZeRO-3/FSDP shards weights)"
    lines.append(Line("weights", "weights", w_bytes, wformula + shard_w, wassume,
                      "The model's parameters stay in memory for the whole run; their dtype sets the bytes per parameter.",
                      ("all",)))
    lines.append(Line("trainable", f"trainable parameters: {n_train:,} ({100 * n_train / total:.3f}%)", 0,
                      tr.detail, "exact count; PEFT's get_nb_trainable_parameters gives the same number",
                      "Only these get gradients and optimizer states; everything else is frozen.", ()))

    # gradients ------------------------------------------------------------------------------------
    layerwise = method.name == "galore" and method.galore_optim == "galore_adamw_layerwise"
    g_count = n_train
    if layerwise:
        g_count = max(train_tensors) if train_tensors else 0
    g_bytes = g_count * g_b
    gformula = f"{fmt_count(g_count)} x {g_b} B"
    if layerwise:
        gformula = f"largest tensor {fmt_count(g_count)} x {g_b} B (layer-wise: each gradient is freed after its update)"
    if Z >= 2 and N > 1:
        g_bytes = -(-g_bytes // N)
        gformula += f" / {N} devices (ZeRO-2 shards gradients)"
    lines.append(Line("gradients", "gradients", g_bytes, gformula,
                      "bf16 gradients" if g_b == 2 else "fp32 gradients",
                      "One gradient per trainable parameter, alive from the backward pass until the optimizer step "
                      "(across all micro batches with gradient accumulation).", ("backward", "step")))
    if Z == 0 and N > 1:
        lines.append(Line("ddp_buckets", "DDP gradient buckets", n_train * g_b, f"{fmt_count(n_train)} x {g_b} B",
                          "torch DDP default (gradient_as_bucket_view=False)",
                          "DDP copies gradients into flat buckets for the all-reduce.", ("backward", "step")))

    # optimizer states -----------------------------------------------------------------------------
    ws_step = 0
    if setup.optimizer == "adamw":
        s_bytes = n_train * 2 * mom_b
        sformula = f"{fmt_count(n_train)} x (4 + 4) B (exp_avg, exp_avg_sq)" if mom_b == 4 else \
            f"{fmt_count(n_train)} x (2 + 2) B (bf16 moments)"
        sassume = "torch AdamW, fp32 moments" if mom_b == 4 else "AdamW with bf16 moments"
        # MethodTrainer's groups: >=2-D tensors (decay) and 1-D (no decay); foreach AdamW makes one
        # sqrt(exp_avg_sq) temporary for a whole group at once
        if tr.kind == "adapter":
            ws_step = n_train * mom_b
        else:
            big = sum(sizes[n] for n in tr.base_names if len(dict(named)[n]) >= 2)
            ws_step = max(big, n_train - big) * mom_b
        wsformula = f"foreach AdamW: sqrt(exp_avg_sq) for the largest parameter group ({fmt_count(ws_step // mom_b)} x {mom_b} B)"
    elif setup.optimizer == "adamw8bit":
        s_bytes = 0
        for v in train_tensors:
            s_bytes += v * 8 if v < BNB8_MIN else 2 * v + 2 * 4 * (-(-v // BNB8_BLOCK))
        sformula = f"{fmt_count(n_train)} x (1 + 1) B + an fp32 absmax per {BNB8_BLOCK} values (tensors < {BNB8_MIN} stay 32-bit)"
        sassume = "bitsandbytes AdamW8bit, blockwise"
        ws_step = 0
        wsformula = "fused 8-bit kernel: no full-size temporaries"
    else:  # galore
        targets = _galore_targets(spec, method)
        r = method.galore_rank
        s_bytes = 0
        proj = 0
        targeted_params = 0
        big_target = 0
        for t in targets:
            m_, n_ = t.out_features, t.in_features
            k = min(r, m_, n_)
            if method.galore_optim == "galore_adafactor":
                s_bytes += (k + max(m_, n_)) * 4
            else:
                s_bytes += 2 * k * max(m_, n_) * 4
            proj += min(m_, n_) ** 2 * 4  # galore-torch keeps the whole SVD factor the projector slices
            targeted_params += m_ * n_
            big_target = max(big_target, m_ * n_)
        s_bytes *= spec.layers
        proj *= spec.layers
        targeted_params *= spec.layers
        rest = total - targeted_params
        s_bytes += rest * 8 if method.galore_optim != "galore_adafactor" else rest * 4
        s_bytes += proj
        sformula = (f"targeted {len(targets)} x {spec.layers} matrices (m x n): moments 2 x rank x max(m, n) x 4 B with rank {r}, "
                    f"plus the projector min(m, n)^2 x 4 B ({fmt_bytes(proj)}); other {fmt_count(rest)} parameters x 8 B")
        sassume = f"galore-torch {method.galore_optim} (HF optim_target_modules)"
        notes.append("galore-torch 1.0 slices the projector out of the full SVD factor, so each targeted matrix keeps "
                     "min(m, n)^2 floats instead of rank x min(m, n): the bill counts what it really keeps.")
        largest_rest = max([spec.embed_params] + [spec.lm_head_params])
        ws_step = max(2 * big_target * 4, 2 * largest_rest * 4)
        wsformula = ("per-tensor loop: update and projection back of the largest matrix (2 x m x n x 4 B) or "
                     "sqrt/denominator of the largest untargeted tensor (2 x n x 4 B)")
    if Z >= 1 and N > 1:
        s_bytes = -(-s_bytes // N)
        sformula += f" / {N} devices (ZeRO-1 shards optimizer states)"
        ws_step = -(-ws_step // N)
    lines.append(Line("optimizer", "optimizer states", s_bytes, sformula, sassume,
                      "Adam keeps two running averages per trainable parameter for the whole run.", ("all",)))
    m_bytes = n_train * master_b
    if Z >= 1 and N > 1:
        m_bytes = -(-m_bytes // N)
    lines.append(Line("master", "fp32 master copies", m_bytes,
                      f"{fmt_count(n_train)} x 4 B" if master_b else
                      ("none: the trainable weights are already fp32" if p in ("fp32", "amp") or adapter_fp32 else "none (pure bf16)"),
                      REGIME_TEXT[p],
                      "Mixed precision updates an fp32 copy so that small updates are not lost in bf16.", ("all",)))

    # activations and logits -----------------------------------------------------------------------
    act = activations(spec, tr, setup)
    act_b = 4 if p == "fp32" else 2
    a_layers = act.saved - act.logits_saved
    amp_copies = 0
    if p == "amp":
        # 4-bit linears dequantize inside bitsandbytes and save only the packed weight
        # with checkpointing only the layer being recomputed keeps its copies
        layers_kept = 1 if setup.checkpointing else spec.layers
        linear = 0 if method.name == "qlora" else layers_kept * spec.layer_linear_params
        amp_copies = (linear + spec.vocab * spec.hidden) * 2
    act_assume = {"fp32": "fp32 activations", "amp": "bf16 matmul activations, fp32 residual stream (approximate)",
                  "bf16": "bf16 activations, fp32 norm statistics (approximate)",
                  "pure-bf16": "bf16 activations, fp32 norm statistics (approximate)"}[p]
    attn_note = "sdpa (flash kernel: no s x s matrix)" if spec.attention == "sdpa" else "eager attention (s x s scores saved)"
    lines.append(Line("activations", "activations (saved for backward)", a_layers,
                      f"{act.formula}; micro batch {setup.batch} x {setup.seq_len} tokens; {attn_note}"
                      + ("; padded batch: k/v repeated for the mask" if setup.layout == "padded" and setup.is_padded
                         and spec.kv_heads < spec.heads else "")
                      + ("; packed rows: attention per example" if setup.layout == "padding_free" and setup.batch > 1
                         and setup.packed_attention and spec.attention == "sdpa" else ""),
                      act_assume + ("; with gradient checkpointing" if setup.checkpointing else "; no checkpointing"),
                      "Every op keeps the inputs its backward needs until the backward pass reaches it.",
                      ("forward", "backward")))
    if amp_copies:
        lines.append(Line("autocast_copies", "autocast bf16 weight copies", amp_copies,
                          ("the lm_head" if method.name == "qlora" else "every linear weight and the lm_head")
                          + " x 2 B, saved for the backward pass", "amp",
                          "Autocast casts each fp32 weight to bf16 for the matmul and autograd keeps that copy.",
                          ("forward", "backward")))
    if act.loss == "full":
        lformula = (f"3 x {setup.tokens:,} positions x {spec.vocab:,} vocab x 4 B (log-softmax saved + nll and "
                    "log-softmax gradients)")
        lassume = "transformers' cross-entropy over every position"
        if setup.loss != "full":
            lassume += " (tunesmith falls back to it for AdaLoRA and soft-capped logits)"
    else:
        N = setup.supervised
        C = min(setup.chunk_tokens, N)
        lformula = (f"{N:,} supervised rows x {spec.hidden} x {act_b} B (hidden gradients kept) x 2 + 3 x chunk of "
                    f"{C:,} rows x {spec.vocab:,} vocab x 4 B" + (" + lm_head gradient 2 x vocab x hidden x 4 B"
                                                                   if act.logits_saved > N * spec.hidden * act_b else ""))
        lassume = "tunesmith's selective chunked cross-entropy (train.selective_loss, the default)"
    lines.append(Line("logits", "logits and loss buffers", act.logits_saved + act.logits_transient, lformula, lassume,
                      "The loss turns each position into a vocabulary-sized fp32 row; only the supervised rows, "
                      "one chunk at a time, with the selective loss.", ("forward", "backward")))

    # workspaces -----------------------------------------------------------------------------------
    embed_tr = tr.trains("model.embed_tokens.weight")
    ws_bwd = 0
    bwd_parts = []
    if embed_tr:
        ws_bwd = 2 * spec.embed_params * g_b
        bwd_parts.append(f"embedding's dense gradient 2 x {fmt_count(spec.embed_params)} x {g_b} B")
    if method.name == "qlora":
        biggest = max(l.in_features * l.out_features for l in spec.linears)
        ws_bwd = max(ws_bwd, biggest * (4 if p in ("fp32", "amp") and setup.device == "cpu" else 2))
        bwd_parts.append("one dequantized 4-bit weight at a time")
    dora_eye = 0
    if tr.adapter == "dora":
        dora_eye = max(t.in_features for t in tr.targets) ** 2 * (4 if p == "fp32" else 2)
        lines.append(Line("dora_identity", "DoRA identity matrix (forward)", dora_eye,
                          f"d_in^2 x {4 if p == 'fp32' else 2} B for the widest adapted input (d_in = "
                          f"{max(t.in_features for t in tr.targets):,})", "PEFT DoRA",
                          "PEFT computes B A by running an identity matrix through the adapter, one module at a time.",
                          ("forward",)))
    lines.append(Line("backward_workspace", "backward workspace", ws_bwd,
                      "; ".join(bwd_parts) or "none worth counting", "transient",
                      "Temporaries of the backward pass beyond the saved tensors.", ("backward",)))
    lines.append(Line("step_workspace", "optimizer step workspace", ws_step, wsformula, "transient",
                      "The optimizer's temporaries during the update.", ("step",)))
    if Z >= 3 and N > 1:
        gather = 2 * spec.layer_params * w_b
        lines.append(Line("gather", "ZeRO-3/FSDP all-gather buffers", gather,
                          f"2 layers x {fmt_count(spec.layer_params)} x {w_b} B (current + prefetched)",
                          "FSDP full sharding", "Each layer's full weights are gathered just before use.",
                          ("forward", "backward")))

    # overhead -------------------------------------------------------------------------------------
    if setup.device == "cuda":
        overhead = CUDA_CONTEXT
        oformula = "CUDA context + cuBLAS/cuDNN workspaces (~0.75 GiB, estimate; not in torch.cuda.max_memory_allocated)"
    else:
        overhead = CPU_RUNTIME_BASE + spec.hidden * CPU_GEMM_BUFFER
        oformula = (f"torch CPU runtime: 13 MiB (OpenMP pools, library state) + GEMM packing buffers hidden x 16384 x 4 B "
                    f"= {fmt_bytes(spec.hidden * CPU_GEMM_BUFFER)} (both measured on this 2-core CPU)")
    lines.append(Line("overhead", "runtime overhead", overhead, oformula, setup.device,
                      "Memory the framework needs besides tensors.", ("all",)))

    # phases ---------------------------------------------------------------------------------------
    get = {l.key: l.bytes for l in lines}
    base = get["weights"] + get["optimizer"] + get["master"] + (get.get("gather", 0))
    G = get["gradients"] + get.get("ddp_buckets", 0)
    G_prev = G if setup.grad_accum > 1 else 0
    head_grad = 0
    if tr.trains("lm_head.weight") or (spec.tied and embed_tr):
        head_grad = spec.vocab * spec.hidden * g_b
    A = act.saved + amp_copies
    phases = {
        "loss": base + G_prev + A + act.logits_transient,
        "forward": base + G_prev + A - act.logits_saved + dora_eye,
        "end of backward": base + G + ws_bwd,
        "optimizer step": base + G + ws_step,
    }
    if head_grad and not G_prev and act.loss == "full":
        phases["lm_head backward"] = base + head_grad + A
    if setup.checkpointing:
        phases["recompute (checkpointing)"] = base + max(G_prev, head_grad) + act.checkpoint_inputs + act.layer_bytes + amp_copies
    peak_phase = max(phases, key=phases.get)
    measured_overhead = overhead if setup.device == "cpu" else 0
    peak = phases[peak_phase] + measured_overhead
    total_b = phases[peak_phase] + overhead
    budget_b = parse_size(budget) if budget is not None else None
    if method.name in ("lora", "dora", "qlora", "loraplus"):
        qv = [l for l in spec.linears if l.name in ("q_proj", "v_proj")]
        n_all = sum(method.r * (l.in_features + l.out_features) for l in spec.linears) * spec.layers
        n_qv = sum(method.r * (l.in_features + l.out_features) for l in qv) * spec.layers
        if qv:
            notes.append(f"LoRA r={method.r} on this model: every linear layer ({len(spec.linears)} per layer) "
                         f"{n_all:,} parameters; q_proj and v_proj only {n_qv:,}.")
    if p in ("bf16", "pure-bf16"):
        notes.append("tunesmith train loads the base in fp32 (bf16 only as autocast): plan it with precision amp "
                     "(or fp32); bf16/pure-bf16 describe DeepSpeed/FSDP-style runs.")
    return Bill(
        model=spec.name,
        method=method.name,
        setup=asdict(setup),
        spec=spec.summary(),
        total_params=total,
        trainable_params=n_train,
        trainable_detail=tr.detail,
        lines=lines,
        phases=phases,
        peak_phase=peak_phase,
        peak=peak,
        total=total_b,
        budget=budget_b,
        notes=notes,
    )
