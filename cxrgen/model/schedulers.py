"""Schedulers with one interface: `.timesteps` and `.step(model_output, t, sample) -> (prev, x0)`."""
from __future__ import annotations

import torch

from cxrgen.errors import InputError


def make_scheduler(name: str, scheduler_args: dict, num_inference_steps: int):
    """The bundle's DDIM (MONAI's own class) or DPM-Solver++(2M) on the same noise schedule."""
    from monai.networks.schedulers import DDIMScheduler

    ddim = DDIMScheduler(**scheduler_args)
    ddim.set_timesteps(num_inference_steps=num_inference_steps)
    if name == "ddim":
        return ddim
    if name == "dpmpp2m":
        prediction_type = scheduler_args.get("prediction_type", "epsilon")
        return DPMSolverPP2M(ddim.alphas_cumprod, ddim.timesteps, prediction_type)
    raise InputError(f"--scheduler {name!r}: use ddim or dpmpp2m")


class DPMSolverPP2M:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2) in data-prediction form.

    Uses the same timesteps as the DDIM schedule and ends at alpha_cumprod = 1 (sigma = 0),
    taking a first-order step there, as the paper recommends for few steps.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str):
        if prediction_type not in ("v_prediction", "epsilon", "sample"):
            raise InputError(f"dpmpp2m: unsupported prediction_type {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.double()
        self.timesteps = timesteps
        self.prediction_type = prediction_type
        self._prev_x0: torch.Tensor | None = None
        self._prev_lambda: float | None = None

    def _coeffs(self, t: int | None) -> tuple[float, float, float]:
        """(alpha, sigma, lambda) at timestep t; None is the clean end point (sigma = 0)."""
        if t is None:
            return 1.0, 0.0, float("inf")
        abar = float(self.alphas_cumprod[int(t)])
        alpha, sigma = abar ** 0.5, (1.0 - abar) ** 0.5
        return alpha, sigma, float(torch.log(torch.tensor(alpha / sigma, dtype=torch.float64)))

    def _next(self, t) -> int | None:
        later = (self.timesteps == t).nonzero()
        i = int(later[0]) + 1 if len(later) else len(self.timesteps)
        return int(self.timesteps[i]) if i < len(self.timesteps) else None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor):
        """One solver step from `timestep` to the next scheduled one."""
        t = int(timestep)
        alpha_s, sigma_s, lambda_s = self._coeffs(t)
        alpha_t, sigma_t, lambda_t = self._coeffs(self._next(t))
        if t == int(self.timesteps[0]):
            self._prev_x0, self._prev_lambda = None, None  # a new sampling run starts
        x0 = self._data_prediction(model_output, sample, alpha_s, sigma_s)
        if sigma_t == 0.0:
            prev = x0  # final step: e^{-h} = 0, the first-order update lands on x0
        else:
            h = lambda_t - lambda_s
            phi = torch.expm1(torch.tensor(-h, dtype=torch.float64)).item()  # e^{-h} - 1
            d = x0
            if self._prev_x0 is not None:
                r = (lambda_s - self._prev_lambda) / h
                d = x0 + (x0 - self._prev_x0) / (2.0 * r)
            prev = (sigma_t / sigma_s) * sample - alpha_t * phi * d
        self._prev_x0, self._prev_lambda = x0, lambda_s
        return prev, x0

    def _data_prediction(self, out: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return alpha * x - sigma * out
        if self.prediction_type == "epsilon":
            return (x - sigma * out) / alpha
        return out
