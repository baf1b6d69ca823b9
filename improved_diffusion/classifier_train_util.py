"""
Training the noised classifier of [ADM §4]: each step draws timesteps from the schedule
sampler, noises the labelled batch to x_t with ``q_sample`` (t = 0 and no noise when
``noised`` is False), and minimises the cross-entropy of the classifier's logits at x_t. The
logs hold loss, acc@1 and acc@5 by quartile of t, for the training batches and, every
``eval_interval`` steps, for a batch of a validation set (guided-diffusion's
``classifier_train.py``).

Everything else (AdamW with an optional linear anneal over ``iterations``, optional EMA, mixed
precision, checkpoints ``model{step:06d}.pt`` / ``opt`` / ``state`` with an exact resume,
signals) is the shared trainer, :class:`~.train_util.TrainerBase`.
"""

from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .errors import UserError
from .precision import ModelCall
from .resample import UniformSampler
from .train_util import TrainerBase, add_quartile_sums, log_quartile_sums

TOP_K = (1, 5)


def classification_stats(logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> Dict[str, torch.Tensor]:
    """
    Per-sample cross-entropy and top-k hits, named as guided-diffusion logs them.

    :param logits: (N, classes) float32.
    :param labels: (N,) int64 class indices.
    :param prefix: ``"train"`` or ``"val"``.
    :return: ``{f"{prefix}_loss", f"{prefix}_acc@1", f"{prefix}_acc@5"}``, each (N,) float32
        (acc@k is 1 where the label is among the k largest logits; k is capped at the classes).
    """
    stats = {f"{prefix}_loss": F.cross_entropy(logits, labels, reduction="none")}
    for k in TOP_K:
        top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # (N, k)
        stats[f"{prefix}_acc@{k}"] = (top == labels[:, None]).any(dim=-1).float()
    return stats


def check_classifier_train_settings(iterations: int, eval_interval: int, max_steps: int = 0) -> None:
    """A UserError naming the flag for a step count or evaluation interval out of range."""
    if max_steps < 0:
        raise UserError(f"--max_steps {max_steps}: must be 0 or more")
    if iterations <= 0:
        raise UserError(f"--iterations {iterations}: must be a positive integer")
    if eval_interval <= 0:
        raise UserError(f"--eval_interval {eval_interval}: must be a positive integer")


class ClassifierTrainLoop(TrainerBase):
    """
    Train a noised classifier (``model(x_t, t) -> logits``) on labelled batches.

    :param model: e.g. :func:`.script_util.create_classifier`'s :class:`~.unet.EncoderUNetModel`.
    :param diffusion: provides ``q_sample``, ``num_timesteps`` and the timesteps the network
        sees (scaled like the diffusion model's, so guidance gives the classifier the same t).
    :param data: endless iterator of ``(images (N, C, H, W), {"y": (N,) int64})``.
    :param val_data: the same for validation, or None.
    :param noised: classify x_t at sampled timesteps; False: the clean images at t = 0.
    :param iterations: steps in total; with ``anneal_lr`` the learning rate falls linearly to 0 over them.
    :param eval_interval: steps between validation batches.
    :param max_steps: stop earlier, after this many steps in total (0 = no limit).

    Other keyword arguments as in :class:`~.train_util.TrainLoop` (``batch_size``, ``microbatch``,
    ``lr``, ``log_interval``, ``save_interval``, ``resume_checkpoint``, precision, ``log_dir``...;
    ``ema_rate=""``: no EMA).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        diffusion: Any,
        data: Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
        val_data: Optional[Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]] = None,
        noised: bool = True,
        iterations: int = 150000,
        anneal_lr: bool = False,
        eval_interval: int = 5,
        ema_rate: Union[str, float, Sequence[float]] = "",
        schedule_sampler: Optional[Any] = None,
        max_steps: int = 0,
        **kwargs: Any,
    ):
        check_classifier_train_settings(iterations, eval_interval, max_steps)
        self.diffusion = diffusion
        self.noised, self.iterations, self.eval_interval = noised, iterations, eval_interval
        self.max_steps = max_steps
        super().__init__(
            model=model,
            data=data,
            num_timesteps=diffusion.num_timesteps,
            ema_rate=ema_rate,
            schedule_sampler=schedule_sampler or UniformSampler(diffusion),
            lr_anneal_steps=iterations if anneal_lr else 0,
            val_data=val_data,
            **kwargs,
        )
        # Validation runs the plain model (no DDP: nothing to synchronise without gradients).
        self._eval_network = ModelCall(self.model, self.precision, self.channels_last)
        self._val_sums: Dict[str, torch.Tensor] = {}

    def step_limits(self) -> Sequence[int]:
        """``iterations`` and ``max_steps``."""
        return (self.iterations, self.max_steps)

    def _noised_batch(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        ``(x_t, t, weights)`` for (N, C, H, W) images: t (N,) from the schedule sampler and
        x_t = q_sample(x_0, t) [DDPM Eq. 4]; without ``noised``, the images at t = 0 with weights 1.
        """
        if not self.noised:
            n = images.shape[0]
            return images, torch.zeros(n, dtype=torch.long, device=self.device), torch.ones(n, device=self.device)
        t, weights = self.schedule_sampler.sample(images.shape[0], self.device)
        return self.diffusion.q_sample(images, t), t, weights

    def _logits(self, network: ModelCall, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """
        (N, classes) float32 logits, the classifier given t as the diffusion gives it to its model
        (original indices, rescaled with ``rescale_timesteps``): guidance calls it the same way.
        """
        return self.diffusion._call_model(network, x_t, t, None)

    def forward_backward(self, batch: torch.Tensor, cond: Dict[str, torch.Tensor]) -> None:
        """
        Accumulate the gradient of the batch's importance-weighted mean cross-entropy over
        microbatches (each weighted by its share of the batch).

        :param batch: (N, C, H, W) images in [-1, 1].
        :param cond: ``{"y": (N,) int64}`` class labels.
        """
        for micro, micro_cond, share, sync in self._microbatches(batch, cond):
            x_t, t, weights = self._noised_batch(micro)
            with sync:
                stats = classification_stats(self._logits(self._network, x_t, t), _labels(micro_cond), "train")
                self._accumulate_losses(t, torch.ones_like(weights), stats)
                self.precision.backward((stats["train_loss"] * weights).mean() * share)
            self._update_sampler(t, stats["train_loss"])

    def after_step(self) -> None:
        """Every ``eval_interval`` steps, the statistics of one validation batch (no gradients)."""
        if self.val_data is None or self.step % self.eval_interval != 0:
            return
        batch, cond = next(self.val_data)
        batch, labels = batch.to(self.device), _labels(cond).to(self.device)
        # eval() for dropout while validating, train() again after it.
        self.model.eval()
        with torch.no_grad():
            x_t, t, _ = self._noised_batch(batch)
            stats = classification_stats(self._logits(self._eval_network, x_t, t), labels, "val")
        self.model.train()
        add_quartile_sums(self._val_sums, t, self.num_timesteps, stats)

    def log_step(self) -> None:
        """The shared log row, with the interval's validation means (``val_loss``, ``val_acc@1``...)."""
        log_quartile_sums(self._val_sums)
        self._val_sums = {}
        super().log_step()


def _labels(cond: Dict[str, torch.Tensor]) -> torch.Tensor:
    if "y" not in cond:
        raise UserError("the classifier trains on labelled images: load the data with class_cond=True")
    return cond["y"]
