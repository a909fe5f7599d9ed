#!/usr/bin/env python3
"""Generate reference fixtures for the KOSMOS decoder port (MAGNETO sub-LN + XPOS, torchscale 0.3.0;
sinusoidal positions from transformers' KOSMOS-2).

Run from the repository root:

    .venv-ref/bin/python scripts/make_decoder_fixtures.py

Writes fixtures/decoder/<case>/{meta.json, weights.safetensors, io.safetensors} (which files exist depends on the
case) and fixtures/decoder/README.md is maintained by hand next to them.

This script only *calls* torchscale / transformers; it does not re-implement them. All tensors are float32 (except
integer token ids), batch-first [batch, seq, embed].
"""

import hashlib
import importlib.metadata
import json
import math
import os
import sys

# torchscale 0.3.0 imports `timm.models.layers.drop_path` (stochastic depth). timm is not installed in the reference
# venv, so a tiny local stand-in (identity drop_path; drop_path_rate is always 0 here) is put on sys.path first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "_stubs"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from torchscale.architecture.config import DecoderConfig  # noqa: E402
from torchscale.architecture.decoder import Decoder  # noqa: E402
from transformers.models.kosmos2.modeling_kosmos2 import (  # noqa: E402
    Kosmos2TextSinusoidalPositionalEmbedding,
)

torch.set_default_dtype(torch.float32)
torch.set_grad_enabled(False)

SCRIPT_REL = "scripts/make_decoder_fixtures.py"
REPO_ROOT = os.path.dirname(_HERE)
OUT_ROOT = os.path.join(REPO_ROOT, "fixtures", "decoder")
TOL = 1e-5

with open(os.path.abspath(__file__), "rb") as _f:
    SCRIPT_SHA256 = hashlib.sha256(_f.read()).hexdigest()

VERSIONS = {
    "torch": torch.__version__,
    "transformers": importlib.metadata.version("transformers"),
    "torchscale": importlib.metadata.version("torchscale"),
    "fairscale": importlib.metadata.version("fairscale"),
    "safetensors": importlib.metadata.version("safetensors"),
    "python": sys.version.split()[0],
}

XPOS_OFFSET_RULE = (
    "torchscale 0.3.0 MultiheadAttention.forward (self-attention with xpos): keys are ALWAYS rotated/scaled with "
    "offset 0 over the whole (cached + new) key sequence, after the new k has been appended to the cache "
    "(the cache 'prev_key' holds k BEFORE xpos, already reshaped per head; q is multiplied by head_dim^-0.5 right "
    "after q_proj, before xpos). Queries get offset = src_len - 1 (src_len = total key length incl. the new "
    "token(s)) exactly when an incremental_state dict is passed AND is_first_step is False; otherwise (no "
    "incremental_state, or is_first_step=True) the query offset is 0. XPOS.forward(x, offset) uses "
    "T = len(x) + offset total positions, scale positions n = (-T)//2 .. (-T)//2 + T - 1 (centred, Python floor "
    "division), rotation positions 0..T-1, and keeps the last len(x) rows when T > len(x). So for a single new "
    "query token q and k share T = src_len and the query row is the last one. Consequence: a multi-token call with "
    "a non-empty cache and is_first_step=False would be mis-positioned (T_q = L + src_len - 1 != T_k); the Decoder "
    "therefore uses is_first_step (read from incremental_state['is_first_step']) for a multi-token prefill, which "
    "also switches the causal mask on. With is_first_step=False and an incremental_state the Decoder passes NO "
    "attention mask (it assumes one new token)."
)


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


