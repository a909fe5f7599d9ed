//! Collation: examples to token ids, labels, image-position masks and pixel tensors.
//!
//! ## Sequences
//!
//! Every example becomes one `Kosmos2Processor` prompt (so the ids equal transformers'
//! processor on the same text, phrases and boxes), with BOS, and with `</s>` at the end when
//! `add_eos` is set (HF's `add_eos_token`):
//!
//! | kind        | sequence |
//! |-------------|----------|
//! | text        | `<s> text </s>` |
//! | caption     | `<s> <image> slots </image> caption </s>` |
//! | grit        | `<s> <image> slots </image> <grounding> ..<phrase> a dog</phrase><object> <ul> <lr> </object>` |
//! | interleaved | `<s>` then the items in order, each image as a block `<image> slots </image>`, then `</s>` |
//! | instruction | `<s> [<image> slots </image>] prompt` then `response </s>` |
//!
//! The `slots` are the processor's `num_image_tokens` placeholder ids whose embeddings the model
//! replaces with the image's; `image_embeds_position_mask` is 1 exactly there. `<ul>` and `<lr>`
//! stand for a box's two `<patch_index_k>` location tokens. An instruction's
//! prompt and response are tokenized separately and concatenated, so the boundary is always a
//! token boundary (the response starts a new word).
//!
//! ## Labels
//!
//! Labels are aligned with the inputs (HF convention, see `kosmos_models::loss`): the label at
//! `t` is the target of the logits at `t - 1`, and [`IGNORE_INDEX`] (-100) is not scored.
//! Labels equal the input ids except:
//!
//! * **BOS** (`<s>` at the start of every document, also inside packed rows): -100, so nothing is
//!   trained to predict the start of a document (in particular not across packed documents);
//! * **the whole image block**, `<image>`, the slots and `</image>`: -100. The slots are image
//!   embeddings, not tokens; the boundary tokens are structure the input pipeline always
//!   supplies and the model is never asked to generate (at inference the processor writes the
//!   block), so KOSMOS is not trained to predict `<image>` or `</image>`. The token after
//!   `</image>` (e.g. `<grounding>` or the caption's first word) *is* scored, predicted from the
//!   last image position;
//! * **instruction prompts**: everything before the response (BOS, image block, prompt) is -100;
//! * **padding**: -100.
//!
//! ## Truncation (`overflow`)
//!
//! A sequence longer than `max_len`: with [`Overflow::Truncate`] the first `max_len` tokens are
//! kept, except that an image block is never cut: when the cut falls inside a block, the cut
//! moves to just before that block's `<image>` and the block's image (and all later ones) are
//! dropped. A truncated sequence has no `</s>`. If nothing scored is left (e.g. an instruction
//! whose prompt fills `max_len`), the example is dropped and counted. [`Overflow::Skip`] drops
//! long examples and [`Overflow::Fail`] stops with [`DataError::TooLong`]. Grounding markup may be
//! cut inside an `<object>..</object>`; the model then sees an unfinished object at the end of
//! the row, as in a cut text stream.
//!
//! ## Packing
//!
//! See [`Packer`]: with packing, text-only examples share rows (first fit, in draw order, up to
//! `max_len` tokens); examples with images keep a row of their own. [`Batch::document_ids`]
//! records the boundaries; the trainer's forward pass (`Kosmos2::forward_packed`) turns them into
//! a block-diagonal causal mask and positions that restart per document, so a packed document is
//! computed as if alone. Labels never cross documents (each document's BOS label is -100).
//!
//! ## Images in a batch
//!
//! [`Batch::pixel_values`] holds every image of the batch, `[total_images, 3, H, W]`, in row order
//! and, within a row, in sequence order; [`Batch::images_per_row`] says how many belong to each
//! row (0 for text-only rows, several for interleaved documents). The image blocks of row `r`
//! consume images `sum(images_per_row[..r])..` in order. (The current `Kosmos2` forward takes
//! one image per row; rows with several images wait for the multi-image model side.)

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use kosmos_models::loss::IGNORE_INDEX;
use kosmos_models::processor::{EncodeOptions, Kosmos2Processor, PaddingSide, Prompt, Segment, Truncation};
use kosmos_vision::preprocess::{ImageProcessor, ImageProcessorConfig, decode_rgb, load_rgb};

