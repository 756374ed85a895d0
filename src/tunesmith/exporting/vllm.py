"""`tunesmith export RUN [RUN ...] --vllm DIR`: LoRA adapters in the layout vLLM loads, a serve.sh, the chat template.

vLLM serves a base model with many LoRA adapters (`vllm serve BASE --enable-lora --lora-modules NAME=PATH ...`),
each picked by the request's `model` field. It loads a PEFT folder (adapter_config.json + adapter_model.safetensors)
and refuses what it cannot apply. The rules below are vLLM's, as its source states them (vllm-project/vllm):

- vllm/lora/peft_helper.py @ e745bafffc44744aa601169f8c6f325e47ca7cd5 (`PEFTHelper`): r, lora_alpha and
  target_modules are required; `modules_to_save` must be empty; `use_dora` is refused; `r` may not exceed
  `--max-lora-rank`; `bias` must be "none". Newer main adds: `lora_bias`, an init that changes the base weights
  (PiSSA, OLoRA, CorDA, LoftQ, unconverted), `layer_replication` are refused; `rank_pattern` ranks count for the max.
- vllm/config/lora.py @ a78dc92f43ae2471dd40675a47079aa1a9a157c1: `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128,
  256, 320, 512]`, the values `--max-lora-rank` accepts.
- vllm/lora/utils.py @ 0fd157078c53638b7ffc9ce7f2c8b8d7ef7a7d28 (`parse_fine_tuned_lora_name`): every tensor is
  `<module>.lora_A.weight` / `<module>.lora_B.weight` (or an embedding's lora_embedding_A/B), after an optional
  `base_model.model.` prefix; anything else (DoRA's magnitude, VeRA's vectors, AdaLoRA's E, IA3) is "unsupported".
- vllm/lora/lora_model.py @ 532cc2581840104cf00297b7ea6a187420456403 (`from_local_checkpoint`): reads
  adapter_model.safetensors first; each module's last name must be one vLLM replaced with a LoRA layer (the
  linear layers; for Llama q/k/v/o_proj, gate/up/down_proj, packed as qkv_proj and gate_up_proj).

tunesmith refuses such adapters before writing anything, saying what to do instead.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunesmithError
from ..methods import get_method
from ..methods.adapter_stack import read_stack_file
from ..models import BUILTIN_MODELS, load_tokenizer, pull_builtin
from ..outdir import check_target, inputs, model_input, staged
from ..rundir import ADAPTER_CONFIG, is_adapter_run, is_run_dir, load_run_config
from .template import served_template

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
# The decoder layers' linear projections of the Llama family, as vLLM's packed_modules_mapping unpacks them.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT inits that rewrite the base weights at load (peft_helper.py _init_is_supported rejects them).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TENSOR = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight")
TEMPLATE_FILE = "chat_template.jinja"
MERGE_INSTEAD = "export --merge --out DIR and serve the merged folder with `vllm serve DIR`"


@dataclass(frozen=True)
class VllmAdapter:
    name: str  # the model name requests use
    run: Path
    rank: int
    base: str  # what `vllm serve` loads: a folder path or a hub id
    template: str  # the chat template, with the run's system prompt baked in
    quantized_base: bool  # trained on a 4-bit base (QLoRA)


def parse_runs(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=RUN` or `RUN` (named after its folder) -> (name, run); names must be unique."""
    pairs = []
    for spec in specs:
        name, sep, run = spec.partition("=")
        if not sep:
            name, run = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(spec).resolve().name), spec
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise TunesmithError(f"--vllm: adapter name '{name}' (from '{spec}') may hold only letters, digits, '_', '-' "
                                 "and '.'; name it with NAME=RUN")
        pairs.append((name, run))
    names = [n for n, _ in pairs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TunesmithError(f"--vllm: two runs are both named '{dupes[0]}'; name them apart with NAME=RUN")
    return pairs


def check_adapter(run: str | Path) -> tuple[dict, list[str]]:
    """(adapter_config, tensor names) of a run vLLM can serve as LoRA; else one line saying why and what instead."""
    run = Path(run)
    if not is_run_dir(run):
        raise TunesmithError(f"'{run}' is not a trained run folder (no adapter or model); train first")
    method = load_run_config(run).method.name
    if not is_adapter_run(run):
        raise TunesmithError(f"'{run}' holds a whole model (method.name={method}), not a LoRA adapter: {MERGE_INSTEAD}")
    if read_stack_file(run) is not None:
        raise TunesmithError(f"'{run}' builds on earlier runs' adapters (continual.previous), and vLLM applies one "
                             f"adapter per request: {MERGE_INSTEAD}, or serve it with `tunesmith serve`")
    cfg = json.loads((run / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    why = _unservable(cfg, method)
    if why:
        raise TunesmithError(f"'{run}': {why}, which vLLM cannot serve as LoRA: {MERGE_INSTEAD}")
    names = safetensors_names(run / ADAPTER_WEIGHTS)
    for tensor in names:
        match = TENSOR.fullmatch(tensor)
        if match is None:
            raise TunesmithError(f"'{run}': the adapter holds '{tensor}', not a lora_A/lora_B weight, which vLLM cannot "
                                 f"load: {MERGE_INSTEAD}")
        module = match["module"].rsplit(".", 1)[-1]
        if ".layers." not in match["module"] or module not in LORA_MODULES:
            raise TunesmithError(f"'{run}': the adapter adapts '{module}', and vLLM applies LoRA to the decoder layers' "
                                 f"projections only ({', '.join(LORA_MODULES)}): train with method.target_modules among "
                                 f"them, or {MERGE_INSTEAD}")
    return cfg, names


def _unservable(cfg: dict, method: str) -> str | None:
    ranks = set((cfg.get("rank_pattern") or {}).values()) | {cfg.get("r")}
    init = cfg.get("init_lora_weights", True)
    rules = [
        (cfg.get("peft_type") != "LORA", f"method.name={method} trains a {cfg.get('peft_type')} adapter, not LoRA"),
        (cfg.get("use_dora"), "it is a DoRA adapter (vLLM: 'does not yet support DoRA')"),
        (cfg.get("modules_to_save"), f"it trains whole modules besides LoRA (modules_to_save {cfg.get('modules_to_save')})"),
        (cfg.get("bias", "none") != "none" or cfg.get("lora_bias"), "its adapter trains biases"),
        (isinstance(init, str) and init.lower() in BASE_CHANGING_INITS,
         f"its init '{init}' changes the base weights and was not converted to a plain LoRA"),
        (cfg.get("layer_replication"), "it replicates layers (layer_replication)"),
        (len(ranks) > 1, f"its modules have uneven ranks {sorted(ranks)} (rank_pattern)"),
        (cfg.get("alpha_pattern"), "its modules have uneven alphas (alpha_pattern)"),
        (max(ranks) > MAX_LORA_RANKS[-1], f"its rank {max(ranks)} is above vLLM's largest --max-lora-rank "
                                          f"{MAX_LORA_RANKS[-1]}"),
    ]
    return next((why for broken, why in rules if broken), None)


def safetensors_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header (8-byte length, then JSON), without loading tensors."""
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error):
        raise TunesmithError(f"'{path}' is missing or not a safetensors file; train the run again") from None
    return sorted(k for k in header if k != "__metadata__")


def max_lora_rank(rank: int) -> int:
    """The smallest value vLLM's --max-lora-rank accepts that holds `rank`."""
    return next(r for r in MAX_LORA_RANKS if r >= rank)


def _base(ref: str) -> str:
    """What `vllm serve` loads for a run's base: the built-in model's converted folder, a folder, or a hub id."""
    if ref in BUILTIN_MODELS:
        return str(pull_builtin(ref).resolve())
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        raise TunesmithError(f"--vllm: the base model '{ref}' is a .gguf file, and vLLM serves LoRA adapters on a "
                             "Hugging Face folder: train on that folder, or export --merge")
    return str(path.resolve()) if path.exists() else ref


def plan(specs: list[str]) -> list[VllmAdapter]:
    """Check every run (and that they share one base and one chat template) before anything is written."""
    adapters = []
    for name, run in parse_runs(specs):
        cfg, _ = check_adapter(run)
        config = load_run_config(run)
        template = served_template(load_tokenizer(run).chat_template, config.data.system_prompt)
        adapters.append(VllmAdapter(name, Path(run), int(cfg["r"]), _base(config.model), template,
                                    get_method(config.method.name).quantized_base))
    first = adapters[0]
    for other in adapters[1:]:
        if other.base != first.base:
            raise TunesmithError(f"--vllm: '{other.run}' was trained on '{other.base}' and '{first.run}' on "
                                 f"'{first.base}'; one vLLM server serves adapters of one base: export them apart")
        if other.template != first.template:
            raise TunesmithError(f"--vllm: '{other.run}' and '{first.run}' use different chat templates or system "
                                 "prompts, and a vLLM server has one --chat-template: export them apart")
    return adapters


def export_vllm(specs: list[str], out: str, overwrite: bool = False) -> Path:
    """Write `out`/adapters/NAME/ (one PEFT folder per run), `out`/chat_template.jinja and `out`/serve.sh."""
    if not specs:
        raise TunesmithError("--vllm: name at least one run folder")
    adapters = plan(specs)
    target = Path(out).expanduser()
    reads = [i for a in adapters for i in inputs("run folder", a.run) + model_input(load_run_config(a.run).model,
                                                                                     "base model")]
    check_target(target, reads, may_replace=overwrite, flag="--vllm", example="exports/vllm",
                 taken="exists and is not empty; pass --overwrite or choose another folder")
    with staged(target) as tmp:
        for a in adapters:
            folder = tmp / "adapters" / a.name
            folder.mkdir(parents=True)
            shutil.copy(a.run / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
            shutil.copy(a.run / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
        (tmp / TEMPLATE_FILE).write_text(adapters[0].template, encoding="utf-8")
        script = tmp / "serve.sh"
        script.write_text(serve_script(adapters), encoding="utf-8")
        script.chmod(0o755)
    return target


def serve_script(adapters: list[VllmAdapter]) -> str:
    """A bash script that finds its adapters next to itself, so the folder can be copied to the GPU machine."""
    modules = " ".join(f'{a.name}="$HERE/adapters/{a.name}"' for a in adapters)
    rank = max_lora_rank(max(a.rank for a in adapters))
    lines = [
        "#!/usr/bin/env bash",
        "# Written by `tunesmith export --vllm`: vLLM's OpenAI-compatible server with these LoRA adapters.",
        "# Requests pick an adapter by name (\"model\": \"" + adapters[0].name + "\"); extra arguments go to vllm serve.",
        "# The base must be at this path (or the same hub id) on the machine that runs this script.",
    ]
    if any(a.quantized_base for a in adapters):
        lines.append("# Trained on a 4-bit (QLoRA) base: served on the full-precision base, answers can differ "
                     "slightly; `tunesmith export --merge` merges into the base the adapter was trained on.")
    lines += [
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        f"exec vllm serve {shlex.quote(adapters[0].base)} \\",
        "  --enable-lora \\",
        f"  --lora-modules {modules} \\",
        f"  --max-lora-rank {rank} \\",
        f"  --max-loras {len(adapters)} \\",
        f'  --chat-template "$HERE/{TEMPLATE_FILE}" \\',
        '  "$@"',
    ]
    return "\n".join(lines) + "\n"