def decoder_config(embed_dim, heads, ffn_dim, layers, xpos, vocab_size=-1, share=False):
    return DecoderConfig(
        decoder_embed_dim=embed_dim,
        decoder_attention_heads=heads,
        decoder_ffn_embed_dim=ffn_dim,
        decoder_layers=layers,
        decoder_normalize_before=True,
        subln=True,
        deepnorm=False,
        activation_fn="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        drop_path_rate=0.0,
        no_scale_embedding=True,
        layernorm_embedding=False,
        xpos_rel_pos=xpos,
        xpos_scale_base=512,
        layernorm_eps=1e-5,
        vocab_size=vocab_size,
        share_decoder_input_output_embed=share,
        no_output_layer=(vocab_size <= 0),
    )


def meta_config(embed_dim, heads, ffn_dim, layers, xpos, batch=None, seq_len=None, vocab_size=None):
    cfg = {
        "embed_dim": embed_dim,
        "attention_heads": heads,
        "ffn_dim": ffn_dim,
        "layers": layers,
        "xpos": bool(xpos),
        "xpos_scale_base": 512,
        "subln": True,
        "activation": "gelu",
        "layer_norm_eps": 1e-5,
    }
    if batch is not None:
        cfg["batch"] = batch
    if seq_len is not None:
        cfg["seq_len"] = seq_len
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    return cfg


def perturb_layer_norms(module, seed):
    """LayerNorms are initialised to weight=1, bias=0, which would make a port that swaps/ignores norm parameters
    pass. Give every LayerNorm a random affine (weight 1 + 0.1 N(0,1), bias 0.1 N(0,1)) from its own seed."""
    g = torch.Generator().manual_seed(seed)
    for _, m in module.named_modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def causal_mask(t):
    # Same construction as torchscale Decoder.forward (upper triangle -inf, 0 elsewhere).
    return torch.triu(torch.zeros([t, t]).float().fill_(float("-inf")), 1)


