"""The training loop: rule conversion, optimizer and schedules, DDP, AMP, checkpoints that resume exactly,
progress bars, metrics.jsonl and plots. run(config) trains and returns the last epoch's metrics."""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import pfa_kernels as pk

from ..nn import PFA_LAYERS
from . import checkpoint, data, models, plots, rundir
from . import config as config_module
from .values import ConfigError

CHECKPOINT = checkpoint.NAME


def _distributed(rank, world_size, init_method):
    """(rank, world size): from arguments (tests), from torchrun's environment, or a single process."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world_size)
    return rank or 0, world_size


def _device(config, rank):
    choice = config["train"]["device"]
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank)) % max(1, torch.cuda.device_count())
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(choice)


def apply_rule(model: nn.Module, config: dict) -> nn.Module:
    """pk.convert with the config's rule (bp: unchanged). parametrization auto = projected under SGD."""
    rule = config["rule"]
    mode = rule["mode"]
    if mode == "bp":
        return model
    if mode == "dfa":
        return pk.convert(model, mode="dfa", feedback_seed=rule["feedback_seed"])
    kwargs = {"exclude": tuple(rule["exclude"]), "backend": rule["backend"], "feedback_seed": rule["feedback_seed"]}
    if mode in ("pfa", "pfa-o", "kp"):
        parametrization = rule["parametrization"]
        if parametrization == "auto":
            dense_masks = rule["feedback_density"] == 1 or isinstance(rule["feedback_density"], (list, tuple))
            parametrization = "projected" if config["optim"]["name"] == "sgd" and dense_masks else "explicit"
        kwargs.update(parametrization=parametrization, feedback_density=rule["feedback_density"])
        if mode == "pfa":
            kwargs["expand_ratio"] = rule["expand_ratio"]
    return pk.convert(model, mode=mode, **kwargs)


def _optimizer(model, config):
    optim = config["optim"]
    if optim["name"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=optim["lr"], momentum=optim["momentum"],
                               nesterov=optim["nesterov"], weight_decay=optim["weight_decay"])
    if optim["name"] in ("adam", "adamw"):
        cls = torch.optim.Adam if optim["name"] == "adam" else torch.optim.AdamW
        return cls(model.parameters(), lr=optim["lr"], weight_decay=optim["weight_decay"])
    raise ValueError(f"optim.name must be sgd, adam or adamw; got {optim['name']!r}")


def weight_decay_for(epoch: int, optim: dict) -> float:
    """The paper's weight-decay schedule: large for the first large_wd_epochs epochs, then small."""
    return optim["large_weight_decay"] if epoch < optim["large_wd_epochs"] else optim["weight_decay"]


def _rng_state():
    # numpy's legacy global state: data pipelines and augmentations use it, so a resume restores it too.
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}  # noqa: NPY002
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _feedback_generators(model):
    """brsf layers draw magnitudes from their own generators: part of the state a resume must restore."""
    return {name: m for name, m in model.named_modules() if isinstance(m, pk.baselines.FixedFeedback)}


@contextlib.contextmanager
def _training_feedback_kept(model):
    """Forwards inside the block (evaluation, metrics) leave the brsf draws of training as they were: otherwise
    ranks that evaluate different numbers of batches would train on different feedback afterwards."""
    saved = {name: (m.generator_state(), m.last_feedback_weight) for name, m in _feedback_generators(model).items()}
    try:
        yield
    finally:
        for name, module in _feedback_generators(model).items():
            module.load_generator_state(saved[name][0])
            module.last_feedback_weight = saved[name][1]


def _to_device(images, labels, device, channels_last):
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.to(memory_format=torch.channels_last)
    return images, labels


def _summed(values: list[float], world_size: int, device) -> list[float]:
    """values summed over the DDP ranks (as they are with one process)."""
    if world_size == 1:
        return values
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def _broadcast_normalization_state(model, world_size):
    # DDP without SyncBatchNorm leaves each rank's running statistics updated by its own last batch: every rank
    # evaluates rank 0's, the model the checkpoint holds.
    if world_size == 1:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)


