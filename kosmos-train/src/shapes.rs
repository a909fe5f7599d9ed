//! A synthetic grounding world: small images with a few coloured shapes, and everything the
//! training engine and the evaluation commands read about them.
//!
//! Each scene is a `width x height` picture (64 to 128 px a side by default) on a plain, gradient
//! or speckled background, with 1 to 4 shapes (circle, square, triangle, diamond, cross) of a
//! colour and a size, placed without overlap. From a scene the generator writes:
//!
//! * a **grounded caption** in GRIT's record format (`grit.jsonl`): `"An image of a red circle and
//!   a small blue square."` with one `noun_chunks` entry per shape (character span, normalised box,
//!   score 1);
//! * for scenes of several shapes, **one phrase grounded at a time** (`phrases.jsonl`): the same
//!   caption once per shape with only that shape's phrase in `noun_chunks`, the others left as
//!   plain text. This is the form of the phrase-grounding prompt (KOSMOS-2's Flickr30k protocol,
//!   `kosmos eval grounding`: the caption up to the phrase, untagged, then the tagged phrase), and
//!   of GRIT's own captions, where only some noun phrases carry boxes;
//! * **referring expressions** (`refexp.jsonl`, also GRIT records with one `ref_exps` entry over the
//!   whole expression): `" the red circle left of the blue square"`. The anchor shape has a unique
//!   description, and the relation (left of, right of, above, below) holds for the target and for
//!   no other shape with the target's description, so the expression names exactly one shape;
//!   scenes often repeat a description so that a relation is needed, to an anchor or among the
//!   shapes of one description (`"the left red circle"`);
//! * an **image-caption pair** (`captions.jsonl`) and, for every few scenes, a **text-only**
//!   sentence about shapes (`text.jsonl`);
//! * the same grounding and referring data as COCO-style annotation files in MDETR's layout
//!   (`mdetr/final_shapes_refexp.json`, `mdetr/final_flickr_separateGT_shapes.json`), which the
//!   `kosmos eval` commands read like the official benchmarks' files;
//! * `data.toml`, a [`DataConfig`] over the JSONL files, and `summary.json` with the counts and
//!   the location-token codec's ceiling on the ground-truth boxes ([`CodecCeiling`]).
//!
//! Shapes are at least `min_cells` grid cells wide and high (4 by default), so that the
//! location tokens can represent them: a box is written as the cells of its two corners and read
//! back as the cells' centres (see `kosmos_models::grounding`), which loses up to one cell per
//! side. They are also at least `min_fraction` of the image side (a quarter by default) and at
//! most half the shorter side. Everything is a pure function of [`ShapesConfig`] (and its seed).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
pub use kosmos_models::grounding::iou;
use kosmos_models::grounding::{BoxXyxy, coordinate_to_patch_index, patch_index_to_coordinate};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::{DataConfig, GritConfig, SourceConfig, SourceFormat, SourceKind};

/// Kinds of shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShapeKind {
    /// A filled disc.
    Circle,
    /// A filled square.
    Square,
    /// A filled triangle pointing up.
    Triangle,
    /// A filled diamond (a square on its corner).
    Diamond,
    /// A plus-shaped cross.
    Cross,
}

impl ShapeKind {
    /// Every kind.
    pub const ALL: [ShapeKind; 5] = [Self::Circle, Self::Square, Self::Triangle, Self::Diamond, Self::Cross];

    /// The word used in captions.
    pub fn word(self) -> &'static str {
        match self {
            Self::Circle => "circle",
            Self::Square => "square",
            Self::Triangle => "triangle",
            Self::Diamond => "diamond",
            Self::Cross => "cross",
        }
    }

    /// Whether the pixel at offset `(u, v)` in `[0, 1)^2` of the shape's box is inside it.
    fn contains(self, u: f64, v: f64) -> bool {
        match self {
            Self::Circle => (u - 0.5).powi(2) + (v - 0.5).powi(2) <= 0.25,
            Self::Square => true,
            Self::Triangle => (u - 0.5).abs() <= v / 2.0,
            Self::Diamond => (u - 0.5).abs() + (v - 0.5).abs() <= 0.5,
            Self::Cross => (u - 0.5).abs() <= 0.17 || (v - 0.5).abs() <= 0.17,
        }
    }
}

