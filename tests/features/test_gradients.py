"""Per-sample LoRA gradients: vmap and loop against a plain single-sample backward; Adam; projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from datasel_ray.features.gradients import AdamState, LoraGradientFeaturizer, tive_param_filter
from datasel_ray.features.projector import RademacherProjector, SparseJLProjector
from numeric import assert_close_to_accumulation, assert_projection_close

IMAGE_TOKEN = 3
PAD = 0
VOCAB = 96
N_IMAGE_TOKENS = 16  # (32 / 8) ** 2


def _tiny_lora_llava(seed=0):
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=64)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=PAD)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=N_IMAGE_TOKENS)
    model = LlavaForConditionalGeneration(config).eval()
    # init_lora_weights=False: B != 0, so both A and B get non-zero gradients
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
    return get_peft_model(model, lora)


def _batch(left_pad=False, seed=0):
    """4 rows: image + answer, image + answer (shorter), text-only + answer, image without answer tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [40, 31, 22, 28]
    width = max(lengths)
    rows, labels = [], []
    for i, n in enumerate(lengths):
        ids = torch.randint(5, VOCAB, (n,), generator=gen)
        if i != 2:
            ids[1:1 + N_IMAGE_TOKENS] = IMAGE_TOKEN
        lab = torch.full((n,), -100)
        if i != 3:
            lab[n - 6:] = ids[n - 6:]
        rows.append(ids)
        labels.append(lab)
    input_ids = torch.full((4, width), PAD)
    mask = torch.zeros(4, width, dtype=torch.long)
    lab_out = torch.full((4, width), -100)
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        sl = slice(width - len(ids), width) if left_pad else slice(0, len(ids))
        input_ids[i, sl], mask[i, sl], lab_out[i, sl] = ids, 1, lab
    pixels = torch.randn(3, 3, 32, 32, generator=gen)  # rows 0, 1, 3 hold image tokens
    return {"input_ids": input_ids, "attention_mask": mask, "labels": lab_out, "pixel_values": pixels}


def _plain_reference(model, batch):
    """Single-sample loss.backward() on each row's non-pad tokens; flat fp64 gradients [B, D]."""
    names = [n for n, _ in model.named_parameters() if tive_param_filter(n)]
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    image_row = 0
    flat = []
    for b in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][b].bool()
        ids = batch["input_ids"][b, keep][None]
        pv = None
        if (ids == IMAGE_TOKEN).any():
            pv = batch["pixel_values"][image_row:image_row + 1]
            image_row += 1
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, pixel_values=pv).logits[0, :-1]
        target = batch["labels"][b, keep][1:]
        if (target != -100).any():
            torch.nn.functional.cross_entropy(logits, target, ignore_index=-100).backward()
        flat.append(torch.cat([(params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]))
                               .reshape(-1).double() for n in names]))
    model.zero_grad(set_to_none=True)
    return torch.stack(flat)


@pytest.fixture(scope="module")
def model():
    return _tiny_lora_llava()


@pytest.fixture(scope="module")
def reference(model):
    return _plain_reference(model, _batch())


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_featurizer_matches_plain_backward(model, reference, method):
    grad_dim = reference.shape[1]
    assert grad_dim == 2 * 4 * 2 * (4 * 64)  # layers x (q,k,v,o) x (A,B) x r * hidden
    projector = RademacherProjector(grad_dim, 32, seed=0, block_rows=1000)
    feats = LoraGradientFeaturizer(model, projector, method=method).compute(_batch())
    assert feats["grad_proj"].dtype == np.float32 and feats["grad_proj"].shape == (4, 32)
    assert_projection_close(feats["grad_proj"], reference, projector.materialize())
    np.testing.assert_allclose(feats["grad_norm"], reference.norm(dim=1).numpy(), rtol=1e-4, atol=1e-9)
    assert feats["grad_norm"][3] == 0 and np.isnan(feats["answer_loss"][3])
    assert np.all(feats["grad_norm"][:3] > 0) and np.all(np.isfinite(feats["answer_loss"][:3]))


def test_vmap_handles_left_padding(model, reference):
    projector = SparseJLProjector(reference.shape[1], 48, seed=1, nnz_per_col=2)
    feats = LoraGradientFeaturizer(model, projector, method="vmap").compute(_batch(left_pad=True))
    assert_projection_close(feats["grad_proj"], reference, projector.materialize())


def test_eager_attention_uses_additive_mask(reference):
    eager = _tiny_lora_llava()
    eager.base_model.model.set_attn_implementation("eager")
    projector = RademacherProjector(reference.shape[1], 16, seed=0)
    feats = LoraGradientFeaturizer(eager, projector, method="vmap").compute(_batch(left_pad=True))
    assert_projection_close(feats["grad_proj"], reference, projector.materialize())


def test_auto_picks_vmap_and_loop_equals_vmap(model):
    projector = RademacherProjector(4096, 16, seed=3)
    auto = LoraGradientFeaturizer(model, projector)
    assert auto.method == "vmap"
    loop = LoraGradientFeaturizer(model, projector, method="loop")
    a, b = auto.compute(_batch(seed=5)), loop.compute(_batch(seed=5))
    assert_close_to_accumulation(a["grad_proj"], b["grad_proj"], _rademacher_scale(b, 4096, 16))
    np.testing.assert_allclose(a["answer_loss"], b["answer_loss"], rtol=1e-5)


