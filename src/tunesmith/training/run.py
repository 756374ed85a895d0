"""`tunesmith.train(config)`: prepare data and model, run the transformers Trainer, write the run folder."""
from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..allocator import keep_oversize_pages
from ..config import RunConfig
from ..data.collate import PaddingCollator, PaddingFreeCollator
from ..data.assemble import prepare_data
from ..data.dataset import PreparedData
from ..device import use_bf16
from ..methods import prepare_model
from ..methods import load_kwargs as method_load_kwargs
from ..methods.adapter_stack import attach_previous, merge_previous_into_base, save_previous
from ..methods.fused_lora import use_fused_lora
from ..modeling import decoder_body, supports_selective_loss
from ..models import load_model, load_tokenizer
from ..objectives import get_objective
from ..regularize import build_loss_terms
from ..outdir import check_target, in_place
from ..rundir import (
    CONFIG_FILE, DATA_STATS_FILE, METRICS_FILE, RESUMABLE_CHANGES, SUMMARY_FILE, config_changes, last_checkpoint,
    resume_checkpoint, run_inputs, write_config, write_json,
)
from ..errors import TunesmithError
from ..doctor.callback import DoctorCallback, DoctorStopped
from ..doctor.detectors import RunFacts
from ..doctor.memory import memory_preflight
from ..doctor.order import length_grouped_order
from ..reporting import write_report
from .callbacks import MetricsFileCallback, ProgressCallback
from .disk import full_disk_is_reported
from .task_score import TaskScoreCallback
from .interrupt import StopOnSignal, TrainingInterrupted
from . import distributed
from .attention import restore_attention, use_packed_attention
from .neftune import NEFTune
from .preference import build_preference_trainer
from .trainer import MethodTrainer


@dataclass
class TrainResult:
    output_dir: Path
    summary: dict


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}


def use_selective_loss(config: RunConfig, model) -> bool:
    """The chunked selective loss, unless the recipe turns it off or the model is one it cannot run."""
    return config.train.selective_loss and supports_selective_loss(model)


def planned_steps(config: RunConfig, n_examples: int) -> int:
    """Optimizer steps the run will take (AdaLoRA's budget schedule needs it up front)."""
    t = config.train
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = math.ceil(math.ceil(n_examples / t.batch_size) / t.grad_accum)
    return max(1, math.ceil(per_epoch * t.epochs))


def use_fast_path(prepared, config: RunConfig) -> Callable[[], None]:
    """The default training path on a prepared model: fused LoRA branches and per-example attention in
    padding-free rows (each behind its switch). Returns one undo for both, for a model that is saved or
    served after (PEFT's forward and the model's attention again); a step that fails undoes the ones before."""
    with ExitStack() as undo:
        if config.train.fused_lora and prepared.is_adapter:
            undo.enter_context(use_fused_lora(prepared.model))
        if config.train.padding_free:
            undo.callback(restore_attention, prepared.model, use_packed_attention(prepared.model))
        if config.train.compile:
            undo.callback(compile_layers(prepared.model))
        return undo.pop_all().close


def compile_layers(model) -> Callable[[], None]:
    """torch.compile every decoder layer, with dynamic shapes (padding-free rows change length every micro
    batch); returns the undo. `nn.Module.compile` keeps the compiled call in `_compiled_call_impl`, and the
    module runs its plain forward again once that is None (torch 2.13; tests/test_compile.py checks both)."""
    layers = list(decoder_body(model).layers)
    for layer in layers:
        layer.compile(dynamic=True)

    def undo() -> None:
        for layer in layers:
            layer._compiled_call_impl = None

    return undo


def training_arguments(config: RunConfig, output_dir: Path, has_eval: bool, extra: dict | None = None):
    from transformers import TrainingArguments

    t = config.train
    warmup = int(t.warmup) if t.warmup >= 1 else t.warmup
    evaluation = evaluation_arguments(config, has_eval)
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=use_bf16(t.bf16),
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=min(t.logging_steps, t.max_steps) if t.max_steps > 0 else t.logging_steps,
        logging_first_step=True,
        save_total_limit=t.save_total_limit,
        logging_nan_inf_filter=False,  # a NaN loss must reach metrics.jsonl and the doctor, not be averaged away
        **evaluation,
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy=t.order,
        include_num_input_tokens_seen="non_padding",
        prediction_loss_only=True,
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        **(extra or {}),
    )