/// Colours of shapes, with their names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
    /// Purple.
    Purple,
    /// Orange.
    Orange,
}

impl Colour {
    /// Every colour.
    pub const ALL: [Colour; 6] = [
        Self::Red,
        Self::Green,
        Self::Blue,
        Self::Yellow,
        Self::Purple,
        Self::Orange,
    ];

    /// The word used in captions.
    pub fn word(self) -> &'static str {
        match self {
            Self::Red => "red",
            Self::Green => "green",
            Self::Blue => "blue",
            Self::Yellow => "yellow",
            Self::Purple => "purple",
            Self::Orange => "orange",
        }
    }

    fn rgb(self) -> [u8; 3] {
        match self {
            Self::Red => [220, 30, 30],
            Self::Green => [30, 170, 50],
            Self::Blue => [30, 60, 220],
            Self::Yellow => [235, 215, 30],
            Self::Purple => [140, 40, 170],
            Self::Orange => [245, 130, 20],
        }
    }
}

/// One shape of a scene.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    /// Its kind.
    pub kind: ShapeKind,
    /// Its colour.
    pub colour: Colour,
    /// Whether the caption calls it small (its side is below the scene's median shape size).
    pub small: bool,
    /// Pixel box `[x, y, w, h]` (the shape fills it).
    pub pixels: [u32; 4],
}

impl Shape {
    /// The normalised `(x1, y1, x2, y2)` box in an image of `width x height`.
    pub fn bbox(&self, width: u32, height: u32) -> BoxXyxy {
        let [x, y, w, h] = self.pixels;
        [
            x as f64 / width as f64,
            y as f64 / height as f64,
            (x + w) as f64 / width as f64,
            (y + h) as f64 / height as f64,
        ]
    }

    /// `"red circle"`.
    pub fn description(&self) -> String {
        format!("{} {}", self.colour.word(), self.kind.word())
    }

    fn centre(&self) -> (f64, f64) {
        let [x, y, w, h] = self.pixels;
        (x as f64 + w as f64 / 2.0, y as f64 + h as f64 / 2.0)
    }
}

/// Backgrounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Background {
    /// One light colour.
    Plain([u8; 3]),
    /// A vertical gradient between two light colours.
    Gradient([u8; 3], [u8; 3]),
    /// A light colour with per-pixel noise of the given amplitude (seeded).
    Speckled([u8; 3], u8, u64),
}

/// A scene: the picture's size, background and shapes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The background.
    pub background: Background,
    /// The shapes, left to right by centre (they never overlap).
    pub shapes: Vec<Shape>,
}

/// A referring expression and the shape it names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefExp {
    /// `"the red circle left of the blue square"`.
    pub text: String,
    /// Index of the target in [`Scene::shapes`].
    pub target: usize,
    /// Whether the target's description alone is ambiguous in the scene (the relation is needed).
    pub needs_relation: bool,
}

/// Settings of the generator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShapesConfig {
    /// Number of scenes.
    pub n: usize,
    /// Seed: the data set is a pure function of the configuration.
    pub seed: u64,
    /// Smallest image side in pixels.
    pub min_side: u32,
    /// Largest image side in pixels.
    pub max_side: u32,
    /// Fewest shapes per scene.
    pub min_shapes: usize,
    /// Most shapes per scene.
    pub max_shapes: usize,
    /// Grid side of the location tokens the data is meant for (32 = KOSMOS-2's 1,024 tokens).
    pub grid: usize,
    /// Smallest shape side in grid cells (what the location tokens can represent).
    pub min_cells: usize,
    /// Smallest shape side as a fraction of the image side (the world's size range: shapes are
    /// between this and half the shorter side).
    pub min_fraction: f64,
    /// Probability that a scene repeats a description (so referring expressions need relations).
    pub repeat_probability: f64,
    /// One text-only sentence is written for every this many scenes (0 = none).
    pub text_every: usize,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        Self {
            n: 1000,
            seed: 0,
            min_side: 64,
            max_side: 128,
            min_shapes: 1,
            max_shapes: 4,
            grid: 32,
            min_cells: 4,
            min_fraction: 0.25,
            repeat_probability: 0.5,
            text_every: 4,
        }
    }
}

