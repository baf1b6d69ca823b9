"""
Strided sampling [IDDPM §4]: keep a subsequence S of the original T steps and build the
diffusion whose abar at step j is abar_{S_j}, i.e. ``beta_j = 1 - abar_{S_j} / abar_{S_{j-1}}``
(and hence posterior variances and means for the subsequence). The model was trained on the
original steps, so it is wrapped to receive the original index ``S_j`` (rescaled to 0..1000
when ``rescale_timesteps``); so is a classifier-guidance ``cond_fn`` [ADM §4].
"""

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Union

import numpy as np
import torch

from .errors import UserError
from .gaussian_diffusion import GaussianDiffusion, Model

_FORMS = "an integer count like '250', comma-separated counts like '10,15,20', or 'ddimN' like 'ddim50'"


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> Set[int]:
    """
    The original steps to keep when respacing ``num_timesteps`` steps ([IDDPM §4]).

    ``section_counts`` splits the steps into ``len(section_counts)`` consecutive sections of
    (nearly) equal size, the first ``T % len`` sections one step longer, and keeps
    ``section_counts[i]`` evenly strided steps of section i: offsets ``0, s, 2s, ...``
    accumulated as floats with stride ``s = (size - 1) / (count - 1)``, each rounded half to
    even, so the first and last steps of a section are kept. For example ``[10, 15, 20]`` with
    300 steps keeps 10 of steps 0-99, 15 of 100-199 and 20 of 200-299.

    ``"ddimN"`` instead keeps ``range(0, T, i)`` for the smallest stride i giving exactly N
    steps, as in [DDIM]'s uniform stride.

    :param section_counts: an int, a sequence of ints, or a string ``"250"``, ``"10,15,20"``
        or ``"ddim50"``.
    :return: the set of kept step indices.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            return _ddim_steps(num_timesteps, spec)
        try:
            counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise UserError(f"--timestep_respacing {section_counts!r}: expected {_FORMS}") from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise UserError(f"--timestep_respacing {section_counts!r}: counts must be positive integers ({_FORMS})")
    if num_timesteps < 1:
        raise UserError(f"--diffusion_steps {num_timesteps}: must be a positive integer")

    size_per, extra = divmod(num_timesteps, len(counts))
    start_idx = 0
    kept: List[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise UserError(
                f"--timestep_respacing {section_counts!r}: section {i} has {size} of the {num_timesteps} "
                f"steps but asks for {count}; each count must be at most its section's size"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        offset = 0.0
        for _ in range(count):
            kept.append(start_idx + round(offset))
            offset += stride  # accumulated, not j * stride: the original's sets depend on it
        start_idx += size
    return set(kept)


def _ddim_steps(num_timesteps: int, spec: str) -> Set[int]:
    """``range(0, T, i)`` for the smallest stride i >= 1 giving exactly N steps (``"ddimN"``)."""
    try:
        desired = int(spec[len("ddim") :])
    except ValueError:
        raise UserError(f"--timestep_respacing {spec!r}: expected {_FORMS}") from None
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == desired:
            return set(range(0, num_timesteps, stride))
    raise UserError(
        f"--timestep_respacing {spec!r}: no integer stride gives exactly {desired} of {num_timesteps} steps; "
        "pick another N or use a plain count like '" + str(desired) + "'"
    )


class SpacedDiffusion(GaussianDiffusion):
    """
    A diffusion that keeps only some steps of a base diffusion ([IDDPM §4]).

    :param use_timesteps: the original step indices to keep (any iterable of ints).
    :param kwargs: the base diffusion's constructor arguments (``betas`` over all T steps).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any) -> None:
        base_betas = np.asarray(kwargs["betas"], dtype=np.float64)
        self.use_timesteps = set(int(t) for t in use_timesteps)
        self.original_num_steps = len(base_betas)
        if not self.use_timesteps or not all(0 <= t < self.original_num_steps for t in self.use_timesteps):
            raise UserError(
                f"use_timesteps must be a non-empty set of steps in [0, {self.original_num_steps}), "
                f"got {sorted(self.use_timesteps)[:10]}"
            )
        self.timestep_map: List[int] = []
        alphas_cumprod = np.cumprod(1.0 - base_betas, axis=0)
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._timestep_map_tables: Dict[torch.device, torch.Tensor] = {}

    def _call_model(
        self, fn: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, model_kwargs: Optional[Dict[str, Any]]
    ) -> torch.Tensor:
        # The model and a guidance cond_fn [ADM §4] both get the original step indices.
        return super()._call_model(self._wrap_model(fn, t.device), x, t, model_kwargs)

    def _wrap_model(self, model: Model, device: torch.device) -> "_WrappedModel":
        if isinstance(model, _WrappedModel):
            return model
        table = self._timestep_map_tables.get(device)
        if table is None:
            table = self._timestep_map_tables[device] = torch.tensor(self.timestep_map, device=device)
        return _WrappedModel(model, table, self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        # The wrapper maps and rescales with the original step count.
        return t


class _WrappedModel:
    """Calls ``model`` with the original timestep ``timestep_map[t]`` (float32 ``* 1000/T`` if rescaled)."""

    def __init__(self, model: Model, timestep_map: torch.Tensor, rescale_timesteps: bool, original_num_steps: int):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        new_ts = self.timestep_map[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