def _rademacher_scale(feats, grad_dim, proj_dim):
    """[B, k] bound on sum_j |g_j R_jk| for +-1 entries R: ||g||_1 <= sqrt(D) ||g||_2."""
    return np.sqrt(grad_dim) * feats["grad_norm"].astype(np.float64)[:, None] * np.ones(proj_dim)


def test_vmap_pass_uses_eager_attention_and_restores_the_model(model, reference):
    import warnings

    projector = RademacherProjector(reference.shape[1], 16, seed=0)
    assert model.config.text_config._attn_implementation == "sdpa"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feats = LoraGradientFeaturizer(model, projector, method="vmap").compute(_batch())
    # functorch warns "There is a performance drop ... batching rule" when it loops over SDPA inside vmap
    assert not [w for w in caught if "batching rule" in str(w.message)]
    assert model.config.text_config._attn_implementation == "sdpa"
    assert_projection_close(feats["grad_proj"], reference, projector.materialize())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
        sdpa = LoraGradientFeaturizer(model, projector, method="vmap", vmap_attention=None).compute(_batch())
    assert_projection_close(sdpa["grad_proj"], reference, projector.materialize())
    with pytest.raises(ValueError, match="vmap_attention"):
        LoraGradientFeaturizer(model, projector, vmap_attention="flash_attention_2")


def test_param_filter_outside_language_model_falls_back_to_loop(model):
    def lm_and_projector(name):
        return tive_param_filter(name) or "multi_modal_projector.linear_2" in name

    d = sum(p.numel() for n, p in model.named_parameters() if lm_and_projector(n))
    feats = LoraGradientFeaturizer(model, RademacherProjector(d, 8), param_filter=lm_and_projector)
    assert feats.method == "loop"
    with pytest.raises(ValueError, match="outside"):
        LoraGradientFeaturizer(model, RademacherProjector(d, 8), param_filter=lm_and_projector, method="vmap")
    LoraGradientFeaturizer(model, RademacherProjector(4096, 8))  # restore the TIVE requires_grad set


def test_adam_preconditioning_matches_less_and_keeps_state(model, reference):
    grad_dim = reference.shape[1]
    gen = torch.Generator().manual_seed(7)
    m = 1e-3 * torch.randn(grad_dim, generator=gen)
    v = 1e-6 * torch.rand(grad_dim, generator=gen)
    state = AdamState(m.clone(), v.clone())
    projector = RademacherProjector(grad_dim, 24, seed=0)
    feats = LoraGradientFeaturizer(model, projector, adam_state=state, method="vmap").compute(_batch())
    assert torch.equal(state.exp_avg, m) and torch.equal(state.exp_avg_sq, v)  # never mutated
    g = reference
    gamma = (0.9 * m.double() + 0.1 * g) / torch.sqrt(0.999 * v.double() + 0.001 * g * g + 1e-8)
    # |gamma| reaches ~10 where v is tiny and its terms cancel in the sum: the bound scales with sum |terms|
    assert_projection_close(feats["grad_proj"], gamma, projector.materialize())
    np.testing.assert_allclose(feats["grad_norm"], g.norm(dim=1).numpy(), rtol=1e-4)  # raw-gradient norm


def test_adam_state_from_optimizer_state_dict(model):
    names = [n for n, _ in model.named_parameters() if tive_param_filter(n)]
    # clones: the optimizer state is index-keyed like a saved warm-up optimizer; the model is untouched
    params = [p.detach().clone().requires_grad_() for n, p in model.named_parameters() if tive_param_filter(n)]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    state = AdamState.from_optimizer_state_dict(opt.state_dict(), names, names)
    assert state.exp_avg.shape == (sum(p.numel() for p in params),)
    torch.testing.assert_close(state.exp_avg, torch.full_like(state.exp_avg, 0.1))
    torch.testing.assert_close(state.exp_avg_sq, torch.full_like(state.exp_avg, 0.001))
    with pytest.raises(KeyError):
        AdamState.from_named({}, names)


def test_rejects_wrong_projector_dim_and_method(model):
    with pytest.raises(ValueError, match="grad_dim"):
        LoraGradientFeaturizer(model, RademacherProjector(10, 4))
    with pytest.raises(ValueError, match="auto, vmap, loop"):
        LoraGradientFeaturizer(model, RademacherProjector(4096, 4), method="jacrev")


def test_tiny_reference_model_vmap_equals_loop(tiny_model_dir):
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoModelForImageTextToText

    from datasel_ray.config import LoraConfig as TiveLora

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    lora = TiveLora()
    torch.manual_seed(0)
    model = get_peft_model(base, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                init_lora_weights=False, target_modules=lora.target_modules))
    cfg = model.config
    n_img, size = int(cfg.image_seq_length), int(cfg.vision_config.image_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, int(cfg.text_config.vocab_size), (2, n_img + 20), generator=gen)
    ids[:, 2:2 + n_img] = int(cfg.image_token_id)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    labels = torch.where(torch.arange(ids.shape[1]) >= n_img + 8, ids, torch.full_like(ids, -100))
    labels[mask == 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "pixel_values": torch.randn(2, 3, size, size, generator=gen)}
    grad_dim = sum(p.numel() for n, p in model.named_parameters() if tive_param_filter(n))
    projector = RademacherProjector(grad_dim, 64, seed=0)
    a = LoraGradientFeaturizer(model, projector, method="vmap").compute(batch)
    b = LoraGradientFeaturizer(model, projector, method="loop").compute(batch)
    assert_close_to_accumulation(a["grad_proj"], b["grad_proj"], _rademacher_scale(b, grad_dim, 64))
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    assert np.all(b["grad_norm"] > 0)
