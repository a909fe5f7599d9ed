//! The same parity checks on the other compiled backends (ndarray on CPU, wgpu through
//! lavapipe in CI). GPU tolerance is 1e-4 (DEVELOPERS.md / issue).

#[cfg(feature = "ndarray")]
#[test]
fn ndarray_decoder_matches_torchscale() {
    use kosmos_core::AttentionImpl;
    type B = burn::backend::NdArray;
    let device = Default::default();
    for imp in [AttentionImpl::Explicit, AttentionImpl::Fused] {
        crate::decoder_parity::check_case::<B>("stack2_xpos", imp, crate::common::ATOL, crate::common::RTOL, &device);
    }
    crate::attention::fused_matches_explicit::<B>(&device, 1e-5, 1e-4);
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_decoder_matches_torchscale() {
    use kosmos_core::AttentionImpl;
    type B = burn::backend::Wgpu;
    let device = burn::backend::wgpu::WgpuDevice::default();
    for imp in [AttentionImpl::Explicit, AttentionImpl::Fused] {
        crate::decoder_parity::check_case::<B>("stack2_xpos", imp, 1e-4, 1e-4, &device);
        crate::decoder_parity::check_case::<B>("layer_noxpos", imp, 1e-4, 1e-4, &device);
    }
    crate::attention::fused_matches_explicit::<B>(&device, 1e-4, 1e-4);
}

#[test]
fn backend_names_resolve_or_explain() {
    use kosmos_core::backend::{BackendError, BackendKind, DeviceSpec};
    let flex: DeviceSpec = "flex".parse().unwrap();
    assert_eq!(flex.kind, BackendKind::Flex);
    assert!(matches!("tpu".parse::<DeviceSpec>(), Err(BackendError::Unknown(_))));
    assert!(matches!("flex:1".parse::<DeviceSpec>(), Err(BackendError::BadIndex(_))));
    assert!(matches!("cuda:x".parse::<DeviceSpec>(), Err(BackendError::BadIndex(_))));
    if !BackendKind::Cuda.is_compiled() {
        let err = "cuda".parse::<DeviceSpec>().unwrap_err();
        assert!(matches!(err, BackendError::NotCompiled { .. }));
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }
}

#[test]
fn generic_task_runs_on_the_named_backend() {
    use burn::prelude::*;
    use kosmos_core::backend::{BackendTask, run_task};
    struct Sum;
    impl BackendTask for Sum {
        type Output = f32;
        fn run<B: Backend>(self, device: B::Device) -> f32 {
            Tensor::<B, 1>::from_floats([1.0, 2.0, 3.5], &device)
                .sum()
                .into_scalar()
                .elem()
        }
    }
    assert_eq!(run_task("flex", Sum).unwrap(), 6.5);
    #[cfg(feature = "ndarray")]
    assert_eq!(run_task("ndarray", Sum).unwrap(), 6.5);
}