use super::config::{DataConfig, Overflow};
use super::error::{DataError, Location};
use super::record::{Content, Example, ImageRef, Item};

/// Collation settings (the part of [`DataConfig`] that collation uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CollateConfig {
    /// Longest sequence in tokens.
    pub max_len: usize,
    /// End documents with `</s>`.
    pub add_eos: bool,
    /// Overflow policy.
    pub overflow: Overflow,
    /// Pad batches to `max_len`.
    pub pad_to_max_len: bool,
    /// Pack text-only examples.
    pub packing: bool,
}

impl From<&DataConfig> for CollateConfig {
    fn from(c: &DataConfig) -> Self {
        Self {
            max_len: c.max_len,
            add_eos: c.add_eos,
            overflow: c.overflow,
            pad_to_max_len: c.pad_to_max_len,
            packing: c.packing,
        }
    }
}

/// One example, encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels ([`IGNORE_INDEX`] where not scored).
    pub labels: Vec<i64>,
    /// 1 at image-embedding slots.
    pub image_embeds_position_mask: Vec<u32>,
    /// `[start, end)` of every image block (`<image>` .. `</image>` inclusive).
    pub image_blocks: Vec<(usize, usize)>,
    /// The images of the blocks, in order.
    pub images: Vec<ImageRef>,
    /// Preprocessed pixels of each image, `3 * H * W` each (empty until loaded).
    pub pixels: Vec<Vec<f32>>,
    /// `(H, W)` of the preprocessed images.
    pub image_size: Option<(usize, usize)>,
    /// Whether the sequence was truncated.
    pub truncated: bool,
    /// The record it came from.
    pub location: Location,
}

impl Encoded {
    /// Length in tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether it has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of scored labels.
    pub fn scored(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// A collated batch (host memory; see [`Batch::to_tensors`]). Rows are right-padded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// `[rows][len]` token ids.
    pub input_ids: Vec<Vec<u32>>,
    /// 1 real token, 0 padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// 1 at image-embedding slots.
    pub image_embeds_position_mask: Vec<Vec<u32>>,
    /// Labels, [`IGNORE_INDEX`] where not scored.
    pub labels: Vec<Vec<i64>>,
    /// Document of each position within its row: 1, 2, .. for packed documents, 0 for padding.
    pub document_ids: Vec<Vec<u32>>,
    /// Every image's pixels, `[total_images, 3, H, W]` flattened, in row order.
    pub pixel_values: Vec<f32>,
    /// `(H, W)` of the images (`None` without images).
    pub image_size: Option<(usize, usize)>,
    /// Number of images of each row.
    pub images_per_row: Vec<usize>,
    /// The records of each row, in order.
    pub locations: Vec<Vec<Location>>,
}

/// A batch as tensors.
#[derive(Clone, Debug)]
pub struct TensorBatch<B: Backend> {
    /// `[rows, len]` token ids.
    pub input_ids: Tensor<B, 2, Int>,
    /// `[rows, len]`, 1 real token, 0 padding.
    pub attention_mask: Tensor<B, 2, Int>,
    /// `[rows, len]`, 1 at image-embedding slots.
    pub image_embeds_position_mask: Tensor<B, 2, Int>,
    /// `[rows, len]` labels for `kosmos_models::loss::causal_lm_loss`.
    pub labels: Tensor<B, 2, Int>,
    /// `[total_images, 3, H, W]`, `None` without images.
    pub pixel_values: Option<Tensor<B, 4>>,
    /// Images of each row.
    pub images_per_row: Vec<usize>,
}

impl Batch {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether it has no rows.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Padded length.
    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    /// Total number of images.
    pub fn num_images(&self) -> usize {
        self.images_per_row.iter().sum()
    }

