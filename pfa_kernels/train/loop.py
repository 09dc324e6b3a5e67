"""The training loop: rule conversion, optimizer and schedules, DDP or FSDP2, AMP, weight averaging, checkpoints
that resume exactly, the best epoch's checkpoint, progress bars, a line per epoch, metrics.jsonl and plots.
run(config) trains and returns the last epoch's metrics; evaluate_checkpoint(path) evaluates a saved model."""

from __future__ import annotations

import contextlib
import copy
import json
import math
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
from . import checkpoint, data, models, optimization, plots, rundir
from . import config as config_module
from .values import ConfigError

CHECKPOINT = checkpoint.NAME


def _world(rank, world_size):
    """(rank, world size): from arguments (tests), from torchrun's environment, or a single process."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    return rank or 0, world_size


def _check_combinations(config: dict, world_size: int) -> None:
    """Options that cannot go together, or not with this many processes: ConfigError naming them."""
    train, mode = config["train"], config["rule"]["mode"]
    if train["fsdp"] and world_size < 2:
        raise ConfigError("train.fsdp=true shards the model over the processes of a distributed run and needs 2 or "
                          "more (torchrun --nproc_per_node N); this run has 1")
    if train["fsdp"] and mode == "dfa":
        raise ConfigError("train.fsdp=true cannot shard rule.mode='dfa': its feedback D (activations x outputs) is "
                          "drawn at the first forward and used whole; DFA suits models that fit one device (DDP)")
    if train["ema_decay"] is not None and mode == "dfa":
        raise ConfigError("train.ema_decay cannot average rule.mode='dfa': its feedback D is drawn at the first "
                          "training forward, after the averaged copy is made")


def _distributed(rank, world_size, init_method):
    """(rank, world size), with the process group initialized when there are several."""
    rank, world_size = _world(rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world_size)
    return rank, world_size


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
    """pk.convert with the config's rule (bp: unchanged). parametrization auto: the layers' "auto" under SGD
    (projected wherever exact: no masked R, a well-conditioned B), explicit under Adam-like optimizers."""
    rule = config["rule"]
    mode = rule["mode"]
    if mode == "bp":
        return model
    if mode == "dfa":
        return pk.convert(model, mode="dfa", feedback_seed=rule["feedback_seed"])
    kwargs = {"exclude": tuple(rule["exclude"]), "backend": rule["backend"], "feedback_seed": rule["feedback_seed"]}
    if mode in ("pfa", "pfa-o", "kp"):
        parametrization = rule["parametrization"]
        if parametrization == "auto" and config["optim"]["name"] != "sgd":
            parametrization = "explicit"  # Adam on a projected Z is another learning rule (the optimizer hook raises)
        kwargs.update(parametrization=parametrization, feedback_density=rule["feedback_density"])
        if mode == "pfa":
            kwargs["expand_ratio"] = rule["expand_ratio"]
    return pk.convert(model, mode=mode, **kwargs)


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
def evaluate(model, loader, device, autocast, channels_last, world_size, collective=False) -> dict:
    """Loss (plain cross-entropy), top-1 and top-5 over the whole validation set: each rank evaluates its shard (the
    unwrapped model: ranks may have different numbers of batches, and a DDP forward is a collective), the sums are
    all-reduced. collective: the forward is a collective (FSDP gathers the parameters), so every rank runs as many
    forwards as the rank with the most batches, the extra ones on a sample whose output is not counted."""
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
    if collective and world_size > 1:
        most = torch.tensor([len(loader)], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        if int(most.item()) > len(loader):
            sample, label = loader.dataset[0]
            sample, _ = _to_device(sample[None], torch.tensor([label]), device, channels_last)
            for _ in range(int(most.item()) - len(loader)):
                with autocast():
                    model(sample)
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


def build_model(config: dict, example: torch.Tensor) -> nn.Module:
    """The config's model (models.build), checked against an example image, with its rule applied; on the CPU."""
    model = models.build(config, tuple(example.shape))
    models.check_input(model, config, example)
    try:
        return apply_rule(model, config)
    except ValueError as error:  # pk.convert refusing an option or a combination of them
        raise ConfigError(f"rule={config['rule']} cannot convert model.name={config['model']['name']!r}: "
                          f"{error}") from error


