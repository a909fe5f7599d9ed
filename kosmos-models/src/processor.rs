//! The KOSMOS-2 processor: prompts (image block, grounding tag, phrase boxes) to token ids,
//! attention masks and image-embedding position masks, equal to transformers 5.24.0's
//! `Kosmos2Processor` for everything but truncation (see [`Truncation`]).
//!
//! A prompt with an image becomes `<s><image> <image> x N </image> TEXT` where the `N`
//! (`latent_query_num`, 64 in the official model) placeholder `<image>` ids are then replaced by
//! the ordinary ids `unk + 1 .. unk + N` (4..67), whose embeddings the model overwrites with the
//! image embeddings. Boxes given for `<phrase>..</phrase>` spans are written after each phrase as
//! `<object> <patch_index_a> <patch_index_b> [</delimiter_of_multi_objects/> ...] </object>`.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::grounding::{BoxXyxy, DEFAULT_GRID, coordinate_to_patch_index, patch_index_token};

/// Boxes of one `<phrase>` (HF accepts a tuple or a list of tuples per phrase).
#[derive(Clone, Debug, PartialEq)]
pub enum PhraseBoxes {
    /// No box for this phrase.
    None,
    /// Normalised `(x1, y1, x2, y2)` boxes.
    Coords(Vec<BoxXyxy>),
    /// `(upper-left, lower-right)` location-token cells.
    Cells(Vec<(i64, i64)>),
    /// A mix, in order.
    Mixed(Vec<BoxSpec>),
}

/// One box, as coordinates or as cells.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BoxSpec {
    /// Normalised corners.
    Coords(BoxXyxy),
    /// Location cells.
    Cells(i64, i64),
}

/// Where padding goes in a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaddingSide {
    /// Pads before the tokens (what generation wants).
    Left,
    /// Pads after the tokens.
    Right,
}

/// What to do with a prompt longer than the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Truncation {
    /// Refuse it with [`ProcessorError::TooLong`] (the default: nothing is cut silently).
    Refuse,
    /// Keep the BOS and the image block whole and drop the oldest text tokens after it.
    /// (HF's processor instead truncates inside the image block, producing masks of different
    /// lengths; that is not reproduced.)
    CutTextFromLeft,
}

/// A piece of an interleaved prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    /// Text.
    Text(String),
    /// An image block (`<image>`, one slot per latent, `</image>`).
    Image,
}

/// One prompt.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prompt {
    /// The text, e.g. `"<grounding>An image of"`.
    pub text: String,
    /// Whether an image goes with it (an image block is inserted before the text).
    pub image: bool,
    /// Boxes per `<phrase>` span, in order (empty = none).
    pub boxes: Vec<PhraseBoxes>,
    /// Several images interleaved with text (KOSMOS-1 documents and few-shot prompts); when not
    /// empty it replaces `text` and `image`. The images' embeddings fill the blocks in order.
    pub segments: Vec<Segment>,
}

impl Prompt {
    /// A prompt about an image.
    pub fn with_image(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            image: true,
            ..Self::default()
        }
    }

    /// A text-only prompt.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            ..Self::default()
        }
    }

    /// An interleaved prompt, e.g. `[Image, Text("A cat."), Image, Text("A")]` for few-shot
    /// captioning.
    pub fn interleaved(segments: Vec<Segment>) -> Self {
        Self {
            segments,
            ..Self::default()
        }
    }

    /// Number of images in the prompt.
    pub fn num_images(&self) -> usize {
        if self.segments.is_empty() {
            self.image as usize
        } else {
            self.segments.iter().filter(|s| matches!(s, Segment::Image)).count()
        }
    }
}

