"""Processors of the reference models without torchvision: the image-only form of a processor with a video half.

transformers 5.x builds the processors of Qwen2-VL, Qwen2.5-VL, SmolVLM and LLaVA-OneVision with a video
processor, and its video processors need torchvision, which cannot be installed next to the CPU torch wheel.
The image halves do not: ``AutoImageProcessor`` falls back to the PIL backend (``Qwen2VLImageProcessorPil``,
``SmolVLMImageProcessorPil``, ``LlavaOnevisionImageProcessorPil``) when torchvision is missing. So
:func:`load_processor` tries ``AutoProcessor`` and, when that fails on a processor class that has a
``video_processor``, loads :func:`image_only` of that class: the same class (same name, same ``__call__``, same
chat template and token expansion) with ``video_processor`` left out of its sub-processors and set to None.
Such a processor refuses ``videos=`` (video is not supported by this project yet) and processes images exactly
as the full one does; its chat template renders through ``ProcessorMixin.apply_chat_template`` (SmolVLM's own
override only adds the video processor's frame defaults). Its ``save_pretrained`` writes the same files as the full one's minus the video
processor's, so a folder saved with it loads with ``AutoProcessor`` wherever torchvision is installed.
"""

from __future__ import annotations

import functools

VIDEO_ATTRIBUTE = "video_processor"


def _has_video(conversation) -> bool:
    """Whether a chat (or a list of chats) has a ``{"type": "video"}`` content item."""
    chats = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
    return any(isinstance(item, dict) and item.get("type") == "video"
               for chat in chats for message in chat for item in (message.get("content") or [])
               if not isinstance(message.get("content"), str))


@functools.cache
def image_only(processor_class: type) -> type:
    """``processor_class`` without its video processor (same class name; ``video_processor`` is None)."""
    from transformers import ProcessorMixin

    if VIDEO_ATTRIBUTE not in processor_class.get_attributes():
        return processor_class

    def get_attributes(cls):
        return [a for a in processor_class.get_attributes() if a != VIDEO_ATTRIBUTE]

    position = processor_class.get_attributes().index(VIDEO_ATTRIBUTE)

    @classmethod
    def _get_arguments_from_pretrained(cls, *args, **kwargs):
        # the loaded sub-processors, with None in the video processor's positional slot (SmolVLM's __init__
        # takes it without a default; ProcessorMixin then ignores the surplus positional None)
        loaded = super(subclass, cls)._get_arguments_from_pretrained(*args, **kwargs)
        return [*loaded[:position], None, *loaded[position:]]

    def apply_chat_template(self, conversation, *args, **kwargs):
        # the class's own override (SmolVLM's) only adds the video processor's num_frames / fps defaults
        if _has_video(conversation):
            raise ValueError(f"{processor_class.__name__} without torchvision has no video processor; video "
                             "items are not supported")
        return ProcessorMixin.apply_chat_template(self, conversation, *args, **kwargs)

    subclass = type(processor_class.__name__, (processor_class,), {
        "get_attributes": classmethod(get_attributes), VIDEO_ATTRIBUTE: None,
        "_get_arguments_from_pretrained": _get_arguments_from_pretrained,
        "apply_chat_template": apply_chat_template,
        "__module__": __name__,
        "__doc__": f"{processor_class.__name__} without its video processor (see {__name__})."})
    return subclass


def processor_class_of(path: str, **kwargs) -> type:
    """The processor class transformers maps ``path``'s ``config.model_type`` to (``Qwen2VLProcessor``, ...)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(path, **kwargs).model_type
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ValueError(f"transformers maps model_type {model_type!r} of {path} to no processor class")
    return getattr(transformers, name)


def load_processor(path: str, **kwargs):
    """``AutoProcessor.from_pretrained(path, **kwargs)``, or the image-only form of the model's processor class
    when that fails on a processor with a video half (no torchvision). Any other failure is raised as is."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, **kwargs)
    except (OSError, ImportError, ValueError) as err:  # e.g. "Can't load video processor" without torchvision
        try:
            cls = processor_class_of(path, **kwargs)
        except (OSError, ValueError, AttributeError):
            raise err from None
        if VIDEO_ATTRIBUTE not in cls.get_attributes():
            raise
        return image_only(cls).from_pretrained(path, **kwargs)
