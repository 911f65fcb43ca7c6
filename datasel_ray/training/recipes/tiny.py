"""The tiny LLaVA-style reference model (``model.name_or_path: tiny``), built fully offline and deterministically.

The model is a real ``LlavaForConditionalGeneration`` (CLIP vision tower + 2-layer projector + Llama decoder),
saved with ``save_pretrained`` so that it loads through the same generic path as any hub model
(:class:`datasel_ray.models.vlm.ReferenceVLM`). Dimensions:

- vision: CLIP, hidden 64, 2 layers, 4 heads, image 32x32, patch 8 -> 16 image tokens (CLS dropped,
  ``vision_feature_select_strategy="default"``, ``vision_feature_layer=-2``);
- text: Llama, hidden 128, 4 layers, 4 heads, intermediate 256, context 512, vocab ~1k (byte-level BPE
  trained in-process on a built-in corpus);
- chat template: LLaVA v1 (``"<sys> USER: <image>\\n... ASSISTANT: ...</s>USER: ..."``).

Pretraining (``TINY_MODEL_VERSION`` >= 2): the randomly initialised model is trained, deterministically and in
process, on ``PRETRAIN_SAMPLES`` clean samples of the synthetic tasks (:mod:`datasel_ray.synthetic`, generator
seed ``PRETRAIN_DATA_SEED``, no duplicates / noise / bad rows; demo and test pools use other seeds) for
``PRETRAIN_STEPS`` AdamW steps of ``PRETRAIN_BATCH_SIZE`` (projector and language model; cosine schedule; one
CPU thread so that the weights do not depend on the machine's thread count); see :func:`pretrain_config`.
The vision tower stays at its random initialisation, as LLaVA-1.5 keeps its CLIP encoder frozen in both
stages (trained from scratch on these samples it collapsed to a near-constant output, which left the visual
half of every COINCIDE vector without information). The language model learns the answers mostly from text.

The pretraining corpus is pinned: :data:`PRETRAIN_CORPUS_VERSION` names it and :data:`PRETRAIN_CORPUS_DIGEST`
is the sha256 of its conversations and rendered images. The cache key (:func:`recipe_fingerprint`) covers the
version, the generator settings and the pinned digest, not the generator's current output, so an edit of the
test-pool generator never rebuilds a cached model; a fresh build whose corpus no longer hashes to the pinned
digest raises :class:`PretrainCorpusChanged` instead of training on other data.

Every method paper scores data with a *trained* reference model (COINCIDE: TinyLLaVA after SFT; DataTailor:
LLaVA after stage-1 pretraining; TIVE: a warmed-up LLaVA). With random weights the features of all samples are
nearly collinear and feature-based selection degenerates to noise. The model is still tiny and only roughly
fitted to the tasks; it exists so that every phase runs end to end on a laptop.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from datasel_ray.models.loading import datasel_home
from datasel_ray.training.recipes.cache import cached_build, marker_matches

TINY_MODEL_VERSION = 2
PRETRAIN_CORPUS_VERSION = 1
PRETRAIN_DATA_SEED = 10_000
PRETRAIN_SAMPLES = 1200
PRETRAIN_CORPUS_DIGEST = "bed17f5b5ab71ea26f4f8f9c674bcae958f13e18fdd71877ca2082b345166a29"
PRETRAIN_STEPS = 150
PRETRAIN_BATCH_SIZE = 16
PRETRAIN_LR = 3e-3
TINY_SUBDIR = "tiny-llava-v1"
MARKER_FILE = "datasel_tiny.json"

VOCAB_SIZE = 1024
IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
VISION_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "projection_dim": 64}
TEXT_CONFIG = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4, "max_position_embeddings": 512}

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# LLaVA v1 conversation format. Content is a string or a list of {"type": "image"|"text"} items.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set sys = '" + SYSTEM_PROMPT.replace("'", "\\'") + "' %}{% set loop_messages = messages %}{% endif %}"
    "{{ sys }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{% if loop.first %} {% endif %}USER: "
    "{% else %} ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown"]
_SHAPES = ["circle", "square", "triangle", "star", "rectangle", "line", "dot", "stripe", "cross", "ring"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_CHAT = [
    "What is in the image?", "Describe the picture in detail.", "How many shapes are there?",
    "What colour is the background?", "Is there a circle in the image?", "Answer with one word.",
    "Please write a short caption.", "Explain your reasoning step by step.", "Yes, there is.", "No, there is not.",
    "The image shows a simple drawing.", "Thank you for the question.", "Hello! How can I help you today?",
    "Let me count them: the answer is", "The largest shape is on the left side of the image.",
]


def _corpus() -> list[str]:
    """Deterministic training corpus for the tokenizer: colours, shapes, counting, captions, numbers, chat."""
    lines = [SYSTEM_PROMPT, "USER: ASSISTANT:", *_CHAT]
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            n = _NUMBERS[(i + j) % len(_NUMBERS)]
            lines.append(f"USER: <image>\nWhat colour is the {shape}? ASSISTANT: The {shape} is {colour}.</s>")
            lines.append(f"There are {n} {colour} {shape}s in the image, {i * 10 + j} in total.")
            lines.append(f"A {colour} {shape} on a {_COLOURS[-1 - i]} background, next to {n} dots.")
    lines.extend(str(k) for k in range(200))
    return lines


class PretrainCorpusChanged(RuntimeError):
    """The pretraining corpus the generator makes now is not the pinned one."""


def default_dir() -> Path:
    """``$DATASEL_HOME/tiny-llava-v1``, default ``~/.cache/datasel_ray/tiny-llava-v1``."""
    return datasel_home() / TINY_SUBDIR


default_tiny_model_dir = default_dir


def pretrain_config(seed: int):
    """The :class:`~datasel_ray.training.finetune.FinetuneConfig` of the build-time pretraining."""
    from datasel_ray.training.finetune import FinetuneConfig

    return FinetuneConfig(
        steps=PRETRAIN_STEPS, batch_size=PRETRAIN_BATCH_SIZE, lr=PRETRAIN_LR, warmup_steps=PRETRAIN_STEPS // 10,
        schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0, seed=seed, train="projector_lm",
        num_threads=1)


def pretrain_samples(num_samples: int | None = None, seed: int | None = None) -> list[dict]:
    """Clean synthetic samples (all tasks, round robin; no duplicates, noise or bad rows), images in memory.

    Defaults: :data:`PRETRAIN_SAMPLES` samples from generator seed :data:`PRETRAIN_DATA_SEED` (read at call time).
    """
    from datasel_ray.synthetic import SynthConfig, plan_rows

    num_samples = PRETRAIN_SAMPLES if num_samples is None else num_samples
    seed = PRETRAIN_DATA_SEED if seed is None else seed
    config = SynthConfig(num_samples=num_samples, seed=seed, duplicate_rate=0.0, noise_rate=0.0, bad_rate=0.0)
    out = []
    for row in plan_rows(config):
        sample = row.sample
        image = sample.render(config.image_size) if sample.picture is not None else None
        out.append({"conversations": sample.conversations(), "image": image, "task": sample.task})
    return out


def _pretrain(model, processor, seed: int) -> dict:
    from datasel_ray.models.vlm import VLMProcessor
    from datasel_ray.training.finetune import finetune

    log = finetune(model, VLMProcessor(processor, max_length=512), pretrain_samples(), pretrain_config(seed))
    tail = log.step_loss[-10:]
    return {"steps": len(log.step_loss), "first_loss": round(log.step_loss[0], 4),
            "last10_loss": round(sum(tail) / len(tail), 4), "seconds": round(log.seconds, 1)}


def pretrain_corpus_spec() -> dict:
    """The settings that make the pretraining corpus (read at call time), covered by the fingerprint."""
    return {"version": PRETRAIN_CORPUS_VERSION, "generator": "datasel_ray.synthetic.plan_rows",
            "num_samples": PRETRAIN_SAMPLES, "seed": PRETRAIN_DATA_SEED, "duplicate_rate": 0.0, "noise_rate": 0.0,
            "bad_rate": 0.0, "digest": PRETRAIN_CORPUS_DIGEST}


@functools.lru_cache(maxsize=4)
def corpus_digest(num_samples: int, data_seed: int) -> str:
    """sha256 (hex) of the generator's current corpus: each sample's task and conversations (JSON) and image
    bytes, in order."""
    digest = hashlib.sha256()
    for sample in pretrain_samples(num_samples, data_seed):
        digest.update(json.dumps([sample["task"], sample["conversations"]], sort_keys=True).encode())
        if sample["image"] is not None:
            digest.update(sample["image"].tobytes())
    return digest.hexdigest()


def check_pretrain_corpus() -> None:
    """Raise :class:`PretrainCorpusChanged` when the generator no longer makes the pinned corpus."""
    got = corpus_digest(PRETRAIN_SAMPLES, PRETRAIN_DATA_SEED)
    if got != PRETRAIN_CORPUS_DIGEST:
        raise PretrainCorpusChanged(
            f"tiny pretraining corpus v{PRETRAIN_CORPUS_VERSION} ({PRETRAIN_SAMPLES} samples, generator seed "
            f"{PRETRAIN_DATA_SEED}) has sha256 {got}, the recipe pins {PRETRAIN_CORPUS_DIGEST}: "
            "datasel_ray.synthetic now generates other data. Restore the generator, or bump "
            "PRETRAIN_CORPUS_VERSION and set PRETRAIN_CORPUS_DIGEST in datasel_ray/training/recipes/tiny.py "
            "(this rebuilds the reference model and changes every feature)")


def recipe_fingerprint(seed: int) -> str:
    """sha256 (hex) of everything a build depends on: tokenizer corpus and special tokens, chat template,
    architecture, pretraining settings and the pinned pretraining corpus (:func:`pretrain_corpus_spec`).

    A cached model is reused only when its marker carries this fingerprint. Computing it renders nothing.
    """
    recipe = {
        "version": TINY_MODEL_VERSION, "seed": seed, "vocab_size": VOCAB_SIZE, "special_tokens": SPECIAL_TOKENS,
        "corpus": _corpus(), "chat_template": CHAT_TEMPLATE, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
        "vision": VISION_CONFIG, "text": TEXT_CONFIG,
        "pretrain": dataclasses.asdict(pretrain_config(seed)), "pretrain_corpus": pretrain_corpus_spec(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def _expected_marker(seed: int) -> dict:
    return {"version": TINY_MODEL_VERSION, "seed": seed, "recipe": recipe_fingerprint(seed)}


def _marker_ok(out_dir: Path, seed: int) -> bool:
    return marker_matches(out_dir, MARKER_FILE, _expected_marker(seed))


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Build (once) the tiny LLaVA model + processor in ``out_dir`` and return its path.

    Idempotent: a directory whose marker has this version, seed and fingerprint is reused; a stale or partial
    one is rebuilt, atomically (:func:`~datasel_ray.training.recipes.cache.cached_build`). Same seed ->
    identical files. Raises :class:`PretrainCorpusChanged` before training when the corpus is not the pinned one.
    """
    def write(tmp: Path) -> dict:
        check_pretrain_corpus()
        return _write_tiny_model(tmp, seed)

    return cached_build(out_dir, MARKER_FILE, lambda: _expected_marker(seed), write, log_key="pretrain")


build_tiny_model = build


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=512, padding_side="right",
    )


def _build_processor(tokenizer):
    from transformers import LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor
    image_processor = ImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_resize=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def _build_model(tokenizer, seed: int):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(**VISION_CONFIG)
    text = LlamaConfig(
        vocab_size=len(tokenizer), **TEXT_CONFIG, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=IMAGE_SEQ_LENGTH,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return model.eval()


def _write_tiny_model(path: Path, seed: int, pretrain: bool = True) -> dict:
    """Build, pretrain (unless ``pretrain=False``: the random-weight model) and save; return the training log."""
    tokenizer = _build_tokenizer()
    processor = _build_processor(tokenizer)
    model = _build_model(tokenizer, seed)
    info = _pretrain(model, processor, seed) if pretrain else {"steps": 0}
    model.eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return info
