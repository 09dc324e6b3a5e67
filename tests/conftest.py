"""Shared helpers: running a layer forward/backward, the literal reference for a module, tolerances."""

from __future__ import annotations

import contextlib
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pfa_kernels as pk
from pfa_kernels import projection, reference, uniform_draw
from pfa_kernels.backends import torch_ops

# Relative error bounds (norm of the difference / norm of the reference) against a float64 reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# Low precision is checked against a low-precision run of the reference: the fast path's error may be
# at most this multiple of the reference's own error (plus a small floor for near-exact cases).
LOW_PRECISION_ERROR_FACTOR = 3.0
LOW_PRECISION_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-4}

STRATEGIES = ("auto", "product", "sequence")

# Devices the equivalence tests run on: "cuda" joins when a GPU is present (`make gpu-check` runs the tests
# marked `cuda`). Tests that only make sense on a GPU take the `requires_cuda` mark.
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; none here (`make gpu-check` on a GPU)")
requires_two_gpus = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2,
                                       reason="needs two CUDA devices")
DEVICES = ("cpu", pytest.param("cuda", marks=(requires_cuda, pytest.mark.cuda)))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True, scope="session")
def _no_tf32():
    """GPU float32 references must be IEEE float32: TF32 in cuBLAS/cuDNN would loosen every float32 bound."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture(params=["extension", "torch"])
def draw_route(request, monkeypatch):
    """Seeded draws through the extension's seeded_uniform_ (where a variant reproduces uniform_ here) and through
    torch's uniform_ itself (uniform_draw.py)."""
    if request.param == "torch":
        monkeypatch.setattr(uniform_draw, "chosen_variant", lambda: None)
    elif uniform_draw.chosen_variant() is None:
        pytest.skip(uniform_draw.route())
    return request.param


def same_state_entry(actual, expected) -> bool:
    """Equality of two state-dict entries: tensors bitwise, anything else (a feedback's "_extra_state") by ==."""
    if isinstance(expected, torch.Tensor):
        return isinstance(actual, torch.Tensor) and torch.equal(actual, expected)
    return actual == expected


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    denominator = expected.norm().item()
    return (actual - expected).norm().item() / (denominator if denominator > 0 else 1.0)


