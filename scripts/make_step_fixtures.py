#!/usr/bin/env python3
"""Generate training-step parity fixtures for KOSMOS-2: loss, gradients and two torch.optim.AdamW updates.

Run from the repository root (after make_generate_fixtures.py, whose model and inputs this script reuses):

    .venv-ref/bin/python scripts/make_step_fixtures.py

Writes fixtures/train_step/:
  step.safetensors   the two steps' batches and labels, their losses, and - for six named parameters only (NAMED;
                     of the embedding, only the rows the batches touch plus a few untouched ones; of the patch
                     embedding, a few output channels: `rows.<name>`) - gradients and parameters after the steps,
                     and the float64 re-run of step 1 (its loss in f64, its gradients rounded to f32)
  meta.json          script + SHA-256, versions, hyperparameters, label rules, key layout, HF's loss convention,
                     the Burn path, layout and initial sum |p| of every parameter, and the script's own checks

The model is fixtures/generate/model/ (Kosmos2ForConditionalGeneration.from_pretrained, eager attention, every
dropout 0 - checked - and train() mode); its weights are the parameters before step 1, so they are not stored. Step 1
runs the batch `greedy_batch_left` of fixtures/generate/io.safetensors (2 rows, row 0 left padded by 14); step 2 runs
`greedy_processors_batch_left` with its rows swapped (row 1 left padded by 2) on the parameters after step 1. Labels
are input_ids with -100 at padding, at the image slots (image_embeds_position_mask == 1), at each row's first real
token (`<s>`) and at the extra positions of each step in STEPS. Each step: outputs = model(..., labels=labels);
outputs.loss.backward(); optimizer.step() with ONE torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98),
eps=1e-6, weight_decay=0.05) kept across both steps (so step 2 exercises the bias corrections at t=2).

"Reference state" run (`ref2.*`): torch's step-1 state cannot be rebuilt from the stored subset, so step 2 is also run
from a state that can: a fresh model and optimizer, step 1 = optimizer.step() with torch's step-1 gradients of the
stored elements of the named parameters only (zero in the other rows of a row-subset parameter, no gradient - so no
update and no optimizer state - for every other parameter), then an ordinary step 2 (forward, backward, step; every
parameter gets a gradient: the named ones are at t=2, the others at t=1). On the stored elements step 1 equals the
real run's bit for bit (AdamW is elementwise; asserted).

Step 1 is then re-run in float64 (same f32 weights and inputs, model.double()) for reference gradients that show how
far torch's own f32 gradients are from the exact ones: this tiny model (text-layer weights x3) is mildly
ill-conditioned in f32, torch f32 vs f64 differing by up to ~2e-4 of a tensor's largest gradient. Its loss is stored
in f64 (f32 could not resolve it); its gradients are rounded to f32 (a relative 6e-8, far below the tests' 1e-5).

This script only *calls* transformers and torch (the model's forward and loss, autograd, torch.optim.AdamW). The
re-computations below are checks only (and the float64 loss): the loss is re-derived with F.cross_entropy on shifted
labels, and the AdamW updates are re-derived in float64 from the recorded gradients (every parameter, both runs);
the differences are asserted small and stored in meta.json.
"""

import hashlib
import importlib.metadata
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import transformers
from transformers import Kosmos2ForConditionalGeneration
from transformers.loss.loss_utils import ForCausalLMLoss

torch.set_default_dtype(torch.float32)
torch.set_num_threads(1)  # one intra-op thread: reductions in a fixed order, run-to-run identical
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

_HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT_REL = "scripts/make_step_fixtures.py"
REPO_ROOT = os.path.dirname(_HERE)
MODEL_DIR = os.path.join(REPO_ROOT, "fixtures", "generate", "model")
GEN_IO = os.path.join(REPO_ROOT, "fixtures", "generate", "io.safetensors")
OUT_DIR = os.path.join(REPO_ROOT, "fixtures", "train_step")
OUT_FILE = "step.safetensors"

