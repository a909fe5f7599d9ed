#!/usr/bin/env python3
"""Generate end-to-end KOSMOS-2 fixtures (tokenizer, processor, post-processing, bbox codec, tiny full models).

Run from the repository root:

    .venv-ref/bin/python scripts/make_kosmos2_fixtures.py

Writes fixtures/kosmos2/:
  tokenizer/            small XLM-R-style Unigram tokenizer (base vocab 400) + the KOSMOS-2 tags, processor files
  tokenizer_realids/    same trained pieces, padded with dummy pieces so that every special/tag id is the real one
  processor/            cases.json, post_process.json, codec.json, tokenizer_cases.json
  tiny/ tiny_f16/ tiny_bf16/ tiny_sharded/ realvocab/   Kosmos2ForConditionalGeneration.save_pretrained + io
  README.md

No model hub is reachable: every tokenizer/model is built locally (the tokenizer from an inline corpus with a fully
deterministic piece-selection rule, the models from config classes with random init). This script only *calls*
transformers / tokenizers; it does not re-implement them.
"""

import collections
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import sys
import unicodedata

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken as TkAddedToken
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

import transformers
from transformers import CLIPImageProcessorPil, Kosmos2Config, Kosmos2ForConditionalGeneration, Kosmos2Processor
from transformers.models.kosmos2 import processing_kosmos2 as pk
from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2TextSinusoidalPositionalEmbedding
from transformers.tokenization_utils_tokenizers import TokenizersBackend

torch.set_default_dtype(torch.float32)
torch.set_grad_enabled(False)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

_HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT_REL = "scripts/make_kosmos2_fixtures.py"
REPO_ROOT = os.path.dirname(_HERE)
OUT_ROOT = os.path.join(REPO_ROOT, "fixtures", "kosmos2")
SIZE_LIMIT = 6.5 * 1024 * 1024

with open(os.path.abspath(__file__), "rb") as _f:
    SCRIPT_SHA256 = hashlib.sha256(_f.read()).hexdigest()

VERSIONS = {
    "torch": torch.__version__,
    "transformers": importlib.metadata.version("transformers"),
    "tokenizers": importlib.metadata.version("tokenizers"),
    "safetensors": importlib.metadata.version("safetensors"),
    "pillow": importlib.metadata.version("pillow"),
    "numpy": np.__version__,
    "python": sys.version.split()[0],
}

TAG_TOKENS = ["</doc>", "<image>", "</image>", "</chunk>", "</line>", "<phrase>", "</phrase>", "<object>",
              "</object>", "</delimiter_of_multi_objects/>", "<grounding>"]
PATCH_TOKENS = [f"<patch_index_{i:04d}>" for i in range(1024)]
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
REAL_BASE_VOCAB = 64002  # <s> <pad> </s> <unk> + 63997 sentencepiece pieces + <mask> (fairseq layout)
N_TRAINED = 395           # trained pieces -> small base vocab = 4 + 395 + 1 (<mask>) = 400
TINY_Q = 8                # latent_query_num of the tiny models
REAL_Q = 64               # latent_query_num of the real checkpoint (HF processor default)

# A small fixed English corpus (plus a few accented words). The tokenizer pieces are derived from it below.
CORPUS = """An image of a snowman warming himself by a fire.
A dog is sitting on the grass next to a red ball.
Two people are riding bicycles along the river at sunset.
The cat sleeps on a wooden chair in the kitchen.
A man in a blue shirt is holding an umbrella in the rain.
A woman with a yellow hat walks her small brown dog through the park.
Three children are playing football on a green field near the school.
A large white boat sails across the calm blue lake under a cloudy sky.
An old car is parked in front of a little house with a red door.
The girl is reading a book while sitting on a bench in the garden.
A bird flies over the mountains covered with snow in the morning.
Two horses stand in a field behind a wooden fence.
A plate of food with rice, chicken and vegetables sits on the table.
A person is surfing on a big wave in the ocean.
The train arrives at the station and people wait on the platform.
A group of friends are eating pizza at a restaurant.
A black and white photo of a street with tall buildings.
The man is cooking dinner in a modern kitchen with a window.
A baby is smiling and holding a toy bear.
A cup of coffee and a croissant on a table at a café in Paris.
The naïve boy looks at the façade of the old museum.
A computer, a keyboard and a mouse are on the desk.
Describe this image in detail.
What is in the picture? It is a photo of a street sign.
Question: what color is the car? Answer: the car is red.
There are five apples and two oranges in the bowl.
A stop sign on the corner of the street next to a tree.
The sun is shining and the sky is clear and blue.
A man and a woman are standing next to each other and smiling.
An airplane is flying high above the clouds.
Call 555 0123 or 867 5309 before 4 pm on June 18, 2024.
Quick zebras, jovial foxes and vexed kings met in Oslo, Berlin, Kyoto, Rome, Ulm, Vigo, Wien, Yale, Zug, Dublin,
Helsinki, Madrid, Nice, Genoa, Porto, Québec, Lima, Tokyo, Xian, Jena, Ibiza, Cairo, Essen, Faro and Graz.
Seven quiet squirrels sit on Sam's roof.
"""


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, ensure_ascii=False)
        f.write("\n")


def write_meta(d, config, notes, extra=None):
    meta = {"script": SCRIPT_REL, "script_sha256": SCRIPT_SHA256, "versions": VERSIONS, "config": config,
            "notes": notes}
    if extra:
        meta.update(extra)
    write_json(os.path.join(d, "meta.json"), meta)


