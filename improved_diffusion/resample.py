"""
Timestep samplers for training: which t each example gets, and the importance weight that
keeps the loss an unbiased estimate of the uniform-t objective. Uniform sampling is the
default; :class:`LossSecondMomentResampler` draws t with probability proportional to the
root mean square of recent losses at t ([IDDPM Eq. 18], §3.3), which lowers the variance
of the L_vlb gradient.
"""

import math
from abc import ABC, abstractmethod
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from . import dist_util
from .errors import UserError

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name: str, diffusion) -> "ScheduleSampler":
    """
    The sampler called ``name`` (the ``--schedule_sampler`` flag) for ``diffusion``.

    :param name: ``"uniform"`` or ``"loss-second-moment"``.
    :param diffusion: the diffusion whose ``num_timesteps`` steps are sampled.
    """
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    allowed = ", ".join(repr(n) for n in SCHEDULE_SAMPLERS)
    raise UserError(f"--schedule_sampler {name!r}: unknown schedule sampler, expected one of {allowed}")


class ScheduleSampler(ABC):
    """
    A distribution over timesteps, used to pick t for each training example.

    Subclasses give (unnormalised) :meth:`weights`; :meth:`sample` draws from them with
    NumPy's global RNG and returns importance weights ``1 / (T p_t)``, which make the
    weighted loss an unbiased estimate of the loss under uniform t.

    The draw happens on the host; the device gets the timesteps by a copy that does not block
    (:func:`.dist_util.to_device`) and the importance weights by indexing a device copy of the
    (T,) table, made again only when the distribution changes.
    """

    _weight_table: Optional[Tuple[np.ndarray, torch.Tensor]] = None  # (p, 1 / (T p) on a device)

    @abstractmethod
    def weights(self) -> np.ndarray:
        """(T,) float64 non-negative weights, one per timestep (need not sum to 1)."""

    def sample(self, batch_size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Draw timesteps for a batch with ``np.random.choice``.

        :return: ``(timesteps, weights)``: (batch_size,) int64 timesteps and (batch_size,)
            float32 importance weights, both on ``device``.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = dist_util.to_device(torch.from_numpy(indices_np).long(), device)
        return indices, self._importance_weights(p, device)[indices]

    def _importance_weights(self, p: np.ndarray, device: torch.device) -> torch.Tensor:
        """(T,) float32 ``1 / (T p_t)`` on ``device``, kept until ``p`` or the device changes."""
        cached = self._weight_table
        if cached is None or cached[1].device != torch.device(device) or not np.array_equal(cached[0], p):
            table = torch.from_numpy(1 / (len(p) * p)).float()
            self._weight_table = cached = (p.copy(), dist_util.to_device(table, device))
        return cached[1]


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely; all importance weights are 1."""

    def __init__(self, diffusion) -> None:
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps], dtype=np.float64)

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the training losses it is told about."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """
        Gather this rank's (timestep, loss) pairs from every rank and update the weights, so
        that all ranks keep identical state. Ranks may have different batch sizes; with one
        process (or no process group) this is just :meth:`update_with_all_losses`. Pairs whose
        loss is not finite (those of a step that will be skipped) are left out, on the host.

        :param local_ts: (n,) int64 timesteps of this rank's batch.
        :param local_losses: (n,) the per-example losses at those timesteps.
        """
        all_ts = dist_util.all_gather_tensors(local_ts.detach())
        all_losses = dist_util.all_gather_tensors(local_losses.detach())
        timesteps = [int(t) for part in all_ts for t in part.cpu().tolist()]
        losses = [float(loss) for part in all_losses for loss in part.cpu().tolist()]
        finite = [(t, loss) for t, loss in zip(timesteps, losses) if math.isfinite(loss)]
        self.update_with_all_losses([t for t, _ in finite], [loss for _, loss in finite])

    @abstractmethod
    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """
        Update the weights with the losses of every rank, in rank order; must be
        deterministic so that ranks stay in sync.

        :param ts: timesteps as Python ints.
        :param losses: the losses at those timesteps, as Python floats.
        """


class LossSecondMomentResampler(LossAwareSampler):
    """
    Importance sampling of t ([IDDPM Eq. 18]): p_t proportional to sqrt(E[L_t^2]) estimated
    from the last ``history_per_term`` losses at each t, mixed with a uniform distribution of
    mass ``uniform_prob``. Uniform until every timestep has a full history.

    :param diffusion: the diffusion whose ``num_timesteps`` steps are sampled.
    :param history_per_term: losses remembered per timestep.
    :param uniform_prob: the share of the uniform distribution in the mixture.
    """

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        if int(history_per_term) != history_per_term or history_per_term < 1:
            raise UserError(f"history_per_term {history_per_term!r}: expected a positive integer")
        if not 0.0 <= uniform_prob <= 1.0:
            raise UserError(f"uniform_prob {uniform_prob!r}: expected a probability in [0, 1]")
        self.diffusion = diffusion
        self.history_per_term = int(history_per_term)
        self.uniform_prob = uniform_prob
        num_timesteps = diffusion.num_timesteps
        self._loss_history = np.zeros([num_timesteps, self.history_per_term], dtype=np.float64)
        # The original built this count array with dtype ``np.int``, an alias of the builtin
        # int that NumPy 1.24 removed, so its constructor raises AttributeError on modern NumPy
        # (golden resample.npz: ``npint_bug``). The intended integer count array is int64 here;
        # behaviour is otherwise unchanged.
        self._loss_counts = np.zeros([num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Full: drop the oldest loss, append the new one.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())
