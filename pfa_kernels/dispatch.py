"""Which backend and order runs a PFA backward: availability, the measured and verified choice of "auto", the
decision cache (table / save / load) and the static rule (docs/design.md §5).

A kernel that has never run on a user's device is not trusted by default, and a fused hand-written kernel is not
faster than cuBLAS/cuDNN because it is fused. backend="auto" therefore works like cudnn.benchmark:

- The first backward for a key (device, dtype, deterministic mode, layer geometry, output_mask, output positions P
  rounded up to a power of two) runs every candidate: each available backend that takes the dtype, times each
  order pair within ORDER_SLACK of the fewest multiply-adds (only the planner's pair when the strategy is named).
- Each candidate's gradients are compared with the PyTorch backend's (the reference candidate: torch, the
  planner's order). One that raises, or disagrees by more than TOLERANCE[dtype], is never chosen for the key, and
  one warning per key says which kernel, on which shape, by how much.
- The agreeing ones are timed side by side (interleaved rounds; CUDA events on a GPU, perf_counter on a CPU) and
  the fastest is cached. The first call returns the PyTorch result, so correctness never rests on an untried kernel.
- Later calls for the key run the cached choice. A key is measured once per process (the lock makes concurrent
  first calls, as DataParallel's per-device threads make them, wait for one measurement; it also serializes
  Triton's first-call autotuning, which is not thread-safe).
- Under CUDA-graph capture or torch.compile tracing nothing is measured: the cached choice runs, or the static one.
- PFA_KERNELS_DISPATCH=static measures nothing: the static rule is the PyTorch backend with the planner's order
  everywhere (no other backend has shown evidence on a device it was not measured on).
- A named backend (backend="torch" | "cpp" | "triton") is never measured and never replaced: it runs or raises.

    pk.dispatch.table()          # one row per cached decision: key, candidates, errors, times, choice
    pk.dispatch.save(path)       # JSON, with the device names and library versions it was measured with
    pk.dispatch.load(path)       # e.g. every rank of a multi-GPU job loads rank 0's measurements
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .planner import Plan

BACKENDS = ("auto", "torch", "triton", "cpp")
# Relative error (Frobenius norm of the difference / norm of the PyTorch result, per gradient) a candidate may show
# against the PyTorch backend. Two exact orders differ by rounding alone: float64 ~1e-15, float32 ~1e-6 over K ~ 1e4
# terms, fp16/bf16 by their unit roundoff (4.9e-4 / 3.9e-3) times a few roundings of g_mid and W_fb. A candidate
# outside these bounds computes something else.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# Order pairs within this factor of the fewest multiply-adds are measured; beyond it the MAC count decides.
ORDER_SLACK = 2.0
# Timed rounds per candidate after the checked run; a candidate more than DROP_FACTOR x the fastest after a round
# is not timed again (a 5x slower kernel needs no third sample to lose).
ROUNDS = 3
DROP_FACTOR = 2.0
MODES = ("measure", "static")
_FORMAT = 1


class DispatchWarning(UserWarning):
    """A candidate kernel raised or disagreed with the PyTorch backend and will not be used for that shape."""


class Key(NamedTuple):
    """What a decision is cached by. positions is P rounded up to a power of two."""

    device: str
    dtype: str
    deterministic: bool
    op: str                    # "linear", "conv1d", "conv2d", "conv3d"
    weight_shape: tuple
    mid_channels: int
    feedback_shape: tuple
    projection: str            # "M", "B" (M applied through B) or "" (explicit / direct)
    conv: tuple                # (stride, padding, dilation, groups); () for linear
    parametrization: str
    strategy: str
    output_mask: tuple
    positions: int


@dataclass
class Decision:
    """A measured (or loaded) choice for one key. Times in seconds (median of the rounds), errors relative."""

    key: Key
    candidates: list[str]
    choice: str
    plan: Plan
    errors: dict = field(default_factory=dict)
    times: dict = field(default_factory=dict)
    rejected: dict = field(default_factory=dict)   # candidate -> why ("raised: ...", "relative error ...")
    source: str = "measured"

    def row(self) -> dict:
        return {"key": self.key._asdict(), "candidates": list(self.candidates), "errors": dict(self.errors),
                "times": dict(self.times), "rejected": dict(self.rejected), "choice": self.choice,
                "input_order": self.plan.input_order, "feedback_grad_order": self.plan.feedback_grad_order,
                "source": self.source}


_decisions: dict[Key, Decision] = {}
_lock = threading.RLock()
# Counts clear() and load(), the changes that can alter a decision once made (a new key only adds one): a layer's
# cached fast path (eager_ticket.py) holds while it is unchanged.
_generation = 0
_device_names: dict[int, str] = {}


# ----------------------------------------------------------------------------- availability


def available_backends(device_type: str, device=None) -> tuple[str, ...]:
    """Backends that can run on tensors of this device type here (the PyTorch one always can); for CUDA, on
    `device` (a torch.device or index; the current one by default).

    "cpp" where pfa_kernels._C is built with device code this GPU runs (compute capability 8.0 or newer); "triton"
    on CUDA, and on CPU only under Triton's interpreter, which "auto" never measures or picks.
    """
    from .backends import cpp as cpp_backend
    from .backends import triton as triton_backend

    available = ["torch"]
    if cpp_backend.is_available(device_type, device):
        available.append("cpp")
    if triton_backend.is_available(device_type):
        available.append("triton")
    return tuple(available)


def _unavailable_reason(backend: str, device_type: str, device=None) -> str:
    if backend == "triton":
        from .backends import triton as triton_backend

        return triton_backend.unavailable_reason(device_type)
    from .backends import cpp as cpp_backend

    return cpp_backend.unavailable_reason(device_type, device)


def check_backend(backend, device_type: str, dtype: torch.dtype | None = None, device=None) -> str:
    """The backend a call runs with: "auto" (decided per backward by the rules above), or a named one, which must
    be available for this device type (and CUDA device) and take this dtype (it is never swapped for another)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        return backend
    available = available_backends(device_type, device)
    if backend not in available:
        raise RuntimeError(
            f"backend={backend!r} is not available for {device_type} tensors here: "
            f"{_unavailable_reason(backend, device_type, device)} (available: {available}); use backend='auto' to "
            f"pick one")
    if dtype is not None and not takes_dtype(backend, dtype):
        raise TypeError(f"backend={backend!r} takes float32, float16 or bfloat16 tensors; got {dtype} "
                        f"(use backend='torch' or 'auto' for it)")
    return backend


