"""PFAMultiheadAttention (attention.py) and the Swin adapters (adapters.py): the same forward as torchvision's and
nn's modules, every projection a PFA layer that runs and learns, and input gradients equal to the literal algorithm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import swin_transformer, vision_transformer

import pfa_kernels as pk
from pfa_kernels.adapters import PFAShiftedWindowAttention, PFAShiftedWindowAttentionV2

EMBED, HEADS, N, L, S = 12, 3, 2, 5, 7

# (kwargs of nn.MultiheadAttention, whether key/value differ from query)
_CONFIGS = {
    "self": (dict(), False),
    "self_batch_first": (dict(batch_first=True), False),
    "cross": (dict(), True),
    "kdim_vdim": (dict(kdim=5, vdim=7, batch_first=True), True),
    "bias_kv_zero_attn": (dict(add_bias_kv=True, add_zero_attn=True), True),
    "no_bias": (dict(bias=False), False),
}


def _inputs(config, cross, batched=True, dtype=torch.float32):
    kdim, vdim = config.get("kdim", EMBED), config.get("vdim", EMBED)
    first = config.get("batch_first", False)

    def shape(length, features):
        if not batched:
            return (length, features)
        return (N, length, features) if first else (length, N, features)

    query = torch.randn(shape(L, EMBED), dtype=dtype)
    if not cross:
        return query, query, query
    return query, torch.randn(shape(S, kdim), dtype=dtype), torch.randn(shape(S, vdim), dtype=dtype)


def _pair(config, dtype=torch.float32, **layer_kwargs):
    """An nn.MultiheadAttention and a PFAMultiheadAttention holding copies of its Parameters."""
    plain = nn.MultiheadAttention(EMBED, HEADS, dtype=dtype, **config)
    pfa = pk.PFAMultiheadAttention(EMBED, HEADS, dtype=dtype, **config, **layer_kwargs)
    pfa.load_state_dict(plain.state_dict(), strict=False)  # the feedback keys are pfa's own
    return plain, pfa


@pytest.mark.parametrize("name", sorted(_CONFIGS))
@pytest.mark.parametrize("need_weights", [True, False])
def test_forward_equals_nn_multihead_attention(name, need_weights):
    """The PFA forward (taken whenever a gradient can flow) computes nn's numbers: 1e-6 in float32."""
    torch.manual_seed(0)
    config, cross = _CONFIGS[name]
    plain, pfa = _pair(config, expand_ratio=2)
    query, key, value = _inputs(config, cross)
    for average in (True, False):
        expected, expected_weights = plain(query, key, value, need_weights=need_weights, average_attn_weights=average)
        output, weights = pfa(query, key, value, need_weights=need_weights, average_attn_weights=average)
        assert output.requires_grad and output.grad_fn is not None
        assert (output - expected).abs().max() <= 1e-6
        if need_weights:
            assert (weights - expected_weights).abs().max() <= 1e-6
        else:
            assert weights is None and expected_weights is None


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("need_weights", [True, False])
def test_masks_as_nn_takes_them(mask_dtype, need_weights):
    torch.manual_seed(1)
    config, cross = dict(batch_first=True), True
    plain, pfa = _pair(config)
    query, key, value = _inputs(config, cross)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    head_mask = torch.rand(N * HEADS, L, S) < 0.3
    head_mask[..., 0] = False  # every query attends somewhere
    for key_padding_mask, attn_mask in ((padding, None), (None, causal), (padding, causal), (None, head_mask)):
        if mask_dtype.is_floating_point:
            key_padding_mask, attn_mask = (None if m is None else torch.zeros(m.shape).masked_fill(m, float("-inf"))
                                           for m in (key_padding_mask, attn_mask))
        kwargs = dict(key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=need_weights)
        expected, expected_weights = plain(query, key, value, **kwargs)
        output, weights = pfa(query, key, value, **kwargs)
        assert (output - expected).abs().max() <= 1e-6
        if need_weights:
            assert (weights - expected_weights).abs().max() <= 1e-6


