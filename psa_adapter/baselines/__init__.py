"""The baselines PSA is compared with, each a generation method by name (``psa_adapter.methods``).

* ``safetydpo``: a non-personalised DPO LoRA (``safetydpo.py``; loading in ``lora.py``);
* ``sld``: Safe Latent Diffusion's safety guidance with the published presets (``sld.py``);
* ``esd`` / ``uce``: user-supplied concept-erased UNet weights, loaded strictly (``unet_weights.py``);
* ``prompt``: the user's banned concepts as a negative prompt or an appended instruction (``prompt.py``).

Importing ``psa_adapter.methods`` registers them.
"""

from psa_adapter.baselines import prompt, safetydpo, sld, unet_weights  # noqa: F401 - registration

__all__ = ["prompt", "safetydpo", "sld", "unet_weights"]
