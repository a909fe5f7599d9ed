//! Named model presets and their sizes, computed from the configurations (no weights allocated).

use crate::decoder::DecoderConfig;

/// A decoder-only language model: token embedding, decoder stack, output projection.
#[derive(Clone, Debug)]
pub struct LanguageModelPreset {
    /// Preset name, as accepted on the command line.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// The decoder stack.
    pub decoder: DecoderConfig,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether the output projection shares the token embedding (counted once).
    pub tied_embeddings: bool,
}

impl LanguageModelPreset {
    /// KOSMOS-1's language model at paper size (24 x 2048, 32 heads, FFN 8192, MAGNETO + XPOS),
    /// with the 64,007-token sentencepiece vocabulary of the unilm release and tied embeddings
    /// (the paper reports ~1.3B parameters for the MLLM component).
    pub fn kosmos1() -> Self {
        Self {
            name: "kosmos1-lm",
            description: "KOSMOS-1 language model (MAGNETO + XPOS), paper size",
            decoder: DecoderConfig::kosmos1(),
            vocab_size: 64007,
            tied_embeddings: true,
        }
    }

    /// The text model of microsoft/kosmos-2-patch14-224 (vocabulary 65,037 including the 1,024
    /// location tokens, tied `lm_head`). Its absolute positions are computed, not learned.
    pub fn kosmos2_text() -> Self {
        Self {
            name: "kosmos2-text",
            description: "KOSMOS-2 text decoder (MAGNETO, sinusoidal positions) of kosmos-2-patch14-224",
            decoder: DecoderConfig::kosmos2(),
            vocab_size: 65037,
            tied_embeddings: true,
        }
    }

    /// All presets.
    pub fn all() -> Vec<Self> {
        vec![Self::kosmos1(), Self::kosmos2_text()]
    }

    /// Parameters: embedding, decoder stack, and the output projection when untied.
    pub fn num_params(&self) -> usize {
        let embed = self.vocab_size * self.decoder.embed_dim;
        embed + self.decoder.num_params() + if self.tied_embeddings { 0 } else { embed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kosmos2_text_count_matches_the_spec_breakdown() {
        // The spec's 1,664,485,376 total = text (this) + CLIP ViT-L/14 (303,179,776) + projection
        // (latent 64x2048 + dense 1024x2048+2048 + 4 x (2048x2048+2048)).
        let text = LanguageModelPreset::kosmos2_text().num_params();
        let vision = 303_179_776usize;
        let projection = 64 * 2048 + (1024 * 2048 + 2048) + 4 * (2048 * 2048 + 2048);
        assert_eq!(text + vision + projection, 1_664_485_376);
    }
}