def maxdiff(a, b):
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------------------------------
# Cases 1 & 2: a single DecoderLayer
# --------------------------------------------------------------------------------------------------------------
def case_layer(name, xpos, seed):
    E, H, F, B, T = 32, 4, 64, 2, 7
    torch.manual_seed(seed)
    cfg = decoder_config(E, H, F, 1, xpos)
    # Built through a 1-layer Decoder so that the MAGNETO init scaling (sqrt(log(2*1))) is applied like in practice;
    # only decoder.layers[0] is used (the Decoder's final layer_norm is NOT part of this case).
    dec = Decoder(cfg).eval()
    layer = dec.layers[0]
    perturb_layer_norms(layer, seed + 1000)
    layer.eval()

    g = torch.Generator().manual_seed(seed + 2000)
    x = torch.randn(B, T, E, generator=g)

    # torchscale 0.3.0 layers are batch-first: MultiheadAttention.forward does `bsz, tgt_len, embed_dim = query.size()`.
    full_out, _, _, _ = layer(x, self_attn_mask=causal_mask(T))

    state = {}
    steps = []
    for t in range(T):
        y, _, _, _ = layer(x[:, t : t + 1, :], incremental_state=state)  # is_first_step=False (default)
        steps.append(y)
    step_out = torch.cat(steps, dim=1)

    # Extra: prefill of the first P tokens in one call (is_first_step=True, causal mask), then one token per call.
    P = 4
    state2 = {}
    pre, _, _, _ = layer(x[:, :P, :], incremental_state=state2, self_attn_mask=causal_mask(P), is_first_step=True)
    outs = [pre]
    for t in range(P, T):
        y, _, _, _ = layer(x[:, t : t + 1, :], incremental_state=state2)
        outs.append(y)
    prefill_out = torch.cat(outs, dim=1)

    d_step = maxdiff(full_out, step_out)
    d_pre = maxdiff(full_out, prefill_out)
    print(f"[{name}] max|full_out - step_out| = {d_step:.3e}; max|full_out - step_out_prefill4| = {d_pre:.3e}")
    assert d_step < TOL, f"{name}: full vs step mismatch {d_step}"
    assert d_pre < TOL, f"{name}: full vs prefill+step mismatch {d_pre}"

    sensitivity = None
    if xpos:
        # How much the xpos *scale* (zeta^(n/512)) part matters at this length: same layer with scale buffer = 1
        # (pure rotary, rotate_every_two).
        orig = layer.self_attn.xpos.scale.clone()
        layer.self_attn.xpos.scale.fill_(1.0)
        rot_only, _, _, _ = layer(x, self_attn_mask=causal_mask(T))
        layer.self_attn.xpos.scale.copy_(orig)
        sensitivity = maxdiff(full_out, rot_only)
        print(f"[{name}] sensitivity: max|full_out - out(with xpos.scale:=1)| = {sensitivity:.3e}")

    sd = {f"layers.0.{k}": v for k, v in layer.state_dict().items()}
    d = case_dir(name)
    save_file(f32_contig(sd), os.path.join(d, "weights.safetensors"))
    save_file(
        f32_contig({"x": x, "full_out": full_out, "step_out": step_out, "step_out_prefill4": prefill_out}),
        os.path.join(d, "io.safetensors"),
    )
    notes = (
        f"Single torchscale DecoderLayer (decoder.layers[0] of a 1-layer torchscale Decoder built with "
        f"torch.manual_seed({seed}); the Decoder's final layer_norm is NOT applied). MAGNETO init scaling with N=1 "
        f"(sqrt(log 2)) was applied by the Decoder constructor; afterwards every LayerNorm (self_attn_layer_norm, "
        f"self_attn.inner_attn_ln, final_layer_norm, ffn.ffn_layernorm) got a random affine: weight = 1 + 0.1*N(0,1), "
        f"bias = 0.1*N(0,1) (generator seed {seed + 1000}). x = randn [batch, seq, embed] (generator seed "
        f"{seed + 2000}). Layout: torchscale 0.3.0 DecoderLayer/MultiheadAttention are batch-FIRST "
        f"([batch, seq, embed]), so no transposes were needed. full_out = layer(x, self_attn_mask=triu(-inf, 1)) "
        f"(the mask torchscale's Decoder builds). step_out = the same layer called once per token with "
        f"x[:, t:t+1] and one shared incremental_state dict (first call = token 0 with an empty dict, "
        f"is_first_step=False, no mask), outputs concatenated along seq. step_out_prefill4 = one call on tokens 0..3 "
        f"with is_first_step=True and the causal mask, then tokens 4..6 one per call. Self-consistency: "
        f"max|full-step| = {d_step:.3e}, max|full-prefill4| = {d_pre:.3e}. "
        + (
            f"XPOS sensitivity: setting xpos.scale to 1 (pure rotary) changes full_out by max {sensitivity:.3e}. "
            if xpos
            else "xpos_rel_pos=False: no self_attn.xpos module and no xpos.scale buffer; no positional information "
            "at all inside the layer (outputs depend on position only via the causal mask). "
        )
        + "Weight keys are the layer's own state_dict keys prefixed with 'layers.0.'; self_attn.xpos.scale is a "
        "persistent buffer (zeta_i = (2i + 0.4*head_dim)/(1.4*head_dim)). "
        + XPOS_OFFSET_RULE
    )
    write_meta(d, meta_config(E, H, F, 1, xpos, batch=B, seq_len=T), notes)


