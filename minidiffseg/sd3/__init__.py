"""Stable Diffusion 3 / 3.5: the MM-DiT (mmdit.py), its config (config.py), its single-file names (ldm.py)."""