def evaluation_arguments(config: RunConfig, has_eval: bool) -> dict:
    """When to evaluate and save. With keep_best a checkpoint is saved at every evaluation, so the best one
    exists to be kept; the Trainer tracks it (metric_for_best_model) and checkpoint rotation spares it."""
    t = config.train
    strategy = "no" if not has_eval else "steps" if t.eval_steps else "epoch" if t.eval_each_epoch else "no"
    out = {"eval_strategy": strategy, "save_strategy": "steps", "save_steps": t.save_steps}
    if strategy == "steps":
        out["eval_steps"] = t.eval_steps
    if t.keep_best and strategy != "no":
        out.update(save_strategy=strategy, metric_for_best_model=BEST_METRICS[t.keep_best],
                   greater_is_better=t.keep_best == "score")
        if strategy == "steps":
            out["save_steps"] = t.eval_steps
    return out


BEST_METRICS = {"eval_loss": "eval_loss", "score": "eval_score"}
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
TENSORBOARD_DIR = "tensorboard"


def check_trackers(config: RunConfig) -> None:
    """Every tracker in train.report_to is installed (checked before the run folder is touched)."""
    import importlib.util

    for name in config.train.report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise TunesmithError(f"train.report_to: {name} needs the {TRACKER_PACKAGES[name]} package, which is not "
                                 f"installed; run `pip install {TRACKER_PACKAGES[name]}` or remove {name} from train.report_to")


def tracker_callbacks(config: RunConfig, out: Path) -> list:
    """transformers' own integrations for train.report_to; TensorBoard writes to RUN/tensorboard/."""
    from transformers.integrations import get_reporting_integration_callbacks

    callbacks = [cls() for cls in get_reporting_integration_callbacks(list(config.train.report_to))]
    for cb in callbacks:
        if hasattr(cb, "tb_writer") and cb.logging_dir is None:
            cb.logging_dir = str(out / TENSORBOARD_DIR)
    return callbacks


def build_trainer(config: RunConfig, prepared, output_dir: Path, train_examples: list, *,
                  eval_examples: list | None = None, ordered: bool = False, tokenizer=None,
                  callbacks: list | None = None, loss_terms=None) -> MethodTrainer:
    """The MethodTrainer `tunesmith train` runs, also built by `plan --measure`, so that what is measured
    is what trains: arguments, collator, selective loss and the method's callbacks and parameter groups.

    `ordered` data (mixed, replay) is read in the order given. The padding id comes from `tokenizer`, else
    the model's config (a measurement loads no tokenizer; padding-free rows never pad). `callbacks` run
    before the method's own.
    """
    from transformers.trainer_callback import PrinterCallback

    loss_terms = [*prepared.loss_terms, *(loss_terms or [])]  # the method's own (AdaLoRA's), then the recipe's
    extra = {**distributed.training_arguments(config), **(prepared.training_args or {})}
    args = training_arguments(config, output_dir, bool(eval_examples), extra)
    if ordered:
        args.train_sampling_strategy = "sequential"  # mixed data is already in its exact, evenly spread order
    if get_objective(config.train.objective).preference:
        return build_preference_trainer(config, prepared, args, train_examples, eval_examples=eval_examples,
                                        tokenizer=tokenizer, callbacks=callbacks, loss_terms=loss_terms)
    if config.train.padding_free:
        collator = PaddingFreeCollator()
    else:
        pad_id = getattr(tokenizer if tokenizer is not None else prepared.model.config, "pad_token_id", None)
        collator = PaddingCollator(pad_id if pad_id is not None else 0)
    trainer = MethodTrainer(
        model=prepared.model,
        args=args,
        param_groups=prepared.param_groups,
        train_dataset=ExampleDataset(train_examples),
        eval_dataset=ExampleDataset(eval_examples) if eval_examples else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[*(callbacks or []), *prepared.callbacks],
        selective_loss=use_selective_loss(config, prepared.model),
        loss_terms=loss_terms,
    )
    trainer.remove_callback(PrinterCallback)  # our progress bar and metrics.jsonl replace its raw prints
    return trainer


