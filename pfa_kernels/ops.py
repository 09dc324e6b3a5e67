"""PFA custom ops: torch.library schemas, fake (meta) kernels and autograd registration.

Four ops in the `pfa_kernels` namespace:

    pfa_kernels::linear(x, weight, bias, B, M, feedback, parametrization, strategy, backend) -> y
    pfa_kernels::conv(x, weight, bias, B, M, feedback, stride, padding, dilation, groups, parametrization,
                      strategy, backend) -> y
    pfa_kernels::linear_backward(grad_output, x, weight, B, M, feedback, parametrization, strategy, backend,
                                 output_mask) -> 4 grads
    pfa_kernels::conv_backward(grad_output, x, weight, B, M, feedback, stride, padding, dilation, groups,
                               parametrization, strategy, backend, output_mask) -> 4 grads

parametrization "explicit": feedback is R (C_mid, C_in/groups, *kernel) and M is None.
parametrization "projected": feedback is Z (C_out, C_in, *kernel), M = B_j B_j^T per group
(G, C_out, C_out), or None to apply it through B (docs/design.md section 2.4).
parametrization "direct": feedback is W_fb itself (W's shape), B and M are None, and nothing learns: the
fixed-feedback rules of baselines.py (backpropagation's backward with W_fb in dL/dx).

The forward ops compute backpropagation's forward (the feedback does not touch the output) and save
only x, weight, B, M and the feedback tensor; the backward ops are opaque to torch.compile, so the
planner runs on concrete shapes at run time. Gradients a caller does not need come back as empty
tensors from the backward ops and as None from autograd. output_mask = [input, weight, bias, feedback].
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from . import dispatch, planner
from .backends import cpp as cpp_backend
from .backends import torch_ops
from .backends import triton as _triton_backend  # noqa: F401  (registers pfa_kernels::triton_* where they run)

_CONV_BY_SPATIAL_DIMS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def plan_backward(grad_output_shape, weight_shape, mid_channels, groups, strategy, backend, output_mask,
                  parametrization="explicit", keeps_projection_matrix=True, orders=None):
    """The Plan (planner.Plan) a backward call with these shapes and this output_mask follows on `backend` (a
    concrete one). orders: an (input_order, feedback_grad_order) pair to take instead of the planner's.

    Cached per argument tuple: a plan is a function of them alone, and planning costs about 20 us of Python per
    backward call (a tenth of a 64x64 layer's whole forward and backward)."""
    arguments = (tuple(grad_output_shape), tuple(weight_shape), mid_channels, groups, strategy, backend,
                 tuple(bool(m) for m in output_mask), parametrization, keeps_projection_matrix,
                 None if orders is None else tuple(orders))
    try:
        return _cached_plan(*arguments)
    except TypeError:  # a symbolic size (torch.compile's dynamic shapes) cannot be hashed
        return _plan(*arguments)


@functools.lru_cache(maxsize=4096)
def _cached_plan(*arguments) -> planner.Plan:
    return _plan(*arguments)


def _plan(grad_output_shape, weight_shape, mid_channels, groups, strategy, backend, output_mask, parametrization,
          keeps_projection_matrix, orders) -> planner.Plan:
    if parametrization == "direct":
        shape = planner.layer_shape(grad_output_shape, weight_shape, 0, groups)
        macs = planner.candidate_macs(shape, output_mask[0], output_mask[1], False)
        return planner.Plan("product" if output_mask[0] else None, None, backend, {"bp": macs["bp"]},
                            "fixed feedback weight: backpropagation's backward with W_fb in dL/dx")
    out_channels = weight_shape[0]
    width = out_channels if keeps_projection_matrix else 2 * (mid_channels // groups)
    shape = planner.layer_shape(grad_output_shape, weight_shape, mid_channels, groups, parametrization,
                                width if parametrization == "projected" else 0)
    need_input, need_weight, _, need_feedback = output_mask
    plan = planner.choose_orders(shape, strategy, need_input, need_weight, need_feedback, backend)
    if orders is not None and tuple(orders) != (plan.input_order, plan.feedback_grad_order):
        plan = dataclasses.replace(plan, input_order=orders[0], feedback_grad_order=orders[1],
                                   reason=f"orders {orders} (a measured candidate)")
    if backend == "cpp" and parametrization != "explicit":
        plan = dataclasses.replace(plan, reason=plan.reason + f"; runs in PyTorch (the compiled ops cover the "
                                   f"explicit parametrization, not {parametrization!r})")
    if backend == "triton" and plan.input_order == "sequence" and not planner.triton_fuses_sequence(
            len(weight_shape) - 2, groups, parametrization, keeps_projection_matrix):
        plan = dataclasses.replace(plan, reason=plan.reason + "; its sequence-order dL/dx runs in PyTorch (the fused "
                                   "Triton kernel covers linear, 1-d and 2-d layers with groups = 1)")
    return plan


def dispatch_key(device, dtype, grad_output_shape, weight_shape, B_shape, M_present, feedback_shape, conv,
                 parametrization, strategy, output_mask, deterministic=None) -> dispatch.Key:
    """The dispatch cache key of a backward call (dispatch.Key): device, dtype, geometry, P bucketed."""
    spatial = len(weight_shape) - 2
    op = "linear" if spatial == 0 else f"conv{spatial}d"
    positions = planner.layer_shape(grad_output_shape, weight_shape, 0, 1).positions
    projection = ("M" if M_present else "B") if parametrization == "projected" else ""
    return dispatch.make_key(device, dtype, op, weight_shape, 0 if B_shape is None else B_shape[1], feedback_shape,
                             projection, conv, parametrization, strategy, output_mask, positions, deterministic)


@functools.lru_cache(maxsize=4096)
def _auto_call(device, dtype, deterministic, grad_output_shape, weight_shape, B_shape, M_present, feedback_shape,
               conv, groups, parametrization, strategy, output_mask) -> tuple[dispatch.Key, planner.Plan]:
    """(dispatch key, the PyTorch backend's plan) of a backend="auto" backward call. Cached: both are functions of
    these arguments alone, and building them costs about 10 us of Python per call (a tenth of a 64x64 layer's
    forward and backward in nn); a decision itself is looked up afresh every call (dispatch.clear, load)."""
    mid_channels = 0 if B_shape is None else B_shape[1]
    reference = _plan(grad_output_shape, weight_shape, mid_channels, groups, strategy, "torch", output_mask,
                      parametrization, M_present, None)
    key = dispatch_key(device, dtype, grad_output_shape, weight_shape, B_shape, M_present, feedback_shape, conv,
                       parametrization, strategy, output_mask, deterministic)
    return key, reference


def _auto_key_and_plan(device, dtype, grad_output_shape, weight, B, M, feedback, conv, groups, parametrization,
                       strategy, output_mask) -> tuple[dispatch.Key, planner.Plan]:
    """_auto_call of a backward call: the key its backward looks up (in _dispatched, and ahead of it in
    _cpp_eager_order, which must find the same one)."""
    call = (device, dtype, torch.are_deterministic_algorithms_enabled(), tuple(grad_output_shape),
            tuple(weight.shape), None if B is None else tuple(B.shape), M is not None, tuple(feedback.shape),
            tuple(tuple(v) if isinstance(v, list) else v for v in conv), groups, parametrization, strategy,
            tuple(output_mask))
    try:
        return _auto_call(*call)
    except TypeError:  # a symbolic size (torch.compile's dynamic shapes) cannot be hashed
        return _auto_call.__wrapped__(*call)


def _dispatched(grad_output, weight, B, M, feedback, conv, groups, parametrization, strategy, backend, output_mask,
                execute):
    """Run execute(plan) with the plan of a named backend, or, for backend="auto", the dispatcher's choice."""

    def plan_on(name, orders=None):
        return plan_backward(grad_output.shape, weight.shape, 0 if B is None else B.shape[1], groups, strategy, name,
                             output_mask, parametrization, M is not None, orders)

    if backend != "auto":
        return execute(plan_on(backend))
    key, reference = _auto_key_and_plan(grad_output.device, grad_output.dtype, grad_output.shape, weight, B, M,
                                        feedback, conv, groups, parametrization, strategy, output_mask)
    decision = dispatch.cached(key)  # None in static mode
    if decision is not None:  # the common case: every call after a shape's first
        return execute(decision.plan)
    if dispatch.mode() == "measure":
        backends = dispatch.candidate_backends(grad_output.device.type, grad_output.dtype, parametrization,
                                                grad_output.device)
        candidates = [plan_on(name, pair) for name in backends for pair in dispatch.order_pairs(reference, strategy)]
    else:
        candidates = []
    return dispatch.run(key, grad_output.device, reference, candidates, execute)


def _zero_size_grads(grad_output, x, weight, feedback, output_mask, channel_dim):
    """The gradients when x or W has no elements (an empty batch, C_in = 0 or C_out = 0), as nn's layers give them,
    without a kernel: dL/dx, dL/dW and the feedback gradient are zero (every product they sum is empty or
    multiplies an empty tensor), and dL/db sums grad_output over everything but its channels. None when there are
    elements: the backward proper runs."""
    if x.numel() and weight.numel():
        return None
    channel_dim %= grad_output.dim()
    other_dims = [d for d in range(grad_output.dim()) if d != channel_dim]
    if grad_output.shape[channel_dim] == weight.shape[0]:
        grad_bias = grad_output.sum(other_dims)
    else:  # F.conv2d on C_in = 0 returns (N, 0, *spatial), not C_out channels of bias: nn's dL/db is then 0
        grad_bias = weight.new_zeros(weight.shape[0])
    grads = (torch.zeros_like(x), torch.zeros_like(weight), grad_bias, torch.zeros_like(feedback))
    return _package_grads(grads, x, weight, feedback, output_mask)


def _check_direct(output_mask):
    # functional checks this before the forward; the op checks it too for direct callers of the op.
    if output_mask[3]:
        raise ValueError("parametrization='direct' feedback (a fixed W_fb) does not learn: pass it without "
                         "requires_grad")


def _pieces(plan, weight, groups, parametrization, M):
    """The backend's kernels for this call (None: the PyTorch ones)."""
    if plan.backend != "triton":
        return None
    from .backends.triton.pieces import TRITON_PIECES

    if planner.triton_fuses_sequence(weight.dim() - 2, groups, parametrization, M is not None):
        return TRITON_PIECES
    return dataclasses.replace(TRITON_PIECES, sequence_input_grad=None)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """Layout the input gradient is returned in: x's own when x is channels_last, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _package_grads(grads, x, weight, feedback, output_mask):
    """Backward outputs in a fixed layout (what the fake kernels promise); empty where masked out."""
    grad_x, grad_weight, grad_bias, grad_feedback = grads
    return (
        grad_x.contiguous(memory_format=_memory_format(x)) if output_mask[0] else x.new_empty(0),
        grad_weight.contiguous() if output_mask[1] else weight.new_empty(0),
        grad_bias.contiguous() if output_mask[2] else weight.new_empty(0),
        grad_feedback.contiguous() if output_mask[3] else feedback.new_empty(0),
    )


def _fake_grads(x, weight, feedback, output_mask):
    out_channels = weight.shape[0]
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
        if output_mask[0] else x.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else weight.new_empty(0),
        weight.new_empty(out_channels) if output_mask[2] else weight.new_empty(0),
        torch.empty_like(feedback, memory_format=torch.contiguous_format) if output_mask[3] else feedback.new_empty(0),
    )


def _refuse_second_order(op_name: str, weight_index: int):
    """Autograd for a backward op: a second backward through a PFA layer's gradients (create_graph=True, then a
    backward of them) raises a clear error instead of PyTorch's "no autograd formula". PFA's dL/dx is not the
    derivative of the forward, so there is no consistent second-order rule to give."""

    def setup_context(ctx, inputs, output):
        ctx.weight_shape = tuple(inputs[weight_index].shape)

    def backward(ctx, *grads):
        raise RuntimeError(
            f"second-order gradients are not supported by PFA layers: the {op_name} layer with weight "
            f"{ctx.weight_shape} was differentiated twice (create_graph=True, then a backward of its gradients). "
            f"Its dL/dx uses the feedback weight, not W, so it is not the derivative of the forward; use an nn layer "
            f"(pk.convert's exclude=...) where a second derivative is needed")

    return backward, setup_context


# ----------------------------------------------------------------------------- linear


def _not_a_view(output: torch.Tensor) -> torch.Tensor:
    """`output` as a tensor of its own. F.linear of an input with more than 2 dims returns a view of its 2-D GEMM's
    result, and autograd forbids modifying a custom Function's output in place when it is a view (an
    nn.ReLU(inplace=True) after the layer, as in Swin V2's cpb_mlp): the same storage, without the view, copies
    nothing."""
    base = output._base
    if base is None:
        return output
    if output.is_contiguous() and base.is_contiguous() and base.numel() == output.numel():
        return torch.ops.aten._unsafe_view.default(base, output.shape)
    return output.clone()


@torch.library.custom_op("pfa_kernels::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, B: torch.Tensor | None,
           M: torch.Tensor | None, feedback: torch.Tensor, parametrization: str, strategy: str, backend: str
           ) -> torch.Tensor:
    """PFA linear forward: y = x W^T + b. x (..., C_in), weight (C_out, C_in), B (C_out, C_mid),
    feedback R (C_mid, C_in) or Z (C_out, C_in), M (1, C_out, C_out) or None."""
    return _not_a_view(F.linear(x, weight, bias))


@linear.register_fake
def _linear_fake(x, weight, bias, B, M, feedback, parametrization, strategy, backend):
    return F.linear(x, weight, bias)


def _linear_backward_impl(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, B: torch.Tensor | None,
                    M: torch.Tensor | None, feedback: torch.Tensor, parametrization: str, strategy: str, backend: str,
                    output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PFA linear backward: (dL/dx, dL/dW, dL/db, dL/dfeedback); grad_output (..., C_out), others as in `linear`."""
    def execute(plan):
        pieces = _pieces(plan, weight, 1, parametrization, M)
        if parametrization == "direct":
            grads = torch_ops.direct_linear_backward(grad_output, x, weight, feedback, *output_mask[:3])
        elif plan.backend == "cpp" and parametrization == "explicit":
            grads = torch.ops.pfa_kernels.cpp_linear_backward(grad_output, x, weight, B, feedback,
                                                              plan.input_order or "", plan.feedback_grad_order or "",
                                                              output_mask)
        elif parametrization == "projected":
            grads = torch_ops.projected_linear_backward(grad_output, x, weight, B, M, feedback, plan, *output_mask,
                                                        pieces=pieces)
        else:
            grads = torch_ops.linear_backward(grad_output, x, weight, B, feedback, plan, *output_mask, pieces=pieces)
        return _package_grads(grads, x, weight, feedback, output_mask)

    if parametrization == "direct":
        _check_direct(output_mask)
    empty = _zero_size_grads(grad_output, x, weight, feedback, output_mask, channel_dim=-1)
    if empty is not None:
        return empty
    return _dispatched(grad_output, weight, B, M, feedback, (), 1, parametrization, strategy, backend, output_mask,
                       execute)


linear_backward = torch.library.custom_op("pfa_kernels::linear_backward", mutates_args=())(_linear_backward_impl)


@linear_backward.register_fake
def _linear_backward_fake(grad_output, x, weight, B, M, feedback, parametrization, strategy, backend, output_mask):
    return _fake_grads(x, weight, feedback, output_mask)


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, B, M, feedback, parametrization, strategy, backend = inputs
    ctx.save_for_backward(x, weight, B, M, feedback)
    ctx.has_bias = bias is not None
    ctx.options = (parametrization, strategy, backend)


def _linear_autograd_backward(ctx, grad_output, backward=None):
    """Autograd's backward of the linear op (and of its eager twin, which passes the backward to run)."""
    x, weight, B, M, feedback = ctx.saved_tensors
    mask = _output_mask(ctx)
    grads = (backward or linear_backward)(grad_output, x, weight, B, M, feedback, *ctx.options, mask)
    return _autograd_grads(grads, mask) + (None,) * 3


linear.register_autograd(_linear_autograd_backward, setup_context=_linear_setup_context)
_backward, _setup = _refuse_second_order("linear", weight_index=2)
linear_backward.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- conv


@torch.library.custom_op("pfa_kernels::conv", mutates_args=())
def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, B: torch.Tensor | None,
         M: torch.Tensor | None, feedback: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
         groups: int, parametrization: str, strategy: str, backend: str) -> torch.Tensor:
    """PFA convolution forward (1d/2d/3d by weight.dim()): y = conv(x, W) + b, zero padding.

    x (N, C_in, *spatial), weight (C_out, C_in/groups, *kernel), bias (C_out,) or None,
    B (C_out, C_mid), feedback R (C_mid, C_in/groups, *kernel) or Z (C_out, C_in, *kernel),
    M (groups, C_out, C_out) or None.
    """
    return _not_a_view(_CONV_BY_SPATIAL_DIMS[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups))


