"""Byte sizes: the units, reading a size a person typed, and writing one back for people."""
from __future__ import annotations

import re

from .errors import TunesmithError

KiB, MiB, GiB = 1024, 1024**2, 1024**3

# The one convention for sizes people type (`plan --budget`, a merge's `max_shard_size`), the one
# transformers, huggingface_hub and Kubernetes use: SI prefixes count powers of 1000 (2GB = 2 x 10^9
# bytes), IEC prefixes powers of 1024 (2GiB = 2 x 2^30); the trailing B is optional (2G, 2Gi) and case
# does not matter. A number without a unit counts bytes.
_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?))?b?$", re.I)
_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}
SIZE_HELP = ("write e.g. 24GiB (GiB = 2^30 bytes), 80GB (GB = 10^9 bytes) or 512MiB; "
             "a number without a unit counts bytes")


class SizeError(TunesmithError, ValueError):
    """A size that cannot be read. A ValueError too, so that pydantic reports it as a field's error."""


def parse_size(value, what: str = "") -> int:
    """Bytes in `value`: '24GiB' -> 24 x 2^30, '80GB' -> 80 x 10^9, 1234 or '1234' -> 1234 (see above).
    `what` names the option in the error message."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = _SIZE.match(str(value).strip())
    if not m:
        raise SizeError(f"{what + ' ' if what else ''}{value!r} is not a size: {SIZE_HELP}")
    number, prefix, binary = m.groups()
    if not prefix:
        return int(float(number))
    return int(float(number) * (1024 if binary else 1000) ** _POWER[prefix.lower()])


def fmt_bytes(n: float) -> str:
    """Binary units, two decimals for GiB: the way the bill and the measurement print memory."""
    n = float(n)
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    if abs(n) >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{int(n)} B"


def fmt_count(n: int) -> str:
    """A parameter count in thousands (K), millions (M) or billions (B), as model cards write it."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)