    /// Move to `device`.
    pub fn to_tensors<B: Backend>(&self, device: &B::Device) -> TensorBatch<B> {
        let (rows, len) = (self.len(), self.seq_len());
        let ints = |v: &[Vec<u32>]| -> Tensor<B, 2, Int> {
            let flat: Vec<i64> = v.iter().flatten().map(|&x| x as i64).collect();
            Tensor::from_data(TensorData::new(flat, [rows, len]), device)
        };
        let labels: Vec<i64> = self.labels.iter().flatten().copied().collect();
        let pixel_values = self.image_size.filter(|_| self.num_images() > 0).map(|(h, w)| {
            Tensor::from_data(
                TensorData::new(self.pixel_values.clone(), [self.num_images(), 3, h, w]),
                device,
            )
        });
        TensorBatch {
            input_ids: ints(&self.input_ids),
            attention_mask: ints(&self.attention_mask),
            image_embeds_position_mask: ints(&self.image_embeds_position_mask),
            labels: Tensor::from_data(TensorData::new(labels, [rows, len]), device),
            pixel_values,
            images_per_row: self.images_per_row.clone(),
        }
    }
}

/// Turns examples into [`Encoded`] sequences and rows of them into [`Batch`]es.
pub struct Collator {
    processor: Kosmos2Processor,
    images: ImageProcessor,
    config: CollateConfig,
    bos: u32,
    eos: u32,
    pad: u32,
    boi: u32,
    eoi: u32,
}

fn token(processor: &Kosmos2Processor, t: &str) -> Result<u32, DataError> {
    processor
        .tokenizer()
        .token_to_id(t)
        .ok_or_else(|| DataError::Config(format!("the tokenizer has no `{t}` token")))
}

impl Collator {
    /// A collator from a text processor and an image processor.
    pub fn new(processor: Kosmos2Processor, images: ImageProcessor, config: CollateConfig) -> Result<Self, DataError> {
        if config.max_len < 2 {
            return Err(DataError::Config(format!(
                "max_len must be >= 2, found {}",
                config.max_len
            )));
        }
        Ok(Self {
            bos: token(&processor, "<s>")?,
            eos: processor.eos_token_id(),
            pad: processor.pad_token_id(),
            boi: token(&processor, "<image>")?,
            eoi: token(&processor, "</image>")?,
            processor,
            images,
            config,
        })
    }

    /// Load `tokenizer.json` and `preprocessor_config.json` from a model directory;
    /// `num_image_tokens` is the model's `latent_query_num`.
    pub fn from_model_dir(
        dir: impl AsRef<Path>,
        num_image_tokens: usize,
        config: CollateConfig,
    ) -> Result<Self, DataError> {
        let dir = dir.as_ref();
        let processor = Kosmos2Processor::from_dir(dir, num_image_tokens).map_err(|source| DataError::Processor {
            location: Location::file(dir.join("tokenizer.json")),
            source: Box::new(source),
        })?;
        let pre = dir.join("preprocessor_config.json");
        let image_config = if pre.exists() {
            ImageProcessorConfig::from_json_file(&pre)
        } else {
            Ok(ImageProcessorConfig::default())
        };
        let images = image_config
            .and_then(ImageProcessor::new)
            .map_err(|e| DataError::Config(format!("{}: {e}", pre.display())))?;
        Self::new(processor, images, config)
    }

    /// The same collator with other settings.
    pub fn with_config(self, config: CollateConfig) -> Result<Self, DataError> {
        Self::new(self.processor, self.images, config)
    }

    /// The settings.
    pub fn config(&self) -> &CollateConfig {
        &self.config
    }

    /// The text processor.
    pub fn processor(&self) -> &Kosmos2Processor {
        &self.processor
    }

    /// The image processor.
    pub fn image_processor(&self) -> &ImageProcessor {
        &self.images
    }