@conv.register_fake
def _conv_fake(x, weight, bias, B, M, feedback, stride, padding, dilation, groups, parametrization, strategy,
               backend):
    return _CONV_BY_SPATIAL_DIMS[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)


def _conv_backward_impl(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, B: torch.Tensor | None,
                  M: torch.Tensor | None, feedback: torch.Tensor, stride: list[int], padding: list[int],
                  dilation: list[int], groups: int, parametrization: str, strategy: str, backend: str,
                  output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PFA convolution backward: (dL/dx, dL/dW, dL/db, dL/dfeedback); grad_output (N, C_out, *out_spatial)."""
    def execute(plan):
        conv_args = (stride, padding, dilation, groups, plan, *output_mask)
        pieces = _pieces(plan, weight, groups, parametrization, M)
        if parametrization == "direct":
            grads = torch_ops.direct_conv_backward(grad_output, x, weight, feedback, stride, padding, dilation, groups,
                                                   *output_mask[:3])
        elif plan.backend == "cpp" and parametrization == "explicit":
            grads = torch.ops.pfa_kernels.cpp_conv_backward(grad_output, x, weight, B, feedback, stride, padding,
                                                            dilation, groups, plan.input_order or "",
                                                            plan.feedback_grad_order or "", output_mask)
        elif parametrization == "projected":
            grads = torch_ops.projected_conv_backward(grad_output, x, weight, B, M, feedback, *conv_args,
                                                      pieces=pieces)
        else:
            grads = torch_ops.conv_backward(grad_output, x, weight, B, feedback, *conv_args, pieces=pieces)
        return _package_grads(grads, x, weight, feedback, output_mask)

    if parametrization == "direct":
        _check_direct(output_mask)
    empty = _zero_size_grads(grad_output, x, weight, feedback, output_mask, channel_dim=1)
    if empty is not None:
        return empty
    return _dispatched(grad_output, weight, B, M, feedback, (stride, padding, dilation, groups), groups,
                       parametrization, strategy, backend, output_mask, execute)


conv_backward = torch.library.custom_op("pfa_kernels::conv_backward", mutates_args=())(_conv_backward_impl)


@conv_backward.register_fake
def _conv_backward_fake(grad_output, x, weight, B, M, feedback, stride, padding, dilation, groups, parametrization,
                        strategy, backend, output_mask):
    return _fake_grads(x, weight, feedback, output_mask)


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, B, M, feedback, stride, padding, dilation, groups, parametrization, strategy, backend = inputs
    ctx.save_for_backward(x, weight, B, M, feedback)
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.options = (parametrization, strategy, backend)


def _conv_autograd_backward(ctx, grad_output, backward=None):
    """Autograd's backward of the conv op (and of its eager twin, which passes the backward to run)."""
    x, weight, B, M, feedback = ctx.saved_tensors
    mask = _output_mask(ctx)
    grads = (backward or conv_backward)(grad_output, x, weight, B, M, feedback, *ctx.conv_args, *ctx.options, mask)
    return _autograd_grads(grads, mask) + (None,) * 7


conv.register_autograd(_conv_autograd_backward, setup_context=_conv_setup_context)
_backward, _setup = _refuse_second_order("convolution", weight_index=2)
conv_backward.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- eager calls


class _EagerLinear(torch.autograd.Function):
    """pfa_kernels::linear's forward, saved tensors and backward implementation without torch.library's dispatch,
    which costs about 150 us of Python per layer call on this CPU (a 64x64 layer's whole forward and backward take
    about 100 us in nn). For eager calls on plain tensors; torch.compile, export and tensor subclasses take the op.
    With create_graph=True the backward runs the backward op, whose autograd refuses a second derivative."""

    @staticmethod
    def forward(ctx, x, weight, bias, B, M, feedback, parametrization, strategy, backend):
        # ctx first, not a separate setup_context: that form binds the arguments with inspect on every call (70 us).
        _linear_setup_context(ctx, (x, weight, bias, B, M, feedback, parametrization, strategy, backend), None)
        return _not_a_view(F.linear(x, weight, bias))

    @staticmethod
    def backward(ctx, grad_output):
        return _linear_autograd_backward(ctx, grad_output, None if torch.is_grad_enabled() else _linear_backward_impl)


class _EagerConv(torch.autograd.Function):
    """pfa_kernels::conv without torch.library's dispatch, as _EagerLinear."""

    @staticmethod
    def forward(ctx, x, weight, bias, B, M, feedback, stride, padding, dilation, groups, parametrization, strategy,
                backend):
        _conv_setup_context(ctx, (x, weight, bias, B, M, feedback, stride, padding, dilation, groups, parametrization,
                                  strategy, backend), None)
        return _not_a_view(_CONV_BY_SPATIAL_DIMS[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups))

    @staticmethod
    def backward(ctx, grad_output):
        return _conv_autograd_backward(ctx, grad_output, None if torch.is_grad_enabled() else _conv_backward_impl)


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter, type(None)))