def _load_starting_weights(model, path):
    """model.checkpoint: a backpropagation state dict; strict, so every BP key must fit (PFA feedback keeps its
    draw)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"model.checkpoint={path!r}: no such file") from None
    except Exception as error:
        raise ConfigError(f"model.checkpoint={path!r} cannot be read: {type(error).__name__}: {error}") from error
    target = model.model if isinstance(model, pk.dfa.DirectFeedbackAlignment) else model
    try:
        target.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ConfigError(f"model.checkpoint={path!r} does not fit this model: {error}") from error


def _restore(state, path, model, optimizer, scheduler, scaler, optim, changes, ema, fsdp):
    """Load a resumed run's state, then put back the optimizer settings this run changes (load_state_dict brings back
    the checkpoint's). Under FSDP every rank loads the whole state and keeps its shards."""
    try:
        if fsdp:
            from . import sharding

            sharding.load_model_state(model, state["model"])
            sharding.load_optimizer_state(model, optimizer, state["optimizer"])
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if fsdp:
                sharding.load_model_state(ema.module, state["ema"]["module"])
            else:
                ema.module.load_state_dict(state["ema"]["module"])
            ema.n_averaged.fill_(state["ema"]["n_averaged"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"{path} does not fit the model and optimizer this config builds: {error}") from error
    for group in optimizer.param_groups:
        for key in ("momentum", "nesterov"):
            if f"optim.{key}" in changes and key in group:
                group[key] = optim[key]
    if optim["schedule"] == "cosine":
        # The schedule's value at this step from this run's lr, min_lr, warmup and epochs (a closure over them).
        scheduler.base_lrs = [optim["lr"]] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"], group["lr"] = optim["lr"], optim["lr"] * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    elif changes.keys() & {"optim.lr", "optim.lr_milestones", "optim.lr_gamma"}:
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


def summary_line(metrics: dict, epochs: int, seconds: float, best: bool) -> str:
    """log.epoch_summary: one line per epoch (epochs counted from 0, as in metrics.jsonl)."""
    parts = [f"epoch {metrics['epoch']} ({metrics['epoch'] + 1}/{epochs})",
             f"train loss {metrics['train_loss']:.4f} top-1 {metrics['train_top1']:.2f}%",
             f"val loss {metrics['val_loss']:.4f} top-1 {metrics['val_top1']:.2f}% top-5 {metrics['val_top5']:.2f}%"]
    if "ema_val_top1" in metrics:
        parts.append(f"EMA val top-1 {metrics['ema_val_top1']:.2f}%")
    parts += [f"lr {metrics['lr']:.4g}", f"{metrics['images_per_s']:.0f} img/s", f"{seconds:.1f} s"]
    return " | ".join(parts) + (" | best" if best else "")


def _layer_metrics(model, val_loader, batches, device, channels_last) -> list[dict]:
    """Per PFA layer: path alignment, norm ratio and (over `batches` validation batches) input-gradient alignment."""
    gradient_angles = input_gradient_alignment(model, val_loader, batches, device, channels_last)
    rows = [{k: row[k] for k in ("layer", "rule", "path_alignment", "norm_ratio")} for row in pk.metrics.report(model)]
    for row in rows:
        if row["layer"] in gradient_angles:
            row["input_gradient_alignment"] = gradient_angles[row["layer"]]
    return rows


def _autocast(amp, device):
    def autocast():
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype, enabled=amp != "fp32")
    return autocast


