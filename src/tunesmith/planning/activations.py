"""Activations: the tensors autograd saves for the backward pass, enumerated per decoder layer for the
transformers implementation of each family, plus the loss's logits buffers.

Tests compare the count with what autograd really saves on small models of each family.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..methods.method import AdapterSaves
from ..sizes import fmt_bytes
from .setup import FULL_LOSS, SELECTIVE_LOSS, Setup
from .spec import LinearSpec, ModelSpec
from .trainable import Trainability


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
    adapted = tr.is_adapter and tr.adapted(lin)
    if adapted:
        # the method's entry enumerates what its adapter saves (methods/<name>.py)
        saves, needs_input = tr.adapter.saves(AdapterSaves(
            tokens=T, rank=tr.r, name=lin.name, d_in=lin.in_features, d_out=lin.out_features, dropout=tr.dropout,
            input_needs_grad=x_rg, act_bytes=c.ab, mask_bytes=c.mask_b, fused=tr.fusable and c.setup.fused_lora,
        ))
        for key, n in saves.items():
            _add(out, key, n)
        keep_input = keep_input or needs_input
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
    if o_keep and (s.attention == "eager" or s.fused_qkv or (packed and st.sequences > 1)):
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
    """tunesmith falls back to transformers' full loss for logit soft-capping (Gemma 2). Preference objectives
    always take the selective path (config refuses the rest, bill.py checks it)."""
    if setup.preference:
        return SELECTIVE_LOSS
    if setup.loss == FULL_LOSS or spec.final_softcap:
        return FULL_LOSS
    return SELECTIVE_LOSS


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
    loss: str = SELECTIVE_LOSS


def _head(c: _Ctx, rg: bool, loss: str) -> int:
    """Bytes saved after the last layer: the final norm, the lm_head input, rope tables and token ids."""
    spec, tr, setup, T = c.spec, c.tr, c.setup, c.setup.tokens
    head: dict[str, int] = {}
    embed_tr = tr.trains("model.embed_tokens.weight")
    _norm(c, T, rg, tr.trains("model.norm.weight"), head, "final norm")
    if lm_head_trains(spec, tr) and loss == FULL_LOSS:
        _add(head, "lm_head input", T * spec.hidden * c.ab)
    _add(head, "rope tables", 2 * setup.rows[1] * spec.head_dim * c.ab)
    _add(head, "token ids", T * 8 * (2 if embed_tr else 1))  # the loss keeps the labels; the embedding its ids
    return sum(head.values())


def lm_head_trains(spec: ModelSpec, tr: Trainability) -> bool:
    """The lm_head trains itself, or through the embedding it is tied to."""
    return tr.trains("lm_head.weight") or (spec.tied and tr.trains("model.embed_tokens.weight"))


def _loss_buffers(c: _Ctx, loss: str) -> tuple[int, int]:
    """(saved, transient) bytes of the loss: what it keeps for backward, and its extra buffers at its worst moment."""
    spec, setup, T = c.spec, c.setup, c.setup.tokens
    V, h = spec.vocab, spec.hidden
    if loss == FULL_LOSS:
        # transformers' loss: log-softmax (fp32) of every position is saved; its backward adds the nll
        # gradient and the log-softmax gradient, two more fp32 tokens x vocab buffers
        return T * V * 4 + (T * V * c.ab if spec.final_softcap else 0), 2 * T * V * 4
    rows = setup.supervised
    chunk = min(setup.chunk_tokens, rows)
    head_grad = V * h * 4 if lm_head_trains(spec, c.tr) else 0
    if setup.preference:
        # training/preference.py's chunked log-probs: forward saves the completion rows' hidden states and
        # targets; backward builds their gradient and, per chunk, the logits and the softmax turned in place
        # into its gradient (2 C x V fp32), and (lm_head training) an fp32 weight gradient plus one chunk's product
        return rows * (h * c.ab + 8), rows * h * c.ab + 2 * chunk * V * 4 + 2 * head_grad
    # tunesmith's selective loss: the gradients for the hidden rows (and the lm_head) are built in
    # the forward pass and saved; per chunk of C rows: logits, logits - lse and exp(...) (3 C x V fp32)
    return rows * h * c.ab + head_grad, rows * h * c.ab + 3 * chunk * V * 4 + head_grad


def no_grad_body(spec: ModelSpec, tr: Trainability, setup: Setup) -> int:
    """Peak temporaries of the decoder body run without autograd: one layer's working set at a time (residual and
    normed stream, q/k/v and output, gate, up and their product) and the final hidden states."""
    c = _ctx(spec, tr, setup)
    T, h, I = setup.tokens, spec.hidden, spec.intermediate
    attention = T * (2 * spec.heads + 2 * spec.kv_heads) * spec.head_dim * c.ab
    layer = 3 * T * h * c.nb + max(attention, 3 * T * I * c.ab)
    return layer + T * h * c.nb


def no_grad_forward(spec: ModelSpec, tr: Trainability, setup: Setup) -> int:
    """Peak temporaries of a forward pass without autograd (a preference run's reference pass): the body's
    (`no_grad_body`) and the chunked log-probs (the completion rows' hidden states; a chunk's C x V fp32 logits
    and the exponentials logsumexp takes of them)."""
    c = _ctx(spec, tr, setup)
    rows = setup.supervised
    head = rows * spec.hidden * c.ab + 2 * min(setup.chunk_tokens, rows) * spec.vocab * 4
    return no_grad_body(spec, tr, setup) + head


def activations(spec: ModelSpec, tr: Trainability, setup: Setup) -> Activations:
    """Everything autograd saves for one micro batch, layer by layer, and the loss's buffers."""
    c = _ctx(spec, tr, setup)
    T = setup.tokens
    # Does the input of layer 0 need a gradient? Only if the embedding trains (it does when every
    # parameter trains), or PEFT's enable_input_require_grads under checkpointing.
    rg = tr.trains("model.embed_tokens.weight") or setup.checkpointing
    outs = []
    for i in range(spec.layers):
        out, rg = _layer(c, T, i, rg)
        outs.append(out)
    layer_sets = [sum(out.values()) for out in outs]
    loss = effective_loss(spec, tr, setup)
    head_bytes = _head(c, rg, loss)
    logits_saved, logits_transient = _loss_buffers(c, loss)
    layer_max = max(layer_sets)
    if setup.checkpointing:
        ckpt = spec.layers * T * spec.hidden * c.nb
        saved = ckpt + head_bytes + logits_saved
        formula = (f"checkpointing: layers x tokens x hidden x {c.nb} B = {spec.layers} x {T} x {spec.hidden} x {c.nb} "
                   f"(each layer's input) + one layer recomputed in backward ({fmt_bytes(layer_max)})")
    else:
        ckpt = 0
        saved = sum(layer_sets) + head_bytes + logits_saved
        formula = (f"sum over {spec.layers} layers of the tensors autograd saves (one middle layer: "
                   f"{layer_max / T:,.0f} B/token x {T} tokens = {fmt_bytes(layer_max)})")
    return Activations(saved, outs[spec.layers // 2], layer_max, ckpt, head_bytes, logits_saved, logits_transient,
                       formula, loss)
