"""An Ollama Modelfile for an exported .gguf: the run's chat template as a Go template, its stop tokens and
system prompt, so `ollama create NAME -f Modelfile` answers with the prompt format the model trained on.

Ollama renders prompts with Go's text/template, not Jinja, so the template is rebuilt from the pieces the
Jinja template writes around each role's content (template.role_pieces, checked to rebuild its renderings).
"""
from __future__ import annotations

from ..errors import TunesmithError
from .template import RolePieces


def modelfile(gguf_name: str, pieces: RolePieces, stops: list[str], system_prompt: str | None) -> str:
    """The Modelfile text. `system_prompt` (the run's data.system_prompt) wins over the template's own default;
    Ollama adds SYSTEM to a conversation that has no system message, as the Jinja template does."""
    system = system_prompt or pieces.default_system
    lines = [
        "# Written by `tunesmith export --format gguf`. Create the model with: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{go_template(pieces)}"""',
    ]
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    # tunesmith chat and eval answer greedily; a served model that samples answers differently.
    lines.append("PARAMETER temperature 0")
    if system:
        lines.append(f'SYSTEM """{_literal(system)}"""')
    return "\n".join(lines) + "\n"


def go_template(pieces: RolePieces) -> str:
    """One line of Go template: each message wrapped by its role's prefix and suffix, then the generation prompt.
    No `{{-` trimming: the pieces' own newlines are part of the prompt."""
    branches = []
    for k, (role, (prefix, suffix)) in enumerate(pieces.wrappers.items()):
        keyword = "if" if k == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_literal(prefix)}{{{{ .Content }}}}{_literal(suffix)}')
    return (f"{{{{ range .Messages }}}}{''.join(branches)}{{{{ end }}}}{{{{ end }}}}"
            f"{_literal(pieces.generation_prompt)}")


def _literal(text: str) -> str:
    """Template text that Go and the Modelfile's triple quotes take as it is."""
    if "{{" in text or '"""' in text:
        raise TunesmithError(
            f"the chat template writes {text!r}, which an Ollama Modelfile cannot hold literally ('{{{{' or '\"\"\"'); "
            "write the Modelfile's TEMPLATE by hand"
        )
    return text


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
