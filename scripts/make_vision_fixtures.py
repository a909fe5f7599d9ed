#!/usr/bin/env python3
"""Generate reference fixtures for the vision side of the KOSMOS port: CLIP ViT encoder, KOSMOS-2 image-to-text
projection, a lucidrains Perceiver resampler (Flamingo-style, as used for KOSMOS-1), and a tiny end-to-end
KOSMOS-2 `get_image_features`.

Run from the repository root:

    .venv-ref/bin/python scripts/make_vision_fixtures.py

Needs (besides torch / transformers / safetensors in .venv-ref):

    .venv-ref/bin/pip install --no-deps flamingo-pytorch==0.1.2 einops==0.8.2 einops-exts==0.0.4

Writes fixtures/vision/<case>/{meta.json, weights.safetensors, io.safetensors}; fixtures/vision/README.md is
maintained by hand next to them.

This script only *calls* transformers / flamingo_pytorch; it does not re-implement them. All tensors are float32,
batch-first. Every case seeds torch.manual_seed(seed) before building its module, runs in eval mode with eager
attention, and afterwards gives every LayerNorm (and the other parameters a sloppy port could ignore) a random value
from its own torch.Generator so that the fixtures catch a port that skips them.
"""

import hashlib
import importlib.metadata
import json
import os
import sys

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    Kosmos2Config,
    Kosmos2Model,
    Kosmos2VisionConfig,
)
from transformers.models.kosmos2.modeling_kosmos2 import (  # noqa: E402
    Kosmos2ImageToTextProjection,
    Kosmos2VisionModel,
)
from flamingo_pytorch import PerceiverResampler  # noqa: E402

torch.set_default_dtype(torch.float32)
torch.set_grad_enabled(False)

_HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT_REL = "scripts/make_vision_fixtures.py"
REPO_ROOT = os.path.dirname(_HERE)
OUT_ROOT = os.path.join(REPO_ROOT, "fixtures", "vision")
TOL = 1e-6

with open(os.path.abspath(__file__), "rb") as _f:
    SCRIPT_SHA256 = hashlib.sha256(_f.read()).hexdigest()

VERSIONS = {
    "torch": torch.__version__,
    "transformers": importlib.metadata.version("transformers"),
    "safetensors": importlib.metadata.version("safetensors"),
    "flamingo-pytorch": importlib.metadata.version("flamingo-pytorch"),
    "einops": importlib.metadata.version("einops"),
    "einops-exts": importlib.metadata.version("einops-exts"),
    "python": sys.version.split()[0],
}


