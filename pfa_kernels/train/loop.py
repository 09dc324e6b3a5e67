"""The training loop: rule conversion, optimizer and schedules, DDP, AMP, checkpoints that resume exactly,
progress bars, metrics.jsonl and plots. run(config) trains and returns the last epoch's metrics."""

from __future__ import annotations

import json
import os
import random
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import pfa_kernels as pk

from . import data, models, plots

CHECKPOINT = "checkpoint.pt"


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


def _to_device(images, labels, device, channels_last):
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.to(memory_format=torch.channels_last)
    return images, labels


@torch.no_grad()
def evaluate(model, loader, device, autocast, channels_last, world_size) -> dict:
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
    return {"val_loss": loss / count, "val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count}


def run(config: dict, rank: int | None = None, world_size: int | None = None, init_method: str | None = None,
        resume: bool = False, progress: bool = True) -> dict:
    rank, world_size = _distributed(rank, world_size, init_method)
    device = _device(config, rank)
    train_cfg, optim_cfg, log_cfg = config["train"], config["optim"], config["log"]
    torch.manual_seed(train_cfg["seed"])
    random.seed(train_cfg["seed"])
    np.random.seed(train_cfg["seed"])  # noqa: NPY002
    run_dir = Path(log_cfg["dir"])
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))

    train_set, val_set = data.datasets(config)
    val_set = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))  # exact counts across ranks
    train_loader, val_loader, batch_sampler = data.loaders(config, train_set, val_set, rank, world_size, device)
    model = apply_rule(models.build(config, tuple(train_set[0][0].shape)), config).to(device)
    if config["model"]["checkpoint"]:
        state = torch.load(config["model"]["checkpoint"], map_location=device, weights_only=True)
        target = model.model if isinstance(model, pk.dfa.DirectFeedbackAlignment) else model
        target.load_state_dict(state)  # strict: every BP key must fit; PFA feedback keeps its draw
    channels_last = train_cfg["channels_last"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, config)
    pk.check_optimizer(optimizer, model)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, optim_cfg["lr_milestones"], optim_cfg["lr_gamma"])
    amp = train_cfg["amp"]
    if amp not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"train.amp must be fp32, bf16 or fp16; got {amp!r}")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast():
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype, enabled=amp != "fp32")

    epoch, step, skip = 0, 0, 0
    checkpoint_path = run_dir / CHECKPOINT
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, step, skip = state["epoch"], state["step"], state["batch_in_epoch"]
        _set_rng_state(state["rng"])
        for name, module in _feedback_generators(model).items():
            module.load_generator_state(state["feedback_generators"].get(name))
    trained = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    if train_cfg["compile"]:
        trained = torch.compile(trained)
    writer = None
    if log_cfg["tensorboard"] and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir / "tensorboard")

    def save(batch_in_epoch):
        if rank != 0:
            return
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                    "batch_in_epoch": batch_in_epoch, "rng": _rng_state(), "config": config,
                    "feedback_generators": {n: m.generator_state() for n, m in _feedback_generators(model).items()}},
                   checkpoint_path)

    max_steps = train_cfg["max_steps"]
    metrics = {}
    while epoch < train_cfg["epochs"]:
        weight_decay = weight_decay_for(epoch, optim_cfg)
        for group in optimizer.param_groups:
            group["weight_decay"] = weight_decay
        batch_sampler.set_epoch(epoch)
        model.train()
        seen, loss_sum, correct, start = 0, 0.0, 0, time.perf_counter()
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
            seen += len(labels) * world_size
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            if step % log_cfg["every"] == 0 or batch_in_epoch == len(train_loader):
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
            if max_steps is not None and step >= max_steps:
                save(batch_in_epoch)
                return {"step": step, "epoch": epoch, "loss": loss.item()}
        skip = 0
        elapsed = time.perf_counter() - start
        metrics = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(1, seen // world_size),
                   "train_top1": 100 * correct / max(1, seen // world_size), "images_per_s": seen / elapsed,
                   "lr": optimizer.param_groups[0]["lr"], "weight_decay": weight_decay,
                   **evaluate(trained, val_loader, device, autocast, channels_last, world_size)}
        if rank == 0:
            metrics["layers"] = [{k: row[k] for k in ("layer", "rule", "path_alignment", "norm_ratio")}
                                 for row in pk.metrics.report(model)]
            with (run_dir / "metrics.jsonl").open("a") as out:
                out.write(json.dumps(metrics) + "\n")
            if writer is not None:
                for key in ("train_loss", "train_top1", "val_top1", "val_top5", "images_per_s", "lr"):
                    writer.add_scalar(key, metrics[key], epoch)
        scheduler.step()
        epoch += 1
        save(0)
    if rank == 0 and metrics:
        plots.write(run_dir)
    if writer is not None:
        writer.close()
    return metrics