@torch.no_grad()
def evaluate(model, loader, device, autocast, channels_last, world_size) -> dict:
    """Loss, top-1 and top-5 over the whole validation set: each rank evaluates its shard (the unwrapped model:
    ranks may have different numbers of batches, and a DDP forward is a collective), the sums are all-reduced."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, channels_last)
        with autocast():
            logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals += torch.tensor([nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item(),
                                (top[:, 0] == labels).sum().item(), (top == labels[:, None]).any(1).sum().item(),
                                len(labels)], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(totals)
    model.train()
    loss, top1, top5, count = totals.tolist()
    return {"val_loss": loss / count, "val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count,
            "val_samples": int(count)}


def input_gradient_alignment(model, loader, batches: int, device, channels_last) -> dict[str, float]:
    """Per PFA layer, pk.metrics.input_gradient_alignment averaged over the first `batches` batches of `loader`
    (degrees; {} without PFA layers or batches)."""
    if batches == 0 or not any(isinstance(m, PFA_LAYERS) for m in model.modules()):
        return {}
    sums, counts = {}, {}
    model.eval()  # BatchNorm uses its running statistics, as in validation
    try:
        for images, labels in islice(loader, batches):
            images, labels = _to_device(images, labels, device, channels_last)
            angles = pk.metrics.input_gradient_alignment(
                model, images, lambda logits, labels=labels: nn.functional.cross_entropy(logits.float(), labels))
            for name, angle in angles.items():
                sums[name] = sums.get(name, 0.0) + angle
                counts[name] = counts.get(name, 0) + 1
    finally:
        model.train()
    return {name: sums[name] / counts[name] for name in sums}


def _load_starting_weights(model, path, device):
    """model.checkpoint: a backpropagation state dict; strict, so every BP key must fit (PFA feedback keeps its
    draw)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"model.checkpoint={path!r}: no such file") from None
    except Exception as error:
        raise ConfigError(f"model.checkpoint={path!r} cannot be read: {type(error).__name__}: {error}") from error
    target = model.model if isinstance(model, pk.dfa.DirectFeedbackAlignment) else model
    try:
        target.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ConfigError(f"model.checkpoint={path!r} does not fit this model: {error}") from error