def fresh_dir(name):
    d = os.path.join(OUT_ROOT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    return d


def to_jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return [to_jsonable(v) for v in x]
    if isinstance(x, list):
        return [to_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items()}
    return x


def run_or_error(fn):
    try:
        return {"ok": True, "result": fn()}
    except Exception as e:  # recorded: the port must reproduce the failure, not the message
        return {"ok": False, "error_type": type(e).__name__, "error": str(e)}


def maxdiff(a, b):
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------------------------------------------
# 1. tokenizers
# --------------------------------------------------------------------------------------------------------------
def trained_pieces():
    """Deterministic sentencepiece-Unigram-like piece selection (the tokenizers UnigramTrainer is not run-to-run
    deterministic, so it is not used): words are NFKC-normalised and prefixed with '▁' (metaspace); candidates are
    all substrings of length 2..12 occurring >= 2 times (counted over word occurrences), ranked by count*len
    (ties: the string), the top N_TRAINED - #chars kept, plus every single character of the corpus (incl. '▁').
    score = ln(count / sum of kept counts); pieces sorted by score desc, ties by string (sentencepiece id order)."""
    words = collections.Counter()
    for line in CORPUS.splitlines():
        for w in unicodedata.normalize("NFKC", line).split():
            words["▁" + w] += 1
    sub = collections.Counter()
    for w, c in words.items():
        for i in range(len(w)):
            for j in range(i + 1, min(len(w), i + 12) + 1):
                sub[w[i:j]] += c
    chars = sorted({ch for w in words for ch in w})
    cands = sorted(((p, c) for p, c in sub.items() if len(p) > 1 and c >= 2), key=lambda pc: (-pc[1] * len(pc[0]),
                                                                                             pc[0]))
    keep = dict(cands[: N_TRAINED - len(chars)])
    for ch in chars:
        keep.setdefault(ch, sub[ch])
    assert len(keep) == N_TRAINED, len(keep)
    assert all(c in chars for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.,:?'"), chars
    total = sum(keep.values())
    pieces = sorted(((p, math.log(c / total)) for p, c in keep.items()), key=lambda x: (-x[1], x[0]))
    return pieces


def build_backend(pieces, pad_to=None):
    """XLM-R layout: <s>=0 <pad>=1 </s>=2 <unk>=3, sentencepiece pieces, <mask> last. pad_to: total base vocab
    size (incl. <mask>); the gap is filled with dummy pieces '▁tok%05d' (score -30, below every trained piece)."""
    vocab = [(s, 0.0) for s in SPECIALS] + list(pieces)
    n_dummy = 0
    if pad_to is not None:
        n_dummy = pad_to - 1 - len(vocab)
        vocab += [(f"▁tok{i:05d}", -30.0) for i in range(len(vocab), pad_to - 1)]
    vocab.append(("<mask>", 0.0))
    assert len({p for p, _ in vocab}) == len(vocab)
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    # Stand-in for the real sentencepiece 'Precompiled' (nmt_nfkc) charsmap, which cannot be produced offline
    # without sentencepiece: NFKC + collapse runs of spaces (what transformers' v4 SpmConverter appended).
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.add_special_tokens([TkAddedToken(s, normalized=False, special=True) for s in SPECIALS]
                           + [TkAddedToken("<mask>", lstrip=True, normalized=False, special=True)])
    backend = TokenizersBackend(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>", mask_token="<mask>", sep_token="</s>", cls_token="<s>")
    return backend, len(vocab), n_dummy


def image_processor():
    # What use_square_size=True produces for the real checkpoint (224x224 squash), at the tiny image size.
    return CLIPImageProcessorPil(size={"height": 28, "width": 28}, crop_size={"height": 28, "width": 28},
                                 do_center_crop=False)


def make_tokenizer_dir(name, pieces, pad_to, compact):
    backend, base, n_dummy = build_backend(pieces, pad_to)
    proc = Kosmos2Processor(image_processor(), backend)  # the processor's __init__ adds the tag tokens
    d = fresh_dir(name)
    proc.save_pretrained(d)                    # tokenizer.json, tokenizer_config.json, processor_config.json
    proc.image_processor.save_pretrained(d)    # legacy standalone preprocessor_config.json
    pc_path = os.path.join(d, "processor_config.json")
    with open(pc_path, encoding="utf-8") as f:
        pc = json.load(f)
    pc["num_image_tokens"] = TINY_Q
    write_json(pc_path, pc)
    if compact:
        # save_pretrained pretty-prints (4 lines per Unigram piece); the 64k-piece file is re-serialised compactly.
        proc.tokenizer.backend_tokenizer.save(os.path.join(d, "tokenizer.json"), pretty=False)
    reloaded = Kosmos2Processor.from_pretrained(d)
    assert reloaded.tokenizer.backend_tokenizer.to_str() == proc.tokenizer.backend_tokenizer.to_str()
    assert reloaded.num_image_tokens == REAL_Q  # processor_config.json's num_image_tokens is NOT read by HF
    tok = reloaded.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS + ["<mask>"] + TAG_TOKENS}
    ids["<patch_index_0000>"] = tok.convert_tokens_to_ids("<patch_index_0000>")
    ids["<patch_index_1023>"] = tok.convert_tokens_to_ids("<patch_index_1023>")
    first_tag = ids["</doc>"]
    for i, t in enumerate(TAG_TOKENS + PATCH_TOKENS):
        assert tok.convert_tokens_to_ids(t) == first_tag + i
    assert first_tag == base
    files = sorted(os.listdir(d))
    info = {"dir": name, "base_vocab": base, "total_vocab": len(tok), "dummy_pieces": n_dummy,
            "trained_pieces": len(pieces), "token_ids": ids, "patch_index_id_formula": f"{ids['</doc>'] + 11} + k",
            "files": {f: os.path.getsize(os.path.join(d, f)) for f in files},
            "tokenizer_json_compact": compact}
    return reloaded, info


def tokenizer_structure(proc):
    j = json.loads(proc.tokenizer.backend_tokenizer.to_str())
    added = j["added_tokens"]
    return {
        "model": {k: v for k, v in j["model"].items() if k != "vocab"},
        "normalizer": j["normalizer"], "pre_tokenizer": j["pre_tokenizer"], "decoder": j["decoder"],
        "post_processor": j["post_processor"], "added_tokens_first_16": added[:16],
        "added_tokens_count": len(added),
    }


TOKENIZER_STRINGS = [
    "An image of a snowman warming himself by a fire.",
    "<grounding>An image of",
    "<grounding> An image of",
    "<s><image><image><image></image><grounding>An image of",
    "<s> <image> <image> </image> text",
    "<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>",
    "<phrase>a dog</phrase> <object> <patch_index_0005> </delimiter_of_multi_objects/> <patch_index_0911> </object>",
    "word<phrase>x</phrase>",
    "  leading and   multiple   spaces  ",
    "trailing space ",
    "Café naïve façade",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ ①",
    "日本語のテキスト 🙂 emoji",
    "tok00123 ▁tok00123",
    "",
    "<unk> <pad> </s> <mask> text",
    "x</doc></chunk></line>",
    "<patch_index_1024> <patch_index_0000>",
]

DECODE_SEQS = [
    # segments: a token name (special / tag / patch index), a 1-tuple = a vocabulary piece name, or plain text
    # (encoded with add_special_tokens=False, so it gets the metaspace '▁' prefix)
    ["<s>", "<image>", "</image>", "<grounding>", "An image of", "<phrase>", "a snowman", "</phrase>", "<object>",
     "<patch_index_0044>", "<patch_index_0863>", "</object>", "warming himself by", "<phrase>", "a fire", "</phrase>",
     "<object>", "<patch_index_0005>", "<patch_index_0911>", "</object>", (".",), "</s>"],
    ["<pad>", "<pad>", "<s>", "A dog", "</s>", "<pad>"],
    ["<object>", "<patch_index_0001>", "</delimiter_of_multi_objects/>", "<patch_index_0002>", "</object>"],
    ["Café", "<unk>", "naïve"],
]


def tokenizer_cases(proc):
    tok = proc.tokenizer
    out = {"encode": [], "decode": []}
    for s in TOKENIZER_STRINGS:
        e0 = tok(s, add_special_tokens=False)
        e1 = tok(s, add_special_tokens=True)
        enc = tok.backend_tokenizer.encode(s, add_special_tokens=False)
        out["encode"].append({
            "text": s,
            "ids": e0["input_ids"], "tokens": tok.convert_ids_to_tokens(e0["input_ids"]),
            "offsets": [list(o) for o in enc.offsets],
            "ids_with_special": e1["input_ids"],
            "decode": tok.decode(e0["input_ids"]),
            "decode_skip_special": tok.decode(e1["input_ids"], skip_special_tokens=True),
        })
    for segs in DECODE_SEQS:
        ids = []
        for sg in segs:
            if isinstance(sg, tuple):
                ids.append(tok.convert_tokens_to_ids(sg[0]))
                assert ids[-1] != 3, sg
            elif sg.startswith("<") and sg.endswith(">"):
                ids.append(tok.convert_tokens_to_ids(sg))
                assert ids[-1] != 3 or sg == "<unk>", sg
            else:
                ids += tok(sg, add_special_tokens=False)["input_ids"]
        out["decode"].append({"segments": to_jsonable(segs), "ids": ids, "tokens": tok.convert_ids_to_tokens(ids),
                              "decode": tok.decode(ids),
                              "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
                              "batch_decode_skip_special": tok.batch_decode([ids], skip_special_tokens=True)})
    return out


# --------------------------------------------------------------------------------------------------------------
# 2. processor cases
# --------------------------------------------------------------------------------------------------------------
def synthetic_image(seed, w, h):
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 255 // (w + h - 2)], -1)
    noise = rs.randint(-20, 21, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


IMAGES = {"img_a": (101, 40, 32), "img_b": (102, 30, 50), "img_c": (103, 28, 28)}


def get_image(name):
    seed, w, h = IMAGES[name]
    return synthetic_image(seed, w, h)


def box(*v):
    return tuple(float(x) for x in v)


PROCESSOR_CASES = [
    dict(name="plain_text_with_image", text="An image of", images="img_a"),
    dict(name="grounding_with_image", text="<grounding>An image of", images="img_a"),
    dict(name="grounding_space_with_image", text="<grounding> An image of", images="img_a"),
    dict(name="text_without_image", text="<grounding>An image of"),
    dict(name="text_without_image_stripped", text="   A dog is sitting on the grass.   "),
    dict(name="bbox_one_phrase_normalised", text="<grounding><phrase> a snowman</phrase> warming himself by a fire",
         images="img_a", bboxes=[box(0.390625, 0.046875, 0.984375, 0.828125)]),
    dict(name="bbox_several_boxes_one_phrase", text="<grounding><phrase> two dogs</phrase> play in the park",
         images="img_a", bboxes=[[box(0.1, 0.2, 0.3, 0.4), box(0.5, 0.5, 0.9, 0.95)]]),
    dict(name="bbox_patch_index_pairs", text="<grounding>An image of<phrase> a snowman</phrase> warming himself by"
         "<phrase> a fire</phrase>.", images="img_a", bboxes=[(44, 863), (5, 911)]),
    dict(name="bbox_several_phrases_mixed", text="<phrase>A man</phrase> holds<phrase> an umbrella</phrase> near"
         "<phrase> a car</phrase> and<phrase> a dog</phrase>", images="img_b",
         bboxes=[(0, 1023), None, [(10, 20), box(0.0, 0.0, 1.0, 1.0)], []]),
    dict(name="bbox_without_image", text="<phrase>a cat</phrase> on a chair",
         bboxes=[box(0.25, 0.25, 0.75, 0.75)]),
    dict(name="bbox_count_mismatch_error", text="<phrase>a cat</phrase> and <phrase>a dog</phrase>",
         images="img_a", bboxes=[box(0.25, 0.25, 0.75, 0.75)]),
    dict(name="bbox_list_not_tuple_error", text="<phrase>a cat</phrase>", images="img_a",
         bboxes=[[[0.1, 0.1, 0.2, 0.2]]]),
    dict(name="batch_images_pad_right", text=["<grounding>An image of", "A dog is sitting on the grass next to a "
         "red ball.", "Describe this image in detail."], images=["img_a", "img_b", "img_c"], padding="longest",
         tokenizer_padding_side="right"),
    dict(name="batch_images_pad_left", text=["<grounding>An image of", "A dog is sitting on the grass next to a "
         "red ball.", "Describe this image in detail."], images=["img_a", "img_b", "img_c"], padding="longest",
         tokenizer_padding_side="left"),
    dict(name="batch_images_padding_side_kwarg_left", text=["<grounding>An image of", "A dog is sitting on the "
         "grass."], images=["img_a", "img_b"], padding="longest", padding_side="left",
         tokenizer_padding_side="right"),
    dict(name="batch_images_padding_false", text=["<grounding>An image of", "A dog is sitting on the grass."],
         images=["img_a", "img_b"], padding=False, tokenizer_padding_side="right"),
    dict(name="batch_images_bboxes", text=["<grounding><phrase> a snowman</phrase> by a fire",
                                           "<phrase>A dog</phrase> and<phrase> a ball</phrase>"],
         images=["img_a", "img_b"], bboxes=[[(44, 863)], [box(0.1, 0.1, 0.5, 0.5), (100, 200)]],
         padding="longest", tokenizer_padding_side="left"),
    dict(name="batch_no_images_pad_right", text=["<grounding>An image of", "A man in a blue shirt is holding an "
         "umbrella in the rain."], padding="longest", tokenizer_padding_side="right"),
    dict(name="batch_no_images_pad_left", text=["<grounding>An image of", "A man in a blue shirt is holding an "
         "umbrella in the rain."], padding="longest", tokenizer_padding_side="left"),
    dict(name="batch_no_images_no_padding", text=["<grounding>An image of", "A man in a blue shirt."]),
    dict(name="add_eos_with_image", text="<grounding>An image of", images="img_a", add_eos_token=True),
    dict(name="add_eos_without_image", text="An image of", add_eos_token=True),
    dict(name="add_eos_batch_images_left", text=["<grounding>An image of", "A dog is sitting on the grass."],
         images=["img_a", "img_b"], add_eos_token=True, padding="longest", tokenizer_padding_side="left"),
    dict(name="no_special_tokens_with_image", text="An image of", images="img_a", add_special_tokens=False),
    dict(name="unicode_with_image", text="Café 日本 🙂 naïve", images="img_c"),
    dict(name="tiny_num_image_tokens_8", text="<grounding>An image of", images="img_a", num_image_tokens=TINY_Q),
    dict(name="tiny_num_image_tokens_8_batch_left", text=["<grounding>An image of", "A dog is sitting on the "
         "grass next to a red ball."], images=["img_a", "img_b"], num_image_tokens=TINY_Q, padding="longest",
         tokenizer_padding_side="left"),
    dict(name="images_only_no_text", images="img_a"),
    # truncation / max_length
    dict(name="trunc_text_only", text="A man in a blue shirt is holding an umbrella in the rain.",
         truncation=True, max_length=6, group="truncation"),
    dict(name="trunc_with_image_inside_image_tokens", text="<grounding>An image of a snowman warming himself",
         images="img_a", truncation=True, max_length=20, group="truncation"),
    dict(name="trunc_with_image_after_image_tokens", text="<grounding>An image of a snowman warming himself by a "
         "fire.", images="img_a", truncation=True, max_length=72, group="truncation"),
    dict(name="trunc_batch_text_only_pad_left", text=["A man in a blue shirt is holding an umbrella in the rain.",
         "A dog."], truncation=True, max_length=8, padding="longest", tokenizer_padding_side="left",
         group="truncation"),
    dict(name="trunc_batch_with_images", text=["A man in a blue shirt is holding an umbrella in the rain.",
         "A dog."], images=["img_a", "img_b"], truncation=True, max_length=70, padding="longest",
         tokenizer_padding_side="right", group="truncation"),
    dict(name="trunc_add_eos_text_only", text="A man in a blue shirt is holding an umbrella.", truncation=True,
         max_length=6, add_eos_token=True, group="truncation"),
]


def run_processor_case(proc, case):
    c = dict(case)
    name = c.pop("name")
    group = c.pop("group", "main")
    side = c.pop("tokenizer_padding_side", "right")
    images = c.pop("images", None)
    img_obj = None
    if images is not None:
        img_obj = [get_image(i) for i in images] if isinstance(images, list) else get_image(images)
    kwargs = dict(c)
    kwargs.setdefault("num_image_tokens", REAL_Q)
    text = kwargs.pop("text", None)
    bboxes = kwargs.pop("bboxes", None)
    proc.tokenizer.padding_side = side
    call = {"text": text, "images": images, "bboxes": to_jsonable(bboxes), "kwargs": kwargs,
            "tokenizer_padding_side": side}

    def call_proc():
        out = proc(images=img_obj, text=text, bboxes=bboxes, **kwargs)
        res = {}
        for k in ("input_ids", "attention_mask", "image_embeds_position_mask"):
            if k in out:
                res[k] = to_jsonable(out[k])
        if "pixel_values" in out:
            res["pixel_values_shape"] = list(np.asarray(out["pixel_values"]).shape)
        res["keys"] = sorted(out.keys())
        ids = res.get("input_ids")
        if ids is not None:
            rows = ids if (ids and isinstance(ids[0], list)) else [ids]
            res["tokens"] = [proc.tokenizer.convert_ids_to_tokens(r) for r in rows]
        return res

    result = run_or_error(call_proc)
    prompt = None
    if text is not None:
        prompt = run_or_error(lambda: proc.preprocess_examples(
            text, img_obj, bboxes, num_image_tokens=kwargs["num_image_tokens"]))
    proc.tokenizer.padding_side = "right"
    return {"name": name, "group": group, "call": call, "preprocess_examples": prompt, **result}


# --------------------------------------------------------------------------------------------------------------
# 3. post_process_generation + codec
# --------------------------------------------------------------------------------------------------------------
SNOWMAN = ("<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> "
           "warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.")
POST_PROCESS_STRINGS = [
    SNOWMAN,
    "<image>. the, to and of as in I that' for is was- on’ it with The as at bet he have from by are \" you his “ "
    "this said not has an ( but had we her they will my or were their): up about out who one all been she can more "
    "would It</image>" + SNOWMAN,
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>",
    "<grounding><phrase> two dogs</phrase><object><patch_index_0010><patch_index_0300></delimiter_of_multi_objects/>"
    "<patch_index_0500><patch_index_0990></object> play.",
    "<grounding><phrase>three cats</phrase><object><patch_index_0000><patch_index_0033></delimiter_of_multi_objects/>"
    "<patch_index_0100><patch_index_0101></delimiter_of_multi_objects/><patch_index_0512><patch_index_1023></object>",
    "An object<object><patch_index_0044><patch_index_0863></object> without a phrase.",
    "Two objects<object><patch_index_0001><patch_index_0002></delimiter_of_multi_objects/><patch_index_0064>"
    "<patch_index_0099></object> without a phrase.",
    "A phrase<phrase> without object</phrase> here.",
    "<phrase> unclosed phrase<object><patch_index_0044><patch_index_0863></object>",
    "<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863>",
    "<phrase> a dog</phrase><object><patch_index_0044></object> half pair",
    "<phrase> a dog</phrase><object></object> empty object",
    "<phrase> a dog</phrase> <object><patch_index_0044><patch_index_0863></object> space before object",
    "<phrase> a dog</phrase><object> <patch_index_0044><patch_index_0863></object> space inside object",
    "text before</image> text after<phrase> a cat</phrase><object><patch_index_0000><patch_index_1023></object>",
    "first</image> second</image> third<phrase> a cat</phrase><object><patch_index_0033><patch_index_0066></object>",
    "<image></image>",
    "</image>",
    "",
    "plain caption without any tags",
    "<grounding> Un café à Paris<phrase> la façade</phrase><object><patch_index_0100><patch_index_0200></object> "
    "est belle.",
    "<grounding> 日本語<phrase> 猫</phrase><object><patch_index_0003><patch_index_0100></object>です。",
    "<grounding> Emoji 🙂<phrase> 🐶 dog</phrase><object><patch_index_0040><patch_index_0080></object> 🎉",
    "<grounding>   <phrase>   leading spaces</phrase><object><patch_index_0001><patch_index_0034></object>   ",
    "<phrase>phrase first</phrase><object><patch_index_0005><patch_index_0006></object> then text",
    "<phrase> trailing space </phrase><object><patch_index_0010><patch_index_0042></object> end",
    "<phrase> out of range</phrase><object><patch_index_1024><patch_index_9999></object>",
    "<phrase> five digits</phrase><object><patch_index_00044><patch_index_12345></object>",
    "<phrase> same cell</phrase><object><patch_index_0500><patch_index_0500></object>",
    "<phrase> same row</phrase><object><patch_index_0032><patch_index_0063></object>",
    "<phrase> same column</phrase><object><patch_index_0005><patch_index_0997></object>",
    "<phrase> reversed</phrase><object><patch_index_0900><patch_index_0010></object>",
    "<phrase> a <phrase> nested</phrase> tag</phrase><object><patch_index_0001><patch_index_0002></object>",
    "<phrase> repeated</phrase><phrase> twice</phrase><object><patch_index_0001><patch_index_0002></object>",
    "<phrase> a dog</phrase><object><patch_index_0001><patch_index_0002></object><object><patch_index_0003>"
    "<patch_index_0004></object> double object",
    "<phrase> a dog</phrase><object><patch_index_0001><patch_index_0002></delimiter_of_multi_objects/></object>",
    "<phrase> a dog</phrase><object><patch_index_0001><patch_index_0002></delimiter_of_multi_objects/><patch_index_"
    "0003></object>",
    "<phrase></phrase><object><patch_index_0001><patch_index_0002></object> empty phrase",
    "a < b and c > d<phrase> math</phrase><object><patch_index_0001><patch_index_0002></object>",
    "<unknown_tag> some <b>bold</b> text<phrase> x</phrase><object><patch_index_0001><patch_index_0002></object>",
    "line one\nline two<phrase> a\nnewline</phrase><object><patch_index_0001><patch_index_0099></object>\n",
    "<s> bos and eos</s><phrase> kept</phrase><object><patch_index_0001><patch_index_0002></object>",
]

CODEC_BOXES = [
    (0.0, 0.0, 1.0, 1.0), (0.390625, 0.046875, 0.984375, 0.828125), (0.171875, 0.015625, 0.484375, 0.890625),
    (0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 0.95), (0.25, 0.25, 0.75, 0.75), (0.0, 0.0, 0.03125, 0.03125),
    (0.0, 0.0, 0.0312, 0.0312), (0.0, 0.0, 0.0313, 0.0313), (0.96875, 0.96875, 1.0, 1.0),
    (0.99, 0.99, 1.0, 1.0), (0.5, 0.5, 0.5000001, 0.5000001), (0.03125, 0.0625, 0.09375, 0.125),
    (0.3, 0.6, 0.7, 0.9), (0.15, 0.35, 0.55, 0.95), (0.7, 0.1, 0.8, 0.2), (0.123, 0.456, 0.789, 0.987),
    (0.0, 0.5, 1.0, 0.75), (0.2, 0.0, 0.4, 1.0), (0.6, 0.6, 0.61, 0.61), (1 / 3, 1 / 3, 2 / 3, 2 / 3),
    (0.001, 0.001, 0.999, 0.999), (0.0625, 0.0625, 0.9375, 0.9375), (0.45, 0.05, 0.55, 0.15),
    (0.05, 0.45, 0.15, 0.55), (0.875, 0.0, 1.0, 0.125), (0.0, 0.875, 0.125, 1.0), (0.33, 0.66, 0.34, 0.67),
    (0.1, 0.1, 0.2, 0.2), (0.7, 0.7, 0.9, 0.8), (0.2, 0.3, 0.25, 0.35), (0.0, 0.0, 0.5, 0.5),
    (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0), (0.9, 0.1, 0.95, 0.9),
    (0.31, 0.41, 0.59, 0.26 + 0.5), (0.8, 0.8, 1.2, 1.3), (-0.1, -0.2, 0.5, 0.5), (0.12, 0.34, 0.56, 0.78),
    (0.2, 0.2, 0.2, 0.4), (0.5, 0.5, 0.4, 0.6), (0.3, 0.3, 0.3, 0.3),
]
CODEC_PAIRS = [
    (0, 0), (0, 1023), (44, 863), (5, 911), (1023, 1023), (500, 500), (32, 63), (5, 997), (900, 10), (0, 33),
    (100, 101), (512, 1023), (31, 992), (992, 31), (1, 2), (64, 99), (3, 100), (40, 80), (33, 66), (100, 200),
    (10, 300), (500, 990), (1, 34), (10, 42), (255, 256), (0, 31), (31, 31), (992, 1023), (528, 561), (17, 17),
    (1024, 9999), (44, 12345), (2047, 2048), (7, 7 + 32 * 5), (300, 300 + 33), (600, 635), (123, 456),
    (789, 1000), (0, 255), (15, 240), (17, 34), (170, 255),
]


def post_process_cases(proc):
    out = []
    for s in POST_PROCESS_STRINGS:
        out.append({
            "text": s,
            "cleanup": to_jsonable(run_or_error(lambda: proc.post_process_generation(s))),
            "no_cleanup": run_or_error(lambda: proc.post_process_generation(s, cleanup_and_extract=False)),
            "extract_entities_with_patch_indices":
                to_jsonable(run_or_error(lambda: pk.extract_entities_with_patch_indices(s.split("</image>")[-1]))),
        })
    return out


def codec_cases(proc):
    res = {"coordinate_to_patch_index": [], "patch_index_to_coordinate": [], "convert_bbox_to_patch_index_tokens": []}
    for b in CODEC_BOXES[:12] + [(44, 863), (0, 1023), (1024, 5), (-1, 3)]:
        res["convert_bbox_to_patch_index_tokens"].append(
            {"bbox": list(b), **to_jsonable(run_or_error(lambda: proc._convert_bbox_to_patch_index_tokens(b)))})
    for grid in (32, 16):
        for b in CODEC_BOXES:
            res["coordinate_to_patch_index"].append(
                {"bbox": list(b), "num_patches_per_side": grid,
                 **to_jsonable(run_or_error(lambda: pk.coordinate_to_patch_index(b, grid)))})
        for a, z in CODEC_PAIRS:
            res["patch_index_to_coordinate"].append(
                {"ul_idx": a, "lr_idx": z, "num_patches_per_side": grid,
                 **to_jsonable(run_or_error(lambda: pk.patch_index_to_coordinate(a, z, grid)))})
    return res


# --------------------------------------------------------------------------------------------------------------
# 4. models
# --------------------------------------------------------------------------------------------------------------
def model_config(vocab_size, embed_dim):
    text = dict(vocab_size=vocab_size, embed_dim=embed_dim, layers=2, attention_heads=4, ffn_dim=64,
                max_position_embeddings=128, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                layer_norm_eps=1e-5, init_std=0.1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    cfg = Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=TINY_Q, attn_implementation="eager")
    return text, vision, cfg


PERTURB_NOTE = ("after init every nn.LayerNorm got weight = 1 + 0.1 N(0,1), bias = 0.1 N(0,1); every nn.Linear bias "
                "0.05 N(0,1); the vision class_embedding and position_embedding.weight 0.5 N(0,1) (one "
                "torch.Generator, modules in named_modules() order)")


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
        if hasattr(m, "class_embedding") and hasattr(m, "position_embedding"):
            m.class_embedding.copy_(0.5 * torch.randn(m.class_embedding.shape, generator=g))
            m.position_embedding.weight.copy_(0.5 * torch.randn(m.position_embedding.weight.shape, generator=g))


MODEL_PROMPTS = ["<grounding>An image of", "A dog is sitting on the grass next to a red ball."]


def model_inputs(proc):
    proc.tokenizer.padding_side = "left"
    imgs = [get_image("img_a"), get_image("img_b")]
    enc = proc(images=imgs, text=MODEL_PROMPTS, num_image_tokens=TINY_Q, padding="longest", return_tensors="pt")
    proc.tokenizer.padding_side = "right"
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long(),
            "image_embeds_position_mask": enc["image_embeds_position_mask"].long(),
            "pixel_values": enc["pixel_values"].float()}


def run_model(model, inp):
    cap = {}
    hooks = [
        model.image_to_text_projection.register_forward_pre_hook(
            lambda m, args: cap.__setitem__("image_features", args[0].clone())),
        model.text_model.model.layers[0].register_forward_pre_hook(
            lambda m, args: cap.__setitem__("text_input_embeds", args[0].clone())),
        model.text_model.model.layer_norm.register_forward_hook(
            lambda m, args, out: cap.__setitem__("text_last_hidden_state", out.clone())),
    ]
    out = model(pixel_values=inp["pixel_values"], input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                image_embeds_position_mask=inp["image_embeds_position_mask"], use_cache=False, return_dict=True)
    for h in hooks:
        h.remove()
    io = {
        "vision_last_hidden_state": out.image_outputs.last_hidden_state,
        "image_features": cap["image_features"],
        "image_embeds": out.image_outputs.pooler_output,
        "projection_attentions": out.image_outputs.projection_attentions,
        "text_input_embeds": cap["text_input_embeds"],
        "text_last_hidden_state": cap["text_last_hidden_state"],
        "logits": out.logits,
    }
    # consistency checks (the captured tensors are what the model used)
    ln = model.vision_model.model.post_layernorm(io["vision_last_hidden_state"])
    assert maxdiff(nn.functional.normalize(ln, dim=-1), io["image_features"]) == 0.0
    lm = model.text_model.lm_head(io["text_last_hidden_state"])
    assert maxdiff(lm, io["logits"]) == 0.0
    return io


def position_ids(input_ids):
    return Kosmos2TextSinusoidalPositionalEmbedding.create_position_ids_from_input_ids(input_ids, 1, 0)


def check_positions(model, inp, pos):
    ep = model.text_model.model.embed_positions
    got = ep(input_ids=inp["input_ids"], cache_length=0)
    want = ep.weights.index_select(0, pos.view(-1)).view(*pos.shape, -1)
    assert maxdiff(got, want) == 0.0


def saved_keys(d):
    keys = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors") and f != "io.safetensors":
            with safe_open(os.path.join(d, f), "pt") as sf:
                for k in sf.keys():
                    keys[k] = {"file": f, "dtype": str(sf.get_slice(k).get_dtype()),
                               "shape": list(sf.get_slice(k).get_shape())}
    return keys


def ls(d):
    return {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}


def f32(t):
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone() for k, v in t.items()}


def build_model(vocab, embed, seed):
    text, vision, cfg = model_config(vocab, embed)
    torch.manual_seed(seed)
    model = Kosmos2ForConditionalGeneration(cfg).eval()
    assert model.config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"
    perturb(model, seed + 1000)
    assert model.text_model.lm_head.weight.data_ptr() == model.text_model.model.embed_tokens.weight.data_ptr()
    return text, vision, model


IO_DOC = {
    "input_ids": "int64 [B,T] processor output (left padded, pad id 1)",
    "attention_mask": "int64 [B,T]",
    "image_embeds_position_mask": "int64 [B,T] 1 where image_embeds replace the token embedding",
    "pixel_values": "f32 [B,3,28,28] processor output (CLIPImageProcessorPil, 28x28 squash, no crop)",
    "position_ids": "int64 [B,T] HF sinusoid position ids (pads -> 1, first real token -> 2)",
    "vision_last_hidden_state": "f32 [B,5,24] vision tower output (before post_layernorm)",
    "image_features": "f32 [B,5,24] normalize(post_layernorm(vision_last_hidden_state), dim=-1) = projection input",
    "image_embeds": "f32 [B,8,E] image_to_text_projection output",
    "projection_attentions": "f32 [B,4,8,13] projection attention probabilities",
    "text_input_embeds": "f32 [B,T,E] input of text layer 0 = (token/image embeds)*sqrt(E) + sinusoid positions",
    "text_last_hidden_state": "f32 [B,T,E] text_model.model output after the final layer_norm",
    "logits": "f32 [B,T,V] full logits (eager attention, no cache)",
}


def case_tiny(proc, tokinfo, seed=21):
    V = tokinfo["total_vocab"]
    text, vision, model = build_model(V, 32, seed)
    inp = model_inputs(proc)
    pos = position_ids(inp["input_ids"])
    check_positions(model, inp, pos)
    io = run_model(model, inp)
    gen = model.generate(pixel_values=inp["pixel_values"], input_ids=inp["input_ids"],
                         attention_mask=inp["attention_mask"], image_embeds_position_mask=inp["image_embeds_position_mask"],
                         max_new_tokens=6, do_sample=False, use_cache=True)
    gen2 = model.generate(pixel_values=inp["pixel_values"], input_ids=inp["input_ids"],
                          attention_mask=inp["attention_mask"],
                          image_embeds_position_mask=inp["image_embeds_position_mask"],
                          max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(gen, gen2)
    print(f"[tiny] T={inp['input_ids'].shape[1]} logits {tuple(io['logits'].shape)} generate {tuple(gen.shape)}")

    d = fresh_dir("tiny")
    model.save_pretrained(d, safe_serialization=True)
    tensors = f32({**inp, "position_ids": pos, **io})
    tensors["generate_ids"] = gen.contiguous().clone()
    save_file(tensors, os.path.join(d, "io.safetensors"))
    keys = saved_keys(d)
    lm_head_saved = "text_model.lm_head.weight" in keys

    # reload check (lm_head must be re-tied from embed_tokens)
    re = Kosmos2ForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    io_re = run_model(re, inp)
    assert maxdiff(io_re["logits"], io["logits"]) == 0.0

    base_notes = (
        f"transformers Kosmos2ForConditionalGeneration(Kosmos2Config(text_config={text}, vision_config={vision}, "
        f"latent_query_num={TINY_Q}, attn_implementation='eager')) built right after torch.manual_seed({seed}), "
        f"eval; {PERTURB_NOTE} (generator seed {seed + 1000}). Text init_std 0.1 (instead of 0.02) so attention is "
        "not near-uniform. lm_head is TIED to text_model.model.embed_tokens (same tensor). Inputs: the processor in "
        "fixtures/kosmos2/tokenizer (reloaded from disk) called as proc(images=[img_a, img_b], text="
        f"{MODEL_PROMPTS}, num_image_tokens={TINY_Q}, padding='longest', return_tensors='pt') with "
        "tokenizer.padding_side='left' (img_a/img_b: synthetic RGB images, see processor/cases.json). Outputs from "
        "model(pixel_values, input_ids, attention_mask, image_embeds_position_mask, use_cache=False); "
        "image_features, text_input_embeds and text_last_hidden_state were captured with forward hooks (the "
        "projection's input, text layer 0's input, the final text layer_norm's output) and checked: "
        "normalize(post_layernorm(vision_last_hidden_state)) == image_features and lm_head(text_last_hidden_state) "
        "== logits exactly. generate_ids = model.generate(same inputs, max_new_tokens=6, do_sample=False, "
        "use_cache=True) (input ids + 6 new ids; greedy; HF cached-decode positions, see spec §8.7). "
        f"save_pretrained(safe_serialization=True) wrote {sorted(ls(d))}; text_model.lm_head.weight "
        f"{'IS' if lm_head_saved else 'is NOT'} in model.safetensors (tied); reloading with from_pretrained "
        "reproduces the logits exactly."
    )
    meta_extra = {
        "position_ids": pos.tolist(),
        "position_ids_rule": "Kosmos2TextSinusoidalPositionalEmbedding.create_position_ids_from_input_ids(input_ids, "
                             "padding_idx=1, cache_length=0) = cumsum(ids != 1) * (ids != 1) + 1; checked against "
                             "embed_positions(input_ids=...) output",
        "inputs": {"prompts": MODEL_PROMPTS, "images": ["img_a", "img_b"], "num_image_tokens": TINY_Q,
                   "padding": "longest", "padding_side": "left", "input_ids": inp["input_ids"].tolist(),
                   "attention_mask": inp["attention_mask"].tolist(),
                   "image_embeds_position_mask": inp["image_embeds_position_mask"].tolist()},
        "generate_ids": gen.tolist(),
        "lm_head_weight_saved": lm_head_saved,
        "saved_tensors": keys,
        "files": ls(d),
        "io_keys": {k: IO_DOC.get(k, "int64 [B,T+6] greedy generate output") for k in tensors},
        "io_shapes": {k: list(v.shape) for k, v in tensors.items()},
        "tokenizer_dir": "../tokenizer",
    }
    write_meta(d, {"text_config": text, "vision_config": vision, "latent_query_num": TINY_Q}, base_notes, meta_extra)

    # ---- dtype copies: weights rounded to f16 / bf16; io = the f32 model with the rounded weights upcast ----------
    for dname, dt in (("tiny_f16", torch.float16), ("tiny_bf16", torch.bfloat16)):
        md = Kosmos2ForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
        md = md.to(dt)
        dd = fresh_dir(dname)
        md.save_pretrained(dd, safe_serialization=True)
        up = Kosmos2ForConditionalGeneration.from_pretrained(dd, attn_implementation="eager", dtype=torch.float32)
        up = up.eval()
        assert up.text_model.lm_head.weight.dtype == torch.float32
        io_up = run_model(up, inp)
        diff = maxdiff(io_up["logits"], io["logits"])
        t2 = f32({"logits_last": io_up["logits"][:, -1, :], "logits_argmax": io_up["logits"].argmax(-1),
                  "text_last_hidden_state": io_up["text_last_hidden_state"], "image_embeds": io_up["image_embeds"],
                  "vision_last_hidden_state": io_up["vision_last_hidden_state"]})
        save_file(t2, os.path.join(dd, "io.safetensors"))
        k2 = saved_keys(dd)
        notes = (
            f"The tiny/ model converted with model.to({dt}) and saved with save_pretrained (safetensors {dt} "
            f"storage, config.json dtype field written by transformers). io.safetensors (inputs: use "
            "../tiny/io.safetensors, identical): vision_last_hidden_state, image_embeds, text_last_hidden_state "
            "[B,T,32], logits_last (logits at the last position [B,V]) and logits_argmax [B,T] computed by "
            f"transformers in float32 from these {dt}-rounded weights upcast to f32 (from_pretrained(dir, "
            "dtype=torch.float32)), so a port that loads the half-precision file into f32 should match them tightly "
            "(full logits = text_last_hidden_state @ embed_tokens^T; not stored to save space). Versus the unrounded "
            f"f32 model (../tiny/io.safetensors logits): max |logits - tiny logits| = {diff:.3e}."
        )
        write_meta(dd, {"dtype": str(dt), "source": "../tiny"}, notes,
                   {"lm_head_weight_saved": "text_model.lm_head.weight" in k2, "saved_tensors": k2,
                    "files": ls(dd), "max_abs_logit_diff_vs_f32": diff,
                    "io_shapes": {k: list(v.shape) for k, v in t2.items()}})
        print(f"[{dname}] max|logits - f32 logits| = {diff:.3e}")

    # ---- sharded copy -----------------------------------------------------------------------------------------
    ds = fresh_dir("tiny_sharded")
    shard = "60KB"
    model.save_pretrained(ds, safe_serialization=True, max_shard_size=shard)
    files = ls(ds)
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in files, files
    rs = Kosmos2ForConditionalGeneration.from_pretrained(ds, attn_implementation="eager").eval()
    assert maxdiff(run_model(rs, inp)["logits"], io["logits"]) == 0.0
    write_meta(ds, {"max_shard_size": shard, "source": "../tiny"},
               f"The tiny/ model (identical f32 weights) saved with save_pretrained(max_shard_size='{shard}') -> "
               f"{len(shards)} shards + model.safetensors.index.json (weight_map: tensor name -> shard file). "
               "No io here: use ../tiny/io.safetensors (reloading the shards reproduces its logits exactly).",
               {"shards": shards, "files": files, "saved_tensors": saved_keys(ds),
                "lm_head_weight_saved": "text_model.lm_head.weight" in saved_keys(ds)})
    print(f"[tiny_sharded] {len(shards)} shards")
    return {"T": int(inp["input_ids"].shape[1]), "lm_head_saved": lm_head_saved, "position_ids": pos.tolist()}


def case_realvocab(proc, seed=22):
    V = 65037
    text, vision, model = build_model(V, 16, seed)
    # Round every floating parameter to float16 (the file is stored in f16 to keep it small); all outputs below are
    # computed in f32 FROM THESE ROUNDED VALUES, so loading the f16 file into f32 gives exactly the reference model.
    for p in model.parameters():
        p.copy_(p.half().float())
    inp = model_inputs(proc)
    pos = position_ids(inp["input_ids"])
    check_positions(model, inp, pos)
    io = run_model(model, inp)
    logits = io.pop("logits")
    B, T, _ = logits.shape
    vocab_slice = torch.cat([torch.arange(0, 256), torch.arange(64000, V)])
    extra = {
        "logits_slice": logits[:, :, vocab_slice],
        "logits_slice_ids": vocab_slice,
        "logits_argmax": logits.argmax(-1),
        "logits_logsumexp": torch.logsumexp(logits, -1),
    }
    d = fresh_dir("realvocab")
    model.half().save_pretrained(d, safe_serialization=True)
    tensors = f32({**inp, "position_ids": pos, **io, **extra})
    save_file(tensors, os.path.join(d, "io.safetensors"))
    keys = saved_keys(d)
    re = Kosmos2ForConditionalGeneration.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    io_re = run_model(re, inp)
    assert maxdiff(io_re["logits"], logits) == 0.0
    print(f"[realvocab] T={T} logits {tuple(logits.shape)} (not stored in full)")
    notes = (
        f"Kosmos2ForConditionalGeneration at the REAL vocabulary size 65037 and real special ids (pad 1, bos 0, eos "
        f"2): Kosmos2Config(text_config={text}, vision_config={vision}, latent_query_num={TINY_Q}, "
        f"attn_implementation='eager'), torch.manual_seed({seed}), {PERTURB_NOTE} (generator seed {seed + 1000}). "
        "STORAGE: every parameter was then rounded to float16 (p = p.half().float()) and the model saved with "
        "model.half().save_pretrained -> model.safetensors holds F16 tensors (65037x16 embeddings = 2 MB instead of "
        "4 MB) and config.json records dtype float16. Because of the rounding, the f16 values ARE the reference "
        "model: every output in io.safetensors was computed in float32 from the f16 values upcast (loading with "
        "from_pretrained(dir, dtype=torch.float32) reproduces the logits exactly). Inputs: processor from "
        f"fixtures/kosmos2/tokenizer_realids (real ids: <image> 64003, </image> 64004, <grounding> 64012), prompts "
        f"{MODEL_PROMPTS}, num_image_tokens={TINY_Q}, left padding. Full logits [B,T,65037] f32 would be "
        f"{B * T * V * 4} bytes, so only: logits_slice [B,T,{len(vocab_slice)}] "
        "at vocab ids logits_slice_ids (0..255 and 64000..65036: specials, image placeholder ids 4..67, all tags and "
        "patch-index tokens), logits_argmax [B,T] and logits_logsumexp [B,T] over the full vocab; plus "
        "text_last_hidden_state (logits = text_last_hidden_state @ embed_tokens^T, lm_head tied). lm_head.weight "
        f"{'IS' if 'text_model.lm_head.weight' in keys else 'is NOT'} in model.safetensors."
    )
    write_meta(d, {"text_config": text, "vision_config": vision, "latent_query_num": TINY_Q, "storage": "float16"},
               notes, {"position_ids": pos.tolist(),
                       "inputs": {"prompts": MODEL_PROMPTS, "images": ["img_a", "img_b"], "num_image_tokens": TINY_Q,
                                  "padding": "longest", "padding_side": "left",
                                  "input_ids": inp["input_ids"].tolist(),
                                  "attention_mask": inp["attention_mask"].tolist(),
                                  "image_embeds_position_mask": inp["image_embeds_position_mask"].tolist()},
                       "lm_head_weight_saved": "text_model.lm_head.weight" in keys, "saved_tensors": keys,
                       "files": ls(d), "io_shapes": {k: list(v.shape) for k, v in tensors.items()},
                       "tokenizer_dir": "../tokenizer_realids"})
    return {"T": T, "position_ids": pos.tolist()}


# --------------------------------------------------------------------------------------------------------------
def main():
    os.makedirs(OUT_ROOT, exist_ok=True)
    pieces = trained_pieces()
    assert trained_pieces() == pieces
    proc_small, info_small = make_tokenizer_dir("tokenizer", pieces, None, compact=False)
    proc_real, info_real = make_tokenizer_dir("tokenizer_realids", pieces, REAL_BASE_VOCAB, compact=True)
    assert info_real["token_ids"]["<image>"] == 64003 and info_real["token_ids"]["<grounding>"] == 64012
    assert info_real["token_ids"]["<patch_index_0000>"] == 64013 and info_real["total_vocab"] == 65037
    print(f"[tokenizer] small base {info_small['base_vocab']} total {info_small['total_vocab']}; "
          f"realids base {info_real['base_vocab']} total {info_real['total_vocab']}")

    tok_notes = (
        "XLM-R/KOSMOS-2-style sentencepiece Unigram tokenizer built offline with the `tokenizers` library: "
        "model Unigram (unk_id 3, byte_fallback false), vocab = [<s>, <pad>, </s>, <unk>] (score 0) + "
        f"{N_TRAINED} pieces derived deterministically from an inline English corpus (see trained_pieces() in the "
        "script: metaspace-prefixed substrings, score = ln(relative count), sorted by score) "
        "[+ dummy pieces '▁tokNNNNN' with score -30 in the realids variant, up to id 64000] + <mask> (last base id, "
        "like fairseq/XLM-R). normalizer: Sequence[NFKC, Replace(' {2,}' -> ' ')] -- a STAND-IN for the real "
        "sentencepiece Precompiled charsmap (not reproducible offline); pre_tokenizer and decoder: Metaspace('▁', "
        "prepend_scheme 'always', split true); post_processor: TemplateProcessing '<s> $A </s>'. Special added "
        "tokens <s> <pad> </s> <unk> (special, normalized false) and <mask> (lstrip true). The KOSMOS-2 tags and "
        "1024 patch-index tokens were added by Kosmos2Processor.__init__ itself (tokenizer.add_tokens of "
        "AddedToken(t, lstrip=True, rstrip=False, normalized=False), special=False) in the order "
        "</doc> <image> </image> </chunk> </line> <phrase> </phrase> <object> </object> "
        "</delimiter_of_multi_objects/> <grounding> <patch_index_0000>..<patch_index_1023>, right after the base "
        "vocab. The tokenizer class is transformers' TokenizersBackend (what AutoTokenizer maps model_type kosmos-2 "
        "to in transformers 5.24; it uses tokenizer.json verbatim). Files written by Kosmos2Processor.save_pretrained "
        "(tokenizer.json, tokenizer_config.json, processor_config.json with the image processor nested) plus "
        "CLIPImageProcessorPil.save_pretrained (standalone preprocessor_config.json). transformers 5 writes NO "
        "special_tokens_map.json (special tokens are in tokenizer_config.json). processor_config.json got "
        f"\"num_image_tokens\": {TINY_Q} added by this script: transformers 5.24 IGNORES that key when loading "
        "(Kosmos2Processor.__init__ has no such parameter; the class attribute 64 stays the default), so callers must "
        "pass num_image_tokens explicitly. Image processor: CLIPImageProcessorPil(size 28x28 height/width, i.e. the "
        "use_square_size squash, do_center_crop false, bicubic, CLIP mean/std). tokenizer_realids/tokenizer.json is "
        "written compactly (tokenizers save(pretty=False)) to keep it small; tokenizer/ is save_pretrained's "
        "pretty JSON."
    )
    for proc, info in ((proc_small, info_small), (proc_real, info_real)):
        d = os.path.join(OUT_ROOT, info["dir"])
        write_meta(d, {"base_vocab": info["base_vocab"], "total_vocab": info["total_vocab"],
                       "num_image_tokens": TINY_Q}, tok_notes,
                   {**info, "structure": tokenizer_structure(proc), "files": ls(d)})

    # ---- processor fixtures (real-ids tokenizer) --------------------------------------------------------------
    pdir = fresh_dir("processor")
    cases = [run_processor_case(proc_real, c) for c in PROCESSOR_CASES]
    # The regular (non-tag) ids are identical in both tokenizer variants.
    for c in PROCESSOR_CASES:
        if isinstance(c.get("text"), str) and "images" not in c and "<" not in c["text"]:
            a = proc_real(text=c["text"])["input_ids"]
            b = proc_small(text=c["text"])["input_ids"]
            assert a == b, (a, b)
    images_meta = {k: {"seed": s, "width": w, "height": h} for k, (s, w, h) in IMAGES.items()}
    write_json(os.path.join(pdir, "cases.json"), {
        "tokenizer_dir": "../tokenizer_realids",
        "images": images_meta,
        "image_rule": "synthetic_image(seed, w, h) in the script: RGB gradient (R = x*255//(w-1), G = y*255//(h-1), "
                      "B = (x+y)*255//(w+h-2)) + numpy RandomState(seed).randint(-20, 21) noise, clipped to uint8",
        "cases": cases,
    })
    write_json(os.path.join(pdir, "post_process.json"), {"cases": post_process_cases(proc_real)})
    write_json(os.path.join(pdir, "codec.json"), codec_cases(proc_real))
    write_json(os.path.join(pdir, "tokenizer_cases.json"), {"tokenizer": tokenizer_cases(proc_small),
                                                            "tokenizer_realids": tokenizer_cases(proc_real)})
    n_pp = len(POST_PROCESS_STRINGS)
    by = {c["name"]: c for c in cases}

    def lens(name):
        r = by[name]["result"]
        return {k: ([len(x) for x in r[k]] if isinstance(r[k][0], list) else len(r[k]))
                for k in ("input_ids", "attention_mask", "image_embeds_position_mask") if k in r}

    kw_left = by["batch_images_padding_side_kwarg_left"]["result"]["input_ids"]
    observed = {
        "truncation_inside_image_tokens_lengths": lens("trunc_with_image_inside_image_tokens"),
        "padding_side_kwarg_with_images_pads_right": kw_left[0][-1] == 1 and kw_left[0][0] == 0,
        "padding_false_with_image_batch_lengths": lens("batch_images_padding_false"),
        "no_padding_text_batch_lengths": lens("batch_no_images_no_padding"),
    }
    quirks = [
        "With images, the processor tokenizes WITHOUT padding and then pads itself to the longest row using "
        "tokenizer.padding_side; the padding / padding_side call kwargs are not used for that: padding=False still "
        "pads an image batch, and padding_side='left' passed as a kwarg is ignored (tokenizer attribute wins).",
        "With images + truncation, the tokenizer truncates the whole prompt (including the 64 '<image>' "
        "placeholders) first; the processor then splices 64 placeholder ids back in (ids[:2] + ids 4..67 + "
        "ids[66:]) and builds image_embeds_position_mask as [0, 0] + [1]*64 + [0] (+ zeros), so for max_length=20 "
        f"the three outputs have different lengths: {observed['truncation_inside_image_tokens_lengths']}.",
        "add_eos_token=True: the '<s>' text prefix is NOT added; instead the tokenizer's post-processor template "
        "'<s> $A </s>' is used (add_special_tokens=True), giving the same <s> at the front and </s> at the end.",
        "bboxes: each box tuple must be a Python tuple (lists raise ValueError); '<object> <patch_index_a> "
        "<patch_index_b> [</delimiter_of_multi_objects/> ...] </object>' is appended right after '</phrase>' (no "
        "space before '<object>'); None or [] for a phrase inserts nothing; _convert_bbox_to_patch_index_tokens "
        "formats with str(i).zfill(4), so -1 becomes '<patch_index_-001>' and 1024 '<patch_index_1024>' (an "
        "unknown token string).",
        "post_process_generation: '<phrase></phrase>' does not match the phrase group ([^<]+ needs 1+ chars), so "
        "the object becomes a phrase-less entity at offset 0; _cleanup_spaces then subtracts the text's 1 leading "
        "space, giving the span (-1, -1). '<.*?>' removal also deletes non-tag text such as '< b and c >'. A "
        "space between '<object>' and the first patch token, an odd number of patch tokens or a trailing "
        "delimiter makes the object unmatched (no entity); out-of-range indices (1024, 9999, 5 digits) are "
        "decoded arithmetically into coordinates > 1.",
    ]
    write_meta(pdir, {"tokenizer_dir": "../tokenizer_realids", "default_num_image_tokens": REAL_Q},
               "cases.json: Kosmos2Processor loaded from fixtures/kosmos2/tokenizer_realids (from_pretrained) called "
               "as proc(images=..., text=..., bboxes=..., **kwargs) with return_tensors unset (python lists); "
               f"num_image_tokens defaults to {REAL_Q} (the real checkpoint) unless a case sets it; "
               "'tokenizer_padding_side' is the value assigned to proc.tokenizer.padding_side before the call. "
               "Images are the synthetic PIL images named in 'images'. 'preprocess_examples' is "
               "proc.preprocess_examples(text, images, bboxes, num_image_tokens) = the prompt string(s) after image "
               "and bbox insertion, BEFORE the '<s>' text prefix that __call__ adds when add_special_tokens and not "
               "add_eos_token. Outputs: input_ids / attention_mask / image_embeds_position_mask (absent when no "
               "image), tokens, keys, or {ok: false, error_type, error} when transformers raised. "
               f"post_process.json: {n_pp} strings through proc.post_process_generation(text) (cleanup) and "
               "(text, cleanup_and_extract=False), plus transformers' extract_entities_with_patch_indices on the "
               "part after the last </image>; tuples are JSON lists. codec.json: processing_kosmos2."
               "coordinate_to_patch_index(bbox, n) and patch_index_to_coordinate(ul, lr, n) for n = 32 and 16 "
               "(the processor itself always uses n = sqrt(1024) = 32). tokenizer_cases.json: plain tokenizer "
               "encode (ids/tokens/offsets, with and without the '<s> $A </s>' template) and decode cases for both "
               "tokenizer variants.", {"files": ls(pdir), "observed": observed, "quirks": quirks})

    tiny = case_tiny(proc_small, info_small)
    real = case_realvocab(proc_real)

    total = 0
    print("written files:")
    for root, _, files in sorted(os.walk(OUT_ROOT)):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            sz = os.path.getsize(p)
            total += sz
            print(f"  {os.path.relpath(p, REPO_ROOT)}  {sz} bytes")
    print(f"total {total} bytes; tiny T={tiny['T']} lm_head_saved={tiny['lm_head_saved']}; realvocab T={real['T']}")
    assert total < SIZE_LIMIT, total


if __name__ == "__main__":
    main()