def test_unbatched_and_causal():
    torch.manual_seed(2)
    plain, pfa = _pair(dict())
    query, key, value = _inputs(dict(), True, batched=False)
    causal = nn.Transformer.generate_square_subsequent_mask(L)[:, :S] if S <= L else torch.zeros(L, S).masked_fill(
        torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    for kwargs in (dict(), dict(attn_mask=causal, is_causal=True, need_weights=False)):
        expected, _ = plain(query, key, value, **kwargs)
        output, _ = pfa(query, key, value, **kwargs)
        assert output.shape == (L, EMBED) and (output - expected).abs().max() <= 1e-6


def test_no_grad_runs_nns_forward_exactly():
    torch.manual_seed(3)
    plain, pfa = _pair(dict(batch_first=True))
    plain.eval(), pfa.eval()
    query = torch.randn(N, L, EMBED)
    with torch.no_grad():
        assert torch.equal(pfa(query, query, query)[0], plain(query, query, query)[0])


def test_state_dict_keys_are_nns_plus_feedback():
    plain, pfa = _pair(dict(kdim=5, vdim=7))
    own = {k for k in pfa.state_dict() if ".feedback." not in k}
    assert own == set(plain.state_dict())
    fresh = pk.PFAMultiheadAttention(EMBED, HEADS, kdim=5, vdim=7)
    fresh.load_state_dict(pk.bp_state_dict(pfa.state_dict()), strict=False)
    plain.load_state_dict(pk.bp_state_dict(pfa.state_dict()), strict=True)
    again = pk.PFAMultiheadAttention(EMBED, HEADS, kdim=5, vdim=7)
    again.load_state_dict(pfa.state_dict(), strict=True)  # feedback included
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), pfa.state_dict().values(), strict=True)
               if isinstance(a, torch.Tensor))


def test_from_module_keeps_the_parameters_and_to_module_gives_them_back():
    plain = nn.MultiheadAttention(EMBED, HEADS)
    pfa = pk.PFAMultiheadAttention.from_module(plain, expand_ratio=2, feedback_seed=7)
    assert pfa.in_proj.weight is plain.in_proj_weight and pfa.out_proj.bias is plain.out_proj.bias
    assert [layer.feedback.seed for layer in pfa.pfa_layers()] == [7, 8]
    back = pfa.to_module()
    assert type(back) is nn.MultiheadAttention and back.in_proj_weight is plain.in_proj_weight
    query = torch.randn(L, N, EMBED)
    assert torch.equal(back(query, query, query)[0], plain(query, query, query)[0])


@pytest.mark.parametrize("arguments, match", [
    (dict(embed_dim=10, num_heads=3), "divisible"),
    (dict(embed_dim=0, num_heads=1), "embed_dim"),
    (dict(embed_dim=12, num_heads=3, dropout=1.5), "dropout"),
])
def test_bad_constructor_arguments_name_themselves(arguments, match):
    with pytest.raises(ValueError, match=match):
        pk.PFAMultiheadAttention(**arguments)


def test_bad_call_arguments_name_themselves():
    pfa = pk.PFAMultiheadAttention(EMBED, HEADS)
    query = torch.randn(L, N, EMBED)
    with pytest.raises(ValueError, match="key_padding_mask"):
        pfa(query, query, query, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="key"):
        pfa(query, torch.randn(L, N, EMBED + 1), query)
    with pytest.raises(ValueError, match="is_causal"):
        pfa(query, query, query, is_causal=True)


def test_a_subclass_or_parametrized_attention_is_left_with_the_reason():
    class Custom(nn.MultiheadAttention):
        pass

    model = nn.Sequential(Custom(EMBED, HEADS))
    model, report = pk.convert(model, return_report=True)
    assert type(model[0]) is Custom and not report[0].converted and "subclass" in report[0].reason
    with pytest.raises(ValueError, match="strict=True"):
        pk.convert(nn.Sequential(Custom(EMBED, HEADS)), strict=True)


