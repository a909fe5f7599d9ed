//! Fused and explicit attention compute the same function; masked rows stay finite.

use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use kosmos_core::{AttentionImpl, AttentionMask, KvCache, MultiHeadAttentionConfig, PositionTreatment, XposConfig};

use crate::common::{TB, assert_close};

/// Left-padded batch: row 0 has 3 pads, row 1 none. Compares the two kernels on the real
/// (non-pad) query rows, with and without XPOS, full and cached, and checks every output is
/// finite (the pad rows are fully masked).
pub fn fused_matches_explicit<B: Backend>(device: &B::Device, atol: f32, rtol: f32) {
    let (b, t, e, h) = (2, 6, 16, 4);
    for position in [PositionTreatment::None, PositionTreatment::Xpos(XposConfig::new(e / h))] {
        let config = MultiHeadAttentionConfig::new(e, h)
            .with_inner_attn_ln(true)
            .with_position(position.clone());
        let mut attn = config.with_implementation(AttentionImpl::Explicit).init::<B>(device);
        let x = Tensor::<B, 3>::random([b, t, e], Distribution::Normal(0.0, 1.0), device);
        let attention_mask =
            Tensor::<B, 2, Int>::from_data(TensorData::from([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]), device);
        let mask = AttentionMask::causal_with_attention_mask(attention_mask.clone());

        let explicit = attn.forward(x.clone(), None, &mask, None);
        attn.set_implementation(AttentionImpl::Fused);
        let fused = attn.forward(x.clone(), None, &mask, None);
        for out in [&explicit, &fused] {
            let v = out.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{position:?}: NaN or inf in attention output"
            );
        }
        // Real rows only: row 0 from position 3 on, row 1 everywhere.
        assert_close(
            fused.clone().slice([0..1, 3..t, 0..e]),
            explicit.clone().slice([0..1, 3..t, 0..e]),
            atol,
            rtol,
            "fused vs explicit, padded row",
        );
        assert_close(
            fused.clone().slice([1..2, 0..t, 0..e]),
            explicit.clone().slice([1..2, 0..t, 0..e]),
            atol,
            rtol,
            "fused vs explicit, full row",
        );

        // Cached: prefill 4 then 2 tokens, padding mask over cache + new keys.
        for imp in [AttentionImpl::Explicit, AttentionImpl::Fused] {
            attn.set_implementation(imp);
            let mut cache = KvCache::new();
            let m1 = AttentionMask::causal_with_attention_mask(attention_mask.clone().slice([0..b, 0..4]));
            let first = attn.forward(x.clone().slice([0..b, 0..4, 0..e]), None, &m1, Some(&mut cache));
            let second = attn.forward(x.clone().slice([0..b, 4..t, 0..e]), None, &mask, Some(&mut cache));
            let out = Tensor::cat(vec![first, second], 1);
            assert_close(
                out.clone().slice([0..1, 3..t, 0..e]),
                explicit.clone().slice([0..1, 3..t, 0..e]),
                atol,
                rtol,
                "cached vs full, padded row",
            );
            assert_close(
                out.slice([1..2, 0..t, 0..e]),
                explicit.clone().slice([1..2, 0..t, 0..e]),
                atol,
                rtol,
                "cached vs full, full row",
            );
        }
    }

    // Cross-attention (no mask, other key length) — the resampler's use.
    let mut attn = MultiHeadAttentionConfig::new(e, h).init::<B>(device);
    let q = Tensor::<B, 3>::random([b, 3, e], Distribution::Normal(0.0, 1.0), device);
    let kv = Tensor::<B, 3>::random([b, 9, e], Distribution::Normal(0.0, 1.0), device);
    attn.set_implementation(AttentionImpl::Explicit);
    let explicit = attn.forward(q.clone(), Some(kv.clone()), &AttentionMask::none(), None);
    attn.set_implementation(AttentionImpl::Fused);
    let fused = attn.forward(q, Some(kv), &AttentionMask::none(), None);
    assert_close(fused, explicit, atol, rtol, "cross-attention fused vs explicit");
}

#[test]
fn fused_and_explicit_agree_on_flex() {
    fused_matches_explicit::<TB>(&Default::default(), 1e-5, 1e-4);
}

#[test]
fn kv_cache_grows_in_chunks_and_keeps_contents() {
    let device = Default::default();
    let mut cache = KvCache::<TB>::new();
    let mut all = Vec::new();
    for step in 0..70 {
        let k = Tensor::<TB, 4>::full([1, 1, 2, 4], step as f32, &device);
        all.push(k.clone());
        cache.append(k.clone(), k);
        assert_eq!(cache.len(), step + 1);
    }
    // One full 64-slot chunk and an open one holding 6 tokens.
    assert_eq!(cache.capacity(), 128);
    assert_eq!(cache.num_segments(), 2);
    let (keys, values) = cache.get().unwrap();
    let expected = Tensor::cat(all, 1).swap_dims(1, 2).into_data();
    assert_eq!(keys.into_data(), expected);
    assert_eq!(values.into_data(), expected);
}