def takes_dtype(backend: str, dtype: torch.dtype) -> bool:
    """The Triton kernels take float32, float16 and bfloat16 (fp32 accumulation); the others every float dtype."""
    return backend != "triton" or dtype in (torch.float32, torch.float16, torch.bfloat16)


def candidate_backends(device_type: str, dtype: torch.dtype, parametrization: str, device=None) -> tuple[str, ...]:
    """Backends "auto" measures for a call: available on a real device (never the Triton interpreter), taking the
    dtype, and computing something of their own (the compiled ops cover the explicit parametrization; elsewhere
    "cpp" would run PyTorch's code again)."""
    backends = []
    for backend in available_backends(device_type, device):
        if backend == "triton" and device_type != "cuda":
            continue
        if backend == "cpp" and parametrization != "explicit":
            continue
        if parametrization == "direct" and backend != "torch":
            continue
        if takes_dtype(backend, dtype):
            backends.append(backend)
    return tuple(backends)


def nondeterministic(plan: Plan, device_type: str, op: str) -> bool:
    """Whether a plan runs a kernel that accumulates with atomics (order of additions varies run to run): the
    fused Triton sequence-order dL/dx, and the compiled CUDA linear sequence kernel."""
    if plan.input_order != "sequence":
        return False
    if plan.backend == "triton":
        return True
    return plan.backend == "cpp" and device_type == "cuda" and op == "linear"


# os.environ's own mapping, read without its Mapping methods: os.environ.get cost 6.5 us inside a 64x64 layer's
# training step (0.8 us timed alone), and every ticketed call (eager_ticket.py) reads the mode. The same entries:
# os.environ[...] = ... and monkeypatch.setenv write there. Elsewhere than CPython's os._Environ, os.environ.get.
_ENVIRON_ENTRIES = os.environ._data if all(hasattr(os.environ, name) for name in ("_data", "encodekey",
                                                                                  "decodevalue")) else None
_MODE_KEY = os.environ.encodekey("PFA_KERNELS_DISPATCH") if _ENVIRON_ENTRIES is not None else None
_MODE_BY_ENTRY: dict = {}  # the raw entry (None: unset) -> its mode, for the valid ones


def mode() -> str:
    """"measure" (the default) or "static", from PFA_KERNELS_DISPATCH (read at every call)."""
    if _ENVIRON_ENTRIES is None:
        return _checked_mode(os.environ.get("PFA_KERNELS_DISPATCH", ""))
    entry = _ENVIRON_ENTRIES.get(_MODE_KEY)
    known = _MODE_BY_ENTRY.get(entry)
    if known is None:
        known = _MODE_BY_ENTRY[entry] = _checked_mode("" if entry is None else os.environ.decodevalue(entry))
    return known


