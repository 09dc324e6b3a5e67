"""PFAMultiheadAttention: nn.MultiheadAttention whose q/k/v and output projections are PFA linear layers.

nn.MultiheadAttention applies its projections through their weights (F.multi_head_attention_forward calls
F.linear(x, in_proj_weight, in_proj_bias) and F.linear(o, out_proj.weight, out_proj.bias)), so converting its
out_proj to a PFA layer would change nothing: that layer's forward never runs. Here the same computation calls
PFA layers instead, so their input gradients go through the feedback W_fb = B·R and the feedback learns:

    in_proj    PFALinear(E, 3E): the packed (3E, E) q/k/v weight with one feedback population  [kdim == vdim == E]
    q_proj, k_proj, v_proj  PFALinear(E, E), (kdim, E), (vdim, E) without bias; the (3E,) bias is qkv_bias   [else]
    out_proj   PFALinear(E, E)

The state dict keeps nn.MultiheadAttention's keys (in_proj_weight, in_proj_bias or q/k/v_proj_weight, out_proj.*,
bias_k, bias_v) plus each projection's feedback (in_proj.feedback.*, ...), so a plain nn.MultiheadAttention
checkpoint loads with strict=True (the feedback is kept as drawn) and pk.bp_state_dict of this one loads into nn.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .nn import PFALinear

# PFALinear's keyword arguments that every projection takes (feedback_seed is counted up per projection).
_PFA_LAYER_KWARGS = tuple(name for name, parameter in inspect.signature(PFALinear.__init__).parameters.items()
                          if parameter.kind is parameter.KEYWORD_ONLY and name != "feedback_seed")

# This module's own state-dict names -> nn.MultiheadAttention's (one table for saving and loading).
_PACKED_KEYS = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias"}
_SEPARATE_KEYS = {"q_proj.weight": "q_proj_weight", "k_proj.weight": "k_proj_weight",
                  "v_proj.weight": "v_proj_weight", "qkv_bias": "in_proj_bias"}


def _state_keys(module) -> dict[str, str]:
    return _PACKED_KEYS if module._qkv_same_embed_dim else _SEPARATE_KEYS


def _save_with_nn_keys(module, state_dict, prefix, local_metadata) -> None:
    for own, plain in _state_keys(module).items():
        if prefix + own in state_dict:
            state_dict[prefix + plain] = state_dict.pop(prefix + own)


def _load_nn_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # Runs before the children load: they are handed the keys under their names.
    for own, plain in _state_keys(module).items():
        if prefix + plain in state_dict:
            state_dict[prefix + own] = state_dict.pop(prefix + plain)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True: not attended) as the additive float mask nn uses (-inf where True), in the query's dtype."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _plus(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias


class PFAMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with PFA projections: same constructor, state-dict keys and forward.

    Inputs as nn.MultiheadAttention's, with L the target and S the source length, N the batch, E = embed_dim:
    query (N, L, E) with batch_first else (L, N, E), or unbatched (L, E); key (N, S, kdim) / (S, N, kdim) / (S, kdim);
    value likewise with vdim; key_padding_mask (N, S) or (S,) (bool: True is not attended, or float, added);
    attn_mask (L, S) or (N * num_heads, L, S) ((num_heads, L, S) unbatched), bool or float. Returns the output
    (query's layout, E features) and, with need_weights, the attention weights (N, L, S) averaged over heads or
    (N, num_heads, L, S) with average_attn_weights=False, else None. is_causal=True is a hint that attn_mask is the
    causal mask (nn.MultiheadAttention's meaning): attn_mask is required.

    A call that can reach no PFA backward (torch.no_grad(), or nothing requiring grad) runs nn.MultiheadAttention's
    own forward, fast path included: identical outputs. Otherwise the forward is F.multi_head_attention_forward's
    with every projection called as a PFA layer: the explicit softmax(Q K^T / sqrt(d)) when need_weights, else
    F.scaled_dot_product_attention. Feedback keyword arguments are PFALinear's; with feedback_seed=s the
    projections get seeds s, s + 1, ... in the order of pfa_layers().

    Cost: with the packed weight, self-attention (query is key is value) runs the in-projection once, as nn does.
    Otherwise every distinct input goes through the whole packed layer and keeps its rows (one PFA layer, one
    feedback for all of q, k and v): the forward and the input-gradient GEMM of the in-projection cost up to 3x nn's.
    """

    original = nn.MultiheadAttention  # the class this one replaces (pk.convert's table)
    weight_users = ("out_proj",)  # its submodules nn's forward applies through their weights

    @classmethod
    def refusal(cls, module: nn.Module) -> str | None:
        """Why replacing this nn.MultiheadAttention by PFAMultiheadAttention would change what it computes (None: it
        would not)."""
        if parametrize.is_parametrized(module) or parametrize.is_parametrized(module.out_proj):
            return "a weight of it is parametrized (torch.nn.utils.parametrize); PFAMultiheadAttention would drop that"
        if type(module) is not nn.MultiheadAttention:
            return (f"{type(module).__name__} is a subclass of nn.MultiheadAttention (PFAMultiheadAttention replaces "
                    f"only nn.MultiheadAttention itself)")
        if module._forward_pre_hooks or module._forward_hooks:
            return "it has forward hooks, which a new module would lose"
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            value = getattr(module, name)
            if value is not None and not isinstance(value, nn.Parameter):
                return f"its {name} is a {type(value).__name__}, not a Parameter"
        if not isinstance(module.out_proj, nn.Linear) or not isinstance(module.out_proj.weight, nn.Parameter):
            return "its out_proj is not an nn.Linear holding a weight Parameter"
        return None

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, feedback_seed=None,
                 **layer_kwargs):
        unknown = sorted(set(layer_kwargs) - set(_PFA_LAYER_KWARGS))
        if unknown:
            raise TypeError(f"PFAMultiheadAttention got unexpected keyword arguments {unknown}: it takes "
                            f"nn.MultiheadAttention's arguments, feedback_seed and PFALinear's {_PFA_LAYER_KWARGS}")
        nn.Module.__init__(self)
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("kdim", kdim), ("vdim", vdim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1]; got {dropout!r}")
        if feedback_seed is not None and (isinstance(feedback_seed, bool) or not isinstance(feedback_seed, int)):
            raise TypeError(f"feedback_seed must be an int or None; got {feedback_seed!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        seeds = iter(range(4)) if feedback_seed is None else iter(range(feedback_seed, feedback_seed + 4))

        def layer(in_features, out_features, has_bias):
            seed = None if feedback_seed is None else next(seeds)
            return PFALinear(in_features, out_features, has_bias, device=device, dtype=dtype, feedback_seed=seed,
                             **layer_kwargs)

        factory = {"device": device, "dtype": dtype}
        if self._qkv_same_embed_dim:
            self.in_proj = layer(embed_dim, 3 * embed_dim, bias)
        else:
            self.q_proj = layer(embed_dim, embed_dim, False)
            self.k_proj = layer(self.kdim, embed_dim, False)
            self.v_proj = layer(self.vdim, embed_dim, False)
            self.qkv_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = layer(embed_dim, embed_dim, bias)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()  # nn.MultiheadAttention's initialization, through the properties below
        self.register_state_dict_post_hook(_save_with_nn_keys)
        self.register_load_state_dict_pre_hook(_load_nn_keys)

    # nn.MultiheadAttention's tensors, held by the PFA layers (nn's own forward and fast path read these).
    @property
    def in_proj_weight(self) -> torch.Tensor | None:
        """(3E, E), or None when kdim or vdim differs from E."""
        return self.in_proj.weight if self._qkv_same_embed_dim else None

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """(3E,): the q, k and v biases, or None (bias=False)."""
        return self.in_proj.bias if self._qkv_same_embed_dim else self.qkv_bias

    @property
    def q_proj_weight(self) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self.q_proj.weight

    @property
    def k_proj_weight(self) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self.k_proj.weight

    @property
    def v_proj_weight(self) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self.v_proj.weight

    def pfa_layers(self) -> list[PFALinear]:
        """The projections: [in_proj, out_proj], or [q_proj, k_proj, v_proj, out_proj]."""
        inputs = [self.in_proj] if self._qkv_same_embed_dim else [self.q_proj, self.k_proj, self.v_proj]
        return [*inputs, self.out_proj]

    def extra_repr(self) -> str:
        dims = "" if self._qkv_same_embed_dim else f", kdim={self.kdim}, vdim={self.vdim}"
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{dims}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention, device=None, **layer_kwargs) -> PFAMultiheadAttention:
        """A PFAMultiheadAttention holding `module`'s own Parameters (an optimizer's references stay valid), with new
        feedback (layer_kwargs: PFALinear's feedback keyword arguments) built on `device` (default: the weights')
        and `module`'s training flag."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be an nn.MultiheadAttention; got {type(module).__name__}")
        reason = cls.refusal(module)
        if reason is not None:
            raise ValueError(f"cannot replace this {type(module).__name__} without changing what it computes: {reason}")
        weight = module.out_proj.weight
        attention = cls(module.embed_dim, module.num_heads, module.dropout, module.in_proj_bias is not None,
                        module.bias_k is not None, module.add_zero_attn, module.kdim, module.vdim, module.batch_first,
                        device=device or weight.device, dtype=weight.dtype, **layer_kwargs)
        if module._qkv_same_embed_dim:
            attention.in_proj.weight, attention.in_proj.bias = module.in_proj_weight, module.in_proj_bias
        else:
            attention.q_proj.weight, attention.k_proj.weight = module.q_proj_weight, module.k_proj_weight
            attention.v_proj.weight, attention.qkv_bias = module.v_proj_weight, module.in_proj_bias
        attention.out_proj.weight, attention.out_proj.bias = module.out_proj.weight, module.out_proj.bias
        attention.bias_k, attention.bias_v = module.bias_k, module.bias_v
        return attention.train(module.training)

    def to_module(self) -> nn.MultiheadAttention:
        """The nn.MultiheadAttention computing the same (built on the meta device, then holding this module's
        Parameters, training flag and forward/backward hooks); the feedback is dropped."""
        with torch.device("meta"):
            plain = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, self.in_proj_bias is not None,
                                          self.bias_k is not None, self.add_zero_attn, self.kdim, self.vdim,
                                          self.batch_first)
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                     "bias_v"):
            setattr(plain, name, getattr(self, name))
        plain.out_proj.weight, plain.out_proj.bias = self.out_proj.weight, self.out_proj.bias
        for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
            getattr(plain, hooks).update(getattr(self, hooks))
        return plain.train(self.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            if self._needs_pfa_backward(query, key, value):
                raise NotImplementedError("query, key or value is a nested tensor: only nn.MultiheadAttention's "
                                          "inference fast path takes those, and it has no PFA backward; pad the batch "
                                          "and pass key_padding_mask")
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                                   is_causal)
        batched = self._check_arguments(query, key, value, key_padding_mask, attn_mask, is_causal)
        if not self._needs_pfa_backward(query, key, value):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                                   is_causal)
        return self._pfa_forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                                 is_causal, batched)

    def _needs_pfa_backward(self, *inputs: torch.Tensor) -> bool:
        """Whether a backward of this call can reach a PFA layer (else nn's forward computes the same). brsf always
        takes the PFA layers: their forward draws the batch's feedback magnitudes."""
        if any(layer.rule == "brsf" for layer in self.pfa_layers()):
            return True
        if not torch.is_grad_enabled():
            return False
        return any(x.requires_grad for x in inputs) or any(p.requires_grad for p in self.parameters())

    def _check_arguments(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> bool:
        """Raise, naming the argument, on what nn.MultiheadAttention would reject; return whether query is batched."""
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D ({'(N, L, E)' if self.batch_first else '(L, N, E)'}) or unbatched "
                             f"2-D (L, E); got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        for name, tensor, features in (("query", query, self.embed_dim), ("key", key, self.kdim),
                                       ("value", value, self.vdim)):
            if tensor.dim() != query.dim() or tensor.shape[-1] != features:
                raise ValueError(f"{name} must be {query.dim()}-D (as query is) with {features} features (last dim); "
                                 f"got shape {tuple(tensor.shape)}")
        sequence = 1 if batched and self.batch_first else 0  # the dim of L and S
        batch = 1 - sequence
        if key.shape[:-1] != value.shape[:-1] or (batched and key.shape[batch] != query.shape[batch]):
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have query's batch size and "
                             f"one source length")
        L, S = query.shape[sequence], key.shape[sequence]
        N = query.shape[batch] if batched else None
        masks = (("key_padding_mask", key_padding_mask, [(N, S)] if batched else [(S,)]),
                 ("attn_mask", attn_mask, [(L, S), ((N if batched else 1) * self.num_heads, L, S)]))
        for name, mask, shapes in masks:
            if mask is None:
                continue
            if mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(f"{name} must be a bool or floating-point tensor; got {mask.dtype}")
            if tuple(mask.shape) not in shapes:
                raise ValueError(f"{name} must have shape {' or '.join(str(s) for s in shapes)}; got "
                                 f"{tuple(mask.shape)}")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is a hint that attn_mask is the causal mask (as in "
                             "nn.MultiheadAttention): pass attn_mask too")
        return batched

    def _in_projection(self, query, key, value, self_attention: bool, shared_key_value: bool):
        """q (L, N, E), k (S, N, E), v (S, N, E) from query (L, N, E), key (S, N, kdim), value (S, N, vdim)."""
        E = self.embed_dim
        if not self._qkv_same_embed_dim:
            biases = (None, None, None) if self.qkv_bias is None else self.qkv_bias.chunk(3)
            return tuple(_plus(layer(x), b) for layer, x, b in
                         zip((self.q_proj, self.k_proj, self.v_proj), (query, key, value), biases, strict=True))
        if self_attention:
            # nn's layout: (3, E) moved to the front and made contiguous, the order chunk() gives.
            packed = self.in_proj(query).unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return packed[0], packed[1], packed[2]
        # One PFA layer holds the packed weight and one feedback B (3E, C_mid), R (C_mid, E). Each distinct input goes
        # through all of it and keeps its rows: its input gradient is g_rows · W_fb[rows], and the feedback learns
        # B^T dL/dW summed over the calls, exactly PFA of the packed layer.
        q = self.in_proj(query)[..., :E]
        if shared_key_value:
            packed = self.in_proj(key)[..., E:].unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2)
            return q, packed[0], packed[1]
        return q, self.in_proj(key)[..., E:2 * E], self.in_proj(value)[..., 2 * E:]

    def _pfa_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                     is_causal, batched):
        # F.multi_head_attention_forward step by step (same operations, same order), projections through PFA layers.
        self_attention, shared_key_value = query is key and key is value, key is value
        if self.batch_first and batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        if not batched:  # one sequence: a batch of one along dim 1, as nn does
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = _float_mask(attn_mask, query.dtype)
            if key_padding_mask is not None:
                is_causal = False  # the merged mask below is no longer causal
        q, k, v = self._in_projection(query, key, value, self_attention, shared_key_value)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None:  # one more key/value position, attended by every query
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros((bsz * heads, 1, head_dim))], dim=1)
            v = torch.cat([v, v.new_zeros((bsz * heads, 1, head_dim))], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
                                .reshape(bsz * heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            output = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:  # (1, L, S) -> (1, 1, L, S); (N * heads, L, S) -> (N, heads, L, S)
                attn_mask = (attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 and attn_mask.dim() == 3
                             else attn_mask.view(bsz, heads, attn_mask.shape[-2], src_len))
            q = q.view(bsz, heads, tgt_len, head_dim)
            k = k.view(bsz, heads, src_len, head_dim)
            v = v.view(bsz, heads, src_len, head_dim)
            output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            output = output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        output = self.out_proj(output).view(tgt_len, bsz, embed_dim)  # no -1: L or N may be 0
        if not batched:
            output = output.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            output = output.transpose(1, 0)
        return output, weights