/// Encoding options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Prepend BOS (HF `add_special_tokens`, default true).
    pub add_special_tokens: bool,
    /// Wrap as `<s> .. </s>` (HF `add_eos_token`, default false).
    pub add_eos_token: bool,
    /// Pad a batch to its longest prompt. Batches with images are always padded (as HF does).
    pub pad: bool,
    /// Padding side.
    pub padding_side: PaddingSide,
    /// Longest accepted prompt in tokens (`None` = no limit).
    pub max_length: Option<usize>,
    /// What to do with longer prompts.
    pub truncation: Truncation,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            add_special_tokens: true,
            add_eos_token: false,
            pad: true,
            padding_side: PaddingSide::Right,
            max_length: None,
            truncation: Truncation::Refuse,
        }
    }
}

impl EncodeOptions {
    /// Refuse prompts longer than the model's positions (`max_position_embeddings`).
    pub fn within_model(mut self, config: &crate::config::Kosmos2Config) -> Self {
        self.max_length = Some(config.text_config.max_position_embeddings);
        self
    }
}

/// Processor output, one row per prompt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoding {
    /// Token ids.
    pub input_ids: Vec<Vec<u32>>,
    /// `1` real token, `0` padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// `1` where an image embedding goes (empty rows when no prompt has an image).
    pub image_embeds_position_mask: Vec<Vec<u32>>,
}

/// Processor errors, each naming the thing.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// The tokenizer file could not be loaded.
    #[error("cannot load tokenizer `{path}`: {message}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A token the format needs is missing from the vocabulary.
    #[error("the tokenizer has no `{0}` token")]
    MissingToken(String),
    /// Boxes do not match the phrases.
    #[error("prompt {index}: {message}")]
    Boxes {
        /// Which prompt.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// A prompt longer than `max_length` with truncation refused.
    #[error("prompt {index} has {length} tokens, more than the limit of {max_length}; shorten it or allow truncation")]
    TooLong {
        /// Which prompt.
        index: usize,
        /// Its length.
        length: usize,
        /// The limit.
        max_length: usize,
    },
    /// The tokenizer failed on a text.
    #[error("tokenizing prompt {index}: {message}")]
    Encode {
        /// Which prompt.
        index: usize,
        /// The tokenizer's message.
        message: String,
    },
}

/// The KOSMOS-2 processor (text side; images go through `kosmos_vision::ImageProcessor`).
pub struct Kosmos2Processor {
    tokenizer: Tokenizer,
    num_image_tokens: usize,
    grid: usize,
    bos: (String, u32),
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
}

fn token_id(tokenizer: &Tokenizer, token: &str) -> Result<u32, ProcessorError> {
    tokenizer
        .token_to_id(token)
        .ok_or_else(|| ProcessorError::MissingToken(token.to_string()))
}

impl Kosmos2Processor {
    /// Load `tokenizer.json` from a model directory; `num_image_tokens` is the model's
    /// `latent_query_num`.
    pub fn from_dir(dir: impl AsRef<Path>, num_image_tokens: usize) -> Result<Self, ProcessorError> {
        let path = dir.as_ref().join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| ProcessorError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Self::new(tokenizer, num_image_tokens)
    }

