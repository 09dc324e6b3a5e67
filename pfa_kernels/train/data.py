"""Datasets for training: scikit-learn's digits (embedded, no download), MNIST and CIFAR-10 from a local
folder (torchvision; downloaded only with data.download=true), and ImageFolder (ImageNet layout:
root/train/<class>/*.jpg, root/val/<class>/*.jpg) with the standard augmentation. data.channels and data.resize
adapt the images to a model built for other inputs (a torchvision model on the 8x8 grayscale digits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from .values import ConfigError


class Adapt:
    """data.channels and data.resize on an image tensor (C, H, W) or a batch (N, C, H, W): grayscale repeated to
    `channels`, RGB averaged to gray, then a bilinear resize to size x size. A picklable transform (DataLoader
    workers)."""

    def __init__(self, channels: int | None, size: int | None):
        self.channels, self.size = channels, size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = images if images.dim() == 4 else images[None]
        have = batch.shape[1]
        if self.channels is not None and self.channels != have:
            if have == 1:
                batch = batch.expand(-1, self.channels, -1, -1).contiguous()
            elif self.channels == 1:
                batch = batch.mean(1, keepdim=True)
            else:
                raise ConfigError(f"data.channels={self.channels} cannot be made from {have}-channel images (it "
                                  f"repeats 1 channel or averages to 1)")
        if self.size is not None and tuple(batch.shape[-2:]) != (self.size, self.size):
            batch = torch.nn.functional.interpolate(batch, size=(self.size, self.size), mode="bilinear",
                                                    align_corners=False, antialias=True)
        return batch if images.dim() == 4 else batch[0]

    def __bool__(self) -> bool:
        return self.channels is not None or self.size is not None


class GlobalBatchSampler(Sampler):
    """Yields this rank's share of each global batch: batch k of an epoch is perm[k*B:(k+1)*B] (perm seeded by
    seed + epoch) and rank r takes its r-th contiguous slice. The global batches are the same for any number
    of ranks, so a DDP run equals one process with the same global batch (gradients are averaged)."""

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int):
        self.size, self.global_batch, self.rank, self.world_size, self.seed = size, global_batch, rank, world_size, seed
        self.per_rank = global_batch // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.global_batch

    def __iter__(self):
        permutation = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for start in range(0, len(self) * self.global_batch, self.global_batch):
            shard = permutation[start + self.rank * self.per_rank:start + (self.rank + 1) * self.per_rank]
            yield shard.tolist()


class ShardSampler(Sampler):
    """This rank's share of a dataset evaluated in order: indices rank, rank + world_size, ... Every sample is on
    exactly one rank (no padding, unlike DistributedSampler), so counts summed across ranks are the whole set's."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def digits(seed: int = 0):
    """(train, val) TensorDatasets of 8x8 digits (1 channel, pixels in [0, 1]); a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.from_numpy((data.images.astype(np.float32) / 16.0)[:, None])
    labels = torch.from_numpy(data.target.astype(np.int64))
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=0.25, random_state=seed,
                                          stratify=data.target)
    return TensorDataset(images[train_idx], labels[train_idx]), TensorDataset(images[val_idx], labels[val_idx])


def _torchvision_dataset(name, root, download, adapt, train=True):
    import torchvision
    from torchvision import transforms

    if name == "mnist":
        normalize = transforms.Normalize((0.1307,), (0.3081,))
        train_tf = val_tf = [transforms.ToTensor(), normalize]
        cls = torchvision.datasets.MNIST
    else:
        normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        train_tf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                    normalize]
        val_tf = [transforms.ToTensor(), normalize]
        cls = torchvision.datasets.CIFAR10
    if adapt:
        train_tf, val_tf = [*train_tf, adapt], [*val_tf, adapt]
    try:
        return (cls(root, train=True, transform=transforms.Compose(train_tf), download=download) if train else None,
                cls(root, train=False, transform=transforms.Compose(val_tf), download=download))
    except RuntimeError as error:
        raise FileNotFoundError(f"{name} not found under data.root={root!r} ({error}); put it there, or set "
                                f"data.download=true where the network allows") from error


def image_folder(root, image_size: int, adapt=None, train=True):
    """(train, val) ImageFolder datasets from root/train and root/val, ImageNet augmentation and normalization
    (train=False: (None, val), without listing the training images)."""
    import torchvision
    from torchvision import transforms

    root = Path(root)
    for split in ("train", "val") if train else ("val",):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"ImageFolder needs {root / split}/<class>/<images>; not found")
    normalize = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                normalize]
    resize = max(image_size, int(round(image_size * 256 / 224)))
    val_tf = [transforms.Resize(resize), transforms.CenterCrop(image_size), transforms.ToTensor(), normalize]
    if adapt:
        train_tf, val_tf = [*train_tf, adapt], [*val_tf, adapt]
    return (torchvision.datasets.ImageFolder(root / "train", transforms.Compose(train_tf)) if train else None,
            torchvision.datasets.ImageFolder(root / "val", transforms.Compose(val_tf)))


def datasets(config: dict, train: bool = True):
    """(train set, validation set); train=False: (None, validation set) for evaluation alone."""
    data = config["data"]
    name = data["dataset"]
    adapt = Adapt(data["channels"], data["resize"])
    if name == "digits":
        train_set, val_set = digits(config["train"]["seed"])
        if adapt:  # in memory: adapted once
            train_set, val_set = (TensorDataset(adapt(s.tensors[0]), s.tensors[1]) for s in (train_set, val_set))
        return (train_set if train else None), val_set
    if name in ("mnist", "cifar10"):
        return _torchvision_dataset(name, data["root"], data["download"], adapt, train)
    if name in ("imagenet", "imagefolder"):
        if data["resize"] is not None:
            raise ConfigError(f"data.resize={data['resize']} is for digits, mnist and cifar10; "
                              f"data.dataset={name!r} crops to data.image_size={data['image_size']}")
        return image_folder(data["root"], data["image_size"], Adapt(data["channels"], None), train)
    raise ValueError(f"data.dataset must be digits, mnist, cifar10, imagenet or imagefolder; got {name!r}")


def num_classes(dataset) -> int:
    """Classes of a training set: torchvision's .classes, else 1 + the largest label of a TensorDataset."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    return int(dataset.tensors[1].max()) + 1