def train(
    config: RunConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    data: PreparedData | None = None,
    recipe: str | Path | None = None,
) -> TrainResult:
    """Fine-tune `config.model` on `config.data` with `config.method`; return the run folder and a summary.

    The output folder is touched only after the config, the folder itself (never an input such as
    `recipe`, the data or the model, nor the working directory) and the model reference are checked and
    the data is prepared. With --resume the run continues in its folder. Otherwise an earlier run there
    (only with overwrite) is renamed to a hidden sibling and the new run writes into the real folder, so
    its checkpoints are where --resume looks; the earlier run is deleted when the new one finishes, or
    fails after its first checkpoint (resumable), and renamed back if it fails before one.

    A resumed run must have the config it was started with, except RESUMABLE_CHANGES (extending it);
    `force` continues with the new one anyway. SIGINT or SIGTERM in training save a checkpoint at the step
    and raise TrainingInterrupted.
    """
    from transformers import set_seed

    out = Path(config.output_dir)
    checkpoint = resume_checkpoint(out) if resume else None
    if force and not resume:
        raise TunesmithError("--force applies only with --resume (it continues a run whose config changed)")
    if resume and not force:
        _refuse_changed_config(out, config)
    check_trackers(config)
    if distributed.is_main_process() and not distributed.output_checked():
        check_output(config, recipe, overwrite=overwrite, resume=resume)
    set_seed(config.train.seed)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    data = data or prepare_data(config, tokenizer)
    if config.train.keep_best and distributed.world_size() > 1:
        raise TunesmithError(f"train.keep_best={config.train.keep_best} runs in one process only for now; remove it for "
                             "--nproc > 1 (checkpoints and train.eval_steps still work)")
    if config.train.keep_best and not data.eval:
        raise TunesmithError(f"train.keep_best={config.train.keep_best} needs eval data to compare checkpoints; set "
                             "data.eval or data.eval_split > 0, or remove train.keep_best")
    if checkpoint is not None or not distributed.is_main_process():
        # other ranks write only their share of each checkpoint, into the folder rank 0 holds
        return _fit(config, out, tokenizer, data, checkpoint, progress)
    with in_place(out, keep_partial=lambda folder: last_checkpoint(folder) is not None):
        return _fit(config, out, tokenizer, data, None, progress)


def check_output(config: RunConfig, recipe: str | Path | None, *, overwrite: bool, resume: bool) -> None:
    """The output folder may be written: not an input, not the working directory, empty unless replaced or resumed.
    Run once per run: by `train`, or by the `--nproc` launcher before its workers start."""
    check_target(Path(config.output_dir), run_inputs(config, recipe), may_replace=overwrite or resume, flag="output_dir",
                 example="runs/my-run", taken="already exists and is not empty; pass --overwrite to replace it, "
                 "--resume to continue it, or --output-dir to write elsewhere")


def _refuse_changed_config(out: Path, config: RunConfig) -> None:
    changed = config_changes(out, config)
    if changed:
        allowed = ", ".join(k + ("*" if k.endswith(".") else "") for k in RESUMABLE_CHANGES)
        raise TunesmithError(
            f"--resume: the config differs from the run's {out / CONFIG_FILE} in {'; '.join(changed)}; resume with "
            f"the recipe and --set options the run was started with (only {allowed} may change), or pass "
            "--force to continue with the new config"
        )