    /// Wrap a tokenizer.
    pub fn new(tokenizer: Tokenizer, num_image_tokens: usize) -> Result<Self, ProcessorError> {
        for tag in [
            "<image>",
            "</image>",
            "<phrase>",
            "</phrase>",
            "<object>",
            "</object>",
            "<grounding>",
        ] {
            token_id(&tokenizer, tag)?;
        }
        // The grid follows the number of location tokens (1,024 -> 32 x 32).
        let locations = (0..)
            .take_while(|i| tokenizer.token_to_id(&patch_index_token(*i)).is_some())
            .count();
        let grid = (locations as f64).sqrt() as usize;
        Ok(Self {
            bos: ("<s>".to_string(), token_id(&tokenizer, "<s>")?),
            eos_id: token_id(&tokenizer, "</s>")?,
            pad_id: token_id(&tokenizer, "<pad>")?,
            unk_id: token_id(&tokenizer, "<unk>")?,
            grid: if grid > 0 { grid } else { DEFAULT_GRID },
            num_image_tokens,
            tokenizer,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Padding id.
    pub fn pad_token_id(&self) -> u32 {
        self.pad_id
    }

    /// End-of-sequence id.
    pub fn eos_token_id(&self) -> u32 {
        self.eos_id
    }

    /// Location grid side.
    pub fn grid(&self) -> usize {
        self.grid
    }

    /// The prompt string before tokenization (HF `preprocess_examples`).
    pub fn prompt_string(&self, prompt: &Prompt, index: usize) -> Result<String, ProcessorError> {
        let block: Vec<&str> = std::iter::once("<image>")
            .chain(std::iter::repeat_n("<image>", self.num_image_tokens))
            .chain(std::iter::once("</image>"))
            .collect();
        let block = block.join(" ");
        let text = if prompt.segments.is_empty() {
            let text = prompt.text.trim().to_string();
            if prompt.image { format!("{block} {text}") } else { text }
        } else {
            let parts: Vec<&str> = prompt
                .segments
                .iter()
                .map(|s| match s {
                    Segment::Text(t) => t.trim(),
                    Segment::Image => block.as_str(),
                })
                .filter(|s| !s.is_empty())
                .collect();
            parts.join(" ")
        };
        self.insert_boxes(&text, &prompt.boxes, index)
    }

    fn insert_boxes(&self, text: &str, boxes: &[PhraseBoxes], index: usize) -> Result<String, ProcessorError> {
        if boxes.is_empty() {
            return Ok(text.to_string());
        }
        // `<phrase>.+?</phrase>`, non-greedy, not across newlines.
        let phrases: Vec<usize> = {
            let re = regex::Regex::new(r"<phrase>.+?</phrase>").expect("valid regex");
            re.find_iter(text).map(|m| m.end()).collect()
        };
        if phrases.len() != boxes.len() {
            return Err(ProcessorError::Boxes {
                index,
                message: format!(
                    "{} box entries for {} `<phrase> ... </phrase>` pairs",
                    boxes.len(),
                    phrases.len()
                ),
            });
        }
        let mut out = String::new();
        let mut pos = 0;
        for (end, b) in phrases.into_iter().zip(boxes) {
            out.push_str(&text[pos..end]);
            pos = end;
            let specs: Vec<BoxSpec> = match b {
                PhraseBoxes::None => continue,
                PhraseBoxes::Coords(v) => v.iter().map(|c| BoxSpec::Coords(*c)).collect(),
                PhraseBoxes::Cells(v) => v.iter().map(|&(a, b)| BoxSpec::Cells(a, b)).collect(),
                PhraseBoxes::Mixed(v) => v.clone(),
            };
            let mut pieces = Vec::new();
            for spec in specs {
                let (a, b) = match spec {
                    BoxSpec::Cells(a, b) => (a, b),
                    BoxSpec::Coords(c) => {
                        coordinate_to_patch_index(c, self.grid).map_err(|e| ProcessorError::Boxes {
                            index,
                            message: e.to_string(),
                        })?
                    }
                };
                pieces.push(format!("{} {}", patch_index_token(a), patch_index_token(b)));
            }
            if !pieces.is_empty() {
                out.push_str(&format!(
                    "<object> {} </object>",
                    pieces.join(" </delimiter_of_multi_objects/> ")
                ));
            }
        }
        out.push_str(&text[pos..]);
        Ok(out)
    }

    /// Encode a batch of prompts.
    pub fn encode(&self, prompts: &[Prompt], options: &EncodeOptions) -> Result<Encoding, ProcessorError> {
        let any_image = prompts.iter().any(|p| p.num_images() > 0);
        let with_bos = options.add_special_tokens;
        let mut enc = Encoding::default();
        for (index, prompt) in prompts.iter().enumerate() {
            let mut text = self.prompt_string(prompt, index)?;
            if options.add_special_tokens && !options.add_eos_token {
                text = format!("{}{text}", self.bos.0);
            }
            let encoded = self
                .tokenizer
                .encode(text.as_str(), options.add_special_tokens && options.add_eos_token)
                .map_err(|e| ProcessorError::Encode {
                    index,
                    message: e.to_string(),
                })?;
            let mut ids = encoded.get_ids().to_vec();
            let mut image_mask = vec![0u32; ids.len()];
            if !prompt.segments.is_empty() {
                // Each block is `<image>`, N placeholder `<image>`s, `</image>`.
                let (boi, eoi) = (
                    token_id(&self.tokenizer, "<image>")?,
                    token_id(&self.tokenizer, "</image>")?,
                );
                let n = self.num_image_tokens;
                let mut p = 0;
                while p + n + 1 < ids.len() {
                    if ids[p] == boi && ids[p + 1..=p + n].iter().all(|&i| i == boi) && ids[p + n + 1] == eoi {
                        for k in 0..n {
                            ids[p + 1 + k] = self.unk_id + 1 + k as u32;
                            image_mask[p + 1 + k] = 1;
                        }
                        p += n + 2;
                    } else {
                        p += 1;
                    }
                }
            } else if prompt.image {
                let start = with_bos as usize + 1;
                for k in 0..self.num_image_tokens {
                    if let Some(slot) = ids.get_mut(start + k) {
                        *slot = self.unk_id + 1 + k as u32;
                        image_mask[start + k] = 1;
                    }
                }
            }
            if let Some(max) = options.max_length.filter(|&m| ids.len() > m) {
                match options.truncation {
                    Truncation::Refuse => {
                        return Err(ProcessorError::TooLong {
                            index,
                            length: ids.len(),
                            max_length: max,
                        });
                    }
                    Truncation::CutTextFromLeft => {
                        let keep_head = if prompt.image {
                            with_bos as usize + self.num_image_tokens + 2
                        } else {
                            with_bos as usize
                        };
                        if keep_head >= max {
                            return Err(ProcessorError::TooLong {
                                index,
                                length: keep_head,
                                max_length: max,
                            });
                        }
                        let cut = ids.len() - max;
                        ids.drain(keep_head..keep_head + cut);
                        image_mask.drain(keep_head..keep_head + cut);
                    }
                }
            }
            enc.attention_mask.push(vec![1; ids.len()]);
            enc.input_ids.push(ids);
            enc.image_embeds_position_mask.push(image_mask);
        }
        if any_image || options.pad {
            let longest = enc.input_ids.iter().map(Vec::len).max().unwrap_or(0);
            for ((ids, att), img) in enc
                .input_ids
                .iter_mut()
                .zip(enc.attention_mask.iter_mut())
                .zip(enc.image_embeds_position_mask.iter_mut())
            {
                let n = longest - ids.len();
                match options.padding_side {
                    PaddingSide::Right => {
                        ids.extend(std::iter::repeat_n(self.pad_id, n));
                        att.extend(std::iter::repeat_n(0, n));
                        img.extend(std::iter::repeat_n(0, n));
                    }
                    PaddingSide::Left => {
                        ids.splice(0..0, std::iter::repeat_n(self.pad_id, n));
                        att.splice(0..0, std::iter::repeat_n(0, n));
                        img.splice(0..0, std::iter::repeat_n(0, n));
                    }
                }
            }
        }
        if !any_image {
            enc.image_embeds_position_mask.clear();
        }
        Ok(enc)
    }

    /// Decode generated ids to text, dropping `<s>`, `</s>` and padding but keeping the tags (as
    /// HF's `batch_decode(skip_special_tokens=True)`).
    pub fn decode(&self, ids: &[u32]) -> Result<String, ProcessorError> {
        self.tokenizer.decode(ids, true).map_err(|e| ProcessorError::Encode {
            index: 0,
            message: e.to_string(),
        })
    }
}
