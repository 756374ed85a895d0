"""Preference training (train.objective dpo, orpo, simpo) on the same fast path as SFT.

- Each pair is one dataset item: the chosen sequence then the rejected one. A micro batch's sequences go
  into one padding-free row (or padded rows), so chosen and rejected share a forward pass and attention
  stays inside each sequence.
- Only completion positions reach the lm_head, in chunks: `completion_logps` sums each sequence's
  per-token log-probs of its supervised tokens; the gradient recomputes each chunk's logits in backward, so
  a (tokens x vocabulary) matrix never exists beyond one chunk.
- The reference of an adapter run is the same model with its adapter disabled (no second copy); a run that
  trains the weights themselves scores every pair with the untouched model once, before training, and
  carries those log-probs in its items.
- The objective's pure loss (objectives/) turns the per-sequence numbers into the loss; rewards, margins,
  accuracies and log-probs are logged under TRL's names through the Trainer's log (metrics.jsonl).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers.trainer_callback import PrinterCallback

from ..config import RunConfig
from ..data.collate import PaddingCollator, PaddingFreeCollator, packed_kwargs
from ..data.masking import IGNORE_INDEX
from ..data.preference import PreferenceExample
from ..errors import TunesmithError
from ..modeling import causal_lm, decoder_body, supports_selective_loss
from ..objectives import Objective, PairLogps, get_objective
from .loss import DEFAULT_CHUNK_ROWS
from .trainer import MethodTrainer


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, one chunk of rows at a time in forward and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        w = weight.to(hidden.dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = (hidden[start : start + chunk_rows] @ w.T).float()
            t = targets[start : start + chunk_rows]
            out[start : start + chunk_rows] = logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)
        grad_h = torch.empty_like(hidden) if needs_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            h = hidden[start : start + ctx.chunk_rows]
            t = targets[start : start + ctx.chunk_rows]
            g = grad_out[start : start + ctx.chunk_rows].float()
            # d logp[t] / d logits = onehot(t) - softmax(logits), built in place: one (chunk x vocabulary) buffer
            grad_logits = torch.softmax((h @ w.T).float(), dim=-1).neg_()
            grad_logits[torch.arange(t.shape[0], device=t.device), t] += 1.0
            grad_logits *= g[:, None]
            if needs_h:
                grad_h[start : start + ctx.chunk_rows] = (grad_logits.to(w.dtype) @ w).to(hidden.dtype)
            if needs_w:
                grad_w += grad_logits.T @ h.float()
        return grad_h, grad_w.to(weight.dtype) if needs_w else None, None, None


def completion_logps(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                     sequence_index: torch.Tensor, n_sequences: int,
                     chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each sequence's supervised next tokens, their count), per sequence.

    hidden: (rows, seq, hidden) final hidden states; labels: (rows, seq), -100 where no log-prob is taken;
    sequence_index: (rows, seq) which sequence each position belongs to (several per padding-free row)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    token_logps = _ChunkedTokenLogProbs.apply(hidden[:, :-1][keep], lm_head_weight, targets[keep], chunk_rows)
    owner = sequence_index[:, 1:][keep]
    sums = torch.zeros(n_sequences, dtype=torch.float32, device=hidden.device).index_add(0, owner, token_logps)
    counts = torch.bincount(owner, minlength=n_sequences)
    return sums, counts


@dataclass
class PairCollator:
    """Items of (chosen + rejected) ids, split back into two sequences each, in the order c0, r0, c1, r1, ...;
    `sequence_index` says which sequence each position belongs to, `ref_logps` (pairs x 2) rides along when
    the reference was scored before training."""

    padding_free: bool = True
    pad_token_id: int = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sequences = []
        for f in features:
            n = f["chosen_length"]
            sequences.append({"input_ids": f["input_ids"][:n], "labels": f["labels"][:n]})
            sequences.append({"input_ids": f["input_ids"][n:], "labels": f["labels"][n:]})
        if self.padding_free:
            batch = PaddingFreeCollator()(sequences)
            lengths = torch.tensor([len(s["input_ids"]) for s in sequences])
            batch["sequence_index"] = torch.repeat_interleave(torch.arange(len(sequences)), lengths)[None]
        else:
            batch = PaddingCollator(self.pad_token_id)(sequences)
            batch["sequence_index"] = torch.arange(len(sequences))[:, None].expand_as(batch["input_ids"]).contiguous()
        if "ref_logps" in features[0]:
            batch["ref_logps"] = torch.tensor([f["ref_logps"] for f in features], dtype=torch.float32)
        return batch


class PairDataset(torch.utils.data.Dataset):
    """A pair as one item (its length, chosen + rejected, is what length-grouped sampling sorts by)."""

    def __init__(self, examples, ref_logps: list[tuple[float, float]] | None = None):
        self.examples = examples
        self.ref_logps = ref_logps

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ex = self.examples[i]
        item = {"input_ids": ex.input_ids, "labels": ex.labels, "chosen_length": len(ex.chosen.input_ids)}
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[i]
        return item


def objective_options(config: RunConfig) -> SimpleNamespace:
    """The `preference:` options with the objective's default beta filled in."""
    p = config.preference
    beta = p.beta if p.beta is not None else get_objective(config.train.objective).default_beta
    return SimpleNamespace(beta=float(beta), label_smoothing=float(p.label_smoothing), loss=p.loss, gamma=float(p.gamma))