# --------------------------------------------------------------------------------------------------------------
# Case 3: 2-layer Decoder with final layer_norm
# --------------------------------------------------------------------------------------------------------------
def case_stack2(name="stack2_xpos", seed=3):
    E, H, F, L, B, T = 32, 4, 64, 2, 2, 7
    torch.manual_seed(seed)
    cfg = decoder_config(E, H, F, L, True)
    dec = Decoder(cfg).eval()  # no embed_tokens, no embed_positions, no output projection (vocab_size=-1)
    perturb_layer_norms(dec, seed + 1000)
    dec.eval()
    assert dec.layer_norm is not None and dec.embed_positions is None and dec.output_projection is None

    g = torch.Generator().manual_seed(seed + 2000)
    x = torch.randn(B, T, E, generator=g)
    # Decoder.forward needs prev_output_tokens (used for its size and the in-incremental slicing only, since there
    # are no embed_positions); dummy zeros are passed.
    dummy = torch.zeros(B, T, dtype=torch.long)

    full_out, _ = dec(dummy, token_embeddings=x, features_only=True)

    # Incremental: Decoder.forward_embedding slices `tokens` to the last position when not first step, but it uses a
    # passed token_embedding AS IS, so only the newest token's embedding [B, 1, E] is fed at each step.
    state = {}
    steps = []
    for t in range(T):
        y, _ = dec(dummy[:, : t + 1], token_embeddings=x[:, t : t + 1, :], incremental_state=state,
                   features_only=True)
        steps.append(y)
    step_out = torch.cat(steps, dim=1)

    # Prefill of 4 tokens via incremental_state["is_first_step"] = True, then flip it off for the next tokens.
    P = 4
    state2 = {"is_first_step": True}
    pre, _ = dec(dummy[:, :P], token_embeddings=x[:, :P, :], incremental_state=state2, features_only=True)
    state2["is_first_step"] = False
    outs = [pre]
    for t in range(P, T):
        y, _ = dec(dummy[:, : t + 1], token_embeddings=x[:, t : t + 1, :], incremental_state=state2,
                   features_only=True)
        outs.append(y)
    prefill_out = torch.cat(outs, dim=1)

    d_step = maxdiff(full_out, step_out)
    d_pre = maxdiff(full_out, prefill_out)
    print(f"[{name}] max|full_out - step_out| = {d_step:.3e}; max|full_out - step_out_prefill4| = {d_pre:.3e}")
    assert d_step < TOL and d_pre < TOL

    sd = {k: v for k, v in dec.state_dict().items() if k.startswith("layers.") or k.startswith("layer_norm.")}
    dropped = sorted(k for k in dec.state_dict() if k not in sd)
    d = case_dir(name)
    save_file(f32_contig(sd), os.path.join(d, "weights.safetensors"))
    save_file(
        f32_contig({"x": x, "full_out": full_out, "step_out": step_out, "step_out_prefill4": prefill_out}),
        os.path.join(d, "io.safetensors"),
    )
    notes = (
        f"torchscale Decoder, {L} layers, built with torch.manual_seed({seed}) (MAGNETO init scaling sqrt(log(2*{L})) "
        f"applied by the constructor), then every LayerNorm (incl. the final decoder layer_norm) got a random affine "
        f"weight = 1 + 0.1*N(0,1), bias = 0.1*N(0,1) (generator seed {seed + 1000}). No embed_tokens, no "
        f"embed_positions, no output projection, no_scale_embedding=True (embed_scale 1), no layernorm_embedding. "
        f"x = randn [batch, seq, embed] (generator seed {seed + 2000}) fed as token_embeddings; prev_output_tokens = "
        f"dummy zeros (needed by Decoder.forward for its size only). full_out = Decoder(dummy, token_embeddings=x, "
        f"features_only=True)[0] = final layer_norm(layer1(layer0(x))) with the Decoder's causal mask; the final "
        f"layer_norm IS applied (decoder_normalize_before=True), individual layers have no output norm. step_out: "
        f"one call per token t with prev_output_tokens=dummy[:, :t+1] and token_embeddings=x[:, t:t+1] (Decoder "
        f"slices tokens to the last one in incremental mode but uses a given token_embedding unchanged, so only the "
        f"new embedding must be passed) and one shared incremental_state dict (per-layer sub-dicts keyed by int "
        f"layer index). step_out_prefill4: incremental_state={{'is_first_step': True}} for tokens 0..3 in one call "
        f"(causal mask on, xpos query offset 0), then is_first_step set False for tokens 4..6. Self-consistency: "
        f"max|full-step| = {d_step:.3e}, max|full-prefill4| = {d_pre:.3e}. Dropped from the state dict: "
        f"{dropped if dropped else 'nothing (only layers.* and layer_norm.* exist)'}. "
        + XPOS_OFFSET_RULE
    )
    write_meta(d, meta_config(E, H, F, L, True, batch=B, seq_len=T), notes)


