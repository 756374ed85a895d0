"""sdpa's flash kernel, its math backend and tunesmith's short-example path (training/attention.py,
ShortCausalAttention) on this CPU: causal attention forward + backward in bf16 for one example of n tokens
(9 query heads, 3 kv heads, head dim 64: the built-in model's shapes), and each one's largest gradient error
against an fp64 reference. Padding-free training sends examples up to `attention.SHORT` tokens to the short path.

    .venv/bin/python bench/attention_backends.py
    .venv/bin/python bench/attention_backends.py --lengths 4096      # a long example
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tunesmith.training.attention import ShortCausalAttention

H, KV, D = 9, 3, 64


def attention(backend, q, k, v):
    if backend == "short":
        return ShortCausalAttention.apply(q, k, v, D**-0.5)
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 160, 192, 256, 512, 1024],
                   help="Example lengths in tokens.")
    for n in p.parse_args().lengths:
        torch.manual_seed(0)
        base = [torch.randn(1, h, n, D, dtype=torch.bfloat16) for h in (H, KV, KV)]
        grad = torch.randn(1, H, n, D, dtype=torch.bfloat16)
        q64, k64, v64 = [t.double().requires_grad_() for t in base]
        attention(SDPBackend.MATH, q64, k64, v64).backward(grad.double())
        line = f"n={n:5d}"
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH),
                              ("short", "short")):
            q, k, v = [t.clone().requires_grad_() for t in base]
            attention(backend, q, k, v).backward(grad)
            err = max((q.grad.double() - q64.grad).abs().max().item(), (k.grad.double() - k64.grad).abs().max().item())
            reps = max(3, 3000 // n)
            start = time.perf_counter()
            for _ in range(reps):
                attention(backend, q, k, v).backward(grad)
            line += f"  {name} {(time.perf_counter() - start) / reps * 1e3:7.2f} ms (grad error {err:.2g})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
