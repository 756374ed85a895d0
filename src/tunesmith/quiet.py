"""Keep library chatter out of the user's terminal: our own progress bars say what is happening."""
from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    # bitsandbytes warns on import that an optional GPU-kernel package is missing; it is not needed.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="peft")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