def _eager(*tensors) -> bool:
    """Whether a call can skip the op: not traced by torch.compile or export, and plain tensors (not fake, functional
    or distributed ones, which the op's registrations handle) or None."""
    return (_PLAIN.issuperset(map(type, tensors)) and not torch.compiler.is_compiling()
            and not torch.compiler.is_exporting())


def apply_linear(x, weight, bias, B, M, feedback, parametrization, strategy, backend) -> torch.Tensor:
    """pfa_kernels::linear, or its eager twin where the op's dispatch is not needed (same results, bit for bit): in
    C++ (csrc/eager_linear.cpp) where _cpp_eager_order finds the PyTorch backend's measured plan, else Python."""
    if _eager(x, weight, bias, B, M, feedback):
        order = _cpp_eager_order(x, weight, bias, B, M, feedback, parametrization, strategy, backend)
        if order is not None:
            return cpp_backend.EAGER.eager_projected_linear(x, weight, bias, M, feedback, order == "sequence",
                                                            strategy, backend)
        return _EagerLinear.apply(x, weight, bias, B, M, feedback, parametrization, strategy, backend)
    return linear(x, weight, bias, B, M, feedback, parametrization, strategy, backend)


def _cpp_eager_order(x, weight, bias, B, M, feedback, parametrization, strategy, backend) -> str | None:
    """The input gradient's order ("product" or "sequence") where a call can take the C++ eager twin, else None.
    It computes the PyTorch backend's projected linear backward with M for 2-D x, so it is taken only where the
    backward would run that: backend and strategy "auto", and a measured decision for this call's backward that chose
    the PyTorch backend (the first call of a shape measures in Python; static mode and the other backends stay
    there). A 64x64 layer's forward and backward: 170 -> 154 us, 134 us with the layer's ticket (eager_ticket.py),
    nn 94 us (bench_overhead.py)."""
    if (cpp_backend.EAGER is None or parametrization != "projected" or M is None or x.dim() != 2
            or strategy != "auto" or backend != "auto" or not torch.is_grad_enabled()
            or x.numel() == 0 or weight.numel() == 0 or torch.jit.is_tracing()):  # (the tracer sees no pybind call)
        return None
    mask = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad, feedback.requires_grad)
    key = _auto_key_and_plan(x.device, x.dtype, (x.shape[0], weight.shape[0]), weight, B, M, feedback, (), 1,
                             parametrization, strategy, mask)[0]
    decision = dispatch.cached(key)
    if decision is None or decision.plan.backend != "torch":
        return None
    return decision.plan.input_order or "product"


def apply_conv(x, weight, bias, B, M, feedback, stride, padding, dilation, groups, parametrization, strategy,
               backend) -> torch.Tensor:
    """pfa_kernels::conv, or its eager twin (as apply_linear)."""
    if _eager(x, weight, bias, B, M, feedback):
        return _EagerConv.apply(x, weight, bias, B, M, feedback, stride, padding, dilation, groups, parametrization,
                                strategy, backend)
    return conv(x, weight, bias, B, M, feedback, stride, padding, dilation, groups, parametrization, strategy,
                backend)


# ----------------------------------------------------------------------------- shared


def _output_mask(ctx) -> list[bool]:
    need_x, need_weight, need_bias, _, _, need_feedback = ctx.needs_input_grad[:6]
    return [bool(need_x), bool(need_weight), bool(need_bias and ctx.has_bias), bool(need_feedback)]


def _autograd_grads(grads, mask):
    """Autograd's view of the backward op's outputs: (dx, dW, db, dB=None, dM=None, dfeedback), None where masked."""
    grad_x, grad_weight, grad_bias, grad_feedback = (
        g if wanted else None for g, wanted in zip(grads, mask, strict=True))
    return grad_x, grad_weight, grad_bias, None, None, grad_feedback