def assert_relative_close(actual, expected, bound, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = relative_error(actual, expected)
    assert error < bound, f"{what}: relative error {error:.3e} >= {bound:.1e}"


def layer_gradients(layer, x, grad_output=None, forward=None):
    """Run layer (or forward(x)) on a copy of x, backpropagate grad_output (random if None).

    Returns (output, {"x": dL/dx, "weight": ..., "bias": ..., "R": ...}, grad_output), where "R" is the
    gradient of the layer's feedback parameter (R, or Z for a projected layer); the layer's .grad fields
    are cleared before and restored to None after.
    """
    x = x.detach().clone().requires_grad_(True)
    for parameter in layer.parameters():
        parameter.grad = None
    output = (forward or layer)(x)
    if grad_output is None:
        grad_output = torch.randn_like(output)
    output.backward(grad_output)
    grads = {"x": x.grad, "weight": layer.weight.grad}
    if layer.feedback.parameter is not None:  # fixed-feedback rules learn no feedback
        grads["R"] = layer.feedback.parameter.grad
    if layer.bias is not None:
        grads["bias"] = layer.bias.grad
    for parameter in layer.parameters():
        parameter.grad = None
    return output, grads, grad_output


def literal_forward(layer):
    """The literal algorithm (reference.py) for a PFA module, padding x the way nn.ConvNd does."""
    def forward(x):
        R = layer.feedback.effective_R()
        if isinstance(layer, pk.PFALinear):
            return reference.pfa_linear(x, layer.weight, layer.bias, layer.feedback.dense_B(), R)
        padding = layer.padding
        if layer.padding_mode != "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            padding = 0
        return reference.pfa_conv(x, layer.weight, layer.bias, layer.feedback.dense_B(), R, layer.stride, padding,
                                  layer.dilation, layer.groups)
    return forward


def explicit_twin(layer):
    """A copy of a projected layer switched to explicit R = B^T Z + N: the same W_fb, for the literal algorithm."""
    twin = copy.deepcopy(layer)
    twin.feedback = twin.feedback.as_explicit()
    return twin


def projected_to_R_grad(layer, grad_Z):
    """What dL/dZ of a projected layer means for R: dL/dR = B^T dL/dZ per group (docs/design.md section 2.4)."""
    return layer.feedback.R_grad_from_weight_grad(grad_Z)


def assert_matches_reference(layer, x, bound):
    """The layer's output and every gradient equal the literal algorithm's within `bound`. For a projected
    layer the literal algorithm runs on its explicit twin, and B^T dL/dZ is compared with dL/dR."""
    output, grads, grad_output = layer_gradients(layer, x)
    if layer.parametrization == "projected":
        grads["R"] = projected_to_R_grad(layer, grads["R"])
        layer = explicit_twin(layer)
    expected_output, expected_grads, _ = layer_gradients(layer, x, grad_output, literal_forward(layer))
    assert_relative_close(output, expected_output, bound, "output")
    for name, expected in expected_grads.items():
        assert grads[name] is not None, f"no gradient for {name}"
        assert_relative_close(grads[name], expected, bound, f"grad {name}")


# (layer class, nn class, constructor args, input shape): odd channel counts, every kernel size,
# stride, dilation, groups (incl. depthwise), "same"/"valid"/tuple padding, every padding mode, no bias.
CONV_CASES = {
    "2d-k1": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=5, out_channels=7, kernel_size=1), (3, 5, 6, 5)),
    "2d-k3-pad1": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=5, out_channels=7, kernel_size=3, padding=1),
                   (2, 5, 7, 6)),
    "2d-k5-stride2": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=3, out_channels=6, kernel_size=5, stride=2,
                                                    padding=2), (2, 3, 9, 8)),
    "2d-k7-stride2-nobias": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=7, stride=2,
                                                           padding=3, bias=False), (2, 3, 11, 10)),
    "2d-dilation2": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=4, out_channels=5, kernel_size=3, dilation=2,
                                                   padding=2), (2, 4, 8, 9)),
    "2d-groups2": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=6, out_channels=4, kernel_size=3, groups=2, padding=1),
                   (2, 6, 6, 5)),
    "2d-depthwise-stride2": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=6, out_channels=6, kernel_size=3, groups=6,
                                                           stride=2, padding=1), (2, 6, 7, 7)),
    "2d-same-even-kernel": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=(2, 4),
                                                          padding="same"), (2, 3, 6, 7)),
    "2d-same-dilation": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=3, dilation=2,
                                                       padding="same"), (2, 3, 7, 6)),
    "2d-valid-rect": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=(3, 1),
                                                    stride=(2, 1), padding="valid"), (2, 3, 7, 6)),
    "2d-reflect": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=3, padding=1,
                                                 padding_mode="reflect"), (2, 3, 6, 6)),
    "2d-replicate-same": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=4,
                                                        padding="same", padding_mode="replicate"), (2, 3, 6, 6)),
    "2d-circular-groups": (pk.PFAConv2d, nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=(1, 2),
                                                         groups=2, padding_mode="circular"), (2, 4, 6, 6)),
    "1d-stride2": (pk.PFAConv1d, nn.Conv1d, dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1),
                   (2, 3, 11)),
    "1d-groups-dilation": (pk.PFAConv1d, nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=5, dilation=2,
                                                         groups=2, padding="same"), (2, 4, 12)),
    "3d-stride2": (pk.PFAConv3d, nn.Conv3d, dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1),
                   (2, 3, 5, 6, 5)),
    "3d-groups": (pk.PFAConv3d, nn.Conv3d, dict(in_channels=4, out_channels=4, kernel_size=(1, 3, 3), groups=2,
                                                padding=(0, 1, 1)), (1, 4, 3, 5, 4)),
}


def is_grouped_case(case) -> bool:
    return case in CONV_CASES and CONV_CASES[case][2].get("groups", 1) > 1


def feedback_group_runs(cases, strategies=STRATEGIES):
    """(case, strategy, feedback_groups) runs: cases with groups > 1 under both feedback structures ("grouped", the
    default, and "dense", the authors'), the others once. Grouped feedback has no sequence order: with strategy
    "sequence" the layer refuses to build (test_nn.py checks that), so those runs are "dense" only."""
    return [(case, strategy, feedback_groups) for case in cases for strategy in strategies
            for feedback_groups in (("grouped", "dense") if is_grouped_case(case) else ("grouped",))
            if not (feedback_groups == "grouped" and strategy == "sequence" and is_grouped_case(case))]