/// Why the generator stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShapesError {
    /// A setting that cannot work.
    #[error("shapes config: {0}")]
    Config(String),
    /// Writing an output failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Encoding a PNG failed.
    #[error("{path}: {source}")]
    Image {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: image::ImageError,
    },
}

impl ShapesConfig {
    /// Check the settings.
    pub fn validate(&self) -> Result<(), ShapesError> {
        let bad = |m: String| Err(ShapesError::Config(m));
        if self.min_side < 16 || self.min_side > self.max_side {
            return bad(format!(
                "need 16 <= min_side <= max_side, got {} and {}",
                self.min_side, self.max_side
            ));
        }
        if self.min_shapes == 0 || self.min_shapes > self.max_shapes || self.max_shapes > 6 {
            return bad(format!(
                "need 1 <= min_shapes <= max_shapes <= 6, got {} and {}",
                self.min_shapes, self.max_shapes
            ));
        }
        if self.grid == 0 || self.min_cells == 0 {
            return bad("grid and min_cells must be positive".into());
        }
        if !(0.0..=0.5).contains(&self.min_fraction) {
            return bad(format!("min_fraction {} is not in [0, 0.5]", self.min_fraction));
        }
        // Room for the largest count of shapes of the smallest size in the smallest image.
        let min_px = self.min_shape_px(self.min_side);
        if min_px * 2 > self.min_side {
            return bad(format!(
                "{} cells of a {}-cell grid are {min_px} px in a {} px image: too large to place several shapes",
                self.min_cells, self.grid, self.min_side
            ));
        }
        if !(0.0..=1.0).contains(&self.repeat_probability) {
            return bad(format!(
                "repeat_probability {} is not in [0, 1]",
                self.repeat_probability
            ));
        }
        Ok(())
    }

    /// Smallest shape side in pixels for an image side: `min_cells` cells or `min_fraction` of
    /// the side, whichever is larger, rounded up.
    fn min_shape_px(&self, side: u32) -> u32 {
        let cells = (self.min_cells as f64 * side as f64 / self.grid as f64).ceil() as u32;
        let fraction = (self.min_fraction * side as f64).ceil() as u32;
        cells.max(fraction).max(4)
    }
}

/// The random stream of scene `index` (independent of the other scenes).
fn scene_rng(seed: u64, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64 + 1);
    rng
}

fn light(rng: &mut ChaCha8Rng) -> [u8; 3] {
    [
        rng.random_range(200..=255),
        rng.random_range(200..=255),
        rng.random_range(200..=255),
    ]
}

