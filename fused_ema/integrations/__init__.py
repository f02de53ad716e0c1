"""Drop-in replacements for the EMA helpers of other libraries, one module per library.

Each module imports its library only when used (and most need none), so importing
``fused_ema.integrations`` costs nothing:

- ``fused_ema.integrations.sb3``: ``polyak_update`` (Stable-Baselines3) and ``patch()``
- ``fused_ema.integrations.torch_ema``: ``ExponentialMovingAverage``
- ``fused_ema.integrations.ema_pytorch``: ``EMA``
- ``fused_ema.integrations.diffusers``: ``EMAModel``
- ``fused_ema.integrations.timm``: ``ModelEmaV3`` and ``ModelEmaV2``
- ``fused_ema.integrations.lightning``: ``EMAWeightAveraging`` (a Lightning callback)
- ``fused_ema.integrations.transformers``: ``EMACallback`` (a Hugging Face TrainerCallback)

Every adapter reproduces its library's decay schedule and bookkeeping and hands the
averaging itself to the fused engine; see each module for what differs. Each drop-in
module (all but ``transformers``, whose library has no EMA) also offers every other
public name of the module it replaces, as the library's own object imported on first use
(``_delegate.py``): ``from fused_ema.integrations.ema_pytorch import EMA, PostHocEMA``
works as ``from ema_pytorch import ...`` did, with ``EMA`` fused.
"""
