//! Rows that pack several documents (`Kosmos2::forward_packed`): each document attends only to
//! itself and counts its positions from the start, so it gets the logits it gets alone in a row.

use burn::prelude::*;
use kosmos_core::testing::{ATOL, Fixture, RTOL, assert_close};
use kosmos_models::{Kosmos2, Kosmos2Input};

use crate::TB;

fn text_input(rows: &[Vec<i64>], mask: &[Vec<i64>]) -> Kosmos2Input<TB> {
    let device = Default::default();
    let t = |v: &[Vec<i64>]| {
        let (b, n) = (v.len(), v[0].len());
        Tensor::<TB, 2, Int>::from_data(TensorData::new(v.concat(), [b, n]), &device)
    };
    Kosmos2Input {
        input_ids: t(rows),
        attention_mask: Some(t(mask)),
        pixel_values: None,
        image_embeds_position_mask: None,
    }
}

#[test]
fn packed_documents_get_the_logits_they_get_alone() {
    let model = Kosmos2::<TB>::from_pretrained(Fixture::open("kosmos2/tiny").dir, &Default::default()).unwrap();
    let d1: Vec<i64> = vec![0, 17, 25, 33, 2];
    let d2: Vec<i64> = vec![0, 44, 51, 60, 71, 90, 2];
    let packed: Vec<i64> = [d1.clone(), d2.clone(), vec![1, 1]].concat();
    let mask: Vec<i64> = [vec![1; 12], vec![0; 2]].concat();
    let docs: Vec<u32> = [vec![1; 5], vec![2; 7], vec![0; 2]].concat();
    let input = text_input(&[packed], &[mask]);
    let logits = model.forward_packed(&input, &[docs]).unwrap().logits;
    let v = logits.dims()[2];
    for (doc, range) in [(&d1, 0..5), (&d2, 5..12)] {
        let alone = model
            .forward(&text_input(&[doc.clone()], &[vec![1; doc.len()]]))
            .unwrap()
            .logits;
        assert_close(
            logits.clone().slice([0..1, range.clone(), 0..v]),
            alone,
            ATOL,
            RTOL,
            &format!("packed document at {range:?} against alone"),
        );
    }
    // Without the document mask the second document sees the first: the logits move.
    let plain = model.forward(&input).unwrap().logits;
    let moved = (plain.slice([0..1, 5..12, 0..v]) - logits.slice([0..1, 5..12, 0..v]))
        .abs()
        .max()
        .into_scalar();
    assert!(moved > 1e-3, "the mask changed nothing ({moved})");

    let err = model.forward_packed(&input, &[vec![1; 3]]).unwrap_err().to_string();
    assert!(err.contains("document ids"), "{err}");
}