/// Generate scene `index` of the data set.
pub fn scene(config: &ShapesConfig, index: usize) -> Scene {
    let mut rng = scene_rng(config.seed, index);
    let width = rng.random_range(config.min_side..=config.max_side);
    let height = rng.random_range(config.min_side..=config.max_side);
    let background = match rng.random_range(0..3) {
        0 => Background::Plain(light(&mut rng)),
        1 => Background::Gradient(light(&mut rng), light(&mut rng)),
        _ => Background::Speckled(light(&mut rng), rng.random_range(8..24), rng.random()),
    };
    let count = rng.random_range(config.min_shapes..=config.max_shapes);
    let min_w = config.min_shape_px(width);
    let min_h = config.min_shape_px(height);
    let max_side = (width.min(height) / 2).max(min_w.max(min_h));
    let mut shapes: Vec<Shape> = Vec::new();
    let mut used: Vec<(ShapeKind, Colour)> = Vec::new();
    for _ in 0..count {
        // Description: sometimes a repeat of an earlier one, otherwise a new one.
        let (kind, colour) = if !used.is_empty() && rng.random_bool(config.repeat_probability) {
            used[rng.random_range(0..used.len())]
        } else {
            loop {
                let d = (
                    ShapeKind::ALL[rng.random_range(0..ShapeKind::ALL.len())],
                    Colour::ALL[rng.random_range(0..Colour::ALL.len())],
                );
                if !used.contains(&d) {
                    break d;
                }
            }
        };
        // Place without overlap (a one-pixel gap); give up on this shape after many tries.
        for _ in 0..200 {
            let side = rng.random_range(min_w.max(min_h)..=max_side);
            let (w, h) = (side.min(width), side.min(height));
            let x = rng.random_range(0..=width - w);
            let y = rng.random_range(0..=height - h);
            let clear = shapes.iter().all(|s| {
                let [sx, sy, sw, sh] = s.pixels;
                x + w + 1 <= sx || sx + sw + 1 <= x || y + h + 1 <= sy || sy + sh + 1 <= y
            });
            if clear {
                shapes.push(Shape {
                    kind,
                    colour,
                    small: false,
                    pixels: [x, y, w, h],
                });
                used.push((kind, colour));
                break;
            }
        }
    }
    // "small" for shapes clearly below the largest one (only when sizes differ enough).
    let largest = shapes.iter().map(|s| s.pixels[2]).max().unwrap_or(0);
    for s in &mut shapes {
        s.small = (s.pixels[2] as f64) < 0.6 * largest as f64;
    }
    // Left to right (by centre, then top to bottom): a caption that repeats a phrase names the
    // shapes in reading order, so its phrases can be grounded from the text alone.
    shapes.sort_by_key(|s| (2 * s.pixels[0] + s.pixels[2], 2 * s.pixels[1] + s.pixels[3]));
    Scene {
        width,
        height,
        background,
        shapes,
    }
}

/// Draw a scene.
pub fn render(scene: &Scene) -> RgbImage {
    let (w, h) = (scene.width, scene.height);
    let mut img = RgbImage::new(w, h);
    let mut noise = match scene.background {
        Background::Speckled(_, _, seed) => Some(ChaCha8Rng::seed_from_u64(seed)),
        _ => None,
    };
    for y in 0..h {
        for x in 0..w {
            let px = match &scene.background {
                Background::Plain(c) => *c,
                Background::Gradient(a, b) => {
                    let t = y as f64 / (h.max(2) - 1) as f64;
                    std::array::from_fn(|i| (a[i] as f64 * (1.0 - t) + b[i] as f64 * t).round() as u8)
                }
                Background::Speckled(c, amp, _) => {
                    let rng = noise.as_mut().expect("speckled background has a stream");
                    let d = rng.random_range(-(*amp as i16)..=*amp as i16);
                    std::array::from_fn(|i| (c[i] as i16 + d).clamp(0, 255) as u8)
                }
            };
            img.put_pixel(x, y, Rgb(px));
        }
    }
    for s in &scene.shapes {
        let [x0, y0, sw, sh] = s.pixels;
        for y in y0..y0 + sh {
            for x in x0..x0 + sw {
                let u = (x - x0) as f64 / sw as f64 + 0.5 / sw as f64;
                let v = (y - y0) as f64 / sh as f64 + 0.5 / sh as f64;
                if s.kind.contains(u, v) {
                    img.put_pixel(x, y, Rgb(s.colour.rgb()));
                }
            }
        }
    }
    img
}

/// `"a"` or `"an"` before `word`.
fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn article_phrase(s: &Shape) -> String {
    if s.small {
        format!("a small {}", s.description())
    } else {
        format!("{} {}", article(s.colour.word()), s.description())
    }
}

/// The grounded caption of a scene: `"An image of a red circle and a small blue square."` and
/// the character span (`start..end`, in chars) of each shape's phrase, in shape order.
pub fn grounded_caption(scene: &Scene) -> (String, Vec<(usize, usize)>) {
    let mut text = String::from("An image of ");
    let mut spans = Vec::new();
    let n = scene.shapes.len();
    for (i, s) in scene.shapes.iter().enumerate() {
        if i > 0 {
            text.push_str(if i + 1 == n { " and " } else { ", " });
        }
        let phrase = article_phrase(s);
        let start = text.chars().count();
        text.push_str(&phrase);
        spans.push((start, start + phrase.chars().count()));
    }
    text.push('.');
    (text, spans)
}