def _restore(state, path, model, optimizer, scheduler, scaler, optim, changes):
    """Load a resumed run's state, then put back the optimizer settings this run changes (load_state_dict brings back
    the checkpoint's)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"{path} does not fit the model and optimizer this config builds: {error}") from error
    for group in optimizer.param_groups:
        for key in ("momentum", "nesterov"):
            if f"optim.{key}" in changes and key in group:
                group[key] = optim[key]
    if changes.keys() & {"optim.lr", "optim.lr_milestones", "optim.lr_gamma"}:
        # The step schedule's value at this epoch, from the new lr, milestones and gamma.
        scheduler.milestones, scheduler.gamma = Counter(optim["lr_milestones"]), optim["lr_gamma"]
        scheduler.base_lrs = [optim["lr"]] * len(optimizer.param_groups)
        passed = sum(1 for milestone in optim["lr_milestones"] if milestone <= scheduler.last_epoch)
        for group in optimizer.param_groups:
            group["initial_lr"], group["lr"] = optim["lr"], optim["lr"] * optim["lr_gamma"] ** passed
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    _set_rng_state(state["rng"])
    for name, module in _feedback_generators(model).items():
        module.load_generator_state(state["feedback_generators"].get(name))


def run(config: dict, rank: int | None = None, world_size: int | None = None, init_method: str | None = None,
        resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Train with `config` (validated first); resume continues log.dir's checkpoint, overwrite replaces an earlier run
    in log.dir. The run folder changes only after the config, data, model and checkpoint have been checked."""
    config = config_module.check(config)
    train_cfg, optim_cfg, log_cfg = config["train"], config["optim"], config["log"]
    if resume and overwrite:
        raise ConfigError("--resume continues the run in log.dir and --overwrite replaces it: give one of them")
    run_dir = Path(log_cfg["dir"])
    resumed, changes, checkpoint_path = None, {}, run_dir / CHECKPOINT
    if resume:
        checkpoint_path = rundir.checkpoint_for_resume(run_dir)
        resumed = checkpoint.load(checkpoint_path)
        changes = rundir.resume_changes(resumed["config"], config, resumed["batch_in_epoch"], checkpoint_path)
    else:
        rundir.check_new(run_dir, overwrite)
    rank, world_size = _distributed(rank, world_size, init_method)
    device = _device(config, rank)
    torch.manual_seed(train_cfg["seed"])
    random.seed(train_cfg["seed"])
    np.random.seed(train_cfg["seed"])  # noqa: NPY002

    train_set, val_set = data.datasets(config)
    data.check(config, train_set, world_size)
    train_loader, val_loader, batch_sampler = data.loaders(config, train_set, val_set, rank, world_size, device)
    try:
        model = apply_rule(models.build(config, tuple(train_set[0][0].shape)), config).to(device)
    except ValueError as error:  # pk.convert refusing an option or a combination of them
        raise ConfigError(f"rule={config['rule']} cannot convert model.name={config['model']['name']!r}: "
                          f"{error}") from error
    if config["model"]["checkpoint"] and resumed is None:
        _load_starting_weights(model, config["model"]["checkpoint"], device)
    channels_last = train_cfg["channels_last"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, config)
    try:
        pk.check_optimizer(optimizer, model)
    except ValueError as error:
        raise ConfigError(f"optim.name={optim_cfg['name']!r} cannot train rule.mode={config['rule']['mode']!r} "
                          f"with rule.parametrization={config['rule']['parametrization']!r}: {error}") from error
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, optim_cfg["lr_milestones"], optim_cfg["lr_gamma"])
    amp = train_cfg["amp"]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast():
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype, enabled=amp != "fp32")

    # This epoch's training loss sum, correct predictions and samples on this rank; a resumed run's rank 0 starts
    # from the checkpoint's totals over all ranks, so that the sums over ranks cover the whole epoch.
    epoch, step, skip, totals = 0, 0, 0, [0.0, 0, 0]
    if resumed is not None:
        _restore(resumed, checkpoint_path, model, optimizer, scheduler, scaler, optim_cfg, changes)
        epoch, step, skip = resumed["epoch"], resumed["step"], resumed["batch_in_epoch"]
        if rank == 0 and "epoch_totals" in resumed:
            totals = list(resumed["epoch_totals"])
    # Everything is checked: only now does the run folder change.
    if rank == 0:
        rundir.prepare(run_dir, config, overwrite, resumed, changes)
        if changes:
            print(f"resuming {checkpoint_path} at epoch {epoch}, step {step}, with "
                  + ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()), file=sys.stderr)
    trained = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    evaluated = model
    if train_cfg["compile"]:
        trained, evaluated = torch.compile(trained), torch.compile(model)
    writer = None
    if log_cfg["tensorboard"] and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir / "tensorboard")

    def save(batch_in_epoch, epoch_totals):
        if rank != 0:
            return
        generators = {name: module.generator_state() for name, module in _feedback_generators(model).items()}
        checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                         "step": step, "batch_in_epoch": batch_in_epoch, "epoch_totals": epoch_totals,
                         "rng": _rng_state(), "config": config, "feedback_generators": generators}, checkpoint_path)

    max_steps, every = train_cfg["max_steps"], log_cfg["checkpoint_every"]
    metrics = {}
    if max_steps is not None and step >= max_steps:
        return {"step": step, "epoch": epoch}
    while epoch < train_cfg["epochs"]:
        weight_decay = weight_decay_for(epoch, optim_cfg)
        for group in optimizer.param_groups:
            group["weight_decay"] = weight_decay
        batch_sampler.set_epoch(epoch)
        model.train()
        images_now, start = 0, time.perf_counter()
        bar = tqdm(islice(train_loader, skip, None), total=len(train_loader) - skip, desc=f"epoch {epoch}",
                   disable=not progress or rank != 0, leave=False)
        batch_in_epoch = skip
        for images, labels in bar:
            images, labels = _to_device(images, labels, device, channels_last)
            with autocast():
                logits = trained(images)
                loss = nn.functional.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            batch_in_epoch += 1
            images_now += len(labels) * world_size
            totals = [totals[0] + loss.item() * len(labels), totals[1] + (logits.argmax(1) == labels).sum().item(),
                      totals[2] + len(labels)]
            if step % log_cfg["every"] == 0 or batch_in_epoch == len(train_loader):
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{images_now / (time.perf_counter() - start):.0f}")
            at_limit = max_steps is not None and step >= max_steps
            if at_limit or (every is not None and step % every == 0 and batch_in_epoch < len(train_loader)):
                save(batch_in_epoch, _summed(totals, world_size, device))
            if at_limit:
                return {"step": step, "epoch": epoch, "loss": loss.item()}
        skip = 0
        elapsed = time.perf_counter() - start
        loss_sum, correct, count = _summed(totals, world_size, device)
        totals = [0.0, 0, 0]
        _broadcast_normalization_state(model, world_size)
        with _training_feedback_kept(model):
            metrics = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(1, count),
                       "train_top1": 100 * correct / max(1, count), "images_per_s": images_now / elapsed,
                       "lr": optimizer.param_groups[0]["lr"], "weight_decay": weight_decay,
                       **evaluate(evaluated, val_loader, device, autocast, channels_last, world_size)}
            if rank == 0:
                gradient_angles = input_gradient_alignment(model, val_loader, log_cfg["alignment_batches"], device,
                                                           channels_last)
                metrics["layers"] = [{k: row[k] for k in ("layer", "rule", "path_alignment", "norm_ratio")}
                                     for row in pk.metrics.report(model)]
                for row in metrics["layers"]:
                    if row["layer"] in gradient_angles:
                        row["input_gradient_alignment"] = gradient_angles[row["layer"]]
        if rank == 0:
            with (run_dir / rundir.METRICS).open("a") as out:
                out.write(json.dumps(metrics) + "\n")
            if writer is not None:
                for key in ("train_loss", "train_top1", "val_top1", "val_top5", "images_per_s", "lr"):
                    writer.add_scalar(key, metrics[key], epoch)
        scheduler.step()
        epoch += 1
        save(0, [0.0, 0, 0])
    if rank == 0 and metrics:
        plots.write(run_dir)
    if writer is not None:
        writer.close()
    return metrics
