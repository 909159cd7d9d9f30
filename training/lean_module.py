"""A LightningModule base that keeps Lightning's own cost per training step low."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.profilers import PassThroughProfiler


class LeanModule(L.LightningModule):
    """Cuts costs Lightning adds to every training step (measured by benchmarks/train_throughput.py,
    which reports Lightning's extra time per step). A subclass defines `training_loss` and
    `configure_optimizers` (one optimizer); `training_step` is this class's.

    - Stepping. Under automatic optimization Lightning wraps each step in closures and five more
      hook calls (zero-grad, optimizer-step and gradient-clipping hooks); `training_step` steps the
      optimizer itself (manual optimization), in the order those would: the loss, zero_grad,
      backward, step. ``global_step`` still counts optimizer steps. Trainer options that need
      automatic optimization (``gradient_clip_val``, ``accumulate_grad_batches``) are refused by
      Lightning.
    - Logging the training loss. ``self.log`` costs about 0.2 ms a call on a 2-core CPU (its
      result bookkeeping runs a torchmetrics update), and once a value is logged Lightning converts
      it again for the progress bar after every later step of the epoch; on a GPU each conversion
      makes the step wait. The loss is kept on the device and, once every
      ``trainer.log_every_n_steps`` steps, the mean since the last log goes to the loggers directly
      (with the epoch, at the step ``self.log`` would give) and to ``train_loss``, which
      `TrainLossBar` shows. It is not a callback metric: checkpoints and early stopping monitor the
      validation metrics.
    - Naming the running hook. Lightning sets ``_current_fx_name`` before and after each hook call
      of a step, and ``nn.Module.__setattr__`` first searches the module's parameters, buffers and
      submodules for the name. The value is a plain string (or None), so it is stored directly.
    - Moving the batch. On the CPU the loaders' batches are already where they go; Lightning would
      still rebuild each one (every KeyedJaggedTensor) through ``Batch.to``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False  # training_step steps the optimizer
        self._losses: list[torch.Tensor] = []  # detached, on the device, since the last log
        self.train_loss: float | None = None  # the mean last logged

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def training_loss(self, step: Any) -> torch.Tensor:
        """The loss to minimize on one training batch (``step``, as the train loader yields it); it
        calls `log_train_loss` with the loss to report."""
        raise NotImplementedError(f"{type(self).__name__} defines no training_loss")

    def training_step(self, step: Any, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(step)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if device.type == "cpu":  # the loaders yield CPU tensors
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def log_train_loss(self, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())
        every, step = self.trainer.log_every_n_steps, self.global_step
        if every and (step + 1) % every == 0:  # as Lightning's own should_update_logs
            self.train_loss = torch.stack(self._losses).mean().item()
            self._losses.clear()
            for logger in self.loggers:
                logger.log_metrics({"train_loss": self.train_loss, "epoch": self.current_epoch}, step=step)


# Lightning reads training_step's signature every step (inspect.getfullargspec, to see whether it
# takes batch_idx); inspect returns a function's __signature__ instead of building it again.
LeanModule.training_step.__signature__ = inspect.signature(LeanModule.training_step)


_NOTHING = contextlib.nullcontext()


class TrainLossBar(TQDMProgressBar):
    """Lightning's progress bar, with a LeanModule's last logged ``train_loss``."""

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, module)
        if getattr(module, "train_loss", None) is not None:
            metrics["train_loss"] = module.train_loss
        return metrics


class NullProfiler(PassThroughProfiler):
    """Lightning's do-nothing profiler without its cost: the Trainer enters ``profile(name)`` around
    every hook call, about twenty a step, and PassThroughProfiler's is a generator-based context."""

    def profile(self, action_name: str) -> contextlib.nullcontext:
        return _NOTHING