    fn encode_prompt(
        &self,
        prompt: &Prompt,
        add_eos: bool,
        location: &Location,
    ) -> Result<(Vec<u32>, Vec<u32>), DataError> {
        let options = EncodeOptions {
            add_special_tokens: true,
            add_eos_token: add_eos,
            pad: false,
            padding_side: PaddingSide::Right,
            max_length: None,
            truncation: Truncation::Refuse,
        };
        let mut enc = self
            .processor
            .encode(std::slice::from_ref(prompt), &options)
            .map_err(|source| DataError::Processor {
                location: location.clone(),
                source: Box::new(source),
            })?;
        let ids = enc.input_ids.pop().unwrap_or_default();
        let mask = enc
            .image_embeds_position_mask
            .pop()
            .unwrap_or_else(|| vec![0; ids.len()]);
        Ok((ids, mask))
    }

    /// Token ids, labels and image blocks of an example, before truncation and image loading.
    pub fn tokenize(&self, example: &Example) -> Result<Encoded, DataError> {
        let location = &example.location;
        let add_eos = self.config.add_eos;
        let mut prompt_len = 0;
        let (ids, mask) =
            match &example.content {
                Content::Text(text) => self.encode_prompt(&Prompt::text(text.as_str()), add_eos, location)?,
                Content::Caption { caption, .. } => {
                    self.encode_prompt(&Prompt::with_image(caption.as_str()), add_eos, location)?
                }
                Content::Grounded { text, boxes, .. } => {
                    let prompt = Prompt {
                        text: text.clone(),
                        image: true,
                        boxes: boxes.clone(),
                        segments: vec![],
                    };
                    self.encode_prompt(&prompt, add_eos, location)?
                }
                Content::Interleaved(items) => {
                    let segments = items
                        .iter()
                        .map(|i| match i {
                            Item::Text(t) => Segment::Text(t.clone()),
                            Item::Image(_) => Segment::Image,
                        })
                        .collect();
                    self.encode_prompt(&Prompt::interleaved(segments), add_eos, location)?
                }
                Content::Instruction {
                    image,
                    prompt,
                    response,
                } => {
                    let p = Prompt {
                        text: prompt.clone(),
                        image: image.is_some(),
                        ..Prompt::default()
                    };
                    let (mut ids, mut mask) = self.encode_prompt(&p, false, location)?;
                    prompt_len = ids.len();
                    let response = self.processor.tokenizer().encode(response.trim(), false).map_err(|e| {
                        DataError::Malformed {
                            location: location.clone(),
                            message: format!("cannot tokenize the response: {e}"),
                        }
                    })?;
                    ids.extend_from_slice(response.get_ids());
                    if add_eos {
                        ids.push(self.eos);
                    }
                    mask.resize(ids.len(), 0);
                    (ids, mask)
                }
            };
        let images: Vec<ImageRef> = example.content.images().into_iter().cloned().collect();
        // Image blocks: each maximal run of slots, with the `<image>` before and `</image>` after.
        let mut blocks = Vec::new();
        let mut t = 0;
        while t < mask.len() {
            if mask[t] == 1 {
                let start = t;
                while t < mask.len() && mask[t] == 1 {
                    t += 1;
                }
                if start == 0 || ids[start - 1] != self.boi || ids.get(t) != Some(&self.eoi) {
                    return Err(DataError::Malformed {
                        location: location.clone(),
                        message: "the text contains image tags that break the image block layout".into(),
                    });
                }
                blocks.push((start - 1, t + 1));
            } else {
                t += 1;
            }
        }
        if blocks.len() != images.len() {
            return Err(DataError::Malformed {
                location: location.clone(),
                message: format!(
                    "{} image(s) but {} image block(s) in the tokens (does the text contain `<image>`?)",
                    images.len(),
                    blocks.len()
                ),
            });
        }
        let mut labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        if ids.first() == Some(&self.bos) {
            labels[0] = IGNORE_INDEX;
        }
        for &(a, b) in &blocks {
            labels[a..b].fill(IGNORE_INDEX);
        }
        labels[..prompt_len].fill(IGNORE_INDEX);
        Ok(Encoded {
            input_ids: ids,
            labels,
            image_embeds_position_mask: mask,
            image_blocks: blocks,
            images,
            pixels: vec![],
            image_size: None,
            truncated: false,
            location: location.clone(),
        })
    }