def _checked_mode(value: str) -> str:
    value = value or "measure"
    if value not in MODES:
        raise ValueError(f"PFA_KERNELS_DISPATCH must be one of {MODES} (or unset); got {value!r}")
    return value


# ----------------------------------------------------------------------------- keys


def device_name(device: torch.device) -> str:
    """'cpu', or the CUDA device's product name ('NVIDIA A100-SXM4-80GB'); cached per device index."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_names:
        _device_names[index] = torch.cuda.get_device_name(index)
    return _device_names[index]


def position_bucket(positions: int) -> int:
    """P rounded up to a power of two, so that variable batch or image sizes reuse a few measurements."""
    return 1 << max(0, math.ceil(math.log2(positions))) if positions > 0 else 0


def make_key(device: torch.device, dtype: torch.dtype, op: str, weight_shape, mid_channels: int, feedback_shape,
             projection: str, conv: tuple, parametrization: str, strategy: str, output_mask, positions: int,
             deterministic: bool | None = None) -> Key:
    """The Key of a call; deterministic: torch's deterministic-algorithms flag (default: as it is now)."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return Key(device_name(device), str(dtype).replace("torch.", ""), bool(deterministic),
               op, tuple(weight_shape), int(mid_channels), tuple(feedback_shape), projection,
               tuple(tuple(v) if isinstance(v, list | tuple) else v for v in conv), parametrization, strategy,
               tuple(bool(m) for m in output_mask), position_bucket(positions))


def candidate_name(plan: Plan) -> str:
    orders = "+".join(order or "-" for order in (plan.input_order, plan.feedback_grad_order))
    return f"{plan.backend}:{orders}"


def order_pairs(plan: Plan, strategy: str) -> list[tuple]:
    """The (input_order, feedback_grad_order) pairs worth measuring: with strategy "auto", every pair within
    ORDER_SLACK of the fewest multiply-adds (cheapest first); with a named strategy, the planner's pair alone."""
    pairs = [pair for pair in plan.macs if pair != "bp"]
    if strategy != "auto" or not pairs:  # a named strategy, or a fixed-feedback layer (one way to compute it)
        return [(plan.input_order, plan.feedback_grad_order)]
    fewest = min(plan.macs[pair] for pair in pairs)
    return sorted((pair for pair in pairs if plan.macs[pair] <= ORDER_SLACK * fewest), key=lambda p: plan.macs[p])


# ----------------------------------------------------------------------------- the decision


