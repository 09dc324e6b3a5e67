"""Triton kernels under the interpreter (TRITON_INTERPRET=1, set before Triton defines a kernel), against
reference.py and PyTorch on small odd shapes and every kernel dtype. `make test` runs this file in its own
pytest process with the variable set; in the main process the ahead-of-time tests (test_triton_aot.py) run.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from conftest import LOW_PRECISION_ERROR_FACTOR, LOW_PRECISION_FLOOR, assert_matches_reference, relative_error
from torch import nn

import pfa_kernels as pk
from pfa_kernels import reference

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter tests: `make test` runs them in a separate process with TRITON_INTERPRET=1")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_low_precision(fast, reference_low, exact, dtype, what):
    """fp32: relative error < 1e-5 against float64. fp16/bf16: within 3x the error of a PyTorch run in that dtype."""
    if dtype == torch.float32:
        assert relative_error(fast, exact) < 1e-5, what
        return
    fast_error, ref_error = relative_error(fast, exact), relative_error(reference_low, exact)
    assert fast_error <= LOW_PRECISION_ERROR_FACTOR * ref_error + LOW_PRECISION_FLOOR[dtype], (what, fast_error,
                                                                                             ref_error)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_matmul_one_launch(dtype):
    shapes = [(5, 7, 11), (33, 19, 70), (1, 3, 2), (40, 65, 17)]
    lefts = [torch.randn(m, k).to(dtype) for m, k, _ in shapes]
    rights = [torch.randn(n, k).to(dtype).t() for _, k, n in shapes]  # strided (transposed) operands
    outs = torch.ops.pfa_kernels.triton_grouped_matmul(lefts, rights)
    for left, right, out in zip(lefts, rights, outs, strict=True):
        assert out.dtype == dtype and out.shape == (left.shape[0], right.shape[1])
        _check_low_precision(out, left @ right, left.double() @ right.double(), dtype, "grouped_matmul")
    with pytest.raises(ValueError, match="do not multiply"):
        torch.ops.pfa_kernels.triton_grouped_matmul([torch.randn(2, 3)], [torch.randn(4, 2)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["linear", "conv1d-stride2", "conv2d-3x3-pad1", "conv2d-stride2-dilation2",
                                  "conv2d-5x3-stride-rect"])
def test_fused_sequence_input_grad_against_reference(case, dtype):
    """dL/dx of the fused kernel vs the literal algorithm (reference.py) on the same inputs, g·B never stored."""
    C_in, C_out, C_mid = 5, 7, 19
    if case == "linear":
        x, R, conv = torch.randn(9, C_in), torch.randn(C_mid, C_in), {}
    elif case == "conv1d-stride2":
        x, R, conv = torch.randn(2, C_in, 11), torch.randn(C_mid, C_in, 3), dict(stride=[2], padding=[1], dilation=[1])
    elif case == "conv2d-3x3-pad1":
        x, R, conv = torch.randn(2, C_in, 7, 6), torch.randn(C_mid, C_in, 3, 3), dict(stride=[1, 1], padding=[1, 1],
                                                                                       dilation=[1, 1])
    elif case == "conv2d-stride2-dilation2":
        x, R, conv = torch.randn(2, C_in, 9, 8), torch.randn(C_mid, C_in, 3, 3), dict(stride=[2, 2], padding=[2, 1],
                                                                                       dilation=[2, 2])
    else:
        x, R, conv = torch.randn(1, C_in, 8, 7), torch.randn(C_mid, C_in, 5, 3), dict(stride=[2, 1], padding=[2, 0],
                                                                                       dilation=[1, 1])
    B = torch.randn(C_out, C_mid) / 4
    weight = torch.randn(C_out, *R.shape[1:])

    def literal_input_grad(x, B, R, grad_output):
        x = x.detach().clone().requires_grad_(True)
        if case == "linear":
            y = reference.pfa_linear(x, weight.to(x.dtype), None, B, R)
        else:
            y = reference.pfa_conv(x, weight.to(x.dtype), None, B, R, **conv)
        y.backward(grad_output)
        return x.grad

    with torch.no_grad():
        out = reference.pfa_linear(x, weight, None, B, R) if case == "linear" else reference.pfa_conv(
            x, weight, None, B, R, **conv)
    grad_output = torch.randn(out.shape)
    low = [t.to(dtype) for t in (x, B, R, grad_output)]
    fused = torch.ops.pfa_kernels.triton_sequence_input_grad(low[3], low[1], low[2], list(x.shape),
                                                             conv.get("stride", []), conv.get("padding", []),
                                                             conv.get("dilation", []))
    assert fused.dtype == dtype and fused.shape == x.shape
    exact = literal_input_grad(*[t.double() for t in low])
    _check_low_precision(fused, literal_input_grad(*low), exact, dtype, case)


LAYERS = {
    "linear": lambda **kw: (pk.PFALinear(6, 5, **kw), torch.randn(3, 2, 6)),
    "conv1d": lambda **kw: (pk.PFAConv1d(3, 5, 3, stride=2, padding=1, **kw), torch.randn(2, 3, 9)),
    "conv2d": lambda **kw: (pk.PFAConv2d(3, 5, 3, stride=2, padding=1, dilation=1, **kw), torch.randn(2, 3, 7, 6)),
    "conv2d-groups2": lambda **kw: (pk.PFAConv2d(4, 6, 3, padding=1, groups=2, **kw), torch.randn(2, 4, 5, 5)),
    "conv2d-groups2-dense": lambda **kw: (pk.PFAConv2d(4, 6, 3, padding=1, groups=2, feedback_groups="dense", **kw),
                                          torch.randn(2, 4, 5, 5)),
    "conv3d": lambda **kw: (pk.PFAConv3d(2, 3, 3, padding=1, **kw), torch.randn(1, 2, 4, 4, 3)),
}


@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
@pytest.mark.parametrize("kind, strategy", [(kind, strategy) for kind in sorted(LAYERS)
                                            for strategy in ("auto", "product", "sequence")
                                            if (kind, strategy) != ("conv2d-groups2", "sequence")])  # no such order
def test_layers_with_backend_triton_match_reference(kind, strategy, parametrization):
    """backend="triton" on every layer kind, strategy and parametrization: float32 against the literal algorithm."""
    layer, x = LAYERS[kind](expand_ratio=4, backend="triton", strategy=strategy, parametrization=parametrization)
    plan = layer.backward_plan(x.shape)
    assert plan.backend == "triton"
    if plan.input_order == "sequence" and kind in ("conv2d-groups2-dense", "conv3d"):
        assert "runs in PyTorch" in plan.reason  # the planner says where the fused kernel does not apply
    assert_matches_reference(layer, x, 1e-5)


def test_model_level_feedback_weights_in_one_launch():
    dense = {"feedback_groups": "dense"}
    model = nn.Sequential(pk.PFAConv2d(3, 8, 3, expand_ratio=10), pk.PFAConv2d(8, 8, 3, groups=4, expand_ratio=1,
                                                                               **dense),
                          pk.PFAConv2d(8, 8, 3, groups=2, expand_ratio=2, parametrization="projected", **dense),
                          pk.PFAConv2d(8, 8, 3, groups=4, expand_ratio=1, parametrization="projected", **dense),
                          pk.PFAConv2d(8, 8, 1, groups=2, expand_ratio=2, parametrization="projected"),
                          nn.Flatten(), pk.PFALinear(8, 4, expand_ratio=3, parametrization="projected"))
    assert model[3].feedback.M is None  # applied through B: the second launch
    fast = pk.feedback_weights(model, backend="triton")
    for name, layer in model.named_children():
        if isinstance(layer, pk.nn.PFA_LAYERS):
            assert relative_error(fast[name], layer.feedback.feedback_weight()) < 1e-5, name


def test_triton_rejects_float64_and_auto_keeps_the_torch_backend():
    layer = pk.PFALinear(4, 3, dtype=torch.float64, backend="triton")
    with pytest.raises(TypeError, match="backend='triton' takes float32, float16 or bfloat16"):
        layer(torch.randn(2, 4, dtype=torch.float64))
    available = pk.dispatch.available_backends("cpu")
    assert available[0] == "torch" and available[-1] == "triton"
    # the interpreter is never measured or picked by "auto"
    assert "triton" not in pk.dispatch.candidate_backends("cpu", torch.float32, "explicit")


def test_every_launch_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on torch.cuda.current_device(), so every launch must make its tensors' device current:
    each op goes through launch.launch, which enters device_guard(the tensors' device) around the kernel."""
    from pfa_kernels.backends.triton import launch

    active, launched = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        active.append(device)
        yield
        active.pop()

    real_wrap_triton = launch.wrap_triton

    def checking_wrap_triton(kernel):
        launched.append(list(active))
        return real_wrap_triton(kernel)

    monkeypatch.setattr(launch, "device_guard", recording_guard)
    monkeypatch.setattr(launch, "wrap_triton", checking_wrap_triton)
    cpu = torch.device("cpu")
    torch.ops.pfa_kernels.triton_grouped_matmul([torch.randn(3, 4)], [torch.randn(4, 5)])
    torch.ops.pfa_kernels.triton_batched_matmul(torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    torch.ops.pfa_kernels.triton_sequence_input_grad(torch.randn(2, 3), torch.randn(3, 4), torch.randn(4, 5),
                                                     [2, 5], [], [], [])
    assert launched == [[cpu], [cpu], [cpu]]


def test_device_guard_selects_a_cuda_tensors_device():
    """The guard for a CUDA tensor switches to its device (checked without a GPU: the context is built, not
    entered); CPU tensors, which only the interpreter runs, need none."""
    from pfa_kernels.backends.triton.launch import device_guard

    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


@contextlib.contextmanager
def deterministic_algorithms(warn_only=False):
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


NONDETERMINISTIC = "triton_sequence_input_grad .*does not have a deterministic implementation"


def test_fused_sequence_kernel_alerts_under_deterministic_algorithms():
    """Its fp32 atomics make dx's rounding vary from run to run: it raises under
    torch.use_deterministic_algorithms(True), warns with warn_only=True, and raises under torch.compile too (the
    check runs while the op is traced). The product order's GEMM kernels have no atomics and run."""
    grad, B, R = torch.randn(4, 3), torch.randn(3, 6), torch.randn(6, 5)

    def input_grad(grad, B, R):
        return torch.ops.pfa_kernels.triton_sequence_input_grad(grad, B, R, [4, 5], [], [], [])

    expected = input_grad(grad, B, R)
    with deterministic_algorithms(), pytest.raises(RuntimeError, match=NONDETERMINISTIC):
        input_grad(grad, B, R)
    with deterministic_algorithms(warn_only=True), pytest.warns(UserWarning, match=NONDETERMINISTIC):
        assert torch.equal(input_grad(grad, B, R), expected)
    with deterministic_algorithms(), pytest.raises(RuntimeError, match=NONDETERMINISTIC):
        torch.compile(input_grad, backend="eager", fullgraph=True)(grad, B, R)

    x = torch.randn(4, 6, requires_grad=True)
    with deterministic_algorithms():
        with pytest.raises(RuntimeError, match=NONDETERMINISTIC):
            pk.PFALinear(6, 5, expand_ratio=2, backend="triton", strategy="sequence")(x).sum().backward()
        pk.PFALinear(6, 5, expand_ratio=2, backend="triton", strategy="product")(x).sum().backward()
    assert x.grad is not None


def _bmm_operands(case, dtype):
    """(left (G, M, K), right (G, K, N)) for a batched_matmul case: odd sizes that cross the interpreter's 64x64
    tile and run 5 K steps of 16 (M = 70, N = 66, K = 75), transposed and sliced views, expanded (zero-stride)
    operands, K = 0, empty."""
    G, M, K, N = 3, 70, 75, 66
    if case == "contiguous":
        return torch.randn(G, M, K), torch.randn(G, K, N)
    if case == "small-odd":
        return torch.randn(2, 5, 7), torch.randn(2, 7, 3)
    if case == "transposed":  # left (G, M, K) with strides (1, G * K, G), right with the group stride innermost
        return torch.randn(M, K, G).permute(2, 0, 1), torch.randn(N, K, G).permute(2, 1, 0)
    if case == "sliced":  # every other row of a larger tensor, a column offset, a group step of 2
        return torch.randn(2 * G, 2 * M, K + 3)[::2, ::2, 3:], torch.randn(G, K + 1, N + 5)[:, 1:, 2:-3]
    if case == "expanded":  # the same left for every group (group stride 0), right constant along N (stride 0)
        return torch.randn(1, M, K).expand(G, M, K), torch.randn(G, K, 1).expand(G, K, N)
    if case == "K=0":
        return torch.randn(G, M, 0), torch.randn(G, 0, N)
    if case == "G=0":
        return torch.randn(0, M, K), torch.randn(0, K, N)
    if case == "M=0":
        return torch.randn(G, 0, K), torch.randn(G, K, N)
    assert case == "N=0"
    return torch.randn(G, M, K), torch.randn(G, K, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["contiguous", "small-odd", "transposed", "sliced", "expanded", "K=0", "G=0", "M=0",
                                  "N=0"])
def test_batched_matmul_matches_bmm(case, dtype):
    """out[g] = left[g] @ right[g] against torch.bmm in float64 (fp32: 1e-5; fp16/bf16: within 3x of torch.bmm in
    that dtype), any strides; empty products are empty or (K = 0) zero, contiguous, in the operands' dtype."""
    left, right = (t.to(dtype) for t in _bmm_operands(case, dtype))
    out = torch.ops.pfa_kernels.triton_batched_matmul(left, right)
    assert out.dtype == dtype and out.shape == (left.shape[0], left.shape[1], right.shape[2]) and out.is_contiguous()
    exact = torch.bmm(left.double(), right.double())
    if exact.numel() == 0 or left.shape[2] == 0:
        assert torch.equal(out.double(), exact), case
        return
    _check_low_precision(out, torch.bmm(left, right), exact, dtype, case)


def test_batched_matmul_rejects_bad_arguments():
    bmm = torch.ops.pfa_kernels.triton_batched_matmul
    with pytest.raises(ValueError, match="are not"):
        bmm(torch.randn(3, 4), torch.randn(4, 5))                   # 2-d
    with pytest.raises(ValueError, match="are not"):
        bmm(torch.randn(2, 3, 4), torch.randn(3, 4, 5))             # group counts differ
    with pytest.raises(ValueError, match="are not"):
        bmm(torch.randn(2, 3, 4), torch.randn(2, 5, 6))             # inner sizes differ
    with pytest.raises(ValueError, match="share dtype"):
        bmm(torch.randn(2, 3, 4), torch.randn(2, 4, 5).half())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        bmm(torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        bmm(torch.ones(2, 3, 4, dtype=torch.int32), torch.ones(2, 4, 5, dtype=torch.int32))


NO_TABLE_LAYERS = {  # product order: W_fb = B·R or M·Z and dL/dR = B^T·C (dL/dZ = M·C) go through the Pieces
    "linear-explicit": lambda **kw: pk.PFALinear(6, 5, expand_ratio=4, **kw),
    "linear-projected": lambda **kw: pk.PFALinear(6, 5, expand_ratio=4, parametrization="projected", **kw),
    "conv2d-explicit": lambda **kw: pk.PFAConv2d(4, 6, 3, padding=1, expand_ratio=3, **kw),
    "conv2d-projected": lambda **kw: pk.PFAConv2d(4, 6, 3, padding=1, expand_ratio=3, parametrization="projected",
                                                  **kw),
    # Dense feedback: grouped feedback takes the direct op (W_fb of W's shape, formed in the forward).
    "conv2d-groups2-explicit": lambda **kw: pk.PFAConv2d(4, 6, 3, padding=1, groups=2, expand_ratio=2,
                                                         feedback_groups="dense", **kw),
    "conv2d-groups2-projected": lambda **kw: pk.PFAConv2d(4, 6, 3, padding=1, groups=2, expand_ratio=2,
                                                          parametrization="projected", feedback_groups="dense",
                                                          **kw),  # keeps M: M_j Z_j
    "conv2d-groups4-projected": lambda **kw: pk.PFAConv2d(8, 8, 3, padding=1, groups=4, expand_ratio=1,
                                                          parametrization="projected", feedback_groups="dense",
                                                          **kw),  # B_j (B_j^T Z_j)
}


@pytest.mark.parametrize("name", sorted(NO_TABLE_LAYERS))
def test_layer_backward_launches_only_strided_batched_gemms(name, monkeypatch):
    """A layer's backward (product order: W_fb = B·R or M·Z, dL/dR = B^T·C) forms its products with the strided
    batched GEMM: no pointer table is built (so nothing is copied host-to-device before a launch) and the only
    tensors a launch receives are the op's own left, right and out (views of B, R, M, Z, the correlation)."""
    from pfa_kernels.backends.triton import batched_matmul, grouped_matmul

    def no_table(*args, **kwargs):
        raise AssertionError("a layer's backward built a table on the host")

    calls, launches = [], []
    real_op, real_launch = torch.ops.pfa_kernels.triton_batched_matmul, batched_matmul.launch

    def recording_op(left, right):
        out = real_op(left, right)
        calls.append((left, right, out))
        return out

    def recording_launch(kernel, grid, device, *args, **kwargs):
        launches.append(args)
        return real_launch(kernel, grid, device, *args, **kwargs)

    monkeypatch.setattr(grouped_matmul, "_launch_tables", no_table)
    monkeypatch.setattr(grouped_matmul, "launch", no_table)
    monkeypatch.setattr(torch.ops.pfa_kernels, "triton_batched_matmul", recording_op)
    monkeypatch.setattr(batched_matmul, "launch", recording_launch)

    layer = NO_TABLE_LAYERS[name](backend="triton", strategy="product")
    x = torch.randn(3, 6) if name.startswith("linear") else torch.randn(2, layer.in_channels, 5, 4)
    assert layer.backward_plan(x.shape).backend == "triton"
    if name.endswith("projected"):
        assert (layer.feedback.M is None) == (name == "conv2d-groups4-projected")
    assert_matches_reference(layer, x, 1e-5)
    assert calls and len(launches) == len(calls), (len(calls), len(launches))
    launched = len(calls)
    output = layer(x.requires_grad_(True))
    with monkeypatch.context() as patch:  # a table made on the host in the backward would come from torch.tensor
        patch.setattr(torch, "tensor", no_table)
        output.backward(torch.randn_like(output))
    assert len(calls) > launched
    described = lambda t: (t.data_ptr(), tuple(t.shape), t.stride())  # noqa: E731
    for operands, args in zip(calls, launches, strict=True):
        tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
        assert [described(t) for t in tensors] == [described(t) for t in operands]
        assert all(isinstance(arg, torch.Tensor) for arg in args[:3])  # left, right, out; then sizes and strides
        assert all(isinstance(arg, int) for arg in args[3:])


@pytest.mark.parametrize("products", [1, 2, 3])
def test_grouped_matmul_tables_share_one_buffer_with_aligned_starts(products, monkeypatch):
    """_launch_tables makes one tensor (one host-to-device copy on a GPU) holding the six tables, each starting on
    a 16-byte boundary whatever the number of products (odd counts are padded), with the right contents."""
    from pfa_kernels.backends.triton import grouped_matmul

    made = []
    real_tensor = torch.tensor

    def counting_tensor(*args, **kwargs):
        made.append(args)
        return real_tensor(*args, **kwargs)

    shapes = [(5, 7, 11), (33, 19, 70), (1, 3, 2)][:products]
    lefts = [torch.randn(m, k) for m, k, _ in shapes]
    rights = [torch.randn(n, k).t() for _, k, n in shapes]
    outs = [torch.empty(m, n) for m, _, n in shapes]
    monkeypatch.setattr(torch, "tensor", counting_tensor)
    pointers, sizes, strides, tile_starts, tiles = grouped_matmul._launch_tables(lefts, rights, outs, 16, 16,
                                                                                 torch.device("cpu"))
    monkeypatch.undo()
    assert len(made) == 1
    tables = [*pointers, sizes, strides, tile_starts]
    base = tables[0].untyped_storage().data_ptr()
    for table in tables:
        assert table.dtype == torch.int64 and table.untyped_storage().data_ptr() == base
        assert table.data_ptr() % 16 == 0, (table.data_ptr() - base)
    for table, tensors in zip(pointers, (lefts, rights, outs), strict=True):
        assert table.tolist() == [t.data_ptr() for t in tensors]
    assert sizes.tolist() == [size for m, k, n in shapes for size in (m, n, k)]
    assert strides.tolist() == [s for left, right, out in zip(lefts, rights, outs, strict=True)
                                for s in (*left.stride(), *right.stride(), *out.stride())]
    tile_counts = [-(-m // 16) * -(-n // 16) for m, _, n in shapes]
    assert tile_starts.tolist() == [sum(tile_counts[:i]) for i in range(products)] and tiles == sum(tile_counts)
