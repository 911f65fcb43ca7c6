"""EfficientNet-Lite as a vision tower of ``LlavaForConditionalGeneration`` (custom HF config + model).

The tower wraps the ``efficientnet-lite-pytorch`` architecture (Tan & Le 2019, the Lite variant: ReLU6, no
squeeze-excitation, fixed stem and head). Its output for a batch ``pixel_values`` float [B, 3, H, W] is the
head's feature map ([B, 1280, H/32, W/32] for Lite0) average-pooled to ``tokens_per_side`` x ``tokens_per_side``
and flattened row-major to tokens: ``hidden_states[-1]`` float [B, tokens_per_side**2, hidden_size]. There is
no CLS token, so LLaVA uses it with ``vision_feature_select_strategy="full"`` and ``vision_feature_layer=-1``.

BatchNorm and drop-connect: the tower stays in eval mode whatever ``train()`` is called on the model around it
(its running statistics are the ImageNet ones; train-mode batch statistics or stochastic depth would make the
same image give other visual tokens from batch to batch). LLaVA keeps its vision encoder frozen in both stages;
the tower's parameters still take gradients when a caller asks for them.

:func:`register` makes ``AutoConfig`` / ``AutoModel`` know the ``datasel_efficientnet_lite`` model type; call it
(through :func:`datasel_ray.models.loading.register_model_classes`) before ``from_pretrained`` of a checkpoint
that uses the tower.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

MODEL_TYPE = "datasel_efficientnet_lite"


class EfficientNetVisionConfig(PretrainedConfig):
    """variant: ``efficientnet-lite0`` .. ``lite4``; image_size: the square input size in pixels (sets the
    static "same" padding of the convolutions); tokens_per_side: side of the pooled token grid; hidden_size:
    the head's channels (1280 for every Lite variant)."""

    model_type = MODEL_TYPE

    def __init__(self, variant: str = "efficientnet-lite0", image_size: int = 224, tokens_per_side: int = 7,
                 hidden_size: int = 1280, **kwargs):
        self.variant = variant
        self.image_size = image_size
        self.tokens_per_side = tokens_per_side
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class EfficientNetVisionModel(PreTrainedModel):
    """The tower; see the module docstring for shapes. ``forward`` returns a ``BaseModelOutputWithPooling`` with
    ``last_hidden_state`` = ``hidden_states[-1]`` (the pooled tokens) and ``pooler_output`` [B, hidden_size]."""

    config_class = EfficientNetVisionConfig
    base_model_prefix = "efficientnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules: list[str] = []

    def __init__(self, config: EfficientNetVisionConfig):
        super().__init__(config)
        from efficientnet_lite_pytorch import EfficientNet

        self.efficientnet = EfficientNet.from_name(config.variant, image_size=config.image_size)
        self.pool = nn.AdaptiveAvgPool2d(config.tokens_per_side)
        self.post_init()
        self.efficientnet.eval()

    def _init_weights(self, module):
        return

    def train(self, mode: bool = True):
        super().train(mode)
        self.efficientnet.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutputWithPooling:
        dtype = next(self.efficientnet.parameters()).dtype
        grid = self.efficientnet.extract_features(pixel_values.to(dtype))
        tokens = self.pool(grid).flatten(2).transpose(1, 2)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens.mean(1),
                                          hidden_states=(tokens,))


def register() -> None:
    """Register the config and model with ``AutoConfig`` / ``AutoModel`` (idempotent)."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE in CONFIG_MAPPING:
        return
    AutoConfig.register(MODEL_TYPE, EfficientNetVisionConfig)
    AutoModel.register(EfficientNetVisionConfig, EfficientNetVisionModel)