/// The relation of `a` to `b` that is clearest (largest centre offset along one axis), if the
/// offset is at least a quarter of the larger shape.
fn relation(a: &Shape, b: &Shape) -> Option<&'static str> {
    let ((ax, ay), (bx, by)) = (a.centre(), b.centre());
    let (dx, dy) = (ax - bx, ay - by);
    let margin = a.pixels[2].max(b.pixels[2]) as f64 / 4.0;
    if dx.abs() >= dy.abs() && dx.abs() >= margin {
        Some(if dx < 0.0 { "left of" } else { "right of" })
    } else if dy.abs() > dx.abs() && dy.abs() >= margin {
        Some(if dy < 0.0 { "above" } else { "below" })
    } else {
        None
    }
}

/// Whether `a` is at all `relation` of `b` (centres compared along the relation's axis): the
/// reading a listener may take, used to rule out every other candidate.
fn loosely(a: &Shape, b: &Shape, relation: &str) -> bool {
    let ((ax, ay), (bx, by)) = (a.centre(), b.centre());
    match relation {
        "left of" => ax < bx,
        "right of" => ax > bx,
        "above" => ay < by,
        _ => ay > by,
    }
}

/// Referring expressions for a scene: for each shape, one expression naming it uniquely if one
/// exists. A shape with a unique description gets `"the red circle"` or, half of the time, a
/// relation to another uniquely described shape; a shape whose description repeats gets a
/// relation to a uniquely described anchor. The relation holds clearly for the target (along its
/// dominant axis, by at least a quarter of the larger shape) and not even loosely (centres
/// compared along the axis) for any other shape of the target's description. An ambiguous
/// target may instead be named by its extreme position among the shapes of its description
/// (`"the left red circle"`, `"the top red circle"`), when it is the clear extreme.
pub fn referring_expressions(scene: &Scene, rng: &mut impl Rng) -> Vec<RefExp> {
    let shapes = &scene.shapes;
    let count = |d: &str| shapes.iter().filter(|s| s.description() == d).count();
    let mut out = Vec::new();
    for (t, target) in shapes.iter().enumerate() {
        let desc = target.description();
        let ambiguous = count(&desc) > 1;
        let mut anchors: Vec<usize> = (0..shapes.len())
            .filter(|&a| a != t && count(&shapes[a].description()) == 1 && shapes[a].description() != desc)
            .collect();
        anchors.shuffle(rng);
        let with_relation = anchors.iter().find_map(|&a| {
            let r = relation(target, &shapes[a])?;
            let unique = shapes
                .iter()
                .enumerate()
                .filter(|(i, s)| *i != t && s.description() == desc)
                .all(|(_, s)| !loosely(s, &shapes[a], r));
            unique.then(|| format!("the {desc} {r} the {}", shapes[a].description()))
        });
        // Among shapes of its own description: "the left red circle" when the target is the
        // clear extreme along an axis (by a quarter of the larger shape).
        let extremal = if ambiguous {
            let others: Vec<&Shape> = shapes
                .iter()
                .enumerate()
                .filter(|(i, s)| *i != t && s.description() == desc)
                .map(|(_, s)| s)
                .collect();
            let (tx, ty) = target.centre();
            let beats = |word: &str, o: &Shape| {
                let m = target.pixels[2].max(o.pixels[2]) as f64 / 4.0;
                let (ox, oy) = o.centre();
                match word {
                    "left" => tx + m <= ox,
                    "right" => tx >= ox + m,
                    "top" => ty + m <= oy,
                    _ => ty >= oy + m,
                }
            };
            let options: Vec<&str> = ["left", "right", "top", "bottom"]
                .into_iter()
                .filter(|word| others.iter().all(|o| beats(word, o)))
                .collect();
            options.choose(rng).map(|w| format!("the {w} {desc}"))
        } else {
            None
        };
        let text = match (ambiguous, with_relation, extremal) {
            (true, Some(a), Some(b)) => {
                if rng.random_bool(0.5) {
                    a
                } else {
                    b
                }
            }
            (true, Some(text), None) | (true, None, Some(text)) => text,
            (true, None, None) => continue,
            (false, Some(text), _) if rng.random_bool(0.5) => text,
            (false, _, _) => format!("the {desc}"),
        };
        out.push(RefExp {
            text,
            target: t,
            needs_relation: ambiguous,
        });
    }
    out
}