def run(config: dict, rank: int | None = None, world_size: int | None = None, init_method: str | None = None,
        resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Train with `config` (validated first); resume continues log.dir's checkpoint, overwrite replaces an earlier run
    in log.dir. The run folder changes only after the config, data, model and checkpoint have been checked."""
    config = config_module.check(config)
    train_cfg, optim_cfg, log_cfg = config["train"], config["optim"], config["log"]
    if resume and overwrite:
        raise ConfigError("--resume continues the run in log.dir and --overwrite replaces it: give one of them")
    _check_combinations(config, _world(rank, world_size)[1])
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
    steps_per_epoch = len(train_loader)
    optimization.check(optim_cfg, train_cfg["epochs"], steps_per_epoch)
    model = build_model(config, train_set[0][0])
    if config["model"]["checkpoint"] and resumed is None:
        _load_starting_weights(model, config["model"]["checkpoint"])
    channels_last, fsdp, ema_decay = train_cfg["channels_last"], train_cfg["fsdp"], train_cfg["ema_decay"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # FSDP: rank 0 keeps a whole copy on the CPU for the per-layer metrics (loaded with the gathered state each epoch);
    # the model shards from the CPU, each unit moving its shards to the device.
    mirror = copy.deepcopy(model) if fsdp and rank == 0 else None
    if not fsdp:
        model = model.to(device)
    ema = optimization.ema_model(model, ema_decay) if ema_decay is not None else None
    if fsdp:
        from . import sharding

        sharding.shard(model, device)
        if ema is not None:
            sharding.shard(ema.module, device)
    optimizer = optimization.optimizer(model, optim_cfg)
    try:
        pk.check_optimizer(optimizer, model)
    except ValueError as error:
        raise ConfigError(f"optim.name={optim_cfg['name']!r} cannot train rule.mode={config['rule']['mode']!r} "
                          f"with rule.parametrization={config['rule']['parametrization']!r}: {error}") from error
    scheduler = optimization.scheduler(optimizer, optim_cfg, train_cfg["epochs"], steps_per_epoch)
    per_step_schedule = optim_cfg["schedule"] == "cosine"
    scaler = torch.amp.GradScaler(device.type, enabled=train_cfg["amp"] == "fp16")
    autocast = _autocast(train_cfg["amp"], device)

    # This epoch's training loss sum, correct predictions and samples on this rank; a resumed run's rank 0 starts
    # from the checkpoint's totals over all ranks, so that the sums over ranks cover the whole epoch.
    epoch, step, skip, totals = 0, 0, 0, [0.0, 0, 0]
    best = {"epoch": None, "val_top1": -math.inf}  # log.keep_best: the epoch best.pt holds
    if resumed is not None:
        _restore(resumed, checkpoint_path, model, optimizer, scheduler, scaler, optim_cfg, changes, ema, fsdp)
        epoch, step, skip = resumed["epoch"], resumed["step"], resumed["batch_in_epoch"]
        best = dict(resumed.get("best", best))
        if rank == 0 and "epoch_totals" in resumed:
            totals = list(resumed["epoch_totals"])
    # Everything is checked: only now does the run folder change.
    if rank == 0:
        rundir.prepare(run_dir, config, overwrite, resumed, changes)
        if changes:
            print(f"resuming {checkpoint_path} at epoch {epoch}, step {step}, with "
                  + ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()), file=sys.stderr)
    trained = nn.parallel.DistributedDataParallel(model) if world_size > 1 and not fsdp else model
    evaluated = model
    if train_cfg["compile"]:
        trained, evaluated = torch.compile(trained), torch.compile(model)
    writer = None
    if log_cfg["tensorboard"] and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir / "tensorboard")

    def training_state(batch_in_epoch, epoch_totals, model_state=None):
        """The checkpoint's content on rank 0 (None elsewhere). Under FSDP every rank must call this: gathering the
        whole model and optimizer state is a collective."""
        if fsdp:
            model_state = sharding.full_model_state(model) if model_state is None else model_state
            optimizer_state = sharding.full_optimizer_state(model, optimizer)
            ema_state = sharding.full_model_state(ema.module) if ema is not None else None
        elif rank == 0:
            model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
            ema_state = ema.module.state_dict() if ema is not None else None
        if rank != 0:
            return None
        generators = {name: module.generator_state() for name, module in _feedback_generators(model).items()}
        state = {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch,
                 "epoch_totals": epoch_totals, "rng": _rng_state(), "config": config,
                 "feedback_generators": generators, "best": dict(best)}
        if ema is not None:
            state["ema"] = {"module": ema_state, "n_averaged": int(ema.n_averaged)}
        return state

    def save(batch_in_epoch, epoch_totals, model_state=None, also_best=False):
        state = training_state(batch_in_epoch, epoch_totals, model_state)
        if state is not None:
            if also_best:  # before checkpoint.pt: a resume after a crash in between redoes the epoch and this save
                checkpoint.save(state, run_dir / checkpoint.BEST)
            checkpoint.save(state, checkpoint_path)

    max_steps, every = train_cfg["max_steps"], log_cfg["checkpoint_every"]
    label_smoothing = optim_cfg["label_smoothing"]
    metrics = {}
    if max_steps is not None and step >= max_steps:
        return {"step": step, "epoch": epoch}
    while epoch < train_cfg["epochs"]:
        weight_decay = weight_decay_for(epoch, optim_cfg)
        optimization.set_weight_decay(optimizer, weight_decay)
        batch_sampler.set_epoch(epoch)
        model.train()
        images_now, start = 0, time.perf_counter()
        bar = tqdm(islice(train_loader, skip, None), total=len(train_loader) - skip, desc=f"epoch {epoch}",
                   disable=not progress or rank != 0, leave=False)
        batch_in_epoch, lr_used = skip, optimizer.param_groups[0]["lr"]
        for images, labels in bar:
            images, labels = _to_device(images, labels, device, channels_last)
            with autocast():
                logits = trained(images)
                loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            lr_used = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                optimization.update_ema(ema, model)
            if per_step_schedule:
                scheduler.step()
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
                _wait_for_rank_0(world_size)
                return {"step": step, "epoch": epoch, "loss": loss.item()}
        skip = 0
        elapsed = time.perf_counter() - start
        loss_sum, correct, count = _summed(totals, world_size, device)
        totals = [0.0, 0, 0]
        _broadcast_normalization_state(model, world_size)
        if ema is not None:
            _broadcast_normalization_state(ema.module, world_size)
        full_state = None
        with _training_feedback_kept(model):
            metrics = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(1, count),
                       "train_top1": 100 * correct / max(1, count), "images_per_s": images_now / elapsed,
                       "lr": lr_used, "weight_decay": weight_decay,
                       **evaluate(evaluated, val_loader, device, autocast, channels_last, world_size, fsdp)}
            if ema is not None:
                averaged = evaluate(ema.module, val_loader, device, autocast, channels_last, world_size, fsdp)
                metrics.update(_as_ema(averaged))
            if fsdp:  # every rank: a collective; rank 0 inspects its whole copy on the CPU
                full_state = sharding.full_model_state(model)
                if rank == 0:
                    mirror.load_state_dict(full_state)
            if rank == 0:
                inspected, inspect_device = (mirror, torch.device("cpu")) if fsdp else (model, device)
                metrics["layers"] = _layer_metrics(inspected, val_loader, log_cfg["alignment_batches"],
                                                   inspect_device, channels_last)
        improved = log_cfg["keep_best"] and metrics["val_top1"] > best["val_top1"]
        if improved:
            best = {"epoch": epoch, "val_top1": metrics["val_top1"]}
        if rank == 0:
            with (run_dir / rundir.METRICS).open("a") as out:
                out.write(json.dumps(metrics) + "\n")
            if writer is not None:
                for key in ("train_loss", "train_top1", "val_top1", "val_top5", "images_per_s", "lr"):
                    writer.add_scalar(key, metrics[key], epoch)
            if log_cfg["epoch_summary"]:
                print(summary_line(metrics, train_cfg["epochs"], time.perf_counter() - start, improved), flush=True)
        if not per_step_schedule:
            scheduler.step()
        epoch += 1
        save(0, [0.0, 0, 0], full_state, also_best=improved)
    if rank == 0 and metrics:
        plots.write(run_dir)
    if writer is not None:
        writer.close()
    _wait_for_rank_0(world_size)
    return metrics


def _wait_for_rank_0(world_size):
    # Every rank returns once rank 0 has written the checkpoint and plots: the run folder is complete on return.
    if world_size > 1:
        dist.barrier()


def _as_ema(metrics: dict) -> dict:
    """The weight average's validation metrics as recorded beside the model's: ema_val_loss, ... (its sample count
    is the model's)."""
    return {f"ema_{key}": value for key, value in metrics.items() if key != "val_samples"}


def evaluate_checkpoint(path, overrides=(), rank: int | None = None, world_size: int | None = None,
                        init_method: str | None = None) -> dict:
    """--eval: the model of a training checkpoint (checkpoint.pt, best.pt), and its weight average if it has one,
    evaluated on the validation set of the checkpoint's config with key=value overrides (data.root, train.device,
    train.batch_size, ...). Nothing trains. Rank 0 writes the metrics to <checkpoint>.eval.json; returns them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--eval {path}: no such file")
    state = checkpoint.load(path)
    config = config_module.override(state["config"], overrides)
    rank, world_size = _distributed(rank, world_size, init_method)
    device = _device(config, rank)
    torch.manual_seed(config["train"]["seed"])
    _, val_set = data.datasets(config, train=False)
    val_loader = data.validation_loader(config, val_set, rank, world_size, device)
    channels_last, autocast = config["train"]["channels_last"], _autocast(config["train"]["amp"], device)
    model = build_model(config, val_set[0][0])
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"{path} does not fit the model its config builds: {error}") from error
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    metrics = {"checkpoint": str(path), "step": state["step"], "epochs_completed": state["epoch"],
               "batch_in_epoch": state["batch_in_epoch"],
               **evaluate(model, val_loader, device, autocast, channels_last, world_size)}
    if "ema" in state:
        averaged = copy.deepcopy(model)
        averaged.load_state_dict(state["ema"]["module"])
        metrics.update(_as_ema(evaluate(averaged, val_loader, device, autocast, channels_last, world_size)))
    if rank == 0:
        metrics["layers"] = _layer_metrics(model, val_loader, config["log"]["alignment_batches"], device,
                                           channels_last)
        output = path.with_name(path.name.removesuffix(path.suffix) + checkpoint.EVAL_SUFFIX)
        output.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
