"""
The training loop of [IDDPM §4]: sample timesteps (uniformly or by importance, [IDDPM §3.3]),
compute the diffusion losses, step AdamW, keep exponential moving averages of the weights and
log. Checkpoint files (names, saving, resuming) belong to :mod:`.checkpoints`; the original's
names for them (``parse_resume_step_from_filename``, ``find_resume_checkpoint``,
``find_ema_checkpoint``, ``get_blob_logdir``) stay importable from here.
"""

import contextlib
import signal
import sys
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import checkpoints, dist_util, logger
from .checkpoints import (  # noqa: F401  (the original's names, importable from here)
    AUTO_RESUME,
    TrainingState,
    find_ema_checkpoint,
    find_resume_checkpoint,
    parse_resume_step_from_filename,
)
from .errors import UserError
from .precision import MixedPrecision, ModelCall, grad_norm, make_adamw
from .resample import LossAwareSampler, UniformSampler

# Float16 halves the loss scale on every skipped step; this many skips in a row means the loss
# itself is broken (2^20 -> 2^-20), not the scale.
FP16_MAX_SKIPS_IN_A_ROW = 40


def parse_ema_rates(ema_rate: Union[str, float, Sequence[float]]) -> List[float]:
    """``"0.9999,0.999"`` (or a float, or a list) -> ``[0.9999, 0.999]``, each in [0, 1]."""
    if isinstance(ema_rate, (int, float)):
        rates = [float(ema_rate)]
    elif isinstance(ema_rate, str):
        try:
            rates = [float(x) for x in ema_rate.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--ema_rate {ema_rate!r}: expected comma-separated numbers like 0.9999,0.999") from None
    else:
        rates = [float(x) for x in ema_rate]
    if not all(0.0 <= r <= 1.0 for r in rates):
        raise UserError(f"--ema_rate {ema_rate!r}: every rate must lie in [0, 1]")
    return rates


class TrainerBase:
    """
    What every trainer of this package shares, whatever its loss: float32 weights on the device,
    AdamW with an optional linear learning-rate anneal, EMA copies of the weights (none with an
    empty ``ema_rate``), mixed precision through :class:`~.precision.MixedPrecision`, skipping
    non-finite steps, checkpoints through :mod:`.checkpoints` (exact resume), per-quartile-of-t
    logging, and the loop that stops at a step limit or a signal, saving first.

    A subclass implements :meth:`forward_backward` (accumulate the step's gradient and record its
    per-sample statistics with :meth:`_accumulate_losses`) and may add work after each step with
    :meth:`after_step`. Parameters as in :class:`TrainLoop`, plus:

    :param num_timesteps: T of the diffusion, for the quartiles of t in the log.
    :param val_data: validation batches a subclass draws from (its position is checkpointed), or None.

    A subclass names its step limits in :meth:`step_limits` (read at every step, so a caller may
    change them between runs).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        data: Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
        num_timesteps: int,
        batch_size: int,
        microbatch: int,
        lr: float,
        ema_rate: Union[str, float, Sequence[float]],
        log_interval: int,
        save_interval: int,
        resume_checkpoint: str,
        schedule_sampler: Any,
        use_fp16: bool = False,
        fp16_scale_growth: float = 1e-3,
        weight_decay: float = 0.0,
        lr_anneal_steps: int = 0,
        use_bf16: bool = False,
        log_dir: Optional[str] = None,
        max_nonfinite_steps: int = 5,
        channels_last: bool = False,
        handle_signals: bool = True,
        val_data: Optional[Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]] = None,
    ):
        check_train_settings(batch_size, microbatch, lr, log_interval, save_interval, lr_anneal_steps, 0)
        self.model, self.data, self.val_data, self.num_timesteps = model, data, val_data, num_timesteps
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr, self.weight_decay, self.lr_anneal_steps = lr, weight_decay, lr_anneal_steps
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval, self.save_interval = log_interval, save_interval
        self.resume_checkpoint = resume_checkpoint
        self.schedule_sampler = schedule_sampler
        self.max_nonfinite_steps = max_nonfinite_steps
        self.channels_last = channels_last
        self.stop = StopRequest(handle_signals)
        self.log_dir = log_dir or logger.get_dir()
        if not self.log_dir:
            raise UserError("no folder for checkpoints: pass log_dir or call logger.configure() first")
        self.device = dist_util.dev()
        self.world_size = dist_util.get_world_size()
        self.global_batch = batch_size * self.world_size
        self.step = 0  # optimizer steps done in total, including those before a resume
        self.nonfinite = NonfiniteSteps(self.device)
        self._last_saved_step: Optional[int] = None
        self.last_logged: Dict[str, Any] = {}  # what log_step wrote last

        # Weights stay float32; only the forward runs under autocast.
        self.model.to(self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.params = list(self.model.parameters())
        self.param_names = [name for name, _ in self.model.named_parameters()]
        self.precision = MixedPrecision(self.device, use_fp16, use_bf16, fp16_scale_growth, log=logger.log)
        self.opt = make_adamw(self.params, self.lr, self.weight_decay)
        self.ema_params = [[p.detach().clone().float() for p in self.params] for _ in self.ema_rate]
        self.training = TrainingState(
            self.model, self.opt, self.ema_rate, self.ema_params, self.schedule_sampler, self.data, self.val_data
        )
        self._resume()
        dist_util.sync_params(self.params)
        self.ddp_model = wrap_ddp(self.model, self.device, self.world_size)
        # The DDP-wrapped model under autocast; its output goes back to float32 for the loss.
        self._network = ModelCall(self.ddp_model, self.precision, channels_last)
        self._reset_log_accumulators()

    # -----------------------------------------------------------------------------------------
    # setup

    @property
    def nonfinite_in_a_row(self) -> int:
        """Non-finite steps in a row up to now (reading it syncs with the device)."""
        return self.nonfinite.in_a_row

    @property
    def stop_signal(self) -> Optional[int]:
        """The signal that stopped training, or None."""
        return self.stop.signum

    def _resume(self) -> None:
        step, state = checkpoints.resume(self.resume_checkpoint, self.log_dir, self.training)
        if step is not None:
            self.step = self._last_saved_step = step
        self.precision.load_state_dict(state.get("precision", {}))
        self.nonfinite.run.fill_(int(state.get("nonfinite_in_a_row", 0)))
        if hasattr(self.model, "load_speed_state"):
            self.model.load_speed_state(state.get("conv_paths", {}))

    # -----------------------------------------------------------------------------------------
    # the loop

    def run_loop(self) -> None:
        """Train until a step limit (or forever), a signal, or an error."""
        with self.stop.installed(), step_progress(self._total_steps(), self.step) as bar:
            # Training mode for dropout; the EMA copies are plain tensors and never run.
            self.model.train()
            while not self._done():
                batch, cond = next(self.data)
                self.run_step(batch, cond)
                bar.update(1)
                self.after_step()
                if self.step % self.log_interval == 0:
                    self.log_step()
                if self.save_interval > 0 and self.step % self.save_interval == 0:
                    self.save()
                if self.stop.agreed(self.device, due=self.step % self.log_interval == 0):
                    logger.log(f"stopping on signal {self.stop.signum} at step {self.step}")
                    break
            if self._last_saved_step != self.step:
                self.save()

    def step_limits(self) -> Sequence[int]:
        """Step counts at which training ends (0 entries: no limit); the smallest wins. None here."""
        return ()

    def _total_steps(self) -> int:
        """Steps the run ends at (the smallest step limit); 0 when it runs until stopped."""
        limits = [s for s in self.step_limits() if s > 0]
        return min(limits) if limits else 0

    def _done(self, step: Optional[int] = None) -> bool:
        return self._total_steps() > 0 and (self.step if step is None else step) >= self._total_steps()

    def _reads_host(self, step: int) -> bool:
        """Whether step ``step`` (1-based) waits for the device anyway: it logs, saves or is the last."""
        saves = self.save_interval > 0 and step % self.save_interval == 0
        return step % self.log_interval == 0 or saves or self._done(step)

    def run_step(self, batch: torch.Tensor, cond: Dict[str, torch.Tensor]) -> None:
        """
        One optimizer step on one batch: accumulate, step, EMA, count. No host-device sync
        (on CUDA with pinned batches), except on steps that log or save (:meth:`optimize`).
        """
        self.forward_backward(batch, cond)
        took_step = self.optimize()
        self.update_ema(took_step)
        self.step += 1

    def forward_backward(self, batch: torch.Tensor, cond: Dict[str, torch.Tensor]) -> None:
        """Accumulate the gradient of one batch (the subclass's loss)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Work after each step, before logging and saving (none here)."""

    def _microbatches(
        self, batch: torch.Tensor, cond: Dict[str, torch.Tensor]
    ) -> Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor], float, contextlib.AbstractContextManager]]:
        """
        The batch in chunks of ``microbatch`` on the device, each with its share of the batch
        (its loss weight) and the context to compute it in: DDP synchronises gradients only on
        the last chunk. Gradients are cleared first.

        :param batch: (N, C, H, W) images; ``cond``: keyword tensors with N rows.
        :return: iterator of ``(micro, micro_cond, share, sync_context)``.
        """
        self.precision.zero_grad(self.params)
        self._step_stats: Dict[str, torch.Tensor] = {}
        n = batch.shape[0]
        for i in range(0, n, self.microbatch):
            micro = batch[i : i + self.microbatch].to(self.device, non_blocking=True)
            micro_cond = {k: v[i : i + self.microbatch].to(self.device, non_blocking=True) for k, v in cond.items()}
            last = i + self.microbatch >= n
            sync = contextlib.nullcontext() if last or self.ddp_model is self.model else self.ddp_model.no_sync()
            yield micro, micro_cond, micro.shape[0] / n, sync

    def _update_sampler(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """
        Feed a loss-aware timestep sampler the per-sample losses (N,) at timesteps t (N,); call it
        after the backward, so that its gather (a host sync by design) does not stall it. The
        sampler leaves out non-finite losses itself, on the host (no boolean mask here).
        """
        if isinstance(self.schedule_sampler, LossAwareSampler):
            self.schedule_sampler.update_with_local_losses(t, losses.detach())

    def optimize(self) -> torch.Tensor:
        """
        Unscale and measure the gradient, anneal the learning rate, and step AdamW unless the
        gradient is not finite, all decided on the device. Non-finite steps are counted there
        too; on a step that logs or saves, a run of ``max_nonfinite_steps`` of them (at any step
        since the last such check) stops training with a UserError.

        :return: 0-d bool tensor, True if the weights were updated.
        """
        self.precision.unscale_(self.opt)
        norm = grad_norm(self.params)
        self._anneal_lr()
        took_step = self.precision.step(self.opt, norm).to(self.device)
        limit = self.max_nonfinite_steps if self.precision.scaler is None else FP16_MAX_SKIPS_IN_A_ROW
        self.nonfinite.record(took_step, self.step + 1, limit)
        self._merge_step_stats(norm, took_step)
        if self._reads_host(self.step + 1):
            self.nonfinite.check(limit)
        return took_step

    def _anneal_lr(self) -> None:
        if not self.lr_anneal_steps:
            return
        frac_done = self.step / self.lr_anneal_steps
        for group in self.opt.param_groups:
            group["lr"] = self.lr * (1 - frac_done)

    @torch.no_grad()
    def update_ema(self, took_step: torch.Tensor) -> None:
        """``ema = rate * ema + (1 - rate) * param`` for every rate, unless the 0-d bool ``took_step`` is False."""
        params = [p.detach().float() for p in self.params]
        for rate, ema in zip(self.ema_rate, self.ema_params):
            torch._foreach_mul_(ema, torch.where(took_step, rate, 1.0))
            torch._foreach_add_(ema, torch._foreach_mul(params, torch.where(took_step, 1 - rate, 0.0)))

    # -----------------------------------------------------------------------------------------
    # logging: statistics stay on the device until log_step reads them in one transfer

    def _reset_log_accumulators(self) -> None:
        self._loss_sums: Dict[str, torch.Tensor] = {}
        self._loss_counts = torch.zeros(4, device=self.device)
        self._grad_norm_sum = torch.zeros((), device=self.device)
        self._steps_taken = torch.zeros((), device=self.device)
        self._step_stats = {}

    def _accumulate_losses(self, t: torch.Tensor, weights: torch.Tensor, losses: Dict[str, torch.Tensor]) -> None:
        """Add per-sample values (N,) at timesteps t (N,), weighted by ``weights`` (N,), to the step's sums."""
        self._step_stats = add_quartile_sums(self._step_stats, t, self.num_timesteps, losses, weights)

    def _merge_step_stats(self, norm: torch.Tensor, took: torch.Tensor) -> None:
        """Add the step's statistics to the interval's, unless the 0-d bool ``took`` is False."""
        for key, sums in self._step_stats.items():
            kept = torch.where(took, sums, 0.0)
            if key == "_count":
                self._loss_counts += kept
            else:
                self._loss_sums[key] = self._loss_sums.get(key, 0) + kept
        self._grad_norm_sum += torch.where(took, norm.to(self.device), 0.0)
        self._steps_taken += took

    def log_step(self) -> None:
        """Log the interval's means (each loss and its t-quartiles, grad_norm) and counters."""
        log_quartile_sums({"_count": self._loss_counts, **self._loss_sums})
        taken = int(self._steps_taken.item())
        if taken:
            logger.logkv_mean("grad_norm", self._grad_norm_sum.item() / taken)
        skipped = self.nonfinite.pop_skipped()
        if skipped:
            logger.log(f"{skipped} step(s) skipped since the last log row: NaN/Inf loss or gradient")
        with torch.no_grad():
            logger.logkv("param_norm", torch.nn.utils.get_total_norm([p.detach() for p in self.params]).item())
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.global_batch)
        logger.logkv("lr", self.opt.param_groups[0]["lr"])
        if self.precision.lg_loss_scale is not None:
            logger.logkv("lg_loss_scale", self.precision.lg_loss_scale)
        self.last_logged = logger.dumpkvs()
        self._reset_log_accumulators()
        for line in getattr(self.model, "speed_report", list)():  # convolution paths chosen since the last log
            logger.log(line)

    # -----------------------------------------------------------------------------------------
    # checkpoints

    def save(self) -> None:
        """Save a checkpoint of the current step (:func:`.checkpoints.save`; every rank calls)."""
        extra = {"nonfinite_in_a_row": self.nonfinite_in_a_row, "precision": self.precision.state_dict()}
        # Convolution paths chosen by timing (--winograd auto): a resumed run must compute alike.
        extra["conv_paths"] = getattr(self.model, "speed_state", dict)()
        checkpoints.save(self.log_dir, self.step, self.training, extra)
        self._last_saved_step = self.step


