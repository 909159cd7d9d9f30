"""The training loss as the LightningModules log it, at little cost per step."""

from __future__ import annotations

import lightning as L
import torch


class TrainLossLogging(L.LightningModule):
    """Logs ``train_loss``, the mean loss of the steps since the last log, once every
    ``trainer.log_every_n_steps`` steps: the steps at which the loggers write.

    Calling ``self.log`` each step costs Lightning's result bookkeeping every step (about half a
    millisecond of CPU), and on a GPU a wait for the step to finish: the progress bar turns every
    logged tensor into a number after each step. Here a step only adds its loss to a sum on the
    device; every N steps the mean is copied to the CPU once and logged, so what the bar converts
    afterwards is a CPU tensor.
    """

    def __init__(self) -> None:
        super().__init__()
        self._loss_sum: torch.Tensor | None = None  # on the device, since the last log
        self._loss_steps = 0

    def log_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        detached = loss.detach()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._loss_steps += 1
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:  # as Lightning's own should_update_logs
            mean = (self._loss_sum / self._loss_steps).cpu()
            self.log("train_loss", mean, batch_size=batch_size, prog_bar=True)
            self._loss_sum, self._loss_steps = None, 0
