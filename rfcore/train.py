"""Train a registry model on an image dataset with the paper's recipe (or a quick one for tiny models).

Kobayashi & Shouno (2020) §3.1: SGD, lr 0.01, momentum 0.9, weight decay 1e-4, lr ÷10 every 30 epochs,
90 epochs, batch 256, RandomResizedCrop with area scale (0.08, 1) and aspect ratio (3/4, 4/3). On CUDA
the loop uses mixed precision, pinned memory and non-blocking copies; on CPU it is plain float32.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from rfcore.data import BadImageError, ImageDataset, iter_batches, loader_context, open_dataset
from rfcore.errors import DataError, RfatlasError
from rfcore.models import default_preprocessing, get_model, model_meta, save_checkpoint, select_device
from rfcore.precision import MODES as PRECISION_MODES
from rfcore.precision import autocast, autocast_dtype


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; the defaults are the paper's §3.1 ImageNet recipe."""

    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step_epochs: int = 30  # multiply the lr by lr_gamma every this many epochs
    lr_gamma: float = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio
    hflip: bool = True
    num_workers: int = 4  # DataLoader worker processes (0: load in the training process)
    amp: str = "auto"  # CUDA only: 'auto' (bf16 where supported, else fp16) | 'bf16' | 'fp16' | 'off'

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1 or self.batch_size < 1 or self.lr_step_epochs < 1 or self.num_workers < 0:
            problems.append("epochs, batch_size and lr_step_epochs must be >= 1, num_workers >= 0")
        if not (self.lr > 0 and self.momentum >= 0 and self.weight_decay >= 0 and self.lr_gamma > 0):
            problems.append("lr and lr_gamma must be > 0, momentum and weight_decay >= 0")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            problems.append(f"crop_scale {self.crop_scale} must satisfy 0 < lo <= hi <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            problems.append(f"crop_ratio {self.crop_ratio} must satisfy 0 < lo <= hi")
        if self.amp not in PRECISION_MODES:
            problems.append(f"amp {self.amp!r} must be one of {', '.join(PRECISION_MODES)}")
        if problems:
            raise RfatlasError("bad TrainConfig: " + "; ".join(problems))

    @classmethod
    def quick(cls) -> TrainConfig:
        """A CPU-minute recipe for the tiny models on the synthetic data (tests, demo).

        Measured on the (hard, `rfcore.synthetic`) ``synthetic-train`` images, val on ``synthetic:512``:
        2000 images (248 steps): 85 % resnet10t, 82 % plainnet10t; 384 images: ~60 % / ~30 % (chance 10 %). Small batches with a larger lr and a short step schedule; a milder crop (the classes differ
        in spatial frequency, which strong zoom changes) and no flip (a mirrored 45° grating is a 135° one).
        """
        return cls(
            epochs=4,
            batch_size=32,
            lr=0.05,
            lr_step_epochs=3,
            crop_scale=(0.5, 1.0),
            hflip=False,
            num_workers=0,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-value dict (stored in the checkpoint)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced."""

    checkpoint_url: str
    val_accuracy: float | None  # top-1 on val_spec; None without one
    train_loss: float  # mean cross-entropy over the last epoch
    epochs: int
    seconds: float


class _Augmented(Dataset[tuple[Tensor, int] | None]):
    """Training view of an ImageDataset: uint8 RandomResizedCrop of the *original* image (§3.1: area
    and aspect ratio drawn relative to the whole image, not to a resized centre crop) (+ flip);
    unreadable images give None."""

    def __init__(self, ds: ImageDataset, size: int, config: TrainConfig) -> None:
        self.ds = ds
        steps: list[nn.Module] = [
            v2.RandomResizedCrop(size, scale=config.crop_scale, ratio=config.crop_ratio, antialias=True)
        ]
        if config.hflip:
            steps.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        try:
            image, label = self.ds.get_original(index)
        except BadImageError:
            return None
        return self.transform(torch.from_numpy(image)), label


def _collate(items: Sequence[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor]:
    good = [it for it in items if it is not None]
    if not good:
        raise DataError("a whole training batch was unreadable")
    return torch.stack([im for im, _ in good]), torch.tensor([lb for _, lb in good], dtype=torch.int64)


def evaluate(
    model: nn.Module, data_spec: str, *, device: str | torch.device = "auto", batch_size: int = 256
) -> float:
    """Top-1 accuracy of a :func:`~rfcore.models.get_model` model on ``data_spec``.

    Eval mode, centre crops, float32 (no autocast), so the number matches what the atlas sweeps see.
    """
    dev = device if isinstance(device, torch.device) else select_device(device)
    meta = model_meta(model)
    pre = meta.preprocessing
    ds = open_dataset(data_spec, size=pre.size, resize=pre.resize)
    if ds.num_classes != meta.num_classes:
        raise DataError(f"{data_spec} has {ds.num_classes} classes, {meta.name} predicts {meta.num_classes}")
    cuda = dev.type == "cuda"
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for batch in iter_batches(ds, range(len(ds)), batch_size, pin_memory=cuda):
            if len(batch.labels) == 0:
                continue
            logits = model(pre.normalize(batch.images.to(dev, non_blocking=cuda)))
            correct += int((logits.argmax(1).cpu() == batch.labels).sum())
            total += len(batch.labels)
    model.train(was_training)
    if total == 0:
        raise DataError(f"{data_spec}: no readable images to evaluate on")
    return correct / total


def train(
    model_name: str,
    data_spec: str,
    *,
    out_url: str,
    config: TrainConfig = TrainConfig(),  # frozen, so a shared default is safe
    val_spec: str | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train ``model_name`` from a ``seed``-ed random init on ``data_spec``; checkpoint to ``out_url``.

    The head gets the training set's number of classes. Augmented uint8 crops are normalized on the
    device with the model's preprocessing. Validation (``val_spec``, centre crops) runs once at the end;
    its accuracy goes into the checkpoint's metrics. The global RNGs are left untouched.
    """
    start = time.perf_counter()
    dev = select_device(device)
    cuda = dev.type == "cuda"
    pre = default_preprocessing(model_name)
    train_ds = open_dataset(data_spec, size=pre.size, resize=pre.resize)  # crops from get_original
    if train_ds.num_classes < 2:
        raise DataError(f"{data_spec}: training needs labelled data with at least 2 classes")
    if len(train_ds) < config.batch_size:
        raise DataError(f"{data_spec}: {len(train_ds)} images, fewer than one batch of {config.batch_size}")
    if val_spec is not None:  # fail before training, not after it
        val_classes = open_dataset(val_spec, size=pre.size, resize=pre.resize).num_classes
        if val_classes != train_ds.num_classes:
            raise DataError(
                f"{val_spec} has {val_classes} classes but {data_spec} has {train_ds.num_classes}"
            )
    model = get_model(model_name, num_classes=train_ds.num_classes, seed=seed).to(dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_step_epochs, gamma=config.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(dev, config.amp) == torch.float16)
    rng_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)  # crops (in-process loading) and shuffling are reproducible per seed
        loader = DataLoader(
            _Augmented(train_ds, pre.size, config),
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=config.num_workers,
            persistent_workers=config.num_workers > 0,
            multiprocessing_context=loader_context() if config.num_workers > 0 else None,
            pin_memory=cuda,
            collate_fn=_collate,
            generator=torch.Generator().manual_seed(seed),
        )
        bar = tqdm(total=config.epochs * len(loader), unit="batch", disable=not progress, desc=model_name)
        train_loss = math.nan
        for epoch in range(config.epochs):
            model.train()
            loss_sum = torch.zeros((), device=dev)
            seen = 0
            for images, labels in loader:
                images = images.to(dev, non_blocking=cuda)
                labels = labels.to(dev, non_blocking=cuda)
                x = pre.normalize(images)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(dev, config.amp):
                    loss = F.cross_entropy(model(x), labels)
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(scaler.scale(loss))
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach().float() * len(labels)
                seen += len(labels)
                bar.update()
            schedule.step()
            train_loss = float(loss_sum) / seen
            if not math.isfinite(train_loss):
                raise RfatlasError(
                    f"training diverged at epoch {epoch + 1} (loss {train_loss}); lower the lr"
                )
            bar.set_postfix(epoch=epoch + 1, loss=f"{train_loss:.3f}")
        bar.close()
    model.eval()
    val_accuracy = evaluate(model, val_spec, device=dev) if val_spec is not None else None
    seconds = time.perf_counter() - start
    save_checkpoint(
        model,
        out_url,
        config={
            **config.to_dict(),
            "data": data_spec,
            "val_data": val_spec,
            "seed": seed,
            "device": str(dev),
        },
        metrics={
            "val_accuracy": val_accuracy,
            "train_loss": train_loss,
            "epochs": config.epochs,
            "seconds": seconds,
        },
    )
    return TrainResult(out_url, val_accuracy, train_loss, config.epochs, seconds)