def add_quartile_sums(
    sums: Dict[str, torch.Tensor],
    t: torch.Tensor,
    num_timesteps: int,
    values: Dict[str, torch.Tensor],
    weights: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """
    Per-quartile-of-t sums of per-sample values, kept on the device: ``sums["_count"]`` (4,)
    counts the samples per quartile, ``sums[key]`` (4,) sums ``values[key] * weights``.

    :param t: (N,) timestep indices in [0, num_timesteps).
    :param values: per-sample values, each (N,).
    :param weights: (N,) importance weights (None: 1).
    :return: ``sums`` updated in place (and returned).
    """
    quartile = torch.div(4 * t, num_timesteps, rounding_mode="floor").clamp(0, 3)
    ones = torch.ones(t.shape, device=t.device)  # a per-quartile count without bincount's host sync
    sums["_count"] = sums.get("_count", 0) + torch.zeros(4, device=t.device).index_add_(0, quartile, ones)
    for key, value in values.items():
        weighted = value.detach().float() if weights is None else (value.detach() * weights).float()
        sums[key] = sums.get(key, 0) + torch.zeros(4, device=weighted.device).index_add_(0, quartile, weighted)
    return sums


def log_quartile_sums(sums: Dict[str, torch.Tensor]) -> None:
    """
    ``logger.logkv_mean`` of each key's mean and its means per quartile (``{key}_q{q}``) from
    :func:`add_quartile_sums`' sums, read from the device in one transfer.
    """
    if "_count" not in sums:
        return
    keys = [k for k in sums if k != "_count"]
    packed = torch.stack([sums["_count"], *(sums[k] for k in keys)]).cpu().tolist()
    counts = packed[0]
    for key, key_sums in zip(keys, packed[1:]):
        if sum(counts) > 0:
            logger.logkv_mean(key, sum(key_sums) / sum(counts))
        for q in range(4):
            if counts[q] > 0:
                logger.logkv_mean(f"{key}_q{q}", key_sums[q] / counts[q])


class TrainLoop(TrainerBase):
    """
    Train ``model`` on batches from ``data`` with the losses of ``diffusion``.

    :param model: the network; its weights stay float32 (checkpoints load into the original).
    :param diffusion: provides ``training_losses`` and ``num_timesteps``.
    :param data: endless iterator of ``(images (N, C, H, W), model_kwargs)``; if it has
        ``state_dict``/``load_state_dict`` (as :func:`image_datasets.load_data`'s loader does),
        its position is saved and restored.
    :param batch_size: images per step and process; ``microbatch`` (-1 = whole batch) splits it
        into chunks whose gradients accumulate into one step.
    :param lr: AdamW learning rate, annealed linearly to 0 over ``lr_anneal_steps`` (0 = constant,
        and no end); ``weight_decay`` is AdamW's.
    :param ema_rate: one rate or a comma-separated list (``"0.9999,0.999"``).
    :param log_interval: steps between log rows; ``save_interval``: steps between checkpoints
        (0 = only at the end).
    :param resume_checkpoint: ``""``, a ``modelNNNNNN.pt`` path, or ``"auto"``.
    :param use_fp16: float16 autocast with loss scaling (bfloat16 on a CPU); the scale's log2
        grows by ``fp16_scale_growth`` per good step.
    :param schedule_sampler: timestep sampler (default uniform).
    :param use_bf16: bfloat16 autocast for the network's forward (no loss scaling).
    :param max_steps: stop after this many steps in total (0 = no limit).
    :param log_dir: checkpoint folder (default ``logger.get_dir()``).
    :param max_nonfinite_steps: stop with an error after this many non-finite losses in a row (seen when logging).
    :param channels_last: feed the network channels-last tensors (faster convolutions on GPUs).
    :param handle_signals: save a checkpoint on SIGTERM / SIGINT, then return from run_loop.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        diffusion: Any,
        data: Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
        batch_size: int,
        microbatch: int,
        lr: float,
        ema_rate: Union[str, float, Sequence[float]],
        log_interval: int,
        save_interval: int,
        resume_checkpoint: str,
        use_fp16: bool = False,
        fp16_scale_growth: float = 1e-3,
        schedule_sampler: Optional[Any] = None,
        weight_decay: float = 0.0,
        lr_anneal_steps: int = 0,
        use_bf16: bool = False,
        max_steps: int = 0,
        log_dir: Optional[str] = None,
        max_nonfinite_steps: int = 5,
        channels_last: bool = False,
        handle_signals: bool = True,
    ):
        check_train_settings(batch_size, microbatch, lr, log_interval, save_interval, lr_anneal_steps, max_steps)
        self.diffusion = diffusion
        self.max_steps = max_steps
        super().__init__(
            model=model,
            data=data,
            num_timesteps=diffusion.num_timesteps,
            batch_size=batch_size,
            microbatch=microbatch,
            lr=lr,
            ema_rate=ema_rate,
            log_interval=log_interval,
            save_interval=save_interval,
            resume_checkpoint=resume_checkpoint,
            schedule_sampler=schedule_sampler or UniformSampler(diffusion),
            use_fp16=use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            weight_decay=weight_decay,
            lr_anneal_steps=lr_anneal_steps,
            use_bf16=use_bf16,
            log_dir=log_dir,
            max_nonfinite_steps=max_nonfinite_steps,
            channels_last=channels_last,
            handle_signals=handle_signals,
        )

    def step_limits(self) -> Sequence[int]:
        """``lr_anneal_steps`` and ``max_steps``."""
        return (self.lr_anneal_steps, self.max_steps)

    def forward_backward(self, batch: torch.Tensor, cond: Dict[str, torch.Tensor]) -> None:
        """
        Accumulate the gradient of the batch's importance-weighted mean loss over microbatches.

        Each microbatch's loss is weighted by its share of the batch, so the gradient equals the
        full batch's whatever the microbatch (the original summed microbatch means instead).
        DDP synchronises gradients only on the last microbatch.

        :param batch: (N, C, H, W) images in [-1, 1].
        :param cond: model keyword arguments, each with N rows (e.g. ``"y"``: (N,) labels).
        """
        for micro, micro_cond, share, sync in self._microbatches(batch, cond):
            t, weights = self.schedule_sampler.sample(micro.shape[0], self.device)
            with sync:
                losses = self.diffusion.training_losses(self._network, micro, t, model_kwargs=micro_cond)
                loss = (losses["loss"] * weights).mean() * share
                self._accumulate_losses(t, weights, losses)
                self.precision.backward(loss)
            self._update_sampler(t, losses["loss"])


def wrap_ddp(model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when several processes train (else ``model`` itself)."""
    if not (dist.is_available() and dist.is_initialized() and world_size > 1):
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        bucket_cap_mb=128,
        find_unused_parameters=False,
    )