/// How well the location tokens can represent the ground-truth boxes: each box encoded to its
/// two corner cells and decoded back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CodecCeiling {
    /// Grid side.
    pub grid: usize,
    /// Boxes measured.
    pub boxes: usize,
    /// Share of boxes whose round trip keeps IoU >= 0.5 with the original: the best accuracy
    /// at IoU >= 0.5 any model writing location tokens can reach.
    pub accuracy_at_0_5: f64,
    /// Mean IoU of the round trip.
    pub mean_iou: f64,
    /// Smallest IoU of the round trip.
    pub min_iou: f64,
}

/// The codec's round trip of one box on a `grid x grid` grid.
pub fn codec_round_trip(bbox: BoxXyxy, grid: usize) -> Option<BoxXyxy> {
    let (ul, lr) = coordinate_to_patch_index(bbox, grid).ok()?;
    Some(patch_index_to_coordinate(ul, lr, grid))
}

/// Measure the codec's ceiling on boxes.
pub fn codec_ceiling(boxes: &[BoxXyxy], grid: usize) -> CodecCeiling {
    let ious: Vec<f64> = boxes
        .iter()
        .map(|&b| codec_round_trip(b, grid).map_or(0.0, |r| iou(b, r)))
        .collect();
    let n = ious.len().max(1) as f64;
    CodecCeiling {
        grid,
        boxes: ious.len(),
        accuracy_at_0_5: ious.iter().filter(|&&v| v >= 0.5).count() as f64 / n,
        mean_iou: ious.iter().sum::<f64>() / n,
        min_iou: ious.iter().copied().fold(f64::INFINITY, f64::min).min(1.0),
    }
}

/// What [`write_dataset`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShapesSummary {
    /// The configuration.
    pub config: ShapesConfig,
    /// Scenes (images) written.
    pub images: usize,
    /// Shapes over all scenes.
    pub shapes: usize,
    /// Grounded captions.
    pub grounded_captions: usize,
    /// Captions with one phrase grounded (one per shape of the scenes of several shapes).
    #[serde(default)]
    pub single_phrase_captions: usize,
    /// Referring expressions.
    pub referring_expressions: usize,
    /// Of those, how many need their relation to be unambiguous.
    pub relational: usize,
    /// Text-only sentences.
    pub text_documents: usize,
    /// The codec's ceiling on every ground-truth box.
    pub codec: CodecCeiling,
}

fn grit_entry(span: (usize, usize), b: BoxXyxy) -> Value {
    json!([span.0, span.1, b[0], b[1], b[2], b[3], 1.0])
}

fn text_sentence(rng: &mut ChaCha8Rng) -> String {
    let kind = ShapeKind::ALL[rng.random_range(0..ShapeKind::ALL.len())].word();
    let colour = Colour::ALL[rng.random_range(0..Colour::ALL.len())].word();
    let other = ShapeKind::ALL[rng.random_range(0..ShapeKind::ALL.len())].word();
    match rng.random_range(0..4) {
        0 => format!(
            "{} {colour} {kind} is a {kind} painted {colour}.",
            if article(colour) == "an" { "An" } else { "A" }
        ),
        1 => format!("Left of the {kind} means closer to the left edge than the {kind}."),
        2 => format!("The {colour} {kind} sits above the {other}."),
        _ => format!("Count the shapes: one {kind} and one {other}."),
    }
}

