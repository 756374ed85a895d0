"""train.keep_best: score: the task score (eval.scorer, greedy generation, as `tunesmith eval` computes it) at
every evaluation, logged as eval_score, so the Trainer can keep the checkpoint that answers best."""
from __future__ import annotations

from transformers import TrainerCallback

from ..config import RunConfig
from ..data.assemble import eval_conversations
from ..evaluation.run import score_generations


class TaskScoreCallback(TrainerCallback):
    """Runs on the Trainer's evaluate: adds `eval_score` to the metrics the best checkpoint is chosen by (the
    Trainer compares them after this hook) and logs it for metrics.jsonl, the report and the trackers.
    `trainer` is set once the Trainer exists (its public `log` reaches every callback)."""

    def __init__(self, config: RunConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        convs = eval_conversations(config)
        self.convs = convs[: config.eval.limit] if config.eval.limit else convs
        self.trainer = None

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if model is None or metrics is None:
            return
        was_training = model.training
        model.eval()
        e = self.config.eval
        score, _ = score_generations(model, self.tokenizer, self.convs, e.scorer, e.max_new_tokens, e.batch_size, progress=False)
        model.train(was_training)
        metrics["eval_score"] = score
        if self.trainer is not None:
            self.trainer.log({"eval_score": score})