class NonfiniteSteps:
    """
    Non-finite (skipped) steps, counted on the device so that a step needs no host sync: the
    current run of them, and the step at which a run first reached the limit; :meth:`check`
    (a host sync, made where the trainer syncs anyway) turns the latter into the UserError.
    """

    def __init__(self, device: torch.device):
        self.run = torch.zeros((), device=device)  # 0-d float32: non-finite steps in a row
        self.reached_at = torch.zeros((), dtype=torch.int64, device=device)  # 0 = never
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # since the last pop_skipped

    @property
    def in_a_row(self) -> int:
        """The current run (reading it syncs with the device)."""
        return int(self.run.item())

    def record(self, took_step: torch.Tensor, step: int, limit: int) -> None:
        """Count step ``step`` (1-based), skipped where the 0-d bool ``took_step`` is False."""
        self.run.add_(1).mul_(~took_step)
        self.skipped.add_(~took_step)
        first_time = (self.reached_at == 0) & (self.run >= limit)
        self.reached_at = torch.where(first_time, step, self.reached_at)

    def pop_skipped(self) -> int:
        """Skipped steps since the last call (a host sync)."""
        skipped = int(self.skipped.item())
        self.skipped.zero_()
        return skipped

    def check(self, limit: int) -> None:
        """Raise the UserError if a run reached ``limit`` at any step recorded so far."""
        step = int(self.reached_at.item())
        if step:
            raise UserError(
                f"training stopped: loss was NaN/Inf for {limit} steps in a row at step {step}; "
                "lower --lr or check the data (weights and checkpoints hold no NaN)"
            )


