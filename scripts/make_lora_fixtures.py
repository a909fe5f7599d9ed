#!/usr/bin/env python3
"""Generate LoRA fixtures with Hugging Face PEFT on the tiny KOSMOS-2 model.

Run from the repository root:

    .venv-ref/bin/python scripts/make_lora_fixtures.py

(PEFT is not in REFERENCE_SETUP's list: `.venv-ref/bin/pip install --no-deps peft accelerate`.)

Writes fixtures/lora/<case>/ for each case below:
  adapter/            PeftModel.save_pretrained: adapter_config.json + adapter_model.safetensors
  io.safetensors      logits of the adapted model (PeftModel forward), logits after merge_and_unload(),
                      and one merged projection weight, on the inputs of fixtures/kosmos2/tiny/io.safetensors
  meta.json           script + SHA-256, versions, the LoRA configuration

The base model is fixtures/kosmos2/tiny (transformers' Kosmos2ForConditionalGeneration). PEFT initialises lora_B
at zero (the adapted model equals the base); the script overwrites every lora_A / lora_B with seeded normal values so
that the adapters change the logits. This script only calls transformers and PEFT; it re-implements nothing.
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import peft
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Kosmos2ForConditionalGeneration

torch.set_default_dtype(torch.float32)
transformers.logging.set_verbosity_error()

_HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT_REL = "scripts/make_lora_fixtures.py"
REPO_ROOT = os.path.dirname(_HERE)
BASE = os.path.join(REPO_ROOT, "fixtures", "kosmos2", "tiny")
OUT_ROOT = os.path.join(REPO_ROOT, "fixtures", "lora")

with open(os.path.abspath(__file__), "rb") as _f:
    SCRIPT_SHA256 = hashlib.sha256(_f.read()).hexdigest()

VERSIONS = {
    "torch": torch.__version__,
    "transformers": importlib.metadata.version("transformers"),
    "peft": peft.__version__,
    "safetensors": importlib.metadata.version("safetensors"),
    "numpy": np.__version__,
    "python": sys.version.split()[0],
}

TEXT = r"text_model\.model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|ffn\.(fc1|fc2))"
EVERYWHERE = r".*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"

CASES = {
    # The trainer's default: every projection of the text decoder, alpha / r scaling.
    "text": dict(r=4, lora_alpha=8.0, target_modules=TEXT, use_rslora=False, seed=11,
                 merged_key="text_model.model.layers.1.ffn.fc1.weight"),
    # Text decoder, vision encoder and the projection's cross-attention; rsLoRA scaling, a rank pattern.
    "everywhere": dict(r=3, lora_alpha=5.0, target_modules=EVERYWHERE, use_rslora=True, seed=12,
                       rank_pattern={"v_proj": 2},
                       merged_key="image_to_text_projection.x_attn.v_proj.weight"),
}


def inputs():
    with safe_open(os.path.join(BASE, "io.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in ["input_ids", "attention_mask", "pixel_values",
                                             "image_embeds_position_mask"]}


def logits(model, inp):
    with torch.no_grad():
        return model(**inp).logits.contiguous()


def make(name, case):
    out = os.path.join(OUT_ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    base = Kosmos2ForConditionalGeneration.from_pretrained(BASE, attn_implementation="eager").eval()
    config = LoraConfig(r=case["r"], lora_alpha=case["lora_alpha"], lora_dropout=0.0,
                        target_modules=case["target_modules"], use_rslora=case["use_rslora"],
                        rank_pattern=case.get("rank_pattern", {}), bias="none")
    model = get_peft_model(base, config).eval()
    gen = torch.Generator().manual_seed(case["seed"])
    adapted = []
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                for part in (module.lora_A["default"], module.lora_B["default"]):
                    part.weight.copy_(torch.randn(part.weight.shape, generator=gen) * 0.2)
                adapted.append(module_name)
    inp = inputs()
    adapted_logits = logits(model, inp)
    model.save_pretrained(os.path.join(out, "adapter"))
    os.remove(os.path.join(out, "adapter", "README.md"))  # PEFT's model card
    # A repository-relative base path (save_pretrained records the absolute one).
    cfg_path = os.path.join(out, "adapter", "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = "fixtures/kosmos2/tiny"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    # The saved adapter reloads onto a fresh base and gives the same logits.
    fresh = Kosmos2ForConditionalGeneration.from_pretrained(BASE, attn_implementation="eager").eval()
    reloaded = PeftModel.from_pretrained(fresh, os.path.join(out, "adapter")).eval()
    reload_diff = float((logits(reloaded, inp) - adapted_logits).abs().max())
    print("reload diff", reload_diff)
    assert reload_diff < 1e-5, reload_diff
    merged = reloaded.merge_and_unload()
    merged_logits = logits(merged, inp)
    merged_weight = merged.state_dict()[case["merged_key"]].contiguous()
    save_file({
        "logits": adapted_logits,
        "merged_logits": merged_logits,
        "merged_weight": merged_weight,
    }, os.path.join(out, "io.safetensors"))
    base_logits = logits(Kosmos2ForConditionalGeneration.from_pretrained(BASE, attn_implementation="eager").eval(), inp)
    meta = {
        "script": SCRIPT_REL,
        "script_sha256": SCRIPT_SHA256,
        "versions": VERSIONS,
        "base": "fixtures/kosmos2/tiny",
        "inputs": "fixtures/kosmos2/tiny/io.safetensors",
        "lora": {k: v for k, v in case.items() if k not in ("seed", "merged_key")},
        "adapted_modules": len(adapted),
        "seed": case["seed"],
        "merged_key": case["merged_key"],
        "max_abs_change_from_base": float((adapted_logits - base_logits).abs().max()),
        "max_abs_merged_minus_adapted": float((merged_logits - adapted_logits).abs().max()),
        "max_abs_reloaded_minus_adapted": reload_diff,
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(name, len(adapted), "adapted modules; logits change", meta["max_abs_change_from_base"],
          "merged vs adapted", meta["max_abs_merged_minus_adapted"])


def main():
    for name, case in CASES.items():
        make(name, case)


if __name__ == "__main__":
    main()
