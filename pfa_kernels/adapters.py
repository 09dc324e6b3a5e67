"""torchvision's Swin attention with its projections called as modules, so that PFA layers there train with PFA.

torchvision's ShiftedWindowAttention (Swin) and ShiftedWindowAttentionV2 (Swin V2) pass self.qkv.weight and
self.proj.weight to shifted_window_attention, which applies them with F.linear: a PFA layer put at qkv or proj
would never run, and its weight would train with backpropagation. The adapters here are the same modules (the same
Parameters, buffers, submodules, hooks and state-dict keys; only the class differs) whose forward is torchvision's
function with those two F.linear calls replaced by calls of the qkv and proj modules. Everything else, V2's cosine
attention with its logit scale and the cpb_mlp relative position bias (ordinary Linear layers called as modules,
converted as any other) included, is torchvision's computation, operation for operation.

    adapted = PFAShiftedWindowAttention.from_module(module)   # then convert qkv and proj (pk.convert does both)
    module = adapted.to_module()                               # torchvision's class again
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import swin_transformer

from .nn import PFA_LAYERS


def shifted_window_attention(input: torch.Tensor, qkv: nn.Module, proj: nn.Module,
                             relative_position_bias: torch.Tensor, window_size: list[int], num_heads: int,
                             shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0,
                             logit_scale: torch.Tensor | None = None, training: bool = True) -> torch.Tensor:
    """torchvision.models.swin_transformer.shifted_window_attention with qkv(x) and proj(x) in place of
    F.linear(x, qkv_weight, qkv_bias) and F.linear(x, proj_weight, proj_bias).

    input (N, H, W, C); qkv: a module (C -> 3C) with a bias attribute (Tensor (3C,) or None); proj: a module
    (C -> C); relative_position_bias (1, num_heads, Wh*Ww, Wh*Ww); logit_scale (num_heads, 1, 1) for V2's cosine
    attention, else None. Returns (N, H, W, C).
    """
    B, H, W, C = input.shape
    # pad feature maps to multiples of window size
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape

    shift_size = shift_size.copy()
    # If window size is larger than feature size, there is no need to shift window
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0

    # cyclic shift
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))

    # partition windows
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)  # B*nW, Ws*Ws, C

    # multi-head attention
    if logit_scale is not None and qkv.bias is not None:
        # V2 uses no key bias: the layer runs with a copy of its bias whose key third is zero (no gradient reaches it)
        qkv_bias = qkv.bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
        qkv_out = torch.func.functional_call(qkv, {"bias": qkv_bias}, (x,))
    else:
        qkv_out = qkv(x)
    qkv_out = qkv_out.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv_out[0], qkv_out[1], qkv_out[2]
    if logit_scale is not None:
        # cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
        attn = attn * logit_scale
    else:
        q = q * (C // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    # add relative position bias
    attn = attn + relative_position_bias

    if sum(shift_size) > 0:
        # generate attention mask
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))

    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)

    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = proj(x)
    x = F.dropout(x, p=dropout, training=training)

    # reverse windows
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)

    # reverse cyclic shift
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))

    # unpad features
    x = x[:, :H, :W, :].contiguous()
    return x


def _as_class(module: nn.Module, cls: type) -> nn.Module:
    """A module of class `cls` with `module`'s attributes: the same Parameters, buffers, submodules and hooks, in
    copied containers (replacing a submodule of one does not touch the other)."""
    other = cls.__new__(cls)
    other.__dict__.update({name: copy.copy(value) if isinstance(value, dict | set | list) else value
                           for name, value in module.__dict__.items()})
    return other


class _WindowAttentionAdapter:
    """What the Swin adapters share: the PFA forward, and the conversion from and back to torchvision's class."""

    original: type          # the torchvision class adapted
    cosine_attention: bool  # V2: cosine attention with a logit scale
    weight_users = ("qkv", "proj")  # the projections torchvision applies through their weights

    @classmethod
    def refusal(cls, module: nn.Module) -> str | None:
        """Why running `module` through this adapter would change what it computes (None: it would not)."""
        if type(module) is not cls.original:
            return (f"{type(module).__name__} is not torchvision's {cls.original.__name__} itself (no adapter for a "
                    f"subclass)")
        for name in cls.weight_users:
            layer = getattr(module, name)
            if not isinstance(layer, PFA_LAYERS) and (not isinstance(layer, nn.Linear)
                                                      or type(layer).forward is not nn.Linear.forward):
                return f"its {name} ({type(layer).__name__}) does not compute nn.Linear's forward"
            if layer._forward_pre_hooks or layer._forward_hooks:
                return f"its {name} has forward hooks, which torchvision never runs (it uses {name}.weight)"
        return None

    @classmethod
    def from_module(cls, module: nn.Module) -> nn.Module:
        """`module` (torchvision's class) as this adapter; its qkv and proj still need converting."""
        reason = cls.refusal(module)
        if reason is not None:
            raise ValueError(f"cannot adapt this {type(module).__name__} without changing what it computes: {reason}")
        return _as_class(module, cls)

    def to_module(self) -> nn.Module:
        """This module as torchvision's class again (same attributes; qkv and proj as they are)."""
        return _as_class(self, self.original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, H, W, C) -> (N, H, W, C), as torchvision's forward."""
        return shifted_window_attention(
            x, self.qkv, self.proj, self.get_relative_position_bias(), self.window_size, self.num_heads,
            shift_size=self.shift_size, attention_dropout=self.attention_dropout, dropout=self.dropout,
            logit_scale=self.logit_scale if self.cosine_attention else None, training=self.training)


class PFAShiftedWindowAttention(_WindowAttentionAdapter, swin_transformer.ShiftedWindowAttention):
    """torchvision's ShiftedWindowAttention (Swin) calling its qkv and proj modules."""

    original = swin_transformer.ShiftedWindowAttention
    cosine_attention = False


class PFAShiftedWindowAttentionV2(_WindowAttentionAdapter, swin_transformer.ShiftedWindowAttentionV2):
    """torchvision's ShiftedWindowAttentionV2 (Swin V2) calling its qkv and proj modules."""

    original = swin_transformer.ShiftedWindowAttentionV2
    cosine_attention = True