    /// Apply the overflow policy; `Ok(None)` = dropped (too long with `Skip`, or nothing scored,
    /// e.g. left after truncation).
    pub fn fit(&self, mut e: Encoded) -> Result<Option<Encoded>, DataError> {
        let max_len = self.config.max_len;
        if e.len() <= max_len {
            return Ok((e.scored() > 0).then_some(e));
        }
        match self.config.overflow {
            Overflow::Fail => Err(DataError::TooLong {
                location: e.location.clone(),
                length: e.len(),
                max_len,
            }),
            Overflow::Skip => Ok(None),
            Overflow::Truncate => {
                let mut cut = max_len;
                if let Some(&(a, _)) = e.image_blocks.iter().find(|&&(a, b)| a < cut && cut < b) {
                    cut = a;
                }
                let kept = e.image_blocks.iter().filter(|&&(_, b)| b <= cut).count();
                e.image_blocks.truncate(kept);
                e.images.truncate(kept);
                e.input_ids.truncate(cut);
                e.labels.truncate(cut);
                e.image_embeds_position_mask.truncate(cut);
                e.truncated = true;
                Ok((e.scored() > 0).then_some(e))
            }
        }
    }

    /// Read and preprocess the images of an encoded example.
    pub fn load_images(&self, e: &mut Encoded) -> Result<(), DataError> {
        let max_pixels = self.images.config().max_pixels;
        e.pixels.clear();
        for image in &e.images {
            let name = image.name();
            let rgb = match image {
                ImageRef::File(path) => {
                    if !path.is_file() {
                        return Err(DataError::MissingImage {
                            location: e.location.clone(),
                            image: name,
                        });
                    }
                    load_rgb(path, max_pixels)
                }
                ImageRef::TarMember {
                    shard, offset, size, ..
                } => {
                    let bytes = read_member(shard, *offset, *size).map_err(|source| DataError::Io {
                        location: e.location.clone(),
                        source,
                    })?;
                    decode_rgb(&bytes, &PathBuf::from(&name), max_pixels)
                }
            }
            .map_err(|source| DataError::Image {
                location: e.location.clone(),
                image: name.clone(),
                source: Box::new(source),
            })?;
            let prepared = self.images.resize_and_crop(&rgb);
            let size = (prepared.height, prepared.width);
            if e.image_size.is_some_and(|s| s != size) {
                return Err(DataError::Config(format!(
                    "{}: images come out in different sizes ({:?} and {size:?}); use a fixed resize or a centre crop",
                    e.location,
                    e.image_size.unwrap_or_default()
                )));
            }
            e.image_size = Some(size);
            e.pixels.push(self.images.normalize(&prepared));
        }
        Ok(())
    }

    /// Tokenize, fit to `max_len` and load the images: the whole per-example pipeline.
    /// `Ok(None)` = dropped by the overflow policy.
    pub fn encode(&self, example: &Example) -> Result<Option<Encoded>, DataError> {
        let Some(mut e) = self.fit(self.tokenize(example)?)? else {
            return Ok(None);
        };
        self.load_images(&mut e)?;
        Ok(Some(e))
    }

    /// Collate rows (each one or several packed examples) into a right-padded batch.
    pub fn collate(&self, rows: Vec<Vec<Encoded>>) -> Result<Batch, DataError> {
        let mut batch = Batch::default();
        for row in rows {
            let mut ids = Vec::new();
            let mut labels = Vec::new();
            let mut mask = Vec::new();
            let mut docs = Vec::new();
            let mut locations = Vec::new();
            let mut n_images = 0;
            for (d, e) in row.into_iter().enumerate() {
                docs.extend(std::iter::repeat_n(d as u32 + 1, e.len()));
                ids.extend(e.input_ids);
                labels.extend(e.labels);
                mask.extend(e.image_embeds_position_mask);
                locations.push(e.location.clone());
                if e.pixels.len() != e.images.len() {
                    return Err(DataError::Config(format!(
                        "{}: images were not loaded before collation",
                        e.location
                    )));
                }
                if let Some(size) = e.image_size {
                    if batch.image_size.is_some_and(|s| s != size) {
                        return Err(DataError::Config(format!(
                            "{}: images of the batch come out in different sizes",
                            e.location
                        )));
                    }
                    batch.image_size = Some(size);
                }
                n_images += e.pixels.len();
                for p in e.pixels {
                    batch.pixel_values.extend(p);
                }
            }
            batch.attention_mask.push(vec![1; ids.len()]);
            batch.input_ids.push(ids);
            batch.labels.push(labels);
            batch.image_embeds_position_mask.push(mask);
            batch.document_ids.push(docs);
            batch.images_per_row.push(n_images);
            batch.locations.push(locations);
        }
        let longest = batch.input_ids.iter().map(Vec::len).max().unwrap_or(0);
        let target = if self.config.pad_to_max_len {
            longest.max(self.config.max_len)
        } else {
            longest
        };
        for r in 0..batch.len() {
            batch.input_ids[r].resize(target, self.pad);
            batch.attention_mask[r].resize(target, 0);
            batch.image_embeds_position_mask[r].resize(target, 0);
            batch.labels[r].resize(target, IGNORE_INDEX);
            batch.document_ids[r].resize(target, 0);
        }
        Ok(batch)
    }