# --------------------------------------------------------------------------------------------------------------
# Case 4: transformers' Kosmos2TextSinusoidalPositionalEmbedding
# --------------------------------------------------------------------------------------------------------------
def case_sinusoidal(name="sinusoidal"):
    NP, PAD = 20, 1
    m32 = Kosmos2TextSinusoidalPositionalEmbedding(num_positions=NP, embedding_dim=32, padding_idx=PAD)
    m33 = Kosmos2TextSinusoidalPositionalEmbedding(num_positions=NP, embedding_dim=33, padding_idx=PAD)
    table_d32 = m32.weights.clone()
    table_d33 = m33.weights.clone()
    input_ids = torch.tensor([[1, 1, 5, 6, 7], [5, 6, 7, 8, 9]], dtype=torch.int64)
    out0 = m32(input_ids=input_ids, cache_length=0)
    out3 = m32(input_ids=input_ids, cache_length=3)
    # The table must not have been regrown by these calls (max_pos = pad+1+seq+cache = 10 < 22 rows).
    assert m32.weights.shape[0] == NP + 2
    pos0 = Kosmos2TextSinusoidalPositionalEmbedding.create_position_ids_from_input_ids(input_ids, PAD, 0)
    pos3 = Kosmos2TextSinusoidalPositionalEmbedding.create_position_ids_from_input_ids(input_ids, PAD, 3)
    assert torch.equal(out0, table_d32[pos0]) and torch.equal(out3, table_d32[pos3])
    assert float(table_d32[PAD].abs().max()) == 0.0 and float(table_d33[:, -1].abs().max()) == 0.0

    d = case_dir(name)
    save_file(
        f32_contig(
            {
                "table_d32": table_d32,
                "table_d33": table_d33,
                "input_ids": input_ids,
                "positions_out": out0,
                "positions_out_past3": out3,
            }
        ),
        os.path.join(d, "io.safetensors"),
    )
    print(f"[{name}] table_d32 {tuple(table_d32.shape)} table_d33 {tuple(table_d33.shape)} "
          f"position ids (cache 0) {pos0.tolist()} (cache 3) {pos3.tolist()}")
    notes = (
        "transformers Kosmos2TextSinusoidalPositionalEmbedding(num_positions=20, embedding_dim=D, padding_idx=1). "
        "The module adds offset 2, so the `weights` buffer (non-persistent) has num_positions + 2 = 22 rows; "
        "table_d32 / table_d33 are that whole buffer at construction (row 1 = padding row, all zeros; D=33 gets a "
        "zero last column). Row p = [sin(p*f_0..f_{h-1}) | cos(p*f_0..f_{h-1})] (halves concatenated), h = D//2, "
        "f_j = exp(-j*ln(10000)/(h-1)). In transformers " + VERSIONS["transformers"] + " the forward signature is "
        "forward(input_ids=None, inputs_embeds=None, cache_length=0, position_ids=None) (there is no "
        "past_key_values_length argument any more). Exact calls: positions_out = module_d32(input_ids=input_ids, "
        "cache_length=0); positions_out_past3 = module_d32(input_ids=input_ids, cache_length=3). Position ids = "
        "(cumsum(ids != 1) + cache_length) * (ids != 1) + 1, i.e. cache 0: "
        f"{pos0.tolist()}, cache 3: {pos3.tolist()} (pads stay at 1 -> zero vector; cache_length is added to every "
        "non-pad position regardless of left padding). The table is regrown (make_weights(max_pos + 2)) only when "
        "1 + 1 + seq_len + cache_length > rows; not triggered here. input_ids is int64."
    )
    cfg = {
        "embed_dim": 32,
        "embed_dim_odd": 33,
        "num_positions": NP,
        "offset": 2,
        "padding_idx": PAD,
        "batch": 2,
        "seq_len": 5,
    }
    write_meta(d, cfg, notes)


