"""Self-distillation from the frozen base model: loss = alpha * SFT + (1 - alpha) * KD.

KD = T^2 * sum over supervised positions of KL(p_base^T || p_model^T), p^T = softmax(logits / T),
divided by the same normaliser as the SFT sum (supervised tokens of the accumulated batch), so alpha
mixes like-for-like and gradient accumulation changes nothing. The T^2 factor keeps the gradient's
scale independent of T (Hinton et al. 2015).

The teacher is the model itself with its adapters switched off (`with model.disable_adapter():`), so
no second copy is in memory; a run without adapters (full, freeze, galore) keeps a frozen copy of the
starting weights instead. In a continual run (progressive, o-lora) the teacher is the model as the
previous task left it: only the earlier adapters active. At LoRA initialisation (B = 0) teacher and
student are the same model, so KD is 0.

The MethodTrainer adds loss terms to its SFT loss; this term returns (1 - alpha) * (KD - SFT), so the
total is exactly alpha * SFT + (1 - alpha) * KD. Like train/loss.py it only sends supervised rows
through the lm_head, in chunks, and computes the gradient in the forward pass while the logits are at
hand: d/dz [T^2 KL] = T (softmax(z/T) - p_teacher^T), d/dz CE = softmax(z) - onehot.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from ..data.collate import packed_kwargs
from ..data.masking import IGNORE_INDEX
from ..methods.adapter_stack import using_adapters
from ..modeling import causal_lm, decoder_body

DEFAULT_CHUNK_ROWS = 512


class _DistillMinusCrossEntropy(torch.autograd.Function):
    """(1 - alpha) * scale * sum_rows [T^2 KL(teacher^T || student^T) - CE(student, target)], fused and chunked."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, alpha, temperature, scale, chunk_rows):
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if needs_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_w else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(hidden.dtype)
        wt = teacher_weight.to(teacher_hidden.dtype)
        T = float(temperature)
        for start in range(0, hidden.shape[0], chunk_rows):
            # Buffers are divided, exponentiated and subtracted in place and freed as soon as they are spent, so at
            # most four chunk x vocab fp32 buffers are alive at once (planning/lines.py distill_line bills them).
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            z = (h @ w.T).float()
            log_p = torch.log_softmax(z, dim=-1)
            log_ps = torch.log_softmax(z.div_(T), dim=-1)
            del z
            with torch.no_grad():
                zt = (teacher_hidden[start : start + chunk_rows] @ wt.T).float()
            log_pt = torch.log_softmax(zt.div_(T), dim=-1)
            del zt
            ce_sum += -log_p.gather(1, t[:, None]).sum()
            pt = log_pt.exp()
            kd_sum += (T * T) * log_pt.sub_(log_ps).mul_(pt).sum()
            del log_pt
            if needs_h or needs_w:
                g = log_ps.exp_().sub_(pt).mul_(T)  # d/dz T^2 KL
                g_ce = log_p.exp_()  # d/dz CE = softmax - onehot
                g_ce[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                g.sub_(g_ce).mul_((1.0 - alpha) * scale)
                del g_ce
                if needs_h:
                    grad_h[start : start + chunk_rows] = (g.to(w.dtype) @ w).to(hidden.dtype)
                if needs_w:
                    grad_w += g.T @ h.float()
                del g
            del log_p, log_ps, pt
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.has = (needs_h, needs_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return (1.0 - alpha) * scale * (kd_sum - ce_sum), kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_out, _grad_kd, _grad_ce):
        saved = list(ctx.saved_tensors)
        needs_h, needs_w = ctx.has
        grad_h = saved.pop(0) * grad_out if needs_h else None
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if needs_w else None
        return grad_h, grad_w, None, None, None, None, None, None, None


def supervised_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows of hidden whose next token is supervised, those next tokens, the mask) as the SFT loss selects them."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep], keep


def term_normaliser(inputs: dict, count: int) -> float:
    """The SFT loss's normaliser: supervised tokens of the accumulated batch (this micro batch's when unknown)."""
    n = inputs.get("num_items_in_batch")
    return float(n) if n else float(max(count, 1))


class DistillTerm:
    """A MethodTrainer loss term: (1 - alpha) * (KD - SFT), so the loss becomes alpha * SFT + (1 - alpha) * KD."""

    def __init__(self, model, alpha: float, temperature: float, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 teacher_adapters: list[str] | None = None):
        self.model = model
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.chunk_rows = chunk_rows
        # Continual runs (progressive, o-lora): the teacher is the model as the previous task left it, i.e. only
        # the earlier adapters active; otherwise every adapter is switched off.
        self.teacher_adapters = teacher_adapters
        self.uses_adapters = callable(getattr(model, "disable_adapter", None))
        # No adapters to switch off: keep a frozen copy of the starting weights as the teacher.
        self.teacher = None if self.uses_adapters else copy.deepcopy(model).eval().requires_grad_(False)
        self.last: dict[str, float] = {}

    def _teacher_context(self):
        if not self.uses_adapters:
            return contextlib.nullcontext()
        if self.teacher_adapters:
            return using_adapters(self.model, self.teacher_adapters)
        return self.model.disable_adapter()

    @torch.no_grad()
    def teacher_hidden(self, inputs: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = self.model if self.uses_adapters else self.teacher
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        was_training = teacher.training
        teacher.eval()  # no dropout, no NEFTune noise: the base model's own distribution
        try:
            with self._teacher_context():
                hidden = decoder_body(teacher)(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs.get("attention_mask"),
                    position_ids=inputs.get("position_ids"),
                    use_cache=False,
                    **packed_kwargs(inputs),
                ).last_hidden_state
        finally:
            teacher.train(was_training)
        return hidden, causal_lm(teacher).get_output_embeddings().weight

    def kd_and_ce(self, hidden: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(term, KD sum, CE sum) for this micro batch; the sums are not normalised."""
        rows, chosen, keep = supervised_rows(hidden, inputs["labels"])
        if chosen.numel() == 0:
            zero = hidden.sum() * 0.0
            return zero, zero.detach(), zero.detach()
        t_hidden, t_weight = self.teacher_hidden(inputs, hidden.device)
        t_rows = t_hidden[:, :-1][keep]
        del t_hidden  # only the supervised rows are needed
        weight = causal_lm(self.model).get_output_embeddings().weight
        scale = 1.0 / term_normaliser(inputs, int(chosen.numel()))
        return _DistillMinusCrossEntropy.apply(
            rows, weight, t_rows, t_weight, chosen, self.alpha, self.temperature, scale, self.chunk_rows
        )

    def __call__(self, model, inputs: dict, hidden: torch.Tensor) -> torch.Tensor:
        if self.alpha >= 1.0:
            return hidden.sum() * 0.0
        term, kd_sum, ce_sum = self.kd_and_ce(hidden, inputs)
        n = term_normaliser(inputs, int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()))
        self.last = {"kd": float(kd_sum) / n, "sft": float(ce_sum) / n}
        return term