/// A prompt becomes one sealed segment; single-token appends fill 64-slot chunks; full segments
/// merge while the older is not longer than the newer (a binary counter), and the contents and
/// segment starts stay those of the sequence.
#[test]
fn kv_cache_merges_segments_like_a_binary_counter() {
    let device = Default::default();
    let token = |i: usize| Tensor::<TB, 4>::full([2, 1, 1, 3], i as f32, &device);
    let mut cache = KvCache::<TB>::new();
    let prompt = Tensor::cat((0..100).map(token).collect(), 1);
    cache.append(prompt.clone(), prompt.clone());
    assert_eq!((cache.num_segments(), cache.capacity()), (1, 100));
    let mut all = vec![prompt];
    let mut shape = Vec::new();
    for i in 100..400 {
        cache.append(token(i), token(i));
        all.push(token(i));
        shape.push((
            cache.len(),
            cache.segments().iter().map(|s| s.keys.dims()[2]).collect::<Vec<_>>(),
        ));
    }
    let lens = |n: usize| shape.iter().find(|(len, _)| *len == n).unwrap().1.clone();
    assert_eq!(lens(101), vec![100, 1]);
    assert_eq!(lens(164), vec![100, 64]);
    // Second chunk full: 64 + 64 merge into 128, then 100 <= 128 merges into 228.
    assert_eq!(lens(228), vec![228]);
    assert_eq!(lens(292), vec![228, 64]);
    assert_eq!(lens(356), vec![228, 128]);
    assert_eq!(lens(400), vec![228, 128, 44]);
    let starts: Vec<usize> = cache.segments().iter().map(|s| s.start).collect();
    assert_eq!(starts, vec![0, 228, 356]);
    let (keys, _) = cache.get().unwrap();
    assert_eq!(keys.into_data(), Tensor::cat(all, 1).swap_dims(1, 2).into_data());
    // Reordering applies to every segment.
    cache.reorder(Tensor::from_ints([1, 1], &device));
    assert_eq!(cache.len(), 400);
    assert_eq!(cache.batch(), Some(2));
}

/// Decoding over a cache of several segments (a 70-token prompt, then 90 single tokens) gives
/// the outputs of the uncached forward on the whole sequence, with and without XPOS (whose key
/// decay is centred on the whole window), for both kernels, with left padding.
#[test]
fn cached_decoding_over_segments_equals_the_full_forward() {
    segmented_decode_matches_full::<TB>(&Default::default(), 160, 70, 1e-5, 1e-4);
}

/// See [`cached_decoding_over_segments_equals_the_full_forward`]: `prompt` tokens prefilled, then
/// `t - prompt` single-token steps.
pub fn segmented_decode_matches_full<B: Backend>(device: &B::Device, t: usize, prompt: usize, atol: f32, rtol: f32) {
    let (b, e, h) = (2, 16, 4);
    for position in [PositionTreatment::None, PositionTreatment::Xpos(XposConfig::new(e / h))] {
        for imp in [AttentionImpl::Explicit, AttentionImpl::Fused] {
            let attn = MultiHeadAttentionConfig::new(e, h)
                .with_inner_attn_ln(true)
                .with_position(position.clone())
                .with_implementation(imp)
                .init::<B>(device);
            let x = Tensor::<B, 3>::random([b, t, e], Distribution::Normal(0.0, 1.0), device);
            let mut mask_rows = vec![1i64; b * t];
            mask_rows[..5].fill(0); // row 0: five pads on the left
            let attention_mask = Tensor::<B, 2, Int>::from_data(TensorData::new(mask_rows, [b, t]), device);
            let full = attn.forward(
                x.clone(),
                None,
                &AttentionMask::causal_with_attention_mask(attention_mask.clone()),
                None,
            );
            let mut cache = KvCache::new();
            let mut outs = vec![attn.forward(
                x.clone().narrow(1, 0, prompt),
                None,
                &AttentionMask::causal_with_attention_mask(attention_mask.clone().narrow(1, 0, prompt)),
                Some(&mut cache),
            )];
            for i in prompt..t {
                let mask = AttentionMask::causal_with_attention_mask(attention_mask.clone().narrow(1, 0, i + 1));
                outs.push(attn.forward(x.clone().narrow(1, i, 1), None, &mask, Some(&mut cache)));
            }
            assert!(cache.num_segments() > 1);
            let cached = Tensor::cat(outs, 1);
            let what = format!("{position:?} {imp:?}: cached over segments vs full");
            assert_close(
                cached.clone().slice([0..1, 5..t, 0..e]),
                full.clone().slice([0..1, 5..t, 0..e]),
                atol,
                rtol,
                &what,
            );
            assert_close(
                cached.slice([1..2, 0..t, 0..e]),
                full.slice([1..2, 0..t, 0..e]),
                atol,
                rtol,
                &what,
            );
        }
    }
}

#[test]
fn kv_cache_reorder_selects_batch_rows() {
    let device = Default::default();
    let mut cache = KvCache::<TB>::new();
    let k = Tensor::<TB, 1>::from_floats([0.0, 1.0, 2.0], &device).reshape([3, 1, 1, 1]);
    cache.append(k.clone(), k);
    cache.reorder(Tensor::from_ints([2, 2, 0], &device));
    let (keys, _) = cache.get().unwrap();
    assert_eq!(keys.into_data().to_vec::<f32>().unwrap(), vec![2.0, 2.0, 0.0]);
}