    /// Encode and collate examples one per row (no packing); examples dropped by the overflow
    /// policy are left out. Errors are returned, not skipped.
    pub fn collate_examples(&self, examples: &[Example]) -> Result<Batch, DataError> {
        let mut rows = Vec::new();
        for e in examples {
            if let Some(enc) = self.encode(e)? {
                rows.push(vec![enc]);
            }
        }
        self.collate(rows)
    }
}

fn read_member(shard: &Path, offset: u64, size: u64) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(shard)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut bytes = vec![0; size as usize];
    f.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Packing of encoded examples into rows.
///
/// Policy: examples are placed in the order they come. With packing on, a text-only example goes
/// into the first open row that holds only text-only examples and still has room for all of it
/// (first fit; documents are never split across rows); otherwise it opens a new row. An example
/// with images always opens a row of its own. When every row is taken and the example fits
/// nowhere, [`Packer::push`] hands it back (the loader keeps it for the next batch). Without
/// packing every example opens a row.
#[derive(Debug)]
pub struct Packer {
    max_len: usize,
    max_rows: usize,
    packing: bool,
    rows: Vec<Vec<Encoded>>,
    lens: Vec<usize>,
    text_only: Vec<bool>,
}

impl Packer {
    /// An empty packer for at most `max_rows` rows of at most `max_len` tokens.
    pub fn new(max_len: usize, max_rows: usize, packing: bool) -> Self {
        Self {
            max_len,
            max_rows,
            packing,
            rows: Vec::new(),
            lens: Vec::new(),
            text_only: Vec::new(),
        }
    }

    /// Place an example, or hand it back when it fits nowhere.
    pub fn push(&mut self, e: Encoded) -> Result<(), Box<Encoded>> {
        let text_only = e.images.is_empty();
        if self.packing && text_only {
            let slot = (0..self.rows.len()).find(|&r| self.text_only[r] && self.lens[r] + e.len() <= self.max_len);
            if let Some(r) = slot {
                self.lens[r] += e.len();
                self.rows[r].push(e);
                return Ok(());
            }
        }
        if self.rows.len() >= self.max_rows {
            return Err(Box::new(e));
        }
        self.lens.push(e.len());
        self.text_only.push(text_only);
        self.rows.push(vec![e]);
        Ok(())
    }

    /// Whether no new row can be opened (more text may still be packed into open rows).
    pub fn rows_full(&self) -> bool {
        self.rows.len() >= self.max_rows
    }

    /// The rows.
    pub fn into_rows(self) -> Vec<Vec<Encoded>> {
        self.rows
    }
}

/// Pack a sequence of encoded examples into rows with a [`Packer`] (no row limit).
pub fn pack(examples: impl IntoIterator<Item = Encoded>, max_len: usize) -> Vec<Vec<Encoded>> {
    let mut packer = Packer::new(max_len, usize::MAX, true);
    for e in examples {
        // Cannot fail without a row limit.
        let _ = packer.push(e);
    }
    packer.into_rows()
}