def dense_projection(B, R, groups, keep_M=True):
    """Z_0 = pinv(B_j^T) R_j and M_j = B_j B_j^T of dense feedback (B (C_out, C_mid), R (C_mid, C_in/G, *kernel)) in
    the layout the functional projected ops take: Z (C_out, C_in, *kernel), M (G, C_out, C_out) or None."""
    B_by_group = torch_ops.grouped_B(B, groups)
    R_by_group = R.reshape(groups, R.shape[0] // groups, -1)
    Z_by_group = projection.project_onto_feedback(B_by_group, R_by_group)[0]
    out_channels = B.shape[0]
    Z = Z_by_group.reshape(groups, out_channels, *R.shape[1:]).transpose(0, 1)
    Z = Z.reshape(out_channels, groups * R.shape[1], *R.shape[2:]).contiguous()
    return Z, projection.projection_matrix(B_by_group) if keep_M else None


def build(case, dtype=torch.float64, **feedback):
    pfa_class, nn_class, kwargs, input_shape = CONV_CASES[case]
    expand_ratio = 2 if kwargs.get("groups", 1) > 1 else 3
    feedback = {"expand_ratio": expand_ratio, **feedback}
    layer = pfa_class(**kwargs, dtype=dtype, **feedback)
    return layer, nn_class, kwargs, torch.randn(input_shape, dtype=dtype)


@contextlib.contextmanager
def distributed_worker_teardown():
    """The end of a torch.multiprocessing.spawn worker's distributed work: after the body, a barrier (no rank closes
    its connections while its peer still reads from them); the process group destroyed in any case; and, when the
    body succeeded, the process ended without Python's finalization (leave_distributed_worker). An exception still
    propagates, so spawn reports it."""
    try:
        yield
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    leave_distributed_worker()


def leave_distributed_worker():
    """End a torch.multiprocessing.spawn worker once its results are saved and its process group destroyed, skipping
    Python's finalization.

    Gloo's worker threads drop a finished collective (and the tensors it holds) after the caller has already moved
    on. A tensor that still has a Python object needs the GIL to be freed; a thread that asks for the GIL while the
    interpreter finalizes is ended by pthread_exit inside a noexcept destructor: std::terminate, SIGABRT, "terminate
    called without an active exception". The core of one such abort: ProcessGroupGloo::runLoop -> ~AsyncBarrierWork
    -> ~AsyncAllgatherCoalescedWork -> decref_pyobject -> gil_scoped_acquire -> PyThread_exit_thread, with the main
    thread in Py_FinalizeEx. It hit the rank that saves nothing (it reaches exit first) in about 1 run of test_fsdp's
    worker in 80. Neither destroy_process_group nor dropping the model and collecting joins those threads (they are
    still there afterwards), and a barrier before it only adds one more finished collective. Leaving with os._exit
    once everything is saved leaves no finalization to race with."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_digits_rank(rank, world_size, init_file, run_dir, overrides):
    """One process of a distributed training run on digits (torch.multiprocessing.spawn's target): the metrics go to
    <run_dir>/metrics_rank<rank>.pt."""
    from pfa_kernels.train import config as train_config
    from pfa_kernels.train import loop

    config = train_config.load("digits", [f"log.dir={run_dir}", *overrides])
    with distributed_worker_teardown():
        metrics = loop.run(config, rank=rank, world_size=world_size, init_method=f"file://{init_file}",
                           progress=False)
        torch.save(metrics, f"{run_dir}/metrics_rank{rank}.pt")


def assert_distributed_run_equals_single(run_dir, single_dir, single_metrics, world_size=2):
    """A train_digits_rank run in run_dir against one process's in single_dir (its metrics: single_metrics): the
    checkpoint's model state (tensors to 1e-5, a layer's extra state exactly), and every rank's epoch metrics (each
    rank validates its share of the 450 digits; the counts are summed). Returns rank 0's metrics."""
    from pfa_kernels.train import loop

    distributed = torch.load(run_dir / loop.CHECKPOINT, weights_only=False)["model"]
    single = torch.load(single_dir / loop.CHECKPOINT, weights_only=False)["model"]
    assert distributed.keys() == single.keys()
    for key, value in single.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(distributed[key], value, rtol=1e-5, atol=1e-6, msg=key)
        else:  # a layer's extra state (the seed and checksum of its fixed feedback)
            assert distributed[key] == value, key
    ranks = [torch.load(run_dir / f"metrics_rank{rank}.pt", weights_only=False) for rank in range(world_size)]
    for metrics in ranks:
        assert (metrics["val_top1"], metrics["val_top5"]) == (single_metrics["val_top1"], single_metrics["val_top5"])
        for key in ("val_loss", "train_loss", "train_top1"):
            assert metrics[key] == pytest.approx(single_metrics[key], rel=1e-5), key
        assert metrics["val_samples"] == single_metrics["val_samples"] == 450
        assert metrics["step"] == single_metrics["step"]
    return ranks[0]
