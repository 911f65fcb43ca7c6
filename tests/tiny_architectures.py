"""Tiny randomly initialised reference models of the architectures the generic loader supports, built offline.

Each builder saves a ``save_pretrained`` folder (model + processor + tokenizer + chat template) that
:class:`datasel_ray.models.vlm.ReferenceVLM` loads like a hub checkpoint. The tokenizer is the tiny LLaVA's
byte-level BPE (:mod:`datasel_ray.training.recipes.tiny`) plus the architecture's special tokens; the processors
are the architectures' own classes with their PIL image processors and without a video processor
(:func:`datasel_ray.models.processors.image_only`): no download and no torchvision. Dimensions are a few dozen
so that a forward/backward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from datasel_ray.models.processors import image_only
from datasel_ray.training.recipes import tiny

ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "llava_onevision")

QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
# Qwen2-VL's chat template (system prompt, <|im_start|>role\n...<|im_end|>, image as vision_start/pad/end)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IDEFICS_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                  *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))]
# Idefics3 / SmolVLM chat template (as shipped with HuggingFaceM4/Idefics3-8B-Llama3 and SmolVLM)
IDEFICS_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
ONEVISION_TOKENS = ["<|im_start|>", "<|im_end|>", "<video>"]
ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>\n{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024}


def _tokenizer(extra: list[str]):
    tokenizer = tiny._build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.model_max_length = TEXT["max_position_embeddings"]
    return tokenizer


def _qwen(path: Path, version: str):
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    tokenizer = _tokenizer(QWEN_TOKENS)
    ids = {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    # patch 4, merge 2: one image token per 8x8 pixels; 8x8 .. 32x32 pixels per image
    images = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32})
    processor = image_only(Qwen2VLProcessor)(image_processor=images, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    text = {**TEXT, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    vision = {"depth": 2, "num_heads": 4, "in_channels": 3, "patch_size": 4, "spatial_merge_size": 2,
              "temporal_patch_size": 2}
    if version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision.update(embed_dim=32, hidden_size=TEXT["hidden_size"], mlp_ratio=2)
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=TEXT["hidden_size"], window_size=16,
                      fullatt_block_indexes=[1])
    config = Config(vision_config=vision, text_config=text, **ids)
    return Model(config), processor


def _idefics(path: Path, family: str):
    tokenizer = _tokenizer(IDEFICS_TOKENS)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    # 32x32 tiles, patch 8 -> 16 patches, pixel shuffle by 2 -> 4 image tokens per tile; images up to 64 px
    # (split into 2x2 tiles plus the global image)
    image_kwargs = {"do_image_splitting": True, "size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}
    text = {**TEXT, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if family == "idefics3":
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
        from transformers import Idefics3ImageProcessorPil as ImageProcessor
        from transformers import Idefics3Processor as Processor
    else:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
        from transformers import SmolVLMImageProcessorPil as ImageProcessor
        from transformers import SmolVLMProcessor as Processor
    video = {"video_processor": None} if "video_processor" in Processor.get_attributes() else {}
    processor = image_only(Processor)(image_processor=ImageProcessor(**image_kwargs), tokenizer=tokenizer,
                                      image_seq_len=4, chat_template=IDEFICS_TEMPLATE, **video)
    config = Config(vision_config=vision, text_config=text, image_token_id=image_token_id, scale_factor=2)
    return Model(config), processor


def _onevision(path: Path):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    tokenizer = _tokenizer(ONEVISION_TOKENS)
    images = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS,
                                             do_pad=True)
    processor = image_only(LlavaOnevisionProcessor)(
        image_processor=images, tokenizer=tokenizer, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=ONEVISION_TEMPLATE)
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    text = {"model_type": "qwen2", **TEXT, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1, vision_feature_select_strategy="full")
    return LlavaOnevisionForConditionalGeneration(config), processor


def build(architecture: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny random ``architecture`` (one of :data:`ARCHITECTURES`) with its processor under ``path``."""
    torch.manual_seed(seed)
    if architecture == "qwen2_vl":
        model, processor = _qwen(path, "2")
    elif architecture == "qwen2_5_vl":
        model, processor = _qwen(path, "2.5")
    elif architecture in ("idefics3", "smolvlm"):
        model, processor = _idefics(path, architecture)
    elif architecture == "llava_onevision":
        model, processor = _onevision(path)
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {ARCHITECTURES}")
    path.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path
