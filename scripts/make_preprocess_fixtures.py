#!/usr/bin/env python3
"""Generate reference fixtures for KOSMOS-2 image preprocessing (transformers' CLIP image processor, PIL backend)
and for PIL's bicubic resize on its own.

Run from the repository root:

    .venv-ref/bin/python scripts/make_preprocess_fixtures.py

Writes fixtures/preprocess/images/* (small synthetic test images in several file formats and PIL modes),
fixtures/preprocess/io.safetensors and fixtures/preprocess/meta.json; fixtures/preprocess/README.md is maintained by
hand next to them.

The test images are synthesised from a fixed numpy seed (smooth gradients + mild noise + a few drawn shapes, so that
resampling has edges and smooth areas to get right). Images are loaded exactly as transformers loads an image given
by path (transformers.image_utils.load_image: PIL.Image.open -> PIL.ImageOps.exif_transpose -> .convert("RGB")),
then run through transformers.CLIPImageProcessorPil. This script only *calls* transformers / PIL; the uint8
intermediate it stores is recomputed with PIL + transformers' own size helper and checked against the processor's
output.
"""

import hashlib
import importlib.metadata
import io as _io
import json
import os
import sys

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageOps
from PIL import features as PIL_features
from safetensors.numpy import save_file

import transformers
from transformers import CLIPImageProcessorPil
from transformers.image_transforms import convert_to_rgb, get_resize_output_image_size
from transformers.image_transforms import resize as tf_resize
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    PILImageResampling,
    load_image,
)

_HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT_REL = "scripts/make_preprocess_fixtures.py"
REPO_ROOT = os.path.dirname(_HERE)
OUT_ROOT = os.path.join(REPO_ROOT, "fixtures", "preprocess")
IMG_DIR = os.path.join(OUT_ROOT, "images")
SEED = 20240607
MAX_IMAGE_BYTES = 60 * 1024
TOL = 1e-6

with open(os.path.abspath(__file__), "rb") as _f:
    SCRIPT_SHA256 = hashlib.sha256(_f.read()).hexdigest()

VERSIONS = {
    "transformers": importlib.metadata.version("transformers"),
    "pillow": PIL.__version__,
    "numpy": np.__version__,
    "safetensors": importlib.metadata.version("safetensors"),
    "python": sys.version.split()[0],
}
# Codec library versions bundled with this Pillow (the image files and decoded pixels depend on them).
VERSIONS["libjpeg"] = PIL_features.version("jpg")
VERSIONS["libjpeg_turbo"] = PIL_features.version("libjpeg_turbo")
VERSIONS["libwebp"] = PIL_features.version("webp")
VERSIONS["zlib"] = PIL_features.version("zlib")

BICUBIC = PILImageResampling.BICUBIC  # == PIL.Image.Resampling.BICUBIC == 3


