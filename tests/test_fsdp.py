"""FSDP2 (torch.distributed.fsdp.fully_shard) on a converted model trains like one process on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import distributed_worker_teardown, relative_error
from torch import nn

import pfa_kernels as pk


class _ConvAttentionNet(nn.Module):
    """A PFA conv, attention over its 64 positions (PFAMultiheadAttention: PFA q/k/v and output projections), PFA
    linears."""

    def __init__(self, parametrization: str):
        super().__init__()
        self.conv = pk.PFAConv2d(3, 8, 3, padding=1, parametrization=parametrization)
        self.attention = pk.PFAMultiheadAttention(8, 2, batch_first=True, parametrization=parametrization)
        self.hidden = pk.PFALinear(8, 16, parametrization=parametrization)
        self.head = pk.PFALinear(16, 5, parametrization=parametrization)

    def forward(self, x):
        tokens = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)  # (N, 64, 8)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(torch.tanh(self.hidden(attended.mean(1))))


def _model(parametrization):
    torch.manual_seed(0)
    return _ConvAttentionNet(parametrization)


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=generator), torch.randint(0, 5, (8,), generator=generator)


def _train(model, x, y, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _fsdp_worker(rank, init_file, result_file, parametrization):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with distributed_worker_teardown():
        model = _model(parametrization)
        for layer in (model.conv, model.attention, model.hidden, model.head):
            fully_shard(layer)
        fully_shard(model)
        x, y = _batch()
        _train(model, x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
        # Parameters are sharded DTensors; buffers (B, M) stay whole on every rank.
        state = {key: value.full_tensor() if hasattr(value, "full_tensor") else value
                 for key, value in model.state_dict().items()}
        if rank == 0:
            torch.save(state, result_file)


@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
def test_fully_shard_equals_one_process(tmp_path, parametrization):
    """2 gloo ranks, every layer and the root sharded, 3 SGD steps with momentum on half batches: weights and
    feedback equal one process on the whole batch (float32; the gradient reductions add in another order)."""
    torch.multiprocessing.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path / "fsdp.pt"),
                                                    parametrization), nprocs=2)
    single = _model(parametrization)
    _train(single, *_batch())
    sharded = torch.load(tmp_path / "fsdp.pt")
    for key, value in single.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert relative_error(sharded[key], value) < 1e-6, key
        else:  # a feedback's "_extra_state": its seed and checksum
            assert sharded[key] == value, key
    name = "R" if parametrization == "explicit" else "Z"
    untrained = _model(parametrization)
    for layer in ("head", "attention.in_proj", "attention.out_proj"):  # training moved every feedback
        initial = untrained.get_submodule(layer).feedback.parameter.detach()
        assert relative_error(sharded[f"{layer}.feedback.{name}"], initial) > 1e-3, layer
