"""SD1.5's noise schedule (docs/design.md §3): 1000 steps, "scaled linear" betas
linspace(√0.00085, √0.012, 1000)² (SD1.5 scheduler_config.json: beta_start, beta_end).

ᾱ is computed in float32, as diffusers' DDPMScheduler (which the official code uses) computes it,
so that a float64 run reproduces the official numbers exactly rather than a more precise variant."""

from __future__ import annotations

import torch


class NoiseSchedule:
    def __init__(self, steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # ᾱ_t; ᾱ_100 ≈ 0.8942

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """z_t = √ᾱ_t · z0 + √(1−ᾱ_t) · ε, in the latents' dtype."""
        a = self.alphas_cumprod[t].to(z0.dtype)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise.to(z0.dtype)


class FlowMatchSchedule:
    """SD3's noise (rectified flow; diffusers' FlowMatchEulerDiscreteScheduler.scale_noise): a straight line from
    the latent to the noise, x_σ = (1 − σ)·x0 + σ·ε, with the model's timestep 1000·σ.

    The method noises once and reads attention, so it names σ directly, as a timestep t = 1000·σ on the same
    0..999 scale as DDPM's (the recipe's `timesteps`). The scheduler's `shift` (3.0 for SD3) re-spaces a
    sampler's steps, σ' = s·σ / (1 + (s − 1)·σ); it does not change what a given σ means, so it is not applied."""

    steps = 1000  # the model timestep of σ = 1 (scheduler_config.json "num_train_timesteps")

    def sigma(self, t: int | float) -> float:
        return float(t) / self.steps

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: int | float) -> torch.Tensor:
        """x_σ = (1 − σ)·z0 + σ·ε with σ = t / 1000, in the latents' dtype."""
        s = self.sigma(t)
        return (1 - s) * z0 + s * noise.to(z0.dtype)