# --------------------------------------------------------------------------------------------------------------
# Synthetic test images
# --------------------------------------------------------------------------------------------------------------
def base_rgb(w, h, rng, noise=0.6, shapes=True):
    """uint8 [h, w, 3]: smooth gradients per channel + Gaussian noise + a few hard-edged shapes."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / max(w - 1, 1), y / max(h - 1, 1)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    r = 30 + 200 * u + 15 * np.sin(6.0 * v + phase[0])
    g = 20 + 210 * v + 15 * np.sin(5.0 * u + phase[1])
    b = 128 + 90 * np.sin(3.0 * (u + v) + phase[2]) * np.cos(2.0 * (u - v))
    img = np.stack([r, g, b], axis=-1) + rng.normal(0.0, noise, size=(h, w, 3))
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if not shapes:
        return img
    pil = Image.fromarray(img, "RGB")
    d = ImageDraw.Draw(pil)
    for k in range(4):
        x0, y0 = int(rng.integers(0, max(w - 4, 1))), int(rng.integers(0, max(h - 4, 1)))
        x1 = min(w - 1, x0 + int(rng.integers(3, max(w // 3, 4))))
        y1 = min(h - 1, y0 + int(rng.integers(3, max(h // 3, 4))))
        col = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if k % 2 == 0:
            d.ellipse([x0, y0, x1, y1], fill=col)
        else:
            d.rectangle([x0, y0, x1, y1], fill=col, outline=(255, 255, 255))
    col = tuple(int(c) for c in rng.integers(0, 256, size=3))
    d.line([(0, h - 1), (w - 1, 0)], fill=col, width=max(1, min(w, h) // 25))
    pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)]
    d.polygon(pts, fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
    return np.array(pil)


def encode(im, fmt, **kw):
    buf = _io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_images(rng):
    """Returns [(stem, file name, bytes, description)] in a fixed order."""
    out = []

    # 1. RGB PNG 300x200
    rgb = Image.fromarray(base_rgb(300, 200, rng), "RGB")
    out.append(("rgb_png", "rgb_300x200.png", encode(rgb, "PNG", optimize=True), "RGB PNG 300x200 (w x h)"))

    # 2. RGBA PNG 120x160 with varying alpha: horizontal alpha ramp 0..255, a fully transparent disc and a fully
    # opaque bar.
    w, h = 120, 160
    a = np.tile(np.linspace(0, 255, w), (h, 1))
    a = a + rng.normal(0, 4, size=(h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    a[(xx - 40) ** 2 + (yy - 50) ** 2 < 18 ** 2] = 0
    a[120:140, :] = 255
    alpha = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    rgba = np.concatenate([base_rgb(w, h, rng), alpha[..., None]], axis=-1)
    out.append(("rgba_png", "rgba_120x160.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"),
                "RGBA PNG 120x160, alpha = horizontal ramp 0..255 + noise, a transparent disc, an opaque bar"))

    # 3. Greyscale 'L' PNG 90x70
    grey = Image.fromarray(base_rgb(90, 70, rng), "RGB").convert("L")
    out.append(("grey_png", "grey_90x70.png", encode(grey, "PNG"), "greyscale (mode L) PNG 90x70"))

    # 4. 16-bit greyscale PNG 80x64, values spanning 0..~900 so that both the <= 255 and the > 255 range occur.
    w, h = 80, 64
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    g16 = 900.0 * xx / (w - 1) * (0.6 + 0.4 * yy / (h - 1)) + rng.normal(0, 3, size=(h, w))
    g16[20:40, 10:30] = 40000.0  # a bright block far above 255
    g16 = np.clip(np.rint(g16), 0, 65535).astype(np.uint16)
    im16 = Image.fromarray(g16)  # mode 'I;16'
    assert im16.mode == "I;16"
    out.append(("grey16_png", "grey16_80x64.png", encode(im16, "PNG"),
                "16-bit greyscale PNG 80x64 (PIL mode I;16), values 0..~900 ramp + a 40000 block"))

    # 5. Large JPEG 640x480 (a big down-scale)
    big = Image.fromarray(base_rgb(640, 480, rng, noise=2.0), "RGB")
    out.append(("large_jpg", "large_640x480.jpg", encode(big, "JPEG", quality=85),
                "JPEG 640x480 quality 85 (PIL default 4:2:0 subsampling)"))

    # 6. JPEG with EXIF Orientation = 6 ("rotate 90 CW to display"), stored pixels 96x64
    ex = Image.fromarray(base_rgb(96, 64, rng), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    out.append(("exif6_jpg", "exif6_96x64.jpg", encode(ex, "JPEG", quality=85, exif=exif.tobytes()),
                "JPEG quality 85, stored 96x64 (w x h), EXIF Orientation 6"))

    # 7. WebP 100x100 (lossy, quality 85)
    wp = Image.fromarray(base_rgb(100, 100, rng), "RGB")
    out.append(("webp", "img_100x100.webp", encode(wp, "WEBP", quality=85, method=4),
                "lossy WebP 100x100 quality 85 method 4 (RGB, no alpha)"))

    # 8. GIF, 2 frames, 50x40 (the first frame is what PIL.Image.open / load_image use)
    f1 = Image.fromarray(base_rgb(50, 40, rng), "RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    f2 = Image.fromarray(base_rgb(50, 40, rng)[::-1].copy(), "RGB").quantize(colors=64,
                                                                           method=Image.Quantize.MEDIANCUT)
    out.append(("gif", "anim_50x40.gif", encode(f1, "GIF", save_all=True, append_images=[f2], duration=100, loop=0),
                "GIF 50x40, 2 frames (64-colour median-cut palettes), no transparency"))

    # 9. BMP 20x30 (up-scale)
    bmp = Image.fromarray(base_rgb(20, 30, rng, shapes=False), "RGB")
    d = ImageDraw.Draw(bmp)
    d.rectangle([5, 8, 14, 20], fill=(250, 20, 30))
    out.append(("bmp", "small_20x30.bmp", encode(bmp, "BMP"), "24-bit BMP 20x30 (w x h)"))

    # 10. Palette PNG 64x48 with one transparent palette entry (tRNS)
    pal = Image.fromarray(base_rgb(64, 48, rng), "RGB").quantize(colors=32, method=Image.Quantize.MEDIANCUT)
    parr = np.array(pal)
    parr[10:25, 20:44] = 31  # a block of the colour that is made transparent
    pal2 = Image.fromarray(parr, "P")
    pal2.putpalette(pal.getpalette())
    out.append(("palette_png", "palette_64x48.png", encode(pal2, "PNG", transparency=31),
                "palette (mode P) PNG 64x48, 32 colours, palette index 31 transparent via tRNS (a 24x15 block)"))
    return out


# --------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------
MODES = {
    "square": dict(size={"height": 48, "width": 48}, do_center_crop=False, resample=BICUBIC),
    "shortest_edge": dict(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40}, do_center_crop=True,
                          resample=BICUBIC),
}
MODES_224 = {
    "square224": dict(size={"height": 224, "width": 224}, do_center_crop=False, resample=BICUBIC),
    "shortest224": dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                        resample=BICUBIC),
}


def expected_uint8(rgb_hwc, mode_kwargs):
    """Reproduce CLIPImageProcessorPil up to (excluding) rescale/normalise: HWC uint8 out.

    PilBackend.resize: target (h, w) = (size.height, size.width), or for shortest_edge
    transformers.image_transforms.get_resize_output_image_size(image, size=shortest_edge, default_to_square=False)
    (short side := shortest_edge, long side := int(shortest_edge * long / short), i.e. truncated); then
    image_transforms.resize -> PIL.Image.fromarray(uint8 HWC).resize((w, h), resample=BICUBIC, reducing_gap=None).
    PilBackend.center_crop: top = (H - ch) // 2, left = (W - cw) // 2 (padding with zeros only if the image is
    smaller than the crop, which never happens after a shortest_edge resize to the crop size)."""
    size = mode_kwargs["size"]
    chw = np.moveaxis(rgb_hwc, -1, 0)
    if "shortest_edge" in size:
        th, tw = get_resize_output_image_size(chw, size=size["shortest_edge"], default_to_square=False,
                                              input_data_format=ChannelDimension.FIRST)
    else:
        th, tw = size["height"], size["width"]
    resized = np.array(Image.fromarray(rgb_hwc, "RGB").resize((tw, th), resample=Image.Resampling.BICUBIC))
    # The same through transformers' own resize helper (must be identical).
    via_tf = tf_resize(chw, (th, tw), resample=BICUBIC, data_format=ChannelDimension.LAST,
                       input_data_format=ChannelDimension.FIRST)
    assert via_tf.dtype == np.uint8 and np.array_equal(via_tf, resized)
    out = resized
    if mode_kwargs.get("do_center_crop"):
        ch, cw = mode_kwargs["crop_size"]["height"], mode_kwargs["crop_size"]["width"]
        top, left = (th - ch) // 2, (tw - cw) // 2
        assert top >= 0 and left >= 0
        out = resized[top:top + ch, left:left + cw]
    return np.ascontiguousarray(out), (th, tw)


def normalise_like_processor(proc, u8_hwc):
    chw = np.moveaxis(u8_hwc, -1, 0)
    x = proc.rescale(chw, proc.rescale_factor)
    return proc.normalize(x, proc.image_mean, proc.image_std)


def normalise_simple(u8_hwc):
    """Plain float32 formula: (u8 / 255 - mean) / std in float32 (for the record: how close a naive port is)."""
    x = u8_hwc.astype(np.float32) / np.float32(255.0)
    m = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)
    s = np.array(OPENAI_CLIP_STD, dtype=np.float32)
    return np.moveaxis((x - m) / s, -1, 0)


def describe_rgb_conversion(mode, info):
    if mode == "RGB":
        return "already RGB: unchanged"
    if mode == "RGBA":
        return ("load_image: .convert('RGB') DROPS the alpha channel (RGB values kept as stored, no compositing; "
                "no 'transparency' info remains, so the processor's convert_to_rgb is a no-op). "
                "If a PIL.Image is passed to the processor directly instead, convert_to_rgb composites it onto "
                "opaque white (PIL.Image.alpha_composite over (255,255,255,255), integer rounding of PIL) first.")
    if mode == "L":
        return "L -> RGB: grey value replicated to R=G=B"
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        return ("16-bit -> RGB by PIL's convert('RGB'): values are CLIPPED to 0..255 (v > 255 -> 255), NOT scaled "
                "(not v/257, not v>>8); grey replicated to R=G=B")
    if mode == "P":
        if info.get("transparency") is not None:
            return ("palette with tRNS -> RGB: load_image's .convert('RGB') replaces each index by its palette "
                    "colour, BUT Pillow keeps info['transparency'] as the RGB colour key of the transparent index "
                    "(here (60, 40, 119)); the processor's convert_to_rgb then sees 'transparency', does "
                    "convert('RGBA') (every pixel EXACTLY equal to that RGB key gets alpha 0) and alpha-composites "
                    "onto white: the transparent block ends up WHITE (255,255,255). np.array(load_image(path)) alone "
                    "would still show the palette colour. Passing PIL.Image.open(path) directly gives the same "
                    "white result (P -> RGBA via the tRNS index -> composite).")
        return "palette -> RGB: each index replaced by its palette colour"
    return f"PIL convert('RGB') from mode {mode}"


def main():
    os.makedirs(IMG_DIR, exist_ok=True)
    rng = np.random.default_rng(SEED)
    images = make_images(rng)

    tensors = {}
    per_image = []
    procs = {m: CLIPImageProcessorPil(**kw) for m, kw in {**MODES, **MODES_224}.items()}
    for p in procs.values():
        assert p.backend == "pil"
        assert tuple(p.image_mean) == tuple(OPENAI_CLIP_MEAN) and tuple(p.image_std) == tuple(OPENAI_CLIP_STD)
        assert p.do_convert_rgb and p.do_rescale and p.do_normalize and abs(p.rescale_factor - 1 / 255) < 1e-15

    max_diff_proc_norm = 0.0
    max_diff_simple = 0.0
    for stem, fname, data, desc in images:
        path = os.path.join(IMG_DIR, fname)
        assert len(data) < MAX_IMAGE_BYTES, (fname, len(data))
        with open(path, "wb") as f:
            f.write(data)

        raw = Image.open(path)
        raw_mode, raw_size, raw_fmt = raw.mode, raw.size, raw.format
        raw_info = {k: (v if isinstance(v, (int, float, str)) else repr(v)) for k, v in raw.info.items()
                    if k in ("transparency", "duration", "loop", "dpi", "gamma", "compression")}
        orientation = raw.getexif().get(0x0112)
        n_frames = getattr(raw, "n_frames", 1)
        transposed = ImageOps.exif_transpose(raw)

        img = load_image(path)  # the reference loading path: open -> exif_transpose -> convert("RGB")
        loaded_info = {k: (v if isinstance(v, (int, float, str)) else repr(v)) for k, v in img.info.items()
                       if k == "transparency"}
        # The processor then runs convert_to_rgb on that PIL image (PilBackend.process_image, do_convert_rgb=True).
        # It is NOT always a no-op: Pillow keeps info['transparency'] through convert('RGB') (for a palette image it
        # becomes an RGB colour key), and convert_to_rgb then composites that colour key onto white.
        rgb = convert_to_rgb(img, return_numpy=True)
        loaded_differs = not np.array_equal(rgb, np.array(img))
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        loaded_size = img.size

        entry = {
            "stem": stem,
            "file": f"images/{fname}",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "description": desc,
            "format": raw_fmt,
            "pil_mode": raw_mode,
            "size_wh": list(raw_size),
            "n_frames": n_frames,
            "info": raw_info,
            "exif_orientation": orientation,
            "size_after_exif_transpose_wh": list(transposed.size),
            "loaded_size_wh": list(loaded_size),
            "rgb_conversion": describe_rgb_conversion(raw_mode, raw.info),
            "load_image_info_transparency": loaded_info.get("transparency"),
            "processor_convert_to_rgb_changed_load_image_output": loaded_differs,
            "loaded_rgb_sha256": hashlib.sha256(rgb.tobytes()).hexdigest(),
            "loaded_rgb_channel_sums": [int(s) for s in rgb.reshape(-1, 3).astype(np.int64).sum(0)],
            "modes": {},
        }
        # Decoded pixels of the lossy formats: a port's JPEG/WebP decoder may differ from libjpeg-turbo/libwebp.
        if stem in ("exif6_jpg", "webp", "grey16_png", "palette_png", "rgba_png"):
            tensors[f"{stem}__loaded_rgb_uint8"] = np.ascontiguousarray(rgb)
            entry["loaded_rgb_key"] = f"{stem}__loaded_rgb_uint8"

        # Direct-PIL path (PIL.Image passed to the processor, no load_image): no EXIF transpose, alpha composited on
        # white by transformers.image_transforms.convert_to_rgb.
        direct_differs = None

        mode_items = list(MODES.items()) + (list(MODES_224.items()) if stem == "large_jpg" else [])
        for mode, kw in mode_items:
            proc = procs[mode]
            pv = proc(path, return_tensors="np")["pixel_values"]  # path -> fetch_images -> load_image
            pv2 = proc(img, return_tensors="np")["pixel_values"]
            assert pv.shape[0] == 1 and pv.dtype == np.float32 and np.array_equal(pv, pv2)
            pv = pv[0]
            u8, (th, tw) = expected_uint8(rgb, kw)
            assert pv.shape == (3, u8.shape[0], u8.shape[1]), (pv.shape, u8.shape)
            renorm = normalise_like_processor(proc, u8)
            d_proc = float(np.abs(renorm - pv).max())
            d_simple = float(np.abs(normalise_simple(u8) - pv).max())
            assert d_proc <= TOL, (stem, mode, d_proc)
            max_diff_proc_norm = max(max_diff_proc_norm, d_proc)
            max_diff_simple = max(max_diff_simple, d_simple)
            tensors[f"{stem}__{mode}__uint8"] = u8
            m_entry = {"resized_hw": [th, tw], "output_hw": list(u8.shape[:2]), "uint8_key": f"{stem}__{mode}__uint8"}
            if mode in MODES:
                tensors[f"{stem}__{mode}__pixel_values"] = np.ascontiguousarray(pv.astype(np.float32))
                m_entry["pixel_values_key"] = f"{stem}__{mode}__pixel_values"

            if mode in MODES:
                direct = Image.open(path)
                pv_d = proc(direct, return_tensors="np")["pixel_values"][0]
                differs = (pv_d.shape != pv.shape) or not np.array_equal(pv_d, pv)
                direct_differs = differs if direct_differs is None else (direct_differs or differs)
                if differs:
                    # Reproduce: convert_to_rgb(PIL) without exif_transpose, then the same steps.
                    rgb_d = convert_to_rgb(Image.open(path), return_numpy=True)
                    u8_d, _ = expected_uint8(rgb_d, kw)
                    dd = float(np.abs(normalise_like_processor(proc, u8_d) - pv_d).max())
                    assert dd <= TOL, (stem, mode, dd)
                    tensors[f"{stem}__{mode}__direct__uint8"] = u8_d
                    m_entry["direct_uint8_key"] = f"{stem}__{mode}__direct__uint8"
                    m_entry["direct_output_hw"] = list(u8_d.shape[:2])
            entry["modes"][mode] = m_entry
        entry["direct_pil_path_differs"] = bool(direct_differs)
        per_image.append(entry)
        print(f"[{stem}] {raw_fmt} {raw_mode} {raw_size} -> loaded {loaded_size}; exif {orientation}; "
              f"{len(data)} bytes; direct path differs: {direct_differs}")

    # PIL bicubic resize on its own (the RGB PNG, loaded as above)
    rgb_png = np.array(load_image(os.path.join(IMG_DIR, "rgb_300x200.png")))
    resize_keys = []
    for (w, h) in [(37, 23), (150, 100), (450, 300)]:
        r = np.array(Image.fromarray(rgb_png, "RGB").resize((w, h), resample=Image.Resampling.BICUBIC))
        k = f"resize__{w}x{h}"
        tensors[k] = np.ascontiguousarray(r)
        resize_keys.append(k)

    # use_square_size handling (KOSMOS-2 backward compatibility) as implemented in this transformers version.
    sq_default = CLIPImageProcessorPil(use_square_size=True)
    sq_with_size = CLIPImageProcessorPil(use_square_size=True, size={"shortest_edge": 48})
    sq_false = CLIPImageProcessorPil(use_square_size=False)
    use_square = {
        "CLIPImageProcessorPil(use_square_size=True)": {
            "size": dict(sq_default.size), "crop_size": dict(sq_default.crop_size),
            "do_center_crop": sq_default.do_center_crop},
        "CLIPImageProcessorPil(use_square_size=True, size={'shortest_edge': 48})": {
            "size": dict(sq_with_size.size), "crop_size": dict(sq_with_size.crop_size),
            "do_center_crop": sq_with_size.do_center_crop},
        "CLIPImageProcessorPil(use_square_size=False)": {
            "size": dict(sq_false.size), "crop_size": dict(sq_false.crop_size),
            "do_center_crop": sq_false.do_center_crop},
    }
    square_note = (
        "use_square_size (transformers " + VERSIONS["transformers"] + "): handled ONLY in CLIPImageProcessorPil."
        "__init__ / CLIPImageProcessor.__init__ ('for backwards compatibility of KOSMOS-2'): if the kwarg is present "
        "and truthy, kwargs['size'] is REPLACED by {'height': S, 'width': S} with S = the CLASS default "
        "size['shortest_edge'] = 224 (any size passed alongside, or stored in preprocessor_config.json, is "
        "overwritten), and the kwarg is removed. crop_size and do_center_crop are untouched (defaults 224x224, "
        "True), so the crop is a no-op on the 224x224 squashed image. Kosmos2Processor itself does nothing with "
        "it (it just holds the image processor). Observed: " + json.dumps(use_square, sort_keys=True) + ". The "
        "fixture mode 'square' reproduces the squash at 48x48 by passing size={'height':48,'width':48} and "
        "do_center_crop=False directly."
    )

    d_bytes = save_file(tensors, os.path.join(OUT_ROOT, "io.safetensors"))
    del d_bytes

    notes = (
        "Processor class that ran: transformers.CLIPImageProcessorPil (PilBackend, backend 'pil'). In transformers "
        + VERSIONS["transformers"] + " CLIPImageProcessor is the torchvision backend (needs torchvision, not "
        "installed here) and CLIPImageProcessorPil is the PIL/NumPy one; the auto mapping for 'kosmos-2' is "
        "{'torchvision': 'CLIPImageProcessor', 'pil': 'CLIPImageProcessorPil'} and AutoImageProcessor picks "
        "torchvision when it is installed unless backend='pil' (use_fast=False is the deprecated spelling). "
        "LOADING: every image was given to the processor as a file PATH, which goes through "
        "transformers.image_utils.load_image: PIL.Image.open(path) -> PIL.ImageOps.exif_transpose(image) (YES, the "
        "EXIF orientation is applied, then the tag is dropped) -> image.convert('RGB'). Passing load_image(path) "
        "gives identical output (checked). GIFs: Image.open shows frame 0, which is what is used. "
        "PIPELINE (PilBackend, per image): process_image: transformers.image_transforms.convert_to_rgb(PIL image) "
        "(has_alpha = 'A' in bands or info.get('transparency') is not None -> convert('RGBA') + alpha_composite onto "
        "opaque white -> RGB; else convert('RGB')); after load_image this is a no-op EXCEPT when Pillow kept an "
        "info['transparency'] colour key (palette_png: the key colour becomes white) -> np HWC uint8 -> "
        "CHW; resize: target (h, w) = (height, width) for size {height, width}; for {shortest_edge: S}: short side "
        "S, long side int(S * long / short) (truncation), via transformers.image_transforms."
        "get_resize_output_image_size(default_to_square=False); then image_transforms.resize converts the uint8 CHW "
        "array to a PIL image (no rescale since uint8) and calls PIL Image.resize((w, h), resample=BICUBIC(3), "
        "reducing_gap=None) -> uint8 again; center_crop (mode shortest_edge only): top = (H - ch) // 2, "
        "left = (W - cw) // 2, plain slice; rescale: float64(u8) * (1/255) then cast to float32; normalize: "
        "float32 (x - mean) / std per channel with mean/std cast to float32 arrays; output CHW float32. "
        "<stem>__<mode>__uint8 is HWC uint8 after resize (and crop) = just before rescale; it was recomputed with PIL "
        "(Image.fromarray(rgb).resize((w, h), Image.BICUBIC)) and transformers' size helper, checked identical to "
        "image_transforms.resize, and rescale+normalize of it with the processor's own methods reproduces "
        f"<stem>__<mode>__pixel_values to max {max_diff_proc_norm:.1e} (limit {TOL}). The naive float32 formula "
        f"(u8.astype(f32) / 255 - mean) / std differs from the processor by at most {max_diff_simple:.2e}. "
        "<stem>__<mode>__pixel_values is float32 [3, H, W] from the processor (batch dim dropped). "
        "<stem>__<mode>__direct__uint8 (only where it differs): the same pipeline when the PIL image from "
        "PIL.Image.open(path) is passed to the processor directly (what most KOSMOS-2 examples do): NO EXIF "
        "transpose, and images with an alpha band or info['transparency'] are composited onto white by "
        "transformers.image_transforms.convert_to_rgb (image.convert('RGBA'); PIL.Image.alpha_composite(white, "
        "image).convert('RGB')); other modes use image.convert('RGB') as load_image does. "
        "<stem>__loaded_rgb_uint8: the HWC uint8 RGB array that enters the resize (load_image -> convert_to_rgb: "
        "decoder output after EXIF transpose and RGB conversion) for the lossy / special-mode images, so decoding "
        "and RGB conversion can be tested apart from resizing. "
        "resize__<w>x<h>: PIL Image.resize((w, h), Image.BICUBIC) of the loaded rgb_300x200.png, uint8 HWC (PIL "
        "bicubic: separable convolution, Keys cubic a = -0.5, support scaled by the down-scale factor (antialias), "
        "coefficients normalised and converted to fixed point, 8-bit rounding/clipping per pass, horizontal pass "
        "first when it shrinks). Modes square224 / shortest224 (only for large_jpg, uint8 only) are the real "
        "KOSMOS-2 sizes. " + square_note
    )
    meta = {
        "script": SCRIPT_REL,
        "script_sha256": SCRIPT_SHA256,
        "versions": VERSIONS,
        "config": {
            "processor_class": "transformers.CLIPImageProcessorPil",
            "backend": "pil",
            "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD),
            "rescale_factor": "1/255",
            "resample": "PIL.Image.Resampling.BICUBIC (3)",
            "modes": {m: {k: (str(v) if k == "resample" else v) for k, v in kw.items()}
                      for m, kw in {**MODES, **MODES_224}.items()},
            "modes_224_only_for": "large_jpg",
            "seed": SEED,
        },
        "notes": notes,
        "use_square_size": use_square,
        "images": per_image,
        "resize_cases": {"source": "images/rgb_300x200.png", "keys": resize_keys, "resample": "PIL BICUBIC"},
        "io_keys": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in sorted(tensors.items())},
    }
    with open(os.path.join(OUT_ROOT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=False)
        f.write("\n")

    total = 0
    print("written files:")
    for root, _, files in sorted(os.walk(OUT_ROOT)):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            sz = os.path.getsize(p)
            total += sz
            print(f"  {os.path.relpath(p, REPO_ROOT)}  {sz} bytes")
    print(f"total {total} bytes; max|renormalised - processor| = {max_diff_proc_norm:.1e}; "
          f"max|naive f32 formula - processor| = {max_diff_simple:.2e}")


if __name__ == "__main__":
    main()