def step_progress(total: int, done: int) -> Any:
    """
    A progress bar over training steps with the time left (tqdm, on stderr, rank 0 only), shown
    when the number of steps is known (``total`` > 0) and stderr is a terminal (a log file or a
    pipe keeps only the log's rows); otherwise a bar that shows nothing.
    """
    shown = total > 0 and dist_util.is_main_process() and sys.stderr.isatty()
    return tqdm(total=total, initial=done, unit="step", disable=not shown)


class StopRequest:
    """
    SIGTERM / SIGINT ask a trainer to save and stop at the next step boundary: while
    :meth:`installed` is active they only record the signal; :meth:`agreed` tells every rank
    the same answer, so all stop at the same step even if only some received the signal.

    :param enabled: install the handlers at all (only possible in the main thread).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.signum: Optional[int] = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handlers for SIGTERM and SIGINT that record the signal; the previous ones come back on exit."""
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            self.signum = signum

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self, device: torch.device, due: bool = True) -> bool:
        """
        Whether any rank received a signal. Alone, a look at a variable; with several ranks a
        collective (and a host sync), so asked only where ``due`` (the trainer: at log steps,
        which every rank reaches together); elsewhere the answer is False.
        """
        if dist_util.get_world_size() == 1 or not dist.is_initialized():
            return self.signum is not None
        if not due:
            return False
        flag = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item()) or None
        return self.signum is not None


