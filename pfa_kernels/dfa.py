"""Direct feedback alignment (DFA; Nøkland 2016): the output error e = dL/d(output) is sent to every hidden
layer through a fixed random matrix, instead of backwards through the layers above.

    model = pk.convert(model, mode="dfa")        # a DirectFeedbackAlignment wrapping the model

For every Linear/Conv layer k but the first, the gradient reaching its input x_k is replaced by D_k e
(D_k fixed, (numel(x_k) per sample) x (outputs)); autograd then carries it through the nonlinearity and
normalization in front of x_k to the layer that produced it, and every layer's weight gradient follows as in
BP. All D_k e are formed in one batched projection when e arrives (one GEMM against the stacked D), not one
hook at a time. The layers themselves stay nn.Linear / nn.Conv*d.

D is (sum of hidden input sizes) x (outputs), so DFA suits models whose activations are small (MLPs,
CIFAR-size CNNs); for an ImageNet ResNet it would take gigabytes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class DirectFeedbackAlignment(nn.Module):
    """Wraps `model`; the first forward (or `prepare(example_input)`) sizes and draws D from `feedback_seed`.

    D (buffer, (sum_k numel(x_k), outputs)): block D_k drawn U(-1/sqrt(numel(x_k)), 1/sqrt(numel(x_k))) on a
    CPU generator.
    """

    def __init__(self, model: nn.Module, feedback_seed: int | None = None):
        super().__init__()
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, _LAYER_TYPES)]
        if len(self.layers) < 2:
            raise ValueError("DFA needs at least two Linear/Conv layers (the first one's input is the data)")
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if feedback_seed is None else feedback_seed
        self.register_buffer("D", None)
        self.sizes: list[int] | None = None
        self._inputs: list[torch.Tensor] = []
        self._projections: list[torch.Tensor] | None = None
        self._active = False
        for index, layer in enumerate(self.layers[1:]):
            layer.register_forward_pre_hook(self._capture_input(index))

    def _capture_input(self, index):
        def hook(module, args):
            if not self._active or not torch.is_grad_enabled():  # the wrapped model called alone is plain BP
                return None
            x = args[0]
            if not x.requires_grad:
                return None
            x = x.view_as(x)  # a tensor of this layer's own, so the hook sees only its gradient
            x.register_hook(lambda grad: self._projected(index, grad))
            self._inputs.append(x)
            return (x, *args[1:])
        return hook

    def _projected(self, index, grad):
        if self._projections is None:
            raise RuntimeError("DFA: a hidden layer's gradient arrived before the output error")
        return self._projections[index].reshape(grad.shape).to(grad.dtype)

    def _project_all(self, error: torch.Tensor):
        """All D_k e in one GEMM: (N, outputs) @ D^T -> (N, sum_k numel(x_k)), split per layer."""
        stacked = error.reshape(error.shape[0], -1).to(self.D.dtype) @ self.D.t()
        self._projections = list(stacked.split(self.sizes, dim=1))
        return error

    @torch.no_grad()
    def _draw(self, sizes, outputs, device, dtype):
        generator = torch.Generator().manual_seed(self.seed)
        # D_k ~ U(-1/sqrt(n_k), 1/sqrt(n_k)), n_k = numel(x_k): the scale of a weight with fan n_k, so D_k e is
        # about as large as a backpropagated error. (1/sqrt(outputs) made hidden errors ~10x BP's on the digits
        # CNN and training diverged at the recipe's learning rate.)
        blocks = [torch.empty(size, outputs, dtype=torch.float64).uniform_(-1 / math.sqrt(size), 1 / math.sqrt(size),
                                                                           generator=generator) for size in sizes]
        D = torch.cat(blocks)
        self.D = D.to(device=device, dtype=dtype)
        self.sizes = list(sizes)

    def forward(self, x):
        self._inputs, self._projections = [], None
        self._active = True
        try:
            output = self.model(x)
        finally:
            self._active = False
        if not torch.is_grad_enabled() or not output.requires_grad:
            return output
        sizes = [t[0].numel() for t in self._inputs]
        if len(sizes) != len(self.layers) - 1:
            raise RuntimeError("DFA: every hidden Linear/Conv layer must run once per forward, on an input that "
                               "requires grad")
        if self.D is None:
            self._draw(sizes, output[0].numel(), output.device, output.dtype)
        elif sizes != self.sizes:
            raise ValueError(f"DFA: layer input sizes {sizes} differ from the ones D was drawn for ({self.sizes})")
        output.register_hook(self._project_all)
        return output

    def get_extra_state(self):
        return {"sizes": self.sizes, "seed": self.seed}

    def set_extra_state(self, state) -> None:
        self.sizes, self.seed = state["sizes"], state["seed"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint taken after the first forward holds D; make room for it before the default loading.
        if self.D is None and prefix + "D" in state_dict:
            self.D = torch.empty_like(state_dict[prefix + "D"])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def feedback_matrices(self) -> list[torch.Tensor]:
        """[D_k]: (numel(x_k), outputs) for each hidden layer k, in model order."""
        return list(self.D.split(self.sizes, dim=0))
