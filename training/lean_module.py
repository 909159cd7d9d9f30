"""A LightningModule base that keeps Lightning's own cost per training step low."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class LeanModule(L.LightningModule):
    """Cuts two costs Lightning adds to every training step (measured by
    benchmarks/train_throughput.py, which reports Lightning's extra time per step):

    - Logging the training loss. ``self.log`` each step runs Lightning's result bookkeeping,
      and on a GPU it makes the step wait: after each step the progress bar turns every logged
      tensor into a number. `log_train_loss` only adds the loss to a sum on the device; once
      every ``trainer.log_every_n_steps`` steps (when the loggers write) it logs the mean since
      the last log, copied to the CPU once, so what the bar converts afterwards is a CPU tensor.
    - Naming the running hook. Lightning sets ``_current_fx_name`` before and after each of the
      two dozen hook calls of a step, and ``nn.Module.__setattr__`` first searches the module's
      parameters, buffers and submodules for the name. The value is a plain string (or None),
      so it is stored directly.
    """

    def __init__(self) -> None:
        super().__init__()
        self._loss_sum: torch.Tensor | None = None  # on the device, since the last log
        self._loss_steps = 0

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def log_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        detached = loss.detach()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._loss_steps += 1
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:  # as Lightning's own should_update_logs
            mean = (self._loss_sum / self._loss_steps).cpu()
            self.log("train_loss", mean, batch_size=batch_size, prog_bar=True)
            self._loss_sum, self._loss_steps = None, 0