def check_train_settings(
    batch_size: int,
    microbatch: int,
    lr: float,
    log_interval: int,
    save_interval: int,
    lr_anneal_steps: int,
    max_steps: int,
) -> None:
    """Raise a UserError naming the flag for a batch, interval, step or rate setting out of range."""
    for name, value in (("batch_size", batch_size), ("log_interval", log_interval)):
        if value <= 0:
            raise UserError(f"--{name} {value}: must be a positive integer")
    for name, value in (
        ("save_interval", save_interval),
        ("lr_anneal_steps", lr_anneal_steps),
        ("max_steps", max_steps),
    ):
        if value < 0:
            raise UserError(f"--{name} {value}: must be 0 or more")
    if microbatch == 0 or microbatch < -1:
        raise UserError(f"--microbatch {microbatch}: must be positive, or -1 for no microbatching")
    if not lr > 0:
        raise UserError(f"--lr {lr}: must be positive")


def get_blob_logdir() -> str:
    """The folder checkpoints go to (the logger's folder; kept for the original's callers)."""
    return logger.get_dir()


def log_loss_dict(diffusion: Any, ts: torch.Tensor, losses: Dict[str, torch.Tensor]) -> None:
    """The original's per-call loss logging (mean and per-quartile of t); syncs with the device."""
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        for sub_t, sub_loss in zip(ts.cpu().numpy(), values.detach().cpu().numpy()):
            quartile = int(4 * sub_t / diffusion.num_timesteps)
            logger.logkv_mean(f"{key}_q{quartile}", sub_loss)
