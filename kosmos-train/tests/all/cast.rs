//! A model loaded in another dtype (`from_pretrained_with_dtype`) stays trainable: its cast
//! parameters are leaves that receive gradients, so an optimizer updates them.

use burn::optim::GradientsParams;
use burn::tensor::DType;
use kosmos_core::testing::repo_root;
use kosmos_models::Kosmos2;

type AB = burn::backend::Autodiff<burn::backend::Flex>;

#[test]
fn cast_parameters_keep_their_gradients() {
    let device = Default::default();
    let dir = repo_root().join("fixtures/generate/model");
    let model = Kosmos2::<AB>::from_pretrained_with_dtype(&dir, &device, DType::F64).unwrap();
    let weight = &model.text_model.model.embed_tokens.weight;
    assert_eq!(weight.val().dtype(), DType::F64);
    let latent = &model.image_to_text_projection.latent_query;
    let loss = weight.val().powf_scalar(2.0).sum() + latent.val().sum();
    let grads = loss.backward();
    let g = weight.grad(&grads).expect("the embedding has a gradient");
    assert_eq!(g.dims(), weight.val().dims());
    assert!(latent.grad(&grads).is_some(), "the latent queries have a gradient");
    let params = GradientsParams::from_grads(grads, &model);
    assert_eq!(params.len(), 2, "exactly the two used parameters have gradients");
}