with open(os.path.abspath(__file__), "rb") as _f:
    SCRIPT_SHA256 = hashlib.sha256(_f.read()).hexdigest()

VERSIONS = {
    "torch": torch.__version__,
    "transformers": importlib.metadata.version("transformers"),
    "safetensors": importlib.metadata.version("safetensors"),
    "numpy": np.__version__,
    "python": sys.version.split()[0],
}

IGNORE_INDEX = -100
IMAGE_START, IMAGE_END = 401, 402  # <image>, </image>
PAD_ID = 1
LR = 1e-3
BETAS = (0.9, 0.98)
EPS = 1e-6
WEIGHT_DECAY = 0.05

# (step, source case in fixtures/generate/io.safetensors, row order, extra label rules)
# Extra rules, each masking label positions on top of padding / image slots / first real token:
#   "image_start": every <image> token;  "image_end": every </image> token;
#   ("after_image_end", row, n): the n tokens right after </image> in that row (an "instruction prefix").
STEPS = [
    dict(step=1, case="greedy_batch_left", rows=[0, 1], extra=["image_start"]),
    dict(step=2, case="greedy_processors_batch_left", rows=[1, 0],
         extra=["image_start", "image_end", ("after_image_end", 0, 3)]),
]
INPUT_KEYS = ["input_ids", "attention_mask", "image_embeds_position_mask", "pixel_values"]

# The parameters whose gradients and updated values are stored: the tied embedding / LM head (deepest in the text
# tower, lookup + head gradient), a text-layer Linear weight (Burn layout transposed), an attention key bias (exact
# gradient 0: f32 noise), a LayerNorm weight (Burn `gamma`), the vision patch embedding (a Conv2d, deepest in the
# vision tower) and the projection's latent queries (the worst f32-vs-f64 tensor). Where rows are named, only those
# rows (torch dim 0) are stored: "batch" = every token id of the two batches, plus the listed untouched ids (their
# gradient comes from the tied LM head only).
EMBED = "text_model.model.embed_tokens.weight"
NAMED = {
    EMBED: ("batch", [2, 3, 100, 717, 1434]),
    "text_model.model.layers.0.self_attn.q_proj.weight": None,
    "text_model.model.layers.0.self_attn.k_proj.bias": None,
    "text_model.model.layers.0.self_attn.inner_attn_ln.weight": None,
    "vision_model.model.embeddings.patch_embedding.weight": ("listed", [0, 4, 8, 12, 16, 20]),
    "image_to_text_projection.latent_query": None,
}


def jsonsafe(x):
    """Strict JSON: non-finite floats become the strings "inf" / "-inf" / "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: jsonsafe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonsafe(v) for v in x]
    return x


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(jsonsafe(obj), f, indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False)
        f.write("\n")


def sha256_file(p):
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------
def check_no_dropout(model):
    """Every dropout probability in the configs and on the modules is 0 (so train() == eval() numerically)."""
    seen = {}
    for sub in ("text_config", "vision_config"):
        cfg = getattr(model.config, sub).to_dict()
        for k, v in cfg.items():
            if "dropout" in k or "layerdrop" in k:
                assert v == 0.0, f"{sub}.{k} = {v}"
                seen[f"{sub}.{k}"] = v
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout):
            assert m.p == 0.0, name
        for attr in ("dropout", "activation_dropout", "attention_dropout", "layerdrop"):
            v = getattr(m, attr, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                assert v == 0.0, f"{name}.{attr} = {v}"
    return seen


def load_model():
    model = Kosmos2ForConditionalGeneration.from_pretrained(MODEL_DIR, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert model.config.text_config.tie_word_embeddings
    assert model.text_model.lm_head.weight is model.text_model.model.embed_tokens.weight
    # the loss transformers uses for this class (LOSS_MAPPING by class-name match)
    assert model.text_model.loss_function is ForCausalLMLoss, model.text_model.loss_function
    return model


def burn_path(hf_name, module):
    """The parameter's path in kosmos_models::Kosmos2 and how its Burn tensor relates to the torch one."""
    path = hf_name
    path = path.replace("text_model.model.layers.", "text_model.model.decoder.layers.")
    path = path.replace("text_model.model.layer_norm.", "text_model.model.decoder.layer_norm.")
    layout = "same"
    if isinstance(module, nn.LayerNorm):
        path = path.rsplit(".", 1)[0] + (".gamma" if hf_name.endswith(".weight") else ".beta")
    elif isinstance(module, nn.Linear) and hf_name.endswith(".weight"):
        layout = "transposed"  # Burn Linear weight is [in, out], torch's is [out, in]
    return path, layout