def _row_inputs(inputs: dict) -> dict:
    """What the decoder body reads; padding-free rows attend by position_ids, so their all-ones mask goes."""
    out = {k: v for k, v in inputs.items() if k not in ("sequence_index", "ref_logps")}
    if "position_ids" in out:
        out.pop("attention_mask", None)
    return out


class PreferenceTrainer(MethodTrainer):
    """MethodTrainer whose loss is a preference objective over per-sequence completion log-probs.

    The loss is the mean over a micro batch's pairs, and the Trainer divides it by the accumulation steps
    (as TRL's DPOTrainer does). `reference` is "adapter" (disable the adapter for the reference forward),
    "precomputed" (items carry `ref_logps`) or None (the objective needs none).
    """

    def __init__(self, *args, objective: Objective, options, reference: str | None, **kwargs):
        super().__init__(*args, selective_loss=False, **kwargs)
        self.objective = objective
        self.options = options
        self.reference = reference
        self.loss_is_scaled_for_ga = False
        self._pair_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def sequence_logps(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._final_hidden(model, _row_inputs(inputs))
        head = causal_lm(self.accelerator.unwrap_model(model)).get_output_embeddings()
        n = int(inputs["sequence_index"].max()) + 1
        return completion_logps(hidden, head.weight, inputs["labels"], inputs["sequence_index"], n)

    def reference_logps(self, model, inputs: dict) -> torch.Tensor:
        """(pairs, 2) reference log-probs: carried by the batch, or the model with its adapter disabled."""
        if self.reference == "precomputed":
            return inputs["ref_logps"]
        with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
            sums, _ = self.sequence_logps(model, inputs)
        return sums.view(-1, 2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The reference pass first: its temporaries are gone before the policy's forward saves its activations
        # (planning prices the two moments apart).
        ref = self.reference_logps(model, inputs) if self.objective.needs_reference else None
        sums, counts = self.sequence_logps(model, inputs)
        pairs, tokens = sums.view(-1, 2), counts.view(-1, 2)
        logps = PairLogps(pairs[:, 0], pairs[:, 1], tokens[:, 0], tokens[:, 1],
                          ref[:, 0] if ref is not None else None, ref[:, 1] if ref is not None else None)
        out = self.objective.loss(logps, self.options)
        self._record(out, "train" if model.training else "eval")
        loss = out.loss
        if model.training:
            # The method's terms (AdaLoRA's orthogonality) at full weight per micro batch: the Trainer divides the
            # whole loss by the accumulation steps, so each counts once per optimizer step.
            for term in self.loss_terms:
                loss = loss + term(model, {}, None)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _record(self, out, mode: str) -> None:
        values = {
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
            "logps/chosen": out.chosen_logps.mean(),
            "logps/rejected": out.rejected_logps.mean(),
            **{k: out.extra[k].mean() for k in self.objective.metrics},
        }
        for key, value in values.items():
            self._pair_metrics[mode][key].append(float(value))

    def log(self, logs: dict, start_time=None) -> None:
        """The Trainer's log line plus the pair metrics averaged since the last one (eval ones as eval_*)."""
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        recorded = self._pair_metrics[mode]
        logs = {**logs, **{f"{prefix}{k}": round(sum(v) / len(v), 6) for k, v in recorded.items() if v}}
        recorded.clear()
        super().log(logs, start_time)


def reference_mode(config: RunConfig, prepared) -> str | None:
    """How the run gets its reference log-probs: the adapter-disabled model, precomputed, or none needed."""
    if not get_objective(config.train.objective).needs_reference:
        return None
    return "adapter" if prepared.is_adapter and hasattr(prepared.model, "disable_adapter") else "precomputed"


@torch.no_grad()
def precompute_reference(model, examples, batch_size: int, padding_free: bool, pad_token_id: int = 0) -> list[tuple[float, float]]:
    """Each pair's (chosen, rejected) summed completion log-probs under `model` as it is now (before training)."""
    was_training = model.training
    model.eval()
    collate = PairCollator(padding_free, pad_token_id)
    dataset = PairDataset(examples)
    out: list[tuple[float, float]] = []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            out.extend((c, r) for c, r in model_logps(model, batch).view(-1, 2).tolist())
    finally:
        model.train(was_training)
    return out


def model_logps(model, batch: dict) -> torch.Tensor:
    """Each sequence's summed completion log-probs under `model` (one process: the body, then the chunked head)."""
    inputs = _row_inputs(batch)
    hidden = decoder_body(model)(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                 position_ids=inputs.get("position_ids"), use_cache=False,
                                 **packed_kwargs(inputs)).last_hidden_state
    head = causal_lm(model).get_output_embeddings()
    n = int(batch["sequence_index"].max()) + 1
    return completion_logps(hidden, head.weight, batch["labels"], batch["sequence_index"], n)[0]


def check_preference_model(config: RunConfig, model) -> None:
    if not supports_selective_loss(model):
        raise TunesmithError(
            f"train.objective={config.train.objective} needs logits that are exactly lm_head(hidden) (no bias, "
            "soft-capping or logit scaling); this model has one of those: train it with objective sft"
        )


def build_preference_trainer(config: RunConfig, prepared, args, train_examples: list, *, eval_examples: list | None,
                             tokenizer, callbacks: list, loss_terms: list | None = None) -> PreferenceTrainer:
    """The trainer of a preference run (run.py's build_trainer hands over here once the arguments are built).
    A run whose reference cannot be the adapter-disabled model scores every pair with the model as loaded,
    now, before any step."""
    if not all(isinstance(ex, PreferenceExample) for ex in train_examples):
        raise TunesmithError(f"train.objective={config.train.objective} trains on preference pairs (prompt, chosen, "
                             "rejected), and these examples are conversations: give pairs or use train.objective: sft")
    check_preference_model(config, prepared.model)
    entry = get_objective(config.train.objective)
    reference = reference_mode(config, prepared)
    pad_id = getattr(tokenizer if tokenizer is not None else prepared.model.config, "pad_token_id", None) or 0
    scored = {}
    for name, examples in (("train", train_examples), ("eval", eval_examples or [])):
        scored[name] = (precompute_reference(prepared.model, examples, config.train.batch_size, config.train.padding_free,
                                             pad_id) if reference == "precomputed" else None)
    trainer = PreferenceTrainer(
        model=prepared.model,
        args=args,
        param_groups=prepared.param_groups,
        train_dataset=PairDataset(train_examples, scored["train"]),
        eval_dataset=PairDataset(eval_examples, scored["eval"]) if eval_examples else None,
        data_collator=PairCollator(config.train.padding_free, pad_id),
        processing_class=tokenizer,
        callbacks=[*(callbacks or []), *prepared.callbacks],
        objective=entry,
        options=objective_options(config),
        reference=reference,
        loss_terms=loss_terms,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer
