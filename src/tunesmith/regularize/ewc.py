"""Elastic weight consolidation (Kirkpatrick et al. 2017) over the trainable parameters.

penalty = lambda / 2 * sum_i F_i * (theta_i - theta_ref_i)^2

theta_ref are the trainable parameters when training starts (for a new LoRA adapter: its
initialisation, so the penalty keeps the adapter's update small in the directions the reference data
needs). F is the diagonal empirical Fisher on a reference set (general text, or the previous task's
data): the mean over N reference examples of the squared per-example gradient,

    F_i = 1/N * sum_n (d loss_n / d theta_i)^2,

with loss_n the example's mean next-token NLL over its supervised tokens (so lambda does not depend on
example length). One forward and backward per example, in eval mode (no dropout), in fp32. F and
theta_ref are written to `ewc.safetensors` in the run folder and read back on --resume.

In training the penalty is added once per optimizer step: each micro batch adds its share of the
accumulated batch's supervised tokens (loss_terms.micro_batch_share), so grad_accum does not scale it.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..data.masking import IGNORE_INDEX, TokenizedExample
from ..data.mixing import source_examples
from ..errors import TunesmithError
from ..loss_terms import micro_batch_share

EWC_FILE = "ewc.safetensors"


def trainable_named(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def example_loss(model, example: TokenizedExample) -> torch.Tensor:
    """Mean next-token NLL of one example over its supervised tokens (fp32)."""
    device = next(model.parameters()).device
    ids = torch.tensor([example.input_ids], dtype=torch.long, device=device)
    labels = torch.tensor([example.labels], dtype=torch.long, device=device)[:, 1:]
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32 (fp64 stays fp64)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def diagonal_fisher(model, examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradient of every trainable parameter (fp32, on the parameter's device)."""
    named = trainable_named(model)
    if not named:
        raise TunesmithError("regularize.ewc: the model has no trainable parameters")
    usable = [e for e in examples if any(t != IGNORE_INDEX for t in e.labels[1:])]
    if not usable:
        raise TunesmithError("regularize.ewc: no reference example has a supervised token")
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in named}
    was_training = model.training
    model.eval()
    try:
        for ex in usable:
            grads = torch.autograd.grad(example_loss(model, ex), [p for _, p in named], allow_unused=True)
            for (n, _), g in zip(named, grads):
                if g is not None:
                    fisher[n] += g.float() ** 2
    finally:
        model.train(was_training)
    return {n: f / len(usable) for n, f in fisher.items()}


class _FisherWeightedSquare(torch.autograd.Function):
    """sum F * (theta - theta_ref)^2 with gradient 2 F (theta - theta_ref), computed in backward: autograd's version
    would keep two parameter-sized fp32 tensors per parameter from the loss to the backward pass."""

    @staticmethod
    def forward(ctx, param, fisher, reference):
        ctx.save_for_backward(param, fisher, reference)  # all three live for the whole run anyway
        d = param.float() - reference
        return (fisher * d * d).sum()

    @staticmethod
    def backward(ctx, grad_out):
        param, fisher, reference = ctx.saved_tensors
        grad = (param.float() - reference).mul_(fisher).mul_(2.0 * grad_out)
        return grad.to(param.dtype), None, None


class EWCTerm:
    """A MethodTrainer loss term: lambda/2 * sum F (theta - theta_ref)^2, once per optimizer step."""

    def __init__(self, model, fisher: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], lam: float,
                 info: dict | None = None):
        named = dict(trainable_named(model))
        missing = sorted(set(named) - set(fisher))
        if missing:
            raise TunesmithError(
                f"regularize.ewc: the stored Fisher has no entry for {missing[0]} (and {len(missing) - 1} more); "
                f"it was computed for another model or method. Delete {EWC_FILE} or start without --resume"
            )
        self.entries = [(named[n], fisher[n], reference[n]) for n in named]
        self.lam = float(lam)
        self.info = info or {}

    def penalty(self) -> torch.Tensor:
        total = None
        for i, (p, f, ref) in enumerate(self.entries):
            if f.device != p.device:
                f, ref = f.to(p.device), ref.to(p.device)
                self.entries[i] = (p, f, ref)
            part = _FisherWeightedSquare.apply(p, f, ref)
            total = part if total is None else total + part
        return 0.5 * self.lam * total

    def __call__(self, model, inputs: dict, hidden: torch.Tensor) -> torch.Tensor:
        return self.penalty() * micro_batch_share(inputs)

    def describe(self) -> dict:
        total = sum(float(f.sum()) for _, f, _ in self.entries)
        peak = max(float(f.max()) for _, f, _ in self.entries)
        return {"lambda": self.lam, **self.info, "file": EWC_FILE, "fisher_sum": total, "fisher_max": peak}


def save_ewc(path: Path, fisher: dict, reference: dict, info: dict) -> None:
    """Written to a temporary file and renamed, so a run killed mid-write never leaves a torn file for --resume."""
    tensors = {f"fisher/{n}": f.detach().cpu().contiguous() for n, f in fisher.items()}
    tensors.update({f"reference/{n}": r.detach().cpu().contiguous() for n, r in reference.items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in info.items()})
    tmp.replace(path)


def load_ewc(path: Path) -> tuple[dict, dict]:
    raw = load_file(str(path))
    fisher = {k[len("fisher/"):]: v for k, v in raw.items() if k.startswith("fisher/")}
    reference = {k[len("reference/"):]: v for k, v in raw.items() if k.startswith("reference/")}
    return fisher, reference


def reference_examples(config, tokenizer) -> list[TokenizedExample]:
    """`ewc.samples` examples of the reference data, chosen by the run's seed."""
    e = config.regularize.ewc
    sources = e.reference if isinstance(e.reference, list) else [e.reference]
    pool = [x for src in sources for x in source_examples(src, tokenizer, config, e.chunk_tokens)]
    rng = random.Random(config.train.seed)
    return rng.sample(pool, e.samples) if len(pool) > e.samples else pool


def ewc_term_for_run(config, model, tokenizer, out_dir: Path, resume: bool = False) -> EWCTerm:
    """The EWC term for a run: the Fisher from the run folder on --resume, else computed now and written there."""
    e = config.regularize.ewc
    path = Path(out_dir) / EWC_FILE
    if resume and path.is_file():
        fisher, reference = load_ewc(path)
        n = None
    else:
        examples = reference_examples(config, tokenizer)
        fisher = diagonal_fisher(model, examples)
        reference = {name: p.detach().float().clone() for name, p in trainable_named(model)}
        n = len(examples)
        save_ewc(path, fisher, reference, {"reference": e.reference, "samples": n})
    info = {"reference": e.reference, "samples": n if n is not None else "from " + EWC_FILE}
    return EWCTerm(model, fisher, reference, e.lambda_, info)
