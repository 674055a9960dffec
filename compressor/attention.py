"""Attention bookkeeping: finding attention modules, their head shapes, and the plain-int attributes
(``num_heads``, ``head_dim``, ``embed_dim``...) a forward reads, kept in step with the pruned widths.

Two layouts are known: timm's (a fused ``qkv`` projection and ``num_heads``/``head_dim`` attributes)
and torch's ``nn.MultiheadAttention`` (torchvision's ViT).
"""

from __future__ import annotations

from torch import nn

from .errors import GraphError


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    # timm's layout (a fused ``qkv`` projection and ``num_heads``/``head_dim`` attributes) and
    # torch's ``nn.MultiheadAttention`` (torchvision's ViT).
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        or (isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int))
    }


def _head_blocks(attention: dict[str, nn.Module]) -> dict[nn.Module, int]:
    """The module whose pruned output channels come in head blocks -> its head count."""
    return {_head_module(m): m.num_heads for m in attention.values()}


def _head_module(attention: nn.Module) -> nn.Module:
    return attention if isinstance(attention, nn.MultiheadAttention) else attention.qkv


def head_shape(attention: nn.Module) -> tuple[int, int]:
    """``(num_heads, head_dim)`` of an attention module, read from its widths where it has no ``head_dim``."""
    if isinstance(attention, nn.MultiheadAttention):
        return attention.num_heads, attention.out_proj.in_features // attention.num_heads
    return attention.num_heads, attention.qkv.out_features // (3 * attention.num_heads)


def attention_heads(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every attention module of ``model`` -> ``(num_heads, head_dim)``."""
    return {name: head_shape(m) for name, m in _attention_modules(model).items()}


def drop_heads(model: nn.Module, names: tuple[str, ...], count: int) -> None:
    """Lower ``num_heads`` of the named attention modules by ``count``, before their heads are pruned.

    Before, because torch-pruning's ``nn.MultiheadAttention`` pruner checks that the pruned
    ``embed_dim`` divides by ``num_heads`` and sets ``head_dim`` from it; :func:`patch_attention`
    then derives ``head_dim`` from the new count, which keeps it as it was.
    """
    for name in names:
        m = model.get_submodule(name)
        if m.num_heads - count < 1:
            raise GraphError(f"removing {count} heads would leave attention module {name!r} without any "
                             f"(it has {m.num_heads})")
        m.num_heads -= count


def patch_attention(model: nn.Module) -> None:
    """Make the attributes that a forward reads as plain ints follow the pruned widths.

    timm's ``head_dim`` follows the ``qkv`` width and ``num_heads`` (the scale is kept: it is part
    of the learned function); ``nn.MultiheadAttention``'s ``embed_dim``/``head_dim``/``kdim``/``vdim``
    follow its ``out_proj`` and ``num_heads``; torchvision's ViT reshapes its patch embedding with
    ``hidden_dim``. Whole-head pruning lowers ``num_heads`` first (:func:`drop_heads`).
    """
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.embed_dim = m.out_proj.out_features
            m.head_dim = m.embed_dim // m.num_heads
            if m._qkv_same_embed_dim:
                m.kdim = m.vdim = m.embed_dim
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            if hasattr(m, "head_dim"):
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        elif isinstance(getattr(m, "conv_proj", None), nn.Conv2d) and isinstance(getattr(m, "hidden_dim", None), int):
            m.hidden_dim = m.conv_proj.out_channels
