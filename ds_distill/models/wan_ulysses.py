"""DeepSpeed-Ulysses for a diffusers `WanTransformer3DModel`, installed as hooks and an attention processor.

- after the patch embedding each rank of an SP group keeps its contiguous slice of the token sequence, and the
  rotary table (and a per-token timestep embedding, Wan2.2 TI2V) the matching slice;
- self-attention runs through `deepspeed.sequence.layer.DistributedAttention`: an all-to-all scatters the heads
  and gathers the sequence, attention is computed over all tokens for this rank's heads, another all-to-all
  brings the tokens back; cross-attention and the feed-forward are token-local;
- the output projection's tokens are gathered before unpatchify, so every rank returns the whole prediction.

Gradients: every rank of a group computes the same loss L, so the group's objective is sp_size * L. The gather's
backward is its exact adjoint (sum the group's output gradients, keep this rank's slice), which makes the
gradients the group's ranks hand ZeRO-3 add up to sp_size times the sample's gradient; ZeRO-3 averages over all
world = dp_size * sp_size ranks, which leaves exactly the data-parallel mean: SP changes memory and speed only.
"""
from __future__ import annotations

import torch

from ds_distill.errors import DataError
from ds_distill.parallel import SequenceParallel


class _GatherTokens(torch.autograd.Function):
    """All-gather along dim 1 over the SP group; backward: the group's summed gradient, this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        from ds_distill.engines import gather_along

        ctx.sp = sp
        ctx.local = x.shape[1]
        return gather_along(x, sp.group, sp.size, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from ds_distill.engines import sum_over

        total = sum_over(grad, ctx.sp.group)
        lo = ctx.sp.sp_rank * ctx.local
        return total[:, lo: lo + ctx.local], None


def _local_slice(x: torch.Tensor, dim: int, sp: SequenceParallel) -> torch.Tensor:
    n = x.shape[dim]
    if n % sp.size:
        raise DataError(f"training.sp_size: {sp.size} does not divide the {n} tokens of this sample; use a video "
                        f"size whose token count (frames x height x width after patching) it divides")
    step = n // sp.size
    return x.narrow(dim, sp.sp_rank * step, step)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved (real, imaginary) pairs of the head dimension."""
    pairs = x.unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2).type_as(x)


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Plain attention on [B, N, H, D] (diffusers' default dispatch, as the stock Wan processor calls it)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)


class UlyssesSelfAttention:
    """Attention processor of a Wan block's self-attention: projections, q/k norms and rotary on this rank's
    tokens, the attention core through DeepSpeed's DistributedAttention (heads scattered, sequence gathered)."""

    def __init__(self, sp: SequenceParallel):
        from deepspeed.sequence.layer import DistributedAttention

        self.sp = sp
        # [B, N/sp, H, D] -> scatter heads (dim 2), gather sequence (dim 1) -> [B, N, H/sp, D], and back.
        self.core = DistributedAttention(_attention, sp.group, scatter_idx=2, gather_idx=1)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None) -> torch.Tensor:
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the Ulysses processor serves self-attention without a mask only")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        if self.sp.active:
            out = self.core(query, key, value, 0)
        else:
            out = _attention(query, key, value)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def install_wan(module: torch.nn.Module, sp: SequenceParallel) -> None:
    """Wire Ulysses into every WanTransformer3DModel in `module` (itself, or the experts of a Wan2.2 A14B role), before
    its engine is built so ZeRO-3's hooks see our outputs. While `sp` is paused the model computes whole sequences
    on every rank."""
    from diffusers import WanTransformer3DModel

    if sp.size == 1:
        return
    for m in module.modules():
        if isinstance(m, WanTransformer3DModel) and getattr(m, "_ds_distill_sp", None) is not sp:
            _install_one(m, sp)


def _install_one(module: torch.nn.Module, sp: SequenceParallel) -> None:
    module._ds_distill_sp = sp

    def keep_slice(_mod, _args, out):
        # Conv output [B, C, F, H, W]; the model flattens dims 2.. into the sequence. Handing it [B, C, 1, 1, N/sp]
        # makes that flatten yield this rank's tokens.
        if not sp.active:
            return out
        return _local_slice(out.flatten(2), 2, sp).unsqueeze(2).unsqueeze(2)

    def rope_slice(_mod, _args, out):
        if not sp.active:
            return out
        return tuple(_local_slice(t, 1, sp) for t in out)

    def per_token_slice(_mod, _args, out):
        # Wan2.2 TI2V embeds one timestep per token: temb [B, N, D] and timestep_proj [B, N, 6D] follow the tokens.
        if not sp.active or out[0].ndim != 3:
            return out
        return (_local_slice(out[0], 1, sp), _local_slice(out[1], 1, sp), *out[2:])

    def gather(_mod, _args, out):
        return _GatherTokens.apply(out, sp) if sp.active else out

    module.patch_embedding.register_forward_hook(keep_slice)
    module.rope.register_forward_hook(rope_slice)
    module.condition_embedder.register_forward_hook(per_token_slice)
    module.proj_out.register_forward_hook(gather)
    processor = UlyssesSelfAttention(sp)
    for block in module.blocks:
        block.attn1.set_processor(processor)