def param_table(model):
    owners = {}
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            owners.setdefault(f"{mname}.{pname}" if mname else pname, m)
    table = []
    for name, p in model.named_parameters():  # tied lm_head is not listed (deduplicated by identity)
        path, layout = burn_path(name, owners[name])
        table.append({"hf": name, "burn": path, "layout": layout, "shape": list(p.shape)})
    return table


# --------------------------------------------------------------------------------------------------------------
# inputs and labels
# --------------------------------------------------------------------------------------------------------------
def load_inputs(case, rows):
    with safe_open(GEN_IO, "pt") as f:
        inp = {k: f.get_tensor(f"{case}.{k}")[rows].contiguous() for k in INPUT_KEYS}
    for k in INPUT_KEYS[:3]:
        assert inp[k].dtype == torch.int64, k
    assert inp["pixel_values"].dtype == torch.float32
    return inp


def make_labels(inp, extra):
    ids, am, iepm = inp["input_ids"], inp["attention_mask"], inp["image_embeds_position_mask"]
    labels = ids.clone()
    labels[am == 0] = IGNORE_INDEX
    labels[iepm == 1] = IGNORE_INDEX
    first_real = am.argmax(dim=1)  # left padding: the first 1 of each row
    for b in range(ids.shape[0]):
        assert bool(am[b, first_real[b]:].all()), "not left padded"
        labels[b, first_real[b]] = IGNORE_INDEX
    for rule in extra:
        if rule == "image_start":
            labels[ids == IMAGE_START] = IGNORE_INDEX
        elif rule == "image_end":
            labels[ids == IMAGE_END] = IGNORE_INDEX
        elif rule[0] == "after_image_end":
            _, row, n = rule
            end = int((ids[row] == IMAGE_END).nonzero()[0, 0])
            labels[row, end + 1:end + 1 + n] = IGNORE_INDEX
        else:
            raise ValueError(rule)
    return labels


def manual_loss(logits, labels):
    """HF's convention re-derived: shift (logits at t predict labels at t + 1), ignore -100, mean over counted
    tokens, in the logits' dtype (a check of the f32 loss; the float64 reference's loss, where HF's own
    ForCausalLMLoss would cast the logits to f32)."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="mean")


# --------------------------------------------------------------------------------------------------------------
# AdamW check (float64 re-derivation of torch's single-tensor AdamW, decoupled weight decay)
# --------------------------------------------------------------------------------------------------------------
class AdamW64:
    """Per-parameter state and step count, as torch's (a parameter without a gradient is skipped: no state)."""

    def __init__(self):
        self.m, self.v, self.t = {}, {}, {}

    def step(self, params, grads):
        b1, b2 = BETAS
        out = {}
        for k, g in grads.items():
            t = self.t[k] = self.t.get(k, 0) + 1
            g = g.double()
            p = params[k].double() * (1 - LR * WEIGHT_DECAY)
            self.m[k] = self.m.get(k, torch.zeros_like(g)) * b1 + (1 - b1) * g
            self.v[k] = self.v.get(k, torch.zeros_like(g)) * b2 + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1 ** t)
            denom = self.v[k].sqrt() / math.sqrt(1 - b2 ** t) + EPS
            out[k] = p - LR * m_hat / denom
        return out