struct Writer {
    path: PathBuf,
    file: std::io::BufWriter<fs::File>,
}

impl Writer {
    fn create(path: PathBuf) -> Result<Self, ShapesError> {
        let file = fs::File::create(&path).map_err(|source| ShapesError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path,
            file: std::io::BufWriter::new(file),
        })
    }

    fn line(&mut self, v: &Value) -> Result<(), ShapesError> {
        writeln!(self.file, "{v}").map_err(|source| ShapesError::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn finish(mut self) -> Result<(), ShapesError> {
        self.file.flush().map_err(|source| ShapesError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

fn write_json(path: PathBuf, v: &impl Serialize) -> Result<(), ShapesError> {
    let text = serde_json::to_string_pretty(v).expect("serialisable");
    fs::write(&path, text).map_err(|source| ShapesError::Io { path, source })
}

/// Write the data set under `out` (see the module documentation for the files).
pub fn write_dataset(config: &ShapesConfig, out: &Path) -> Result<ShapesSummary, ShapesError> {
    config.validate()?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ShapesError::Io { path, source }
    };
    fs::create_dir_all(out.join("images")).map_err(io(&out.join("images")))?;
    fs::create_dir_all(out.join("mdetr")).map_err(io(&out.join("mdetr")))?;
    let mut grit = Writer::create(out.join("grit.jsonl"))?;
    let mut phrases = Writer::create(out.join("phrases.jsonl"))?;
    let mut refexp = Writer::create(out.join("refexp.jsonl"))?;
    let mut captions = Writer::create(out.join("captions.jsonl"))?;
    let mut text = Writer::create(out.join("text.jsonl"))?;
    let mut summary = ShapesSummary {
        config: config.clone(),
        ..Default::default()
    };
    let mut boxes = Vec::new();
    // MDETR-style COCO files: one "image" entry per (picture, sentence).
    let (mut ref_images, mut ref_anns) = (Vec::new(), Vec::new());
    let (mut fl_images, mut fl_anns) = (Vec::new(), Vec::new());
    let mut text_rng = scene_rng(config.seed ^ 0x7e57, usize::MAX - 1);
    for index in 0..config.n {
        let scene = scene(config, index);
        let file = format!("images/{index:06}.png");
        let path = out.join(&file);
        render(&scene).save(&path).map_err(|source| ShapesError::Image {
            path: path.clone(),
            source,
        })?;
        summary.images += 1;
        summary.shapes += scene.shapes.len();
        let (w, h) = (scene.width, scene.height);
        boxes.extend(scene.shapes.iter().map(|s| s.bbox(w, h)));

        let (caption, spans) = grounded_caption(&scene);
        let chunks: Vec<Value> = spans
            .iter()
            .zip(&scene.shapes)
            .map(|(&span, s)| grit_entry(span, s.bbox(w, h)))
            .collect();
        grit.line(&json!({"image": file, "caption": caption, "noun_chunks": chunks, "ref_exps": []}))?;
        summary.grounded_captions += 1;
        if chunks.len() > 1 {
            for chunk in &chunks {
                phrases.line(&json!({"image": file, "caption": caption, "noun_chunks": [chunk], "ref_exps": []}))?;
                summary.single_phrase_captions += 1;
            }
        }
        let sentence_id = fl_images.len();
        fl_images.push(json!({
            "id": sentence_id, "file_name": file, "width": w, "height": h, "caption": caption,
            "original_img_id": index, "sentence_id": sentence_id,
            "tokens_positive_eval": spans.iter().map(|&(a, b)| json!([[a, b]])).collect::<Vec<_>>(),
        }));
        for (phrase_id, (&(a, b), s)) in spans.iter().zip(&scene.shapes).enumerate() {
            let [x, y, bw, bh] = s.pixels;
            fl_anns.push(json!({
                "id": fl_anns.len(), "image_id": sentence_id, "bbox": [x, y, bw, bh],
                "area": bw * bh, "iscrowd": 0, "category_id": 1,
                "tokens_positive": [[a, b]], "phrase_ids": phrase_id,
            }));
        }

        let plain = format!(
            "An image of {}.",
            scene
                .shapes
                .iter()
                .map(article_phrase)
                .collect::<Vec<_>>()
                .join(" and ")
        );
        captions.line(&json!({"image": file, "caption": plain}))?;

        let mut rng = scene_rng(config.seed ^ 0x5eed, index);
        for r in referring_expressions(&scene, &mut rng) {
            let b = scene.shapes[r.target].bbox(w, h);
            // A leading space: the markup then reads `<grounding><phrase> the ...</phrase>`, the
            // comprehension prompt of `kosmos refer`.
            let caption = format!(" {}", r.text);
            let len = caption.chars().count();
            refexp.line(&json!({
                "image": file, "caption": caption, "noun_chunks": [],
                "ref_exps": [grit_entry((1, len), b)], "needs_relation": r.needs_relation,
            }))?;
            summary.referring_expressions += 1;
            summary.relational += usize::from(r.needs_relation);
            let id = ref_images.len();
            ref_images.push(json!({
                "id": id, "file_name": file, "width": w, "height": h, "caption": r.text,
                "original_img_id": index, "needs_relation": r.needs_relation,
            }));
            let [x, y, bw, bh] = scene.shapes[r.target].pixels;
            ref_anns.push(json!({
                "id": id, "image_id": id, "bbox": [x, y, bw, bh], "area": bw * bh,
                "iscrowd": 0, "category_id": 1,
            }));
        }
        if config.text_every > 0 && index % config.text_every == 0 {
            text.line(&json!({"text": text_sentence(&mut text_rng)}))?;
            summary.text_documents += 1;
        }
    }
    for w in [grit, phrases, refexp, captions, text] {
        w.finish()?;
    }
    let categories = json!([{"id": 1, "name": "object", "supercategory": "object"}]);
    write_json(
        out.join("mdetr/final_shapes_refexp.json"),
        &json!({"images": ref_images, "annotations": ref_anns, "categories": categories}),
    )?;
    write_json(
        out.join("mdetr/final_flickr_separateGT_shapes.json"),
        &json!({"images": fl_images, "annotations": fl_anns, "categories": categories}),
    )?;
    summary.codec = codec_ceiling(&boxes, config.grid);
    write_json(out.join("summary.json"), &summary)?;
    let data = data_config(config.seed);
    let toml = toml::to_string_pretty(&data).expect("serialisable");
    fs::write(out.join("data.toml"), toml).map_err(io(&out.join("data.toml")))?;
    Ok(summary)
}

/// The [`DataConfig`] over a written data set (paths relative to its directory): grounded
/// captions (whole and one phrase at a time), referring expressions (with their `ref_exps` on),
/// captions and text, weighted towards grounding.
pub fn data_config(seed: u64) -> DataConfig {
    let source = |name: &str, kind, file: &str, weight, grit: GritConfig| SourceConfig {
        name: name.into(),
        kind,
        format: SourceFormat::Jsonl,
        paths: vec![PathBuf::from(file)],
        weight,
        image_root: None,
        grit,
        on_error: None,
    };
    let refexp = GritConfig {
        use_ref_exps: true,
        ..GritConfig::default()
    };
    DataConfig {
        sources: vec![
            source("grounded", SourceKind::Grit, "grit.jsonl", 2.0, GritConfig::default()),
            source("phrases", SourceKind::Grit, "phrases.jsonl", 1.0, GritConfig::default()),
            source("refexp", SourceKind::Grit, "refexp.jsonl", 3.0, refexp),
            source(
                "captions",
                SourceKind::Caption,
                "captions.jsonl",
                0.5,
                GritConfig::default(),
            ),
            source("text", SourceKind::Text, "text.jsonl", 0.25, GritConfig::default()),
        ],
        seed,
        max_len: 256,
        packing: false,
        pad_to_max_len: false,
        add_eos: true,
        overflow: Default::default(),
        on_error: Default::default(),
        max_consecutive_skips: 1000,
    }
}