def _fit(config: RunConfig, out: Path, tokenizer, data: PreparedData, checkpoint: Path | None, progress: bool) -> TrainResult:
    """Load and prepare the model, train it into `out` (from `checkpoint` when resuming) and write the run
    (rank 0 alone in a multi-process run; every rank trains)."""
    main = distributed.is_main_process()
    if main:
        write_config(out, config)
        write_json(out / DATA_STATS_FILE, data.stats())

    # measured before the model loads: what the run will need against what the device has
    lengths = [len(ex.input_ids) for ex in data.train if hasattr(ex, "input_ids")]
    preflight = [memory_preflight(config, lengths), length_grouped_order(config)] if main and config.train.doctor else []
    model = load_model(config.model, trust_remote_code=config.trust_remote_code, **method_load_kwargs(config))
    model.config.use_cache = False
    widest = max(getattr(model.config, "intermediate_size", 0) or 0, getattr(model.config, "hidden_size", 0) or 0)
    keep_oversize_pages(4 * widest * config.train.batch_size * max(lengths, default=0))  # an fp32 tensor per token
    if config.continual.previous:  # earlier runs' adapters: merged into the base, or loaded beside the new one
        model = merge_previous_into_base(model, config)
    prepared = prepare_model(model, config, total_steps=planned_steps(config, len(data.train)))
    model = prepared.model
    if config.continual.previous:
        attach_previous(prepared, config)
    undo_fast_path = use_fast_path(prepared, config)
    loss_terms, regularize_info = build_loss_terms(config, model, tokenizer, data, out, resume=checkpoint is not None)
    neftune = NEFTune(model, config.train.neftune_alpha) if config.train.neftune_alpha else None

    progress_cb = ProgressCallback(enabled=progress and main)
    stop = StopOnSignal()
    callbacks = [progress_cb, MetricsFileCallback(out / METRICS_FILE, progress_cb)] if main else [progress_cb]
    doctor = None
    if main and config.train.doctor:
        # The divergence bound 2 ln V holds for a plain cross-entropy, not with regularisers or a preference loss.
        cross_entropy_only = not loss_terms and not get_objective(config.train.objective).preference
        facts = RunFacts(lr=config.train.lr, adapter=prepared.is_adapter, max_grad_norm=config.train.max_grad_norm,
                         vocab_size=getattr(model.config, "vocab_size", None) if cross_entropy_only else None)
        doctor = DoctorCallback(out, facts, data.train, echo=progress, preflight=[f for f in preflight if f])
        callbacks.append(doctor)
    scorer = TaskScoreCallback(config, tokenizer) if config.train.keep_best == "score" else None
    if scorer is not None:
        callbacks.insert(0, scorer)  # before metrics.jsonl and the trackers, which log its score
    if main:
        callbacks.extend(tracker_callbacks(config, out))  # after ours: they log tokens/s and memory too
    callbacks.append(stop)
    trainer = build_trainer(config, prepared, out, data.train, eval_examples=data.eval, ordered=data.ordered,
                            tokenizer=tokenizer, loss_terms=loss_terms, callbacks=callbacks)
    if scorer is not None:
        scorer.trainer = trainer
    start = time.perf_counter()
    with stop:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    elapsed = time.perf_counter() - start
    if stop.received is not None and trainer.state.global_step < trainer.state.max_steps:
        raise TrainingInterrupted(stop.received, trainer.state.global_step, last_checkpoint(out))
    if doctor is not None and doctor.fatal is not None:
        f = doctor.fatal
        raise DoctorStopped(f"the doctor stopped training: {f.message}; cause: {f.cause}; examples in those steps: "
                            f"{', '.join(f.example_ids) or 'unknown'}; remedy: {f.remedy} (all findings: tunesmith doctor {out})")

    if neftune is not None:
        neftune.remove()
    undo_fast_path()
    best = best_checkpoint(trainer, config)
    if best is not None and best["step"] != trainer.state.global_step:
        _save_weights(trainer, prepared, config, out / LAST_DIR, main)  # the last weights, before the best are loaded
        trainer._load_best_model()  # transformers' own loader (the one load_best_model_at_end uses)
        best["last"] = LAST_DIR
    with full_disk_is_reported(out, "the trained weights"):
        _save_weights(trainer, prepared, config, out, main)
        if main:
            tokenizer.save_pretrained(out)
    if main and config.continual.previous:
        save_previous(out, config)
    if prepared.cleanup:
        prepared.cleanup()
    summary = {
        "model": config.model,
        "method": config.method.name,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_loss": round(result.training_loss, 6),
        "train_seconds": round(elapsed, 2),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "tokens_per_second": round(progress_cb.tokens_per_second(trainer.state), 1),
        "bf16": use_bf16(config.train.bf16),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "saved_as": "adapter" if prepared.is_adapter else "full model",
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "data": {"train": data.train_stats.as_dict(), "eval": data.eval_stats.as_dict()},
    }
    if regularize_info:
        summary["regularize"] = regularize_info
    if get_objective(config.train.objective).preference:
        summary["objective"] = config.train.objective
    if data.eval:
        final = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        summary["eval_loss"] = round(final[-1]["eval_loss"] if final else trainer.evaluate()["eval_loss"], 6)
    if best is not None:
        summary["best"] = best
    if main:
        write_json(out / SUMMARY_FILE, summary)
        write_report(out, tokenizer=tokenizer, data=data)
    return TrainResult(out, summary)


LAST_DIR = "last"


def _save_weights(trainer, prepared, config: RunConfig, dest: Path, main: bool) -> None:
    if distributed.shards_weights(config):
        trainer.save_model(str(dest))  # every rank: the Trainer gathers the shards, rank 0 writes
    elif main:
        dest.mkdir(exist_ok=True)
        prepared.save(dest)


def best_checkpoint(trainer, config: RunConfig) -> dict | None:
    """Which evaluated step won under train.keep_best, by how much, and the checkpoint that holds it."""
    state = trainer.state
    if not config.train.keep_best or not state.best_global_step:
        return None
    metric = BEST_METRICS[config.train.keep_best]
    evaluated = [h[metric] for h in state.log_history if metric in h]
    lowest = config.train.keep_best == "eval_loss"
    return {
        "step": state.best_global_step,
        "metric": metric,
        "value": round(state.best_metric, 6),
        "why": f"{'lowest' if lowest else 'highest'} {metric} of {len(evaluated)} evaluations",
        "checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
    }
