"""Test helper: the bytes autograd really saves for backward in one forward pass (unique storages)."""
from __future__ import annotations


def tiny_config(model_type: str, **over) -> dict:
    base = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000,
            "tie_word_embeddings": True, "max_position_embeddings": 256}
    if model_type == "gemma2":
        base.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, head_dim=16, query_pre_attn_scalar=16,
                    sliding_window=4096)
    if model_type == "phi3":
        base.update(num_key_value_heads=4, tie_word_embeddings=False, pad_token_id=0)
    base.update(over)
    return base


def build(cfg: dict, device=None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    c = dict(cfg)
    mt = c.pop("model_type")
    config = AutoConfig.for_model(mt, **c)
    if mt == "gemma2":
        config._attn_implementation = "eager"
    if device is not None:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def saved_bytes(model, batch: int, seq: int, padded: bool, detail: dict | None = None) -> int:
    import gc
    import weakref

    import torch

    model.train()
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        mask[-1, -3:] = 0
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    packed = []

    def pack(t):
        packed.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    loss = out.loss
    del out  # what the loss graph still holds is what backward needs
    gc.collect()
    alive: dict[int, int] = {}
    for ref in packed:
        t = ref()
        if t is None:
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            alive[st.data_ptr()] = st.nbytes()
            if detail is not None:
                detail.setdefault(st.data_ptr(), (tuple(t.shape), str(t.dtype)))
    del loss
    return sum(alive.values())