class _Encoder(nn.Module):
    """Self-attention over tokens, with a key padding mask, then a linear head: (N, L, E) -> (N, 3)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(EMBED, HEADS, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.cross = nn.MultiheadAttention(EMBED, HEADS, kdim=5, vdim=5, batch_first=True)
        self.head = nn.Linear(EMBED, 3)

    def forward(self, tokens, memory):
        x = self.layer(tokens)
        x = x + self.cross(x, memory, memory, need_weights=False)[0]
        return self.head(x.mean(1))


def _tiny_vit():
    return vision_transformer.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=8, mlp_dim=16, num_classes=3)


def _tiny_swin(v2):
    block = swin_transformer.SwinTransformerBlockV2 if v2 else swin_transformer.SwinTransformerBlock
    merging = swin_transformer.PatchMergingV2 if v2 else swin_transformer.PatchMerging
    return swin_transformer.SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[2, 2],
                                            window_size=[2, 2], num_classes=3, block=block,
                                            downsample_layer=merging)


_MODELS = {
    "encoder": (_Encoder, lambda: (torch.randn(2, L, EMBED), torch.randn(2, S, 5))),
    "vit": (_tiny_vit, lambda: (torch.randn(2, 3, 16, 16),)),
    "swin": (lambda: _tiny_swin(False), lambda: (torch.randn(2, 3, 12, 12),)),
    "swin_v2": (lambda: _tiny_swin(True), lambda: (torch.randn(2, 3, 12, 12),)),
}


@pytest.mark.parametrize("name", sorted(_MODELS))
@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
def test_every_linear_of_a_transformer_trains_with_pfa(name, parametrization):
    """Eval outputs equal the original model's (1e-6, float32); every Linear is a PFA layer whose forward runs and
    whose feedback learns; every gradient, the input's included, equals the literal algorithm's (float64)."""
    torch.manual_seed(4)
    build, inputs = _MODELS[name]
    model, example = build().eval(), inputs()
    with torch.no_grad():
        expected = model(*example)
    model, report = pk.convert(model, expand_ratio=2, parametrization=parametrization, return_report=True)
    assert report and all(record.converted for record in report), [r for r in report if not r.converted]
    assert not [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.modules.linear.
                                                                    NonDynamicallyQuantizableLinear)]
    with torch.no_grad():
        assert (model(*example) - expected).abs().max() <= 1e-6
    model.train()
    verified = pk.testing.assert_matches_reference(model, tuple(x.double() for x in example), tolerance=1e-10)
    assert len(verified.layers) == len(report)
    assert all(layer.forward_calls >= 1 and layer.feedback_has_grad for layer in verified.layers)


@pytest.mark.parametrize("name", ["vit", "swin", "swin_v2"])
def test_unconvert_gives_torchvisions_classes_back(name):
    torch.manual_seed(5)
    build, inputs = _MODELS[name]
    original = build().eval()
    classes = {n: type(m) for n, m in original.named_modules()}
    model = pk.convert(original, expand_ratio=2)
    assert any(isinstance(m, (pk.PFAMultiheadAttention, PFAShiftedWindowAttention, PFAShiftedWindowAttentionV2))
               for m in model.modules())
    example = inputs()
    with torch.no_grad():
        expected = model(*example)
    model, records = pk.unconvert(model, return_report=True)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    layers = [record for record in records if "Attention" not in record.layer]
    assert layers and all(any(key.endswith("feedback._extra_state") for key in r.removed) for r in layers)
    with torch.no_grad():
        assert torch.equal(model(*example), expected)
    plain = build()
    plain.load_state_dict(model.state_dict(), strict=True)


def _pair64(**config):
    plain = nn.MultiheadAttention(EMBED, HEADS, dtype=torch.float64, **config)
    pfa = pk.PFAMultiheadAttention(EMBED, HEADS, dtype=torch.float64, **config, expand_ratio=2)
    pfa.load_state_dict(plain.state_dict(), strict=False)
    return plain, pfa


@pytest.mark.parametrize("case", ["key_is_value", "bias_kv_without_bias", "causal_with_weights", "zero_target",
                                  "zero_batch", "training_dropout"])
def test_more_arguments_equal_nn_in_float64(case):
    """Argument combinations beyond the float32 grid, in float64 (1e-12): every projection's feedback learns."""
    torch.manual_seed(6)
    config = {"bias_kv_without_bias": dict(bias=False, add_bias_kv=True),
              "training_dropout": dict(dropout=0.3)}.get(case, {})
    plain, pfa = _pair64(**config)
    length, batch = {"zero_target": (0, N), "zero_batch": (L, 0)}.get(case, (L, N))
    query = torch.randn(length, batch, EMBED, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(S, batch, EMBED, dtype=torch.float64)
    kwargs = {}
    if case == "causal_with_weights":
        memory = torch.randn(L, batch, EMBED, dtype=torch.float64)
        kwargs = dict(attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1), is_causal=True, need_weights=True)
    results = []
    for module in (plain, pfa):
        torch.manual_seed(7)  # the same dropout draws, in the same order
        results.append(module(query, memory, memory, **kwargs))
    (expected, expected_weights), (output, weights) = results
    assert output.shape == expected.shape
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    if expected_weights is not None:
        torch.testing.assert_close(weights, expected_weights, rtol=1e-12, atol=1e-12)
    output.square().sum().backward()
    if output.numel():
        assert all(layer.feedback.parameter.grad is not None for layer in pfa.pfa_layers())


def test_deepcopy_and_pickle_keep_the_feedback():
    import io

    _, pfa = _pair64(batch_first=True)
    query = torch.randn(N, L, EMBED, dtype=torch.float64, requires_grad=True)
    buffer = io.BytesIO()
    torch.save(pfa, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(pfa), torch.load(buffer, weights_only=False)):
        assert torch.equal(other(query, query, query)[0], pfa(query, query, query)[0])
        assert torch.equal(other.in_proj.feedback.parameter, pfa.in_proj.feedback.parameter)
        assert other.in_proj.feedback.parameter.data_ptr() != pfa.in_proj.feedback.parameter.data_ptr()


def test_an_unknown_keyword_names_this_class():
    with pytest.raises(TypeError, match=r"PFAMultiheadAttention got unexpected keyword arguments \['batchfirst'\]"):
        pk.PFAMultiheadAttention(EMBED, HEADS, batchfirst=True)