def write_meta(case_dir, config, notes, extra=None):
    meta = {
        "script": SCRIPT_REL,
        "script_sha256": SCRIPT_SHA256,
        "versions": VERSIONS,
        "config": config,
        "notes": notes,
    }
    if extra:
        meta.update(extra)
    with open(os.path.join(case_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=False)
        f.write("\n")


def case_dir(name):
    d = os.path.join(OUT_ROOT, name)
    os.makedirs(d, exist_ok=True)
    return d


def f32_contig(tensors):
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(torch.float32)
        out[k] = v.contiguous().clone()
    return out


def maxdiff(a, b):
    return float((a - b).abs().max())


def shapes(tensors):
    return {k: list(v.shape) for k, v in tensors.items()}


def perturb(module, seed, class_pos_std=0.5, bias_std=0.05):
    """Random affine for every LayerNorm (weight = 1 + 0.1 N(0,1), bias = 0.1 N(0,1)); every nn.Linear / nn.Conv2d
    bias that exists gets bias_std * N(0,1) (CLIP's and KOSMOS-2's initialisers leave them at 0); CLIP-style
    embeddings get class_embedding = class_pos_std * N(0,1) and position_embedding.weight = class_pos_std * N(0,1)
    (the initialiser's std 0.02 would let a port that drops them pass). One generator, modules in named_modules()
    order."""
    g = torch.Generator().manual_seed(seed)
    done = []
    for name, m in module.named_modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            done.append(name)
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            m.bias.copy_(bias_std * torch.randn(m.bias.shape, generator=g))
        if hasattr(m, "class_embedding") and isinstance(getattr(m, "class_embedding"), nn.Parameter):
            m.class_embedding.copy_(class_pos_std * torch.randn(m.class_embedding.shape, generator=g))
            m.position_embedding.weight.copy_(
                class_pos_std * torch.randn(m.position_embedding.weight.shape, generator=g)
            )
    return done


PERTURB_NOTE = (
    "After construction every nn.LayerNorm got weight = 1 + 0.1*N(0,1), bias = 0.1*N(0,1); every nn.Linear bias "
    "got 0.05*N(0,1) (the transformers initialisers zero them); class_embedding and position_embedding.weight got "
    "0.5*N(0,1) (initialiser std is 0.02 / embed_dim^-0.5). All from torch.Generator().manual_seed(seed + 1000), "
    "modules visited in named_modules() order. "
)


def persistent_state_dict(model):
    """The model's state_dict (which already excludes non-persistent buffers such as embeddings.position_ids).
    Returns (state_dict, names of all buffers that are NOT in it)."""
    sd = model.state_dict()
    non_persistent = sorted(n for n, _ in model.named_buffers() if n not in sd)
    return sd, non_persistent


# --------------------------------------------------------------------------------------------------------------
# Cases 1 & 2: transformers CLIPVisionModel
# --------------------------------------------------------------------------------------------------------------
def case_clip(name, seed, hidden, inter, layers, heads, image, patch, batch, interp_size):
    cfg_kwargs = dict(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        num_channels=3,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**cfg_kwargs, attn_implementation="eager")
    model = CLIPVisionModel(config).eval()
    assert model.config._attn_implementation == "eager"
    perturb(model, seed + 1000)
    model.eval()

    g = torch.Generator().manual_seed(seed + 2000)
    pixel_values = torch.randn(batch, 3, image, image, generator=g)
    pixel_values_interp = torch.randn(1, 3, interp_size, interp_size, generator=g) if interp_size else None

    out = model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
    last = out.last_hidden_state
    pooler = out.pooler_output
    hidden_states = out.hidden_states
    embeddings = model.embeddings(pixel_values)

    # Cross-check 1: hidden_states[0] is pre_layrnorm(embeddings), the last one is last_hidden_state, and pooler is
    # post_layernorm(last[:, 0]).
    assert maxdiff(hidden_states[0], model.pre_layrnorm(embeddings)) == 0.0
    assert maxdiff(hidden_states[-1], last) == 0.0
    assert maxdiff(pooler, model.post_layernorm(last[:, 0])) == 0.0

    # Cross-check 2 / image_features: KOSMOS-2's own vision tower with the same weights. Kosmos2VisionModel wraps the
    # same transformer under `.model`, so its keys are 'model.' + the CLIPVisionModel keys.
    sd, non_persistent = persistent_state_dict(model)
    k2 = Kosmos2VisionModel(Kosmos2VisionConfig(**cfg_kwargs, attn_implementation="eager")).eval()
    missing, unexpected = k2.load_state_dict({f"model.{k}": v for k, v in sd.items()}, strict=True)
    assert not missing and not unexpected
    k2_out = k2(pixel_values=pixel_values, return_dict=True)
    d_k2 = maxdiff(k2_out.last_hidden_state, last)
    assert d_k2 < TOL, d_k2
    # Exactly the two lines of Kosmos2Model.get_image_features / Kosmos2ForConditionalGeneration.get_image_features
    # that come before the projection:
    image_features = nn.functional.normalize(k2.model.post_layernorm(k2_out[0]), dim=-1)
    # and the same on the CLIP model's own post_layernorm (must agree)
    image_features_clip = nn.functional.normalize(model.post_layernorm(last), dim=-1)
    d_feat = maxdiff(image_features, image_features_clip)
    assert d_feat < TOL, d_feat

    io = {
        "pixel_values": pixel_values,
        "embeddings": embeddings,
        "last_hidden_state": last,
        "pooler_output": pooler,
        "image_features": image_features,
    }
    for i, h in enumerate(hidden_states):
        io[f"hidden_states_{i}"] = h

    interp_note = ""
    if interp_size:
        out_i = model(pixel_values=pixel_values_interp, interpolate_pos_encoding=True, return_dict=True)
        emb_i = model.embeddings(pixel_values_interp, interpolate_pos_encoding=True)
        pos_i = model.embeddings.interpolate_pos_encoding(emb_i, interp_size, interp_size)
        k2_i = k2(pixel_values=pixel_values_interp, interpolate_pos_encoding=True, return_dict=True)
        assert maxdiff(k2_i.last_hidden_state, out_i.last_hidden_state) < TOL
        feat_i = nn.functional.normalize(k2.model.post_layernorm(k2_i[0]), dim=-1)
        io.update(
            {
                "pixel_values_interp": pixel_values_interp,
                "position_embedding_interp": pos_i,
                "last_hidden_state_interp": out_i.last_hidden_state,
                "pooler_output_interp": out_i.pooler_output,
                "image_features_interp": feat_i,
            }
        )
        # Sanity: interpolation to the native size is the identity (transformers short-cuts it).
        same = model(pixel_values=pixel_values, interpolate_pos_encoding=True, return_dict=True)
        assert maxdiff(same.last_hidden_state, last) == 0.0
        ng = interp_size // patch
        interp_note = (
            f"pixel_values_interp [1,3,{interp_size},{interp_size}] (same generator, drawn after pixel_values) is run "
            f"with interpolate_pos_encoding=True: the {image // patch}x{image // patch} grid of patch position "
            f"embeddings (rows 1.. of position_embedding.weight, row-major, reshaped [1, g, g, D] -> permute to "
            f"[1, D, g, g]) is resized with torch.nn.functional.interpolate(mode='bicubic', align_corners=False) to "
            f"{ng}x{ng} (torch bicubic: Keys cubic with A = -0.75, NO antialias, border indices clamped; sample "
            f"position src = (dst + 0.5) * in/out - 0.5), permuted back and flattened row-major, and the class "
            f"position (row 0) is prepended unchanged. position_embedding_interp [1, {ng * ng + 1}, D] is that "
            f"table (model.embeddings.interpolate_pos_encoding(...)). New grid = floor(size / patch) per side. "
            f"When the grid already equals the trained one and H == W, transformers returns the table unchanged "
            f"(checked). last_hidden_state_interp / pooler_output_interp / image_features_interp are the outputs "
            f"for that input. "
        )

    d = case_dir(name)
    save_file(f32_contig(sd), os.path.join(d, "weights.safetensors"))
    io = f32_contig(io)
    save_file(io, os.path.join(d, "io.safetensors"))
    n_tok = (image // patch) ** 2 + 1
    print(f"[{name}] tokens {n_tok}; |kosmos2 vision - clip| = {d_k2:.1e}; io {shapes(io)}")

    notes = (
        f"transformers CLIPVisionModel(CLIPVisionConfig(hidden_size={hidden}, intermediate_size={inter}, "
        f"num_hidden_layers={layers}, num_attention_heads={heads} (head_dim {hidden // heads}), image_size={image}, "
        f"patch_size={patch}, hidden_act='quick_gelu', layer_norm_eps=1e-5), attn_implementation='eager') built "
        f"after torch.manual_seed({seed}), eval mode. " + PERTURB_NOTE + "pixel_values = randn "
        f"[{batch},3,{image},{image}] (torch.Generator seed {seed + 2000}). "
        f"WEIGHT KEYS: exactly CLIPVisionModel.state_dict() of transformers {VERSIONS['transformers']}, which has NO "
        "'vision_model.' prefix any more (keys are 'embeddings.class_embedding', 'embeddings.patch_embedding.weight', "
        "'embeddings.position_embedding.weight', 'pre_layrnorm.*', 'encoder.layers.{i}.{self_attn.{q,k,v,out}_proj,"
        "layer_norm1,mlp.fc1,mlp.fc2,layer_norm2}.*', 'post_layernorm.*'). Older CLIP checkpoints (and "
        "CLIPVisionModel of transformers 4.x) spell them 'vision_model.' + these; transformers 5 strips that prefix "
        "on load (conversion_mapping: CLIPVisionModel -> PrefixChange(prefix_to_remove='vision_model')). KOSMOS-2 "
        "checkpoints spell them 'vision_model.model.' + these (see kosmos2_image_features). Dropped non-persistent "
        f"buffers (not in state_dict): {non_persistent} (= arange(num_positions)). patch_embedding is a Conv2d "
        "without bias, weight [D,3,p,p]; all q/k/v/out/fc1/fc2 have bias. "
        "Forward: conv(stride=patch) -> flatten(2).transpose(1,2) (row-major over the grid, h then w) -> prepend "
        "class_embedding as token 0 -> + position_embedding -> embeddings (saved) -> pre_layrnorm -> hidden_states_0 "
        "-> per layer: h = h + out_proj(MHA(layer_norm1(h))); h = h + fc2(quick_gelu(fc1(layer_norm2(h)))) with "
        "quick_gelu(x) = x*sigmoid(1.702x), eager attention softmax(q k^T * head_dim^-0.5) v, no mask -> "
        f"hidden_states_i (i = 1..{layers}); last_hidden_state = hidden_states_{layers} (NO final norm). "
        "pooler_output = post_layernorm(last_hidden_state[:, 0]). "
        "image_features = torch.nn.functional.normalize(post_layernorm(last_hidden_state), dim=-1) over ALL tokens "
        "(F.normalize: x / max(||x||_2, 1e-12) per token vector). This is what Kosmos2Model.get_image_features and "
        "Kosmos2ForConditionalGeneration.get_image_features do in transformers "
        f"{VERSIONS['transformers']}: vision_output = self.vision_model(pixel_values, interpolate_pos_encoding); "
        "image_embeds = self.vision_model.model.post_layernorm(vision_output[0]); image_embeds = "
        "nn.functional.normalize(image_embeds, dim=-1); then image_to_text_projection(image_embeds). It was computed "
        "by loading these weights (keys prefixed 'model.') into transformers' Kosmos2VisionModel and running those "
        f"lines; Kosmos2VisionModel's last_hidden_state equals CLIPVisionModel's (max diff {d_k2:.1e}) and "
        f"normalize(clip.post_layernorm(last)) agrees to {d_feat:.1e}. " + interp_note
    )
    cfg = {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "head_dim": hidden // heads,
        "image_size": image,
        "patch_size": patch,
        "num_channels": 3,
        "num_positions": n_tok,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "batch": batch,
        "attn_implementation": "eager",
    }
    if interp_size:
        cfg["interp_image_size"] = interp_size
    write_meta(d, cfg, notes, {"io_shapes": shapes(io), "weight_shapes": shapes(f32_contig(sd)),
                               "dropped_non_persistent_buffers": non_persistent})


# --------------------------------------------------------------------------------------------------------------
# Case 3: transformers Kosmos2ImageToTextProjection
# --------------------------------------------------------------------------------------------------------------
def tiny_kosmos2_config(vision, latent_query_num):
    text = dict(
        embed_dim=32,
        attention_heads=4,
        layers=1,
        ffn_dim=64,
        vocab_size=64,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layer_norm_eps=1e-5,
    )
    return text, Kosmos2Config(
        text_config=text, vision_config=vision, latent_query_num=latent_query_num, attn_implementation="eager"
    )


PROJECTION_NOTE = (
    "Kosmos2ImageToTextProjection.forward(features): hidden = dense(features) [B, N, E] (Linear vision_hidden -> "
    "text embed_dim, with bias); latent_query = self.latent_query.unsqueeze(0).expand(B, -1, -1) [B, Q, E] (the raw "
    "parameter, no dense, no norm); key_value_states = torch.cat([hidden, latent_query], dim=1) [B, N + Q, E] (image "
    "tokens FIRST, latent queries LAST); out, attn = x_attn(hidden_states=latent_query, "
    "encoder_hidden_states=key_value_states, attention_mask=None). x_attn is KosmosTextAttention(is_decoder=False, "
    "add_inner_attn_layernorm=False, bias=True): q = q_proj(latent_query), k = k_proj(kv), v = v_proj(kv), split "
    "heads as [B, N, H, head_dim] -> [B, H, N, head_dim] (head index outer in the embed dim), eager attention: "
    "weights = softmax(q @ k^T * head_dim^-0.5) (the scale multiplies the scores; q is not pre-scaled in this "
    "version), no mask, no dropout in eval, out = weights @ v -> transpose back -> reshape [B, Q, E] -> out_proj. "
    "NO residual, NO layer norm, NO inner_attn_ln. Returns (image_embeds [B, Q, E], projection_attentions "
    "[B, H, Q, N + Q]). "
)


def case_projection(name="kosmos2_projection", seed=5):
    B, N, VH, Q = 2, 10, 24, 8
    torch.manual_seed(seed)
    text, config = tiny_kosmos2_config(
        dict(hidden_size=VH, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
             patch_size=14),
        Q,
    )
    proj = Kosmos2ImageToTextProjection(config).eval()
    assert proj.x_attn.config._attn_implementation == "eager" and proj.x_attn.inner_attn_ln is None
    perturb(proj, seed + 1000)
    proj.eval()
    E, H = text["embed_dim"], text["attention_heads"]

    g = torch.Generator().manual_seed(seed + 2000)
    features = torch.randn(B, N, VH, generator=g)
    image_embeds, attn = proj(features)
    assert attn is not None and tuple(attn.shape) == (B, H, Q, N + Q), attn.shape
    assert tuple(image_embeds.shape) == (B, Q, E)
    # Sensitivity: how much the latent queries as extra keys/values matter.
    hidden = proj.dense(features)
    lq = proj.latent_query.unsqueeze(0).expand(B, -1, -1)
    only_img, _ = proj.x_attn(hidden_states=lq, encoder_hidden_states=hidden)
    sens = maxdiff(only_img, image_embeds)
    print(f"[{name}] image_embeds {tuple(image_embeds.shape)} attn {tuple(attn.shape)}; "
          f"sensitivity to concatenating latents into kv: {sens:.3e}")

    sd, non_persistent = persistent_state_dict(proj)
    d = case_dir(name)
    save_file(f32_contig(sd), os.path.join(d, "weights.safetensors"))
    io = f32_contig({"features": features, "image_embeds": image_embeds, "projection_attentions": attn})
    save_file(io, os.path.join(d, "io.safetensors"))
    notes = (
        f"transformers Kosmos2ImageToTextProjection(Kosmos2Config(text_config={text}, vision_config.hidden_size={VH}, "
        f"latent_query_num={Q}, attn_implementation='eager')) built after torch.manual_seed({seed}) (plain nn.Module: "
        "nn.Linear default init, latent_query = torch.randn), eval mode. Every nn.Linear bias then got 0.05*N(0,1) "
        f"(torch.Generator seed {seed + 1000}, named_modules() order; there is no LayerNorm in this module). "
        f"features = randn [{B},{N},{VH}] (torch.Generator seed {seed + 2000}); "
        "in KOSMOS-2 they are the L2-normalised post_layernorm'd vision tokens (see clip_p14 image_features), here "
        "plain randn. Weight keys are the module's own state_dict keys (prefix 'image_to_text_projection.' in a "
        "Kosmos2Model checkpoint). " + PROJECTION_NOTE + f"Sensitivity: attending to the image tokens only "
        f"(no latents in kv) changes image_embeds by max {sens:.3e}."
    )
    cfg = {
        "vision_hidden_size": VH,
        "embed_dim": E,
        "attention_heads": H,
        "head_dim": E // H,
        "latent_query_num": Q,
        "batch": B,
        "num_image_tokens": N,
        "attn_implementation": "eager",
    }
    write_meta(d, cfg, notes, {"io_shapes": shapes(io), "weight_shapes": shapes(f32_contig(sd)),
                               "dropped_non_persistent_buffers": non_persistent})


# --------------------------------------------------------------------------------------------------------------
# Case 4: lucidrains flamingo_pytorch.PerceiverResampler
# --------------------------------------------------------------------------------------------------------------
def case_perceiver(name="perceiver", seed=6):
    DIM, DEPTH, DH, HEADS, NL, FF, NME = 32, 2, 8, 4, 6, 2, 2
    B, N = 2, 10
    torch.manual_seed(seed)
    model = PerceiverResampler(dim=DIM, depth=DEPTH, dim_head=DH, heads=HEADS, num_latents=NL,
                               num_media_embeds=NME, ff_mult=FF).eval()
    perturb(model, seed + 1000)
    model.eval()

    g = torch.Generator().manual_seed(seed + 2000)
    x = torch.randn(B, N, DIM, generator=g)
    x_media2 = torch.randn(1, 2, 5, DIM, generator=g)

    out = model(x)
    assert tuple(out.shape) == (B, 1, NL, DIM), out.shape
    grad_out = torch.randn(out.shape, generator=g)
    out_4d = model(x.unsqueeze(1))
    assert maxdiff(out, out_4d) == 0.0
    out_media2 = model(x_media2)
    assert tuple(out_media2.shape) == (1, 2, NL, DIM)

    # Backprop: loss = sum(out * grad_out); gradients w.r.t. every parameter and the input x.
    params = dict(model.named_parameters())
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        o = model(xg)
        loss = (o * grad_out).sum()
        loss.backward()
    grads = {f"grad_{n}": p.grad.detach().clone() for n, p in params.items()}
    grads["grad_x"] = xg.grad.detach().clone()
    assert maxdiff(o.detach(), out) == 0.0

    # Finite-difference spot check of grad_latents (float64 copy) to prove the gradient is the one of this loss.
    m64 = PerceiverResampler(dim=DIM, depth=DEPTH, dim_head=DH, heads=HEADS, num_latents=NL,
                             num_media_embeds=NME, ff_mult=FF).double().eval()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    eps = 1e-6
    i, j = 3, 7
    m64.latents[i, j] += eps
    lp = float((m64(x.double()) * grad_out.double()).sum())
    m64.latents[i, j] -= 2 * eps
    lm = float((m64(x.double()) * grad_out.double()).sum())
    m64.latents[i, j] += eps
    fd = (lp - lm) / (2 * eps)
    an = float(grads["grad_latents"][i, j])
    assert abs(fd - an) < 1e-4 * max(1.0, abs(fd)), (fd, an)

    # Sensitivity of the "latents are also keys/values" detail.
    print(f"[{name}] out {tuple(out.shape)}, out_media2 {tuple(out_media2.shape)}; "
          f"fd check grad_latents[{i},{j}] {fd:.6f} vs {an:.6f}; grads {len(grads)}")

    sd = model.state_dict()
    d = case_dir(name)
    save_file(f32_contig(sd), os.path.join(d, "weights.safetensors"))
    io = {"x": x, "output": out, "grad_out": grad_out, "x_media2": x_media2, "output_media2": out_media2}
    io.update(grads)
    io = f32_contig(io)
    save_file(io, os.path.join(d, "io.safetensors"))

    notes = (
        f"lucidrains flamingo-pytorch {VERSIONS['flamingo-pytorch']} (PyPI 'flamingo-pytorch', module "
        "flamingo_pytorch.flamingo_pytorch.PerceiverResampler; needs einops + einops-exts) built as "
        f"PerceiverResampler(dim={DIM}, depth={DEPTH}, dim_head={DH}, heads={HEADS}, num_latents={NL}, "
        f"num_media_embeds={NME}, ff_mult={FF}) after torch.manual_seed({seed}), eval mode (it has no dropout). "
        "Every nn.LayerNorm then got weight = 1 + 0.1*N(0,1), bias = 0.1*N(0,1) (torch.Generator seed "
        f"{seed + 1000}, named_modules() order); no Linear has a bias; latents and media_pos_emb keep their "
        "torch.randn init. "
        f"Inputs (torch.Generator seed {seed + 2000}, in this order): x = randn [{B},{N},{DIM}], x_media2 = randn "
        f"[1,2,5,{DIM}], grad_out = randn [{B},1,{NL},{DIM}]. LAYOUT: forward(x) takes x [b, n, d] (rearranged to "
        "[b, 1, n, d], i.e. one media per sample) or [b, t, n, d] (t media/time steps, each resampled separately); "
        f"output is [b, t, num_latents, d], so output = [{B},1,{NL},{DIM}] for x and [1,2,{NL},{DIM}] for x_media2 "
        "(passing x.unsqueeze(1) gives the identical result, checked). "
        "STRUCTURE (exact): x = x + media_pos_emb[:t] (parameter [num_media_embeds, 1, d], broadcast over the n "
        "tokens; media t uses row t); latents = self.latents [num_latents, d] repeated to [b, t, num_latents, d]; "
        "for each of the depth layers (attn, ff): latents = attn(x, latents) + latents; latents = ff(latents) + "
        "latents; return norm(latents) (final LayerNorm). "
        "PerceiverAttention(x, latents): xn = norm_media(x); ln = norm_latents(latents) (both LayerNorm(d), eps "
        "1e-5, applied inside EVERY layer to the same media x); q = to_q(ln) (Linear d -> heads*dim_head, no bias); "
        "kv_input = cat([xn, ln], dim=-2) (media tokens FIRST, then the normed latents: [b, t, n + num_latents, d]); "
        "k, v = to_kv(kv_input).chunk(2, dim=-1) (to_kv: Linear d -> 2*heads*dim_head, no bias; first half of the "
        "output features = k, second half = v); heads split as '(h d)' -> head index outer, dim_head inner; "
        "q = q * dim_head^-0.5 (scale applied to q after projection); sim = q k^T; sim = sim - amax(sim, -1) "
        "(detached; softmax-invariant); attn = softmax(sim, -1); out = attn v -> '(h d)' merge -> to_out (Linear "
        "heads*dim_head -> d, no bias). No mask. "
        "FeedForward = Sequential(LayerNorm(d), Linear(d, d*ff_mult, bias=False), GELU() (exact erf), "
        "Linear(d*ff_mult, d, bias=False)), keys layers.{i}.1.0 (norm), .1.1 (in), .1.3 (out); attention keys "
        "layers.{i}.0.{norm_media,norm_latents,to_q,to_kv,to_out}. "
        "GRADIENTS: loss = sum(output * grad_out) for input x; grad_<param name> = d loss / d param for EVERY "
        "parameter (e.g. grad_latents [num_latents, d], grad_layers.0.0.to_q.weight [heads*dim_head, d], "
        "grad_media_pos_emb), grad_x = d loss / d x. A float64 central-difference check of grad_latents[3,7] agreed "
        f"({fd:.6f} vs {an:.6f})."
    )
    cfg = {
        "dim": DIM,
        "depth": DEPTH,
        "dim_head": DH,
        "heads": HEADS,
        "inner_dim": DH * HEADS,
        "num_latents": NL,
        "num_media_embeds": NME,
        "ff_mult": FF,
        "layer_norm_eps": 1e-5,
        "batch": B,
        "num_media_tokens": N,
        "package": "flamingo-pytorch",
        "class": "flamingo_pytorch.PerceiverResampler",
    }
    write_meta(d, cfg, notes, {"io_shapes": shapes(io), "weight_shapes": shapes(f32_contig(sd))})


# --------------------------------------------------------------------------------------------------------------
# Case 5: tiny end-to-end Kosmos2Model.get_image_features (vision tower + normalise + projection), real KOSMOS-2 keys
# --------------------------------------------------------------------------------------------------------------
def case_kosmos2_image_features(name="kosmos2_image_features", seed=7):
    B, IMG, P, VH, Q = 2, 28, 14, 24, 8
    vision = dict(hidden_size=VH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=IMG,
                  patch_size=P, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    text, config = tiny_kosmos2_config(vision, Q)
    model = Kosmos2Model(config).eval()
    assert model.config.vision_config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "eager"
    perturb(model.vision_model, seed + 1000)
    perturb(model.image_to_text_projection, seed + 1001)
    model.eval()

    g = torch.Generator().manual_seed(seed + 2000)
    pixel_values = torch.randn(B, 3, IMG, IMG, generator=g)
    res = model.get_image_features(pixel_values=pixel_values, return_dict=True)
    image_embeds = res.pooler_output
    proj_attn = res.projection_attentions
    last = res.last_hidden_state
    feats = nn.functional.normalize(model.vision_model.model.post_layernorm(last), dim=-1)
    re, ra = model.image_to_text_projection(feats)
    assert maxdiff(re, image_embeds) == 0.0 and maxdiff(ra, proj_attn) == 0.0
    n_tok = (IMG // P) ** 2 + 1
    assert tuple(image_embeds.shape) == (B, Q, text["embed_dim"]) and tuple(proj_attn.shape) == (
        B, text["attention_heads"], Q, n_tok + Q)

    full_sd, non_persistent = persistent_state_dict(model)
    sd = {k: v for k, v in full_sd.items()
          if k.startswith("vision_model.") or k.startswith("image_to_text_projection.")}
    d = case_dir(name)
    save_file(f32_contig(sd), os.path.join(d, "weights.safetensors"))
    io = f32_contig({"pixel_values": pixel_values, "last_hidden_state": last, "image_features": feats,
                     "image_embeds": image_embeds, "projection_attentions": proj_attn})
    save_file(io, os.path.join(d, "io.safetensors"))
    print(f"[{name}] image_embeds {tuple(image_embeds.shape)} projection_attentions {tuple(proj_attn.shape)}")
    notes = (
        f"transformers Kosmos2Model(Kosmos2Config(text_config={text}, vision_config={vision}, latent_query_num={Q}, "
        f"attn_implementation='eager')) built after torch.manual_seed({seed}), eval mode; vision_model perturbed "
        f"with generator seed {seed + 1000} and image_to_text_projection with {seed + 1001} (" + PERTURB_NOTE +
        f"). pixel_values = randn [{B},3,{IMG},{IMG}] (generator seed {seed + 2000}). Outputs of "
        "model.get_image_features(pixel_values, return_dict=True): last_hidden_state = vision tower output (no final "
        "norm), image_embeds = its pooler_output field (= projected image embeddings [B, latent_query_num, "
        "embed_dim], which replace the image placeholder tokens in the text), projection_attentions [B, heads, Q, "
        "tokens + Q]. image_features = normalize(vision_model.model.post_layernorm(last_hidden_state), dim=-1) (the "
        "projection's input; re-running the projection on it reproduces image_embeds exactly). WEIGHT KEYS: the real "
        "KOSMOS-2 checkpoint layout, 'vision_model.model.' + CLIP vision keys and 'image_to_text_projection.' + "
        "projection keys; the text_model.* keys of this model were NOT saved (only the image path is tested here). "
        f"Non-persistent buffers of the whole model (not saved): {non_persistent}. " + PROJECTION_NOTE
    )
    cfg = {"vision_config": vision, "text_embed_dim": text["embed_dim"], "text_attention_heads": text["attention_heads"],
           "latent_query_num": Q, "batch": B, "num_image_tokens": n_tok, "attn_implementation": "eager"}
    write_meta(d, cfg, notes, {"io_shapes": shapes(io), "weight_shapes": shapes(f32_contig(sd)),
                               "dropped_non_persistent_buffers": non_persistent})


def main():
    os.makedirs(OUT_ROOT, exist_ok=True)
    case_clip("clip_p14", seed=11, hidden=32, inter=64, layers=2, heads=4, image=56, patch=14, batch=2,
              interp_size=84)
    case_clip("clip_p8", seed=12, hidden=48, inter=96, layers=3, heads=6, image=32, patch=8, batch=1,
              interp_size=48)
    case_projection()
    case_perceiver()
    case_kosmos2_image_features()

    total = 0
    print("written files:")
    for root, _, files in sorted(os.walk(OUT_ROOT)):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            sz = os.path.getsize(p)
            total += sz
            print(f"  {os.path.relpath(p, REPO_ROOT)}  {sz} bytes")
    print(f"total {total} bytes")
    assert total < 2 * 1024 * 1024


if __name__ == "__main__":
    main()