def adamw_check(before, after, expect):
    """Max |torch - float64 re-derivation| over `expect`'s parameters, absolute and in f32 spacings (the spacing at
    |p_before| + lr: the operands' scale, as the update may cancel most of p); asserted <= 4 spacings."""
    err = max(float((after[k].double() - expect[k]).abs().max()) for k in expect)
    ulps = max(float(((after[k].double() - expect[k]).abs() / f32_spacing(before[k].double().abs() + LR)).max())
               for k in expect)
    assert ulps <= 4.0, ulps
    return err, ulps


def f32_spacing(x):
    """The spacing of f32 numbers at |x| (float64 tensor), at least the smallest normal spacing."""
    return torch.from_numpy(np.spacing(x.abs().float().numpy())).double().clamp_min(2.0 ** -149)


def exact_position_table(weights):
    """HF's sinusoidal table (get_embedding: computed in f32, then cast) recomputed in float64 (row 1 = padding = 0)."""
    n, d = weights.shape
    half = d // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000) / (half - 1)))
    angle = torch.arange(n, dtype=torch.float64)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    table[PAD_ID] = 0.0
    return table


def float64_reference(spec, names, exact_positions=False):
    """Step 1 in float64: loss (manual_loss, all f64) and the gradient of every parameter, from the same f32 weights
    and inputs. Not HF's outputs.loss: ForCausalLMLoss casts the logits to f32 (`logits.float()`). With
    exact_positions the f32-computed sinusoidal table is replaced by a float64 one (a sensitivity check only)."""
    torch.set_default_dtype(torch.float64)  # HF builds its causal mask with torch.full(..., finfo(dtype).min)
    try:
        model = load_model().double().train()
        if exact_positions:
            positions = model.text_model.model.embed_positions
            positions.weights = exact_position_table(positions.weights)
        inp = load_inputs(spec["case"], spec["rows"])
        inp["pixel_values"] = inp["pixel_values"].double()
        labels = make_labels(inp, spec["extra"])
        out = model(**inp)
        assert out.logits.dtype == torch.float64
        loss = manual_loss(out.logits, labels)
        loss.backward()
        params = dict(model.named_parameters())
        grads = {k: params[k].grad.detach().clone().contiguous() for k in names}
        return loss.detach(), grads
    finally:
        torch.set_default_dtype(torch.float32)


# --------------------------------------------------------------------------------------------------------------
def stored_rows(batches):
    """{name: None (the whole tensor) or the sorted torch dim-0 rows stored}."""
    ids = sorted(set(int(i) for inp in batches for i in inp["input_ids"].flatten()))
    rows = {}
    for name, spec in NAMED.items():
        if spec is None:
            rows[name] = None
            continue
        kind, listed = spec
        if kind == "batch":
            assert not set(listed) & set(ids), "the listed embedding rows must be untouched"
            rows[name] = sorted(set(ids) | set(listed))
        else:
            rows[name] = sorted(listed)
    return rows


def subset(rows, t):
    return t if rows is None else t[torch.tensor(rows)]


def masked(rows, g):
    """g on the stored rows, 0 elsewhere."""
    if rows is None:
        return g.clone()
    out = torch.zeros_like(g)
    out[torch.tensor(rows)] = g[torch.tensor(rows)]
    return out


def step_forward(model, spec):
    """Forward + backward of a step's batch; returns inputs, labels, outputs.loss (detached), the gradients and checks
    (HF's loss re-derived, train() == eval())."""
    params = dict(model.named_parameters())
    inp = load_inputs(spec["case"], spec["rows"])
    labels = make_labels(inp, spec["extra"])
    out = model(**inp, labels=labels)
    loss = out.loss
    loss.backward()
    loss = loss.detach()
    grads = {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}
    assert set(grads) == set(params), f"parameters without a gradient: {set(params) - set(grads)}"
    with torch.no_grad():
        loss_manual = manual_loss(out.logits, labels)
        model.eval()
        loss_eval = model(**inp, labels=labels).loss
        model.train()
    assert abs(float(loss_manual) - float(loss)) < 1e-6, (float(loss_manual), float(loss))
    assert float(loss_eval) == float(loss), (float(loss_eval), float(loss))
    return inp, labels, loss, grads, float(loss_manual) - float(loss)