def _capturing_or_tracing(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def generation() -> int:
    """How many times the decisions have been cleared or loaded (see _generation)."""
    return _generation


def cached(key: Key) -> Decision | None:
    """The decision for a key, if one was measured or loaded (never in static mode)."""
    if mode() == "static":
        return None
    return _decisions.get(key)


def run(key: Key, device: torch.device, reference: Plan, candidates: list[Plan], execute):
    """Gradients for one backward call with backend="auto".

    reference: the PyTorch plan (the static rule, and what candidates are checked against); candidates: every
    plan worth trying (the reference among them); execute(plan) -> tuple of gradient tensors (empty where masked).
    """
    if mode() == "static":
        return execute(reference)
    decision = _decisions.get(key)
    if decision is not None:
        return execute(decision.plan)
    if _capturing_or_tracing(device):
        return execute(reference)
    with _lock:
        decision = _decisions.get(key)
        if decision is not None:
            return execute(decision.plan)
        result, decision = _measure(key, device, reference, candidates, execute)
        _decisions[key] = decision
    return result


def _measure(key, device, reference, candidates, execute):
    """Run, check and time every candidate; return (the reference's result, the Decision)."""
    deterministic = key.deterministic
    plans = {candidate_name(reference): reference}
    for plan in candidates:
        if not (deterministic and nondeterministic(plan, device.type, key.op)):
            plans.setdefault(candidate_name(plan), plan)
    timer = _Timer(device)
    expected, first_time = timer.time(lambda: execute(reference))
    times = {candidate_name(reference): [first_time]}
    errors = {candidate_name(reference): 0.0}
    rejected = {}
    tolerance = TOLERANCE.get(getattr(torch, key.dtype), 1e-4)
    for name, plan in plans.items():
        if name == candidate_name(reference):
            continue
        try:
            result, elapsed = timer.time(lambda plan=plan: execute(plan))
        except Exception as error:  # noqa: BLE001  (any failure of an untried kernel rejects it)
            rejected[name] = f"raised {type(error).__name__}: {error}"
            continue
        error = max_relative_error(result, expected)
        errors[name] = error
        if not error <= tolerance:
            rejected[name] = f"relative error {error:.3g} > {tolerance:g} ({key.dtype})"
            continue
        times[name] = [elapsed]
    if len(times) > 1:
        for _ in range(ROUNDS - 1):
            fastest = min(min(samples) for samples in times.values())
            for name, samples in times.items():
                if min(samples) <= DROP_FACTOR * fastest:
                    samples.append(timer.time(lambda plan=plans[name]: execute(plan))[1])
    medians = {name: _median(samples) for name, samples in times.items()}
    choice = min(medians, key=lambda name: (medians[name], name != candidate_name(reference)))
    if rejected:
        _warn(key, rejected)
    decision = Decision(key, list(plans), choice, plans[choice], errors, medians, rejected)
    return expected, decision


def max_relative_error(result, expected) -> float:
    """The largest relative error (Frobenius norms) over the gradients that were computed; inf if any is
    missing, misshapen or not finite."""
    worst = 0.0
    for actual, reference in zip(result, expected, strict=True):
        if reference.numel() == 0 and actual.numel() == 0:
            continue
        if actual.shape != reference.shape:
            return math.inf
        difference = (actual.double() - reference.double()).norm().item()
        scale = reference.double().norm().item()
        error = difference / scale if scale > 0 else difference
        if not math.isfinite(error):
            return math.inf
        worst = max(worst, error)
    return worst


def _median(samples):
    ordered = sorted(samples)
    return ordered[len(ordered) // 2]


class _Timer:
    """Wall time of one call: CUDA events on the current stream for a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return result, start.elapsed_time(end) / 1000
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start


def _warn(key: Key, rejected: dict) -> None:
    geometry = f"{key.op} weight {key.weight_shape}, C_mid {key.mid_channels}, {key.parametrization}"
    if key.conv:
        geometry += f", stride/padding/dilation/groups {key.conv}"
    lines = "; ".join(f"{name} {why}" for name, why in rejected.items())
    warnings.warn(
        f"pfa_kernels dispatch: on {key.device} ({key.dtype}, {geometry}, P <= {key.positions}) these kernels were "
        f"rejected and will not be used for this shape: {lines}. The PyTorch result was used. Please report it "
        f"with this message and the output of `python -m pfa_kernels.check` (pk.dispatch.table() lists every "
        f"decision).", DispatchWarning, stacklevel=3)


# ----------------------------------------------------------------------------- inspection and persistence


def table() -> list[dict]:
    """Every cached decision as a dict: key fields, candidates, errors, times (s), rejected, choice, orders."""
    with _lock:
        return [decision.row() for decision in _decisions.values()]


def clear() -> None:
    """Forget every decision (the next backward of each key measures again)."""
    global _generation
    with _lock:
        _decisions.clear()
        _generation += 1


def versions() -> dict:
    """What a saved table is only valid with: the library versions that produced its kernels."""
    import importlib.metadata

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
            "pfa_kernels": version("pfa_kernels")}


def save(path) -> int:
    """Write every measured decision to a JSON file; returns how many."""
    with _lock:
        rows = [decision.row() for decision in _decisions.values()]
    payload = {"format": _FORMAT, "versions": versions(), "decisions": rows}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(tmp, path)
    return len(rows)


def load(path) -> int:
    """Read decisions saved by save(); returns how many were loaded. A file written with other library versions
    is not used (its kernels may differ): a DispatchWarning says so and nothing is loaded."""
    global _generation
    with open(path) as handle:
        payload = json.load(handle)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT or "decisions" not in payload:
        raise ValueError(f"{path} is not a pfa_kernels dispatch table (format {_FORMAT})")
    if payload.get("versions") != versions():
        warnings.warn(f"pfa_kernels dispatch: {path} was measured with {payload.get('versions')}, this process runs "
                      f"{versions()}; its decisions are not loaded and will be measured again", DispatchWarning,
                      stacklevel=2)
        return 0
    loaded = {}
    for row in payload["decisions"]:
        key = Key(**{name: _tuples(value) for name, value in row["key"].items()})
        backend = row["choice"].split(":", 1)[0]
        plan = Plan(row["input_order"], row["feedback_grad_order"], backend, {}, f"loaded from {path}")
        loaded[key] = Decision(key, row["candidates"], row["choice"], plan, row["errors"], row["times"],
                               row["rejected"], source=f"loaded from {path}")
    with _lock:
        _decisions.update(loaded)
        _generation += 1
    return len(loaded)


def _tuples(value):
    """JSON lists back to the tuples a Key holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
