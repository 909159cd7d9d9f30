"""LeanModule: the logged training loss is the mean of the steps since the last log, and its own
optimizer step is a plain loop's."""

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from training.lean_module import LeanModule, NullProfiler, TrainLossBar


class Regression(LeanModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.losses: list[float] = []

    def training_loss(self, batch: tuple) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.linear(x).squeeze(1), y)
        self.losses.append(loss.item())
        self.log_train_loss(loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_train_loss_is_the_mean_since_the_last_log(tmp_path):
    torch.manual_seed(0)
    batches = [(torch.randn(8, 2), torch.randn(8)) for _ in range(6)]
    module = Regression()
    trainer = Trainer(max_steps=6, log_every_n_steps=3, logger=CSVLogger(tmp_path, name="logs"),
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    logged = pd.read_csv(tmp_path / "logs" / "version_0" / "metrics.csv").dropna(subset=["train_loss"])
    assert logged["step"].tolist() == [2, 5] and logged["epoch"].tolist() == [0, 0]
    expected = [sum(module.losses[:3]) / 3, sum(module.losses[3:]) / 3]
    assert logged["train_loss"].tolist() == pytest.approx(expected, rel=1e-6)
    assert module.train_loss == pytest.approx(expected[1], rel=1e-6)
    assert module.losses[0] != pytest.approx(expected[0])  # a mean, not one step's loss
    assert "_current_fx_name" not in module._modules and module._current_fx_name is None


def test_training_step_steps_as_a_plain_loop_does():
    torch.manual_seed(0)
    batches = [(torch.randn(8, 2), torch.randn(8)) for _ in range(5)]
    module = Regression()
    plain = nn.Linear(2, 1)
    plain.load_state_dict(module.linear.state_dict())
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    for x, y in batches:
        loss = F.mse_loss(plain(x).squeeze(1), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trainer = Trainer(max_steps=5, logger=False, profiler=NullProfiler(), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 5  # one per optimizer step
    assert torch.equal(module.linear.weight, plain.weight) and torch.equal(module.linear.bias, plain.bias)


def test_the_progress_bar_shows_the_last_logged_loss(tmp_path):
    torch.manual_seed(0)
    batches = [(torch.randn(8, 2), torch.randn(8)) for _ in range(4)]
    module, bar = Regression(), TrainLossBar()
    trainer = Trainer(max_steps=4, log_every_n_steps=2, logger=False, callbacks=[bar], enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    assert "train_loss" not in bar.get_metrics(trainer, module)  # nothing logged yet
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert bar.get_metrics(trainer, module)["train_loss"] == pytest.approx(sum(module.losses[2:]) / 2, rel=1e-6)