def make_optimizer(model):
    # foreach=None resolves to the same single-tensor path on CPU
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False)


def main():
    model = load_model()
    dropout_fields = check_no_dropout(model)
    model.train()
    table = param_table(model)
    names = [e["hf"] for e in table]
    params = dict(model.named_parameters())
    assert len(names) == len(params)
    assert set(NAMED) <= set(names), set(NAMED) - set(names)
    initial = {k: p.detach().clone() for k, p in params.items()}
    for e in table:  # the Rust test checks that it loads the same model
        e["init_abs_sum"] = float(initial[e["hf"]].double().abs().sum())
    rows = stored_rows([load_inputs(spec["case"], spec["rows"]) for spec in STEPS])
    named = list(NAMED)

    # ---------------- the real run: two steps of one optimizer on every parameter
    optimizer = make_optimizer(model)
    check = AdamW64()
    tensors, steps_meta, grads1 = {}, [], None
    for name in named:
        if rows[name] is not None:
            tensors[f"rows.{name}"] = torch.tensor(rows[name], dtype=torch.int64)
    for spec in STEPS:
        s = spec["step"]
        before = {k: p.detach().clone() for k, p in params.items()}
        optimizer.zero_grad(set_to_none=True)
        inp, labels, loss, grads, loss_manual_diff = step_forward(model, spec)
        if s == 1:
            grads1 = grads
        optimizer.step()
        after = {k: p.detach().clone() for k, p in params.items()}
        adamw_err, adamw_ulps = adamw_check(before, after, check.step(before, grads))
        changed = max(float((after[k] - before[k]).abs().max()) for k in params)

        prefix = f"step{s}"
        for k in INPUT_KEYS:
            tensors[f"{prefix}.{k}"] = inp[k]
        tensors[f"{prefix}.labels"] = labels
        tensors[f"{prefix}.loss"] = loss.reshape(1).float()
        for k in named:
            if s == 1:
                tensors[f"{prefix}.grad.{k}"] = subset(rows[k], grads[k]).float().contiguous()
            tensors[f"{prefix}.param.{k}"] = subset(rows[k], after[k]).float().contiguous()

        counted = int((labels[:, 1:] != IGNORE_INDEX).sum())
        grad_abs = torch.cat([g.abs().flatten() for g in grads.values()])
        steps_meta.append({
            "step": s, "inputs_from": f"fixtures/generate/io.safetensors {spec['case']}.*",
            "row_order": spec["rows"], "extra_label_rules": spec["extra"],
            "shape": list(inp["input_ids"].shape), "counted_tokens": counted,
            "labels": labels.tolist(), "loss": float(loss),
            "loss_recomputed_minus_hf": loss_manual_diff,
            "loss_eval_mode_equal": True,
            "adamw_float64_recomputation_max_abs_diff": adamw_err,
            "adamw_float64_recomputation_max_ulps": adamw_ulps,
            "max_abs_param_change": changed,
            "grad_abs_min": float(grad_abs.min()), "grad_abs_max": float(grad_abs.max()),
            "grad_elements_below_1e-6": int((grad_abs < 1e-6).sum()), "grad_elements": int(grad_abs.numel()),
        })

    # ---------------- the reference-state run: step 1 on the stored elements only, then an ordinary step 2
    model2 = load_model().train()
    params2 = dict(model2.named_parameters())
    optimizer2 = make_optimizer(model2)
    check2 = AdamW64()
    grads_ref1 = {k: masked(rows[k], grads1[k]) for k in named}
    for k, p in params2.items():
        assert torch.equal(p.detach(), initial[k]), k
        p.grad = grads_ref1.get(k)
    optimizer2.step()
    after1 = {k: p.detach().clone() for k, p in params2.items()}
    ref1_err, ref1_ulps = adamw_check(initial, after1, check2.step(initial, grads_ref1))
    for k in names:
        if k in NAMED:  # the stored elements: bit for bit the real run's
            assert torch.equal(subset(rows[k], after1[k]), tensors[f"step1.param.{k}"]), k
        else:  # no gradient: untouched
            assert torch.equal(after1[k], initial[k]), k
    optimizer2.zero_grad(set_to_none=True)
    spec2 = STEPS[1]
    inp, labels, loss, grads, loss_manual_diff = step_forward(model2, spec2)
    assert torch.equal(labels, tensors["step2.labels"])
    optimizer2.step()
    after2 = {k: p.detach().clone() for k, p in params2.items()}
    ref2_err, ref2_ulps = adamw_check(after1, after2, check2.step(after1, grads))
    tensors["ref2.loss"] = loss.reshape(1).float()
    for k in named:
        tensors[f"ref2.grad.{k}"] = subset(rows[k], grads[k]).float().contiguous()
        tensors[f"ref2.param.{k}"] = subset(rows[k], after2[k]).float().contiguous()
    ref2_meta = {
        "loss": float(loss), "loss_recomputed_minus_hf": loss_manual_diff,
        "loss_minus_real_step2_loss": float(loss) - float(tensors["step2.loss"]),
        "adamw_float64_recomputation_max_ulps": {"step1": ref1_ulps, "step2": ref2_ulps},
        "adamw_float64_recomputation_max_abs_diff": {"step1": ref1_err, "step2": ref2_err},
    }
    del model2, params2, optimizer2

    # ---------------- float64 re-run of step 1
    loss64, grads64 = float64_reference(STEPS[0], names)
    tensors["f64.step1.loss"] = loss64.reshape(1)
    f32_vs_f64 = {}
    for k in names:
        if k in NAMED:
            tensors[f"f64.step1.grad.{k}"] = subset(rows[k], grads64[k]).float().contiguous()
        g32 = grads1[k].double()
        f32_vs_f64[k] = {"max_abs_grad": float(grads64[k].abs().max()),
                         "max_abs_diff": float((g32 - grads64[k]).abs().max())}
    # (tensors whose exact gradient is ~0, the attention key biases, hold f32 noise only and are left out here)
    worst = max(((k, v) for k, v in f32_vs_f64.items() if v["max_abs_grad"] > 1e-6),
                key=lambda kv: kv[1]["max_abs_diff"] / kv[1]["max_abs_grad"])
    # how much the f32 rounding of the position table (which both HF and kosmos-core compute in f32, each with its own
    # libm) matters in float64: a lower bound for float64 parity
    loss64x, grads64x = float64_reference(STEPS[0], names, exact_positions=True)
    table_sensitivity = {
        "loss_change": float(loss64x) - float(loss64),
        "max_grad_change_over_tensor_max": max(float((grads64x[k] - grads64[k]).abs().max() / grads64[k].abs().max())
                                               for k in names if float(grads64[k].abs().max()) > 1e-6),
    }
    # the stored subset's own f32 noise (what the Rust test sees)
    stored_noise = {k: float((tensors[f"step1.grad.{k}"].double() - subset(rows[k], grads64[k])).abs().max())
                    for k in named}
    f32_rounding = max(float((tensors[f"f64.step1.grad.{k}"].double() - subset(rows[k], grads64[k])).abs().max()
                             / subset(rows[k], grads64[k]).abs().max()) for k in named)
    float64_meta = {
        "loss_f64": float(loss64), "loss_f32_minus_f64": float(tensors["step1.loss"]) - float(loss64),
        "position_table_sensitivity": table_sensitivity,
        "worst_tensor": worst[0], "worst_tensor_errors": worst[1],
        "stored_gradients_f32_rounding_over_tensor_max": f32_rounding,
        "stored_elements_torch_f32_minus_f64_max_abs": stored_noise,
        "per_parameter_f32_vs_f64_step1": f32_vs_f64,
    }

    os.makedirs(OUT_DIR, exist_ok=True)
    for fn in os.listdir(OUT_DIR):
        os.remove(os.path.join(OUT_DIR, fn))
    save_file(tensors, os.path.join(OUT_DIR, OUT_FILE))

    meta = {
        "script": SCRIPT_REL,
        "script_sha256": SCRIPT_SHA256,
        "versions": VERSIONS,
        "model": {"dir": "fixtures/generate/model", "model_safetensors_sha256":
                  sha256_file(os.path.join(MODEL_DIR, "model.safetensors")),
                  "class": "Kosmos2ForConditionalGeneration", "attn_implementation": "eager", "mode": "train()",
                  "dropout_fields": dropout_fields, "tie_word_embeddings": True},
        "inputs_sha256": {"fixtures/generate/io.safetensors": sha256_file(GEN_IO)},
        "config": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY, "amsgrad": False,
                   "optimizer": "torch.optim.AdamW(model.parameters(), lr, betas, eps, weight_decay, foreach=False)",
                   "ignore_index": IGNORE_INDEX, "steps": len(STEPS)},
        "loss_convention": (
            "transformers 5.24 Kosmos2TextForCausalLM.forward: loss = self.loss_function(logits=logits, labels=labels, "
            "vocab_size=...), and loss_function resolves (class-name match in LOSS_MAPPING) to "
            "transformers.loss.loss_utils.ForCausalLMLoss: logits.float(); labels = pad(labels, (0, 1), -100); "
            "shift_labels = labels[..., 1:]; cross_entropy(logits.view(-1, V), shift_labels.view(-1), "
            "ignore_index=-100, reduction='mean') (num_items_in_batch is not passed). So labels are ALIGNED with "
            "input_ids, the shift happens inside, and the mean is over counted (label != -100) target tokens of the "
            "whole batch, not per row. Kosmos2ForConditionalGeneration.forward passes labels to the text model "
            "unchanged. Recomputed here with F.cross_entropy on logits[:, :-1] / labels[:, 1:] (see per-step "
            "loss_recomputed_minus_hf)."),
        "label_rules": (
            "labels = input_ids, then -100 where attention_mask == 0 (padding), where image_embeds_position_mask == "
            "1 (image slots), at each row's first real token (<s>: nothing predicts it in an unpadded row; with "
            "left padding HF would otherwise train the last PAD position to predict it), plus the step's "
            "extra_label_rules: image_start = every <image> (401), image_end = every </image> (402), "
            "[after_image_end, row, n] = the n tokens right after </image> in that row."),
        "padding_idx_note": (
            "HF's embed_tokens is nn.Embedding(padding_idx=1): the lookup adds no gradient to row 1. Burn's "
            "Embedding has no padding_idx. With these labels no pad position influences the loss (real queries "
            "give pads exactly zero attention weight), so row 1's gradient comes only from the tied lm_head in "
            "both."),
        "stored": [{"hf": k, "rows": rows[k]} for k in named],
        "keys": {
            "rows.<hf name>": ("i64 [n], the torch dim-0 rows stored of a named parameter stored by rows (see "
                               "`stored`; the others are stored whole)"),
            "step{s}.input_ids / attention_mask / image_embeds_position_mask": "i64 [2, 29], the step's batch",
            "step{s}.pixel_values": "f32 [2, 3, 28, 28]",
            "step{s}.labels": "i64 [2, 29] (aligned with input_ids; -100 = not counted)",
            "step{s}.loss": "f32 [1], outputs.loss of the step's forward (step 2: on the parameters after step 1)",
            "step1.grad.<named>": "f32, torch layout, the stored rows: the gradient of step 1's loss",
            "step{s}.param.<named>": ("f32, torch layout, the stored rows: the parameter after optimizer.step() of "
                                      "step s"),
            "ref2.loss": "f32 [1], outputs.loss of step 2 from the reference state (see the docstring)",
            "ref2.grad.<named>": "f32, torch layout, the stored rows: its gradient",
            "ref2.param.<named>": "f32, torch layout, the stored rows: the parameter after that step 2",
            "f64.step1.loss": "f64 [1], the float64 reference loss of step 1 (see float64_reference)",
            "f64.step1.grad.<named>": "f32 (float64 gradient rounded), torch layout, the stored rows",
        },
        "reference_state_step2": dict({
            "what": ("a fresh model and torch.optim.AdamW; step 1 = optimizer.step() with the real step-1 gradient "
                     "on the stored elements of the named parameters (0 on the other rows of a row-subset "
                     "parameter: those rows are only decayed; p.grad = None for every other parameter: untouched, no "
                     "state); then step 2 as in the real run (all parameters get a gradient: the named ones at t=2, "
                     "the others at t=1). The stored elements after step 1 equal the real run's bit for bit "
                     "(asserted)."),
        }, **ref2_meta),
        "float64_reference": dict({
            "what": ("step 1 again in float64 (model.double() from the same f32 weights, pixel_values.double(); "
                     "HF computes its sinusoidal position table in f32 by design, `.float()`, and casts it): the loss "
                     "by manual_loss in f64 (HF's ForCausalLMLoss would cast the logits to f32) and every gradient "
                     "(stored rounded to f32 for the named parameters). It measures how far torch's own f32 gradients "
                     "are from the exact ones (the model, with its text-layer weights x3, is mildly ill-conditioned "
                     "in f32). position_table_sensitivity: the same run with the table computed in float64 instead; "
                     "the f32 table's rounding (and so the libm exp/sin/cos each side uses to build it) moves the f64 "
                     "results by about that much. The attention key biases have an exact gradient of 0 (softmax "
                     "ignores a per-query constant): their f32 gradients are noise."),
        }, **float64_meta),
        "parameters": table,
        "steps": steps_meta,
        "files": {OUT_FILE: os.path.getsize(os.path.join(OUT_DIR, OUT_FILE))},
        "notes": (
            "Parameters before step 1 are the model files' values (init_abs_sum: sum |p| in float64 of each, for a "
            "check that the same model is loaded). The tied lm_head shares embed_tokens.weight, so the embedding "
            "gradient is the sum of the lookup and head contributions (dense: every row gets a head gradient). "
            "Every parameter receives a gradient at both steps of the real run (asserted), so torch.optim.AdamW "
            "updates (and decays) all of them, as Burn's OptimizerAdaptor does for every parameter present in "
            "GradientsParams; the float64 AdamW re-derivation covers every parameter, the stored values only the "
            "named ones."),
    }
    write_json(os.path.join(OUT_DIR, "meta.json"), meta)
    for sm in steps_meta:
        print(f"step {sm['step']}: loss {sm['loss']:.8f}, counted {sm['counted_tokens']}, "
              f"adamw f64 check {sm['adamw_float64_recomputation_max_abs_diff']:.2e}, "
              f"max change {sm['max_abs_param_change']:.2e}, grads < 1e-6: {sm['grad_elements_below_1e-6']}")
    print(f"reference-state step 2: loss {ref2_meta['loss']:.8f} "
          f"(real step 2 {ref2_meta['loss_minus_real_step2_loss']:+.2e}), adamw ulps {ref1_ulps:.2f} / {ref2_ulps:.2f}")
    print(f"float64 reference: loss {float(loss64):.10f}; worst f32-vs-f64 gradient tensor {worst[0]} {worst[1]}")
    print("stored rows:", {k: (len(v) if v is not None else "all") for k, v in rows.items()})
    print("wrote", OUT_DIR, meta["files"])


if __name__ == "__main__":
    main()