# --------------------------------------------------------------------------------------------------------------
# Case 5: MAGNETO (sub-LN) init statistics
# --------------------------------------------------------------------------------------------------------------
SCALED_PATTERNS = ["fc1", "fc2", "out_proj", "v_proj"]


def case_magneto_init(name="magneto_init"):
    E, H, F, N = 256, 4, 512, 6
    torch.manual_seed(0)
    dec = Decoder(decoder_config(E, H, F, N, False))
    init_scale = math.sqrt(math.log(2 * N))  # decoder-only (is_encoder_decoder=False) branch of Decoder.__init__

    # Empirical check 1: same seed, same construction order, but subln=False (decoder_normalize_before stays True).
    # LayerNorm construction draws no random numbers, so every Linear gets the same raw draws; subln=False skips the
    # scaling loop (and the inner_attn_ln / ffn_layernorm modules).
    torch.manual_seed(0)
    cfg_ref = decoder_config(E, H, F, N, False)
    cfg_ref.subln = False
    ref = Decoder(cfg_ref)
    ref_params = dict(ref.named_parameters())
    ratios = {}
    params = []
    for pname, p in dec.named_parameters():
        if not (pname.startswith("layers.") or pname.startswith("layer_norm.")):
            continue
        scaled = any(s in pname for s in SCALED_PATTERNS)
        entry = {
            "name": pname,
            "shape": list(p.shape),
            "std": float(p.double().std(unbiased=False)),
            "mean": float(p.double().mean()),
            "max_abs": float(p.double().abs().max()),
            "scaled": scaled,
        }
        params.append(entry)
        if pname in ref_params:
            r = ref_params[pname]
            if scaled:
                ratio = float((p.double() / r.double()).median())
                err = float((p - r * init_scale).abs().max())
                assert err < 1e-6, (pname, err)
                ratios[pname] = ratio
            else:
                assert torch.equal(p, r), pname
        else:
            assert "inner_attn_ln" in pname or "ffn_layernorm" in pname, pname
    emp_ratio = sum(ratios.values()) / len(ratios)
    assert abs(emp_ratio - init_scale) < 1e-5

    # Empirical check 2: a fresh nn.Linear with the same fan_in has the unscaled std; the scaled params are x init_scale.
    torch.manual_seed(123)
    fresh = nn.Linear(E, E)
    fresh_w_std = float(fresh.weight.double().std(unbiased=False))
    v_std = float(dec.layers[0].self_attn.v_proj.weight.double().std(unbiased=False))
    q_std = float(dec.layers[0].self_attn.q_proj.weight.double().std(unbiased=False))
    fresh_ffn = nn.Linear(F, E)
    fc2_std = float(dec.layers[0].ffn.fc2.weight.double().std(unbiased=False))
    fresh_fc2_std = float(fresh_ffn.weight.double().std(unbiased=False))
    print(f"[{name}] init_scale sqrt(log(2N)) = {init_scale:.6f}; exact ratio scaled/unscaled = {emp_ratio:.6f}; "
          f"std ratios v_proj/fresh {v_std / fresh_w_std:.4f}, fc2/fresh {fc2_std / fresh_fc2_std:.4f}, "
          f"q_proj/fresh {q_std / fresh_w_std:.4f}")

    d = case_dir(name)
    # No weights for this case: only meta.json.
    for stale in ("weights.safetensors", "io.safetensors"):
        if os.path.exists(os.path.join(d, stale)):
            os.remove(os.path.join(d, stale))
    notes = (
        f"torchscale Decoder (decoder-only, subln=True => decoder_normalize_before=True, deepnorm=False), N={N} layers, "
        f"embed {E}, heads {H}, ffn {F}, no xpos, built right after torch.manual_seed(0); no weights saved. "
        "Initialisation as torchscale 0.3.0 + PyTorch actually do it: (1) every nn.Linear (q_proj, k_proj, v_proj, "
        "out_proj, ffn.fc1, ffn.fc2; all with bias) keeps PyTorch's default nn.Linear.reset_parameters: weight ~ "
        "kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), +1/sqrt(fan_in)) (std 1/sqrt(3*fan_in)), bias ~ "
        "U(-1/sqrt(fan_in), +1/sqrt(fan_in)). torchscale's MultiheadAttention.reset_parameters (xavier_uniform_ with "
        "gain 1/sqrt(2) for q/k/v, xavier_uniform_ for out_proj, zero out_proj bias) exists but is NEVER called by the "
        "constructors, and bert_init is False by default. (2) LayerNorms (self_attn_layer_norm, "
        "self_attn.inner_attn_ln, final_layer_norm, ffn.ffn_layernorm, the decoder's final layer_norm): weight = 1, "
        "bias = 0 (PyTorch nn.LayerNorm default), eps 1e-5. (3) Then Decoder.__init__ (subln branch) multiplies in "
        "place every parameter whose name contains 'fc1', 'fc2', 'out_proj' or 'v_proj' (and not 'encoder_attn') by "
        "init_scale = sqrt(log(2*N)) for a decoder-only model (sqrt(log(3*N)) when is_encoder_decoder). This scales "
        "BOTH the weight and the bias of v_proj, out_proj, fc1, fc2 (q_proj/k_proj untouched). fan_in: q/k/v/out_proj "
        f"{E}, fc1 {E}, fc2 {F}. Expected std: unscaled linear weight with fan_in 256: {1/math.sqrt(3*256):.6f}; "
        f"scaled fan_in 256: {init_scale/math.sqrt(3*256):.6f}; scaled fan_in 512 (fc2): "
        f"{init_scale/math.sqrt(3*512):.6f}. Verification: the same construction with torch.manual_seed(0) and "
        "subln=False (same RNG draws, LayerNorms draw nothing) gives identical unscaled q/k tensors and the scaled "
        f"tensors equal unscaled * init_scale to < 1e-6 (mean elementwise ratio {emp_ratio:.6f}); a fresh nn.Linear "
        f"({E}->{E}) has weight std {fresh_w_std:.6f} vs layers.0 v_proj {v_std:.6f} (ratio {v_std/fresh_w_std:.4f}) "
        f"and q_proj {q_std:.6f} (ratio {q_std/fresh_w_std:.4f}); fresh nn.Linear({F}->{E}) std {fresh_fc2_std:.6f} "
        f"vs fc2 {fc2_std:.6f}. 'std' in params is the population std (unbiased=False) in float64 of the float32 "
        "values; 'scaled' marks names matching scaled_params."
    )
    cfg = meta_config(E, H, F, N, False)
    extra = {
        "init_scale": init_scale,
        "init_scale_formula": "sqrt(log(2 * layers))  (decoder-only; sqrt(log(3 * layers)) for encoder-decoder)",
        "init_scale_empirical": emp_ratio,
        "scaled_params": SCALED_PATTERNS,
        "scaled_params_rule": "substring match on the full parameter name (weight AND bias), skipping names that "
        "contain 'encoder_attn'",
        "params": params,
    }
    write_meta(d, cfg, notes, extra)