def check(config: dict, train_set, world_size: int) -> None:
    """The keys that can only be checked against the data: ConfigError naming the key."""
    batch_size, size = config["train"]["batch_size"], len(train_set)
    if batch_size > size:
        raise ConfigError(f"train.batch_size={batch_size} is larger than the training set ({size} samples of "
                          f"data.dataset={config['data']['dataset']!r}): an epoch would have no step")
    if batch_size % world_size:
        raise ConfigError(f"train.batch_size={batch_size} must divide by the {world_size} DDP ranks")
    classes, wanted = num_classes(train_set), config["model"]["num_classes"]
    if wanted != classes:
        raise ConfigError(f"model.num_classes={wanted}, but data.dataset={config['data']['dataset']!r} has "
                          f"{classes} classes")


def _loader_options(config: dict, dataset, device) -> dict:
    in_memory, workers = isinstance(dataset, TensorDataset), config["data"]["workers"]
    return dict(num_workers=0 if in_memory else workers, pin_memory=config["data"]["pin_memory"] and
                device.type == "cuda", persistent_workers=not in_memory and workers > 0)


def loaders(config: dict, train_set, val_set, rank: int, world_size: int, device):
    """(train loader, val loader, train batch sampler). Training batches come from GlobalBatchSampler; each sample
    of the validation set is evaluated on exactly one rank (counts are summed across ranks by the caller)."""
    train = config["train"]
    batch_sampler = GlobalBatchSampler(len(train_set), train["batch_size"], rank, world_size, train["seed"])
    train_loader = DataLoader(train_set, batch_sampler=batch_sampler, **_loader_options(config, train_set, device))
    return train_loader, validation_loader(config, val_set, rank, world_size, device), batch_sampler


def validation_loader(config: dict, val_set, rank: int, world_size: int, device):
    """Batches of train.batch_size / world_size, in order; each sample on exactly one rank."""
    return DataLoader(val_set, batch_size=max(1, config["train"]["batch_size"] // world_size),
                      sampler=ShardSampler(len(val_set), rank, world_size),
                      **_loader_options(config, val_set, device))
