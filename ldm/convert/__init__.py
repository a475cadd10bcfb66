"""State-dict conversion between this project's (original SD) layout and other layouts (diffusers)."""

from ldm.convert.vae import diffusers_to_sd_vae, extract_vae_state_dict, is_diffusers_vae, sd_to_diffusers_vae

__all__ = ["diffusers_to_sd_vae", "extract_vae_state_dict", "is_diffusers_vae", "sd_to_diffusers_vae"]