# --------------------------------------------------------------------------------------------------------------
# Case 6: KOSMOS-1-size parameter count on the meta device
# --------------------------------------------------------------------------------------------------------------
def case_param_count(name="param_count"):
    E, H, F, L, V = 2048, 32, 8192, 24, 64007
    cfg = decoder_config(E, H, F, L, True, vocab_size=V, share=True)
    with torch.device("meta"):
        embed_tokens = nn.Embedding(V, E, padding_idx=1)
        dec = Decoder(cfg, embed_tokens=embed_tokens)
    assert dec.output_projection.weight is dec.embed_tokens.weight
    assert all(p.device.type == "meta" for p in dec.parameters())

    unique = {}
    for pname, p in dec.named_parameters(remove_duplicate=False):
        unique.setdefault(id(p), (pname, p))
    total = sum(p.numel() for _, p in unique.values())
    layers = sum(p.numel() for n, p in unique.values() if n.startswith("layers."))
    embed = dec.embed_tokens.weight.numel()

    per_top = {}
    for top, mod in dec.named_children():
        ps = list(mod.parameters())  # module-local, dedup within the module
        per_top[top] = sum(p.numel() for p in ps)
    shared_note = {
        "output_projection.weight": "same tensor as embed_tokens.weight (share_decoder_input_output_embed=True); "
        "listed under both top-level modules in per_top_level_module, counted once in param_count_total"
    }
    # Per-layer breakdown (layer 0, all layers identical).
    per_layer0 = {n: list(p.shape) for n, p in dec.layers[0].named_parameters()}
    per_layer_numel = sum(p.numel() for p in dec.layers[0].parameters())

    buffers = {}
    for bname, b in dec.named_buffers():
        buffers[bname] = {"shape": list(b.shape), "numel": b.numel()}
    xpos_buf = sum(v["numel"] for k, v in buffers.items() if k.endswith("xpos.scale"))
    assert total == sum(per_top.values()) - dec.output_projection.weight.numel()
    print(f"[{name}] total unique params {total:,}; layers {layers:,}; embed {embed:,}; per layer {per_layer_numel:,}; "
          f"buffers {sum(v['numel'] for v in buffers.values())} (xpos.scale {xpos_buf})")

    d = case_dir(name)
    notes = (
        "torchscale Decoder built entirely inside `with torch.device('meta')` (no allocation): "
        f"{L} layers, embed {E}, heads {H} (head_dim {E // H}), ffn {F}, xpos_rel_pos=True, subln=True, "
        f"vocab_size {V}, share_decoder_input_output_embed=True, embed_tokens = nn.Embedding({V}, {E}, padding_idx=1) "
        "passed in, no embed_positions, no layernorm_embedding. output_projection is an nn.Linear(bias=False) whose "
        "weight IS embed_tokens.weight, so it is counted once in param_count_total. Buffers are not parameters: each "
        f"self-attention has a persistent xpos.scale buffer of head_dim/2 = {E // H // 2} floats. Per layer: 4 x "
        "(E*E + E) attention projections + inner_attn_ln (2E) + self_attn_layer_norm (2E) + fc1 (F*E + F) + fc2 "
        "(E*F + E) + ffn_layernorm (2F) + final_layer_norm (2E). This is the architecture described in the KOSMOS-1 "
        "paper at these sizes; the real KOSMOS-1 checkpoint is not available, so this is not a verified count of "
        "the released model."
    )
    cfg = meta_config(E, H, F, L, True, vocab_size=V)
    extra = {
        "param_count_total": total,
        "param_count_layers": layers,
        "param_count_embed": embed,
        "param_count_final_layer_norm": per_top.get("layer_norm", 0),
        "param_count_per_layer": per_layer_numel,
        "per_top_level_module": per_top,
        "shared": shared_note,
        "layer0_param_shapes": per_layer0,
        "buffers": {
            "count_total": sum(v["numel"] for v in buffers.values()),
            "xpos_scale_total": xpos_buf,
            "xpos_scale_per_layer": E // H // 2,
            "persistent_names": sorted(
                dec.state_dict().keys() - {n for n, _ in dec.named_parameters(remove_duplicate=False)}
            ),
        },
    }
    write_meta(d, cfg, notes, extra)


def main():
    os.makedirs(OUT_ROOT, exist_ok=True)
    case_layer("layer_xpos", xpos=True, seed=1)
    case_layer("layer_noxpos", xpos=False, seed=2)
    case_stack2()
    case_sinusoidal()
    case_magneto_init()
    case_param_count()

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
