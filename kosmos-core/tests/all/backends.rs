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
    crate::attention::segmented_decode_matches_full::<B>(&device, 100, 70, 1e-5, 1e-4);
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
    crate::attention::segmented_decode_matches_full::<B>(&device, 73, 70, 1e-4, 1e-4);
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

/// CPU tasks run on a worker of rayon's global pool (their parallel operations start there), a
/// nested `on_cpu_pool` runs in place on the same worker, and a panic reaches the caller.
#[test]
fn cpu_tasks_run_on_a_pool_worker() {
    use burn::prelude::*;
    use kosmos_core::backend::{BackendTask, on_cpu_pool, run_task};
    struct Where;
    impl BackendTask for Where {
        type Output = (Option<usize>, Option<usize>, f32);
        fn run<B: Backend>(self, device: B::Device) -> Self::Output {
            let outer = rayon::current_thread_index();
            let inner = on_cpu_pool(rayon::current_thread_index);
            let x = Tensor::<B, 2>::ones([64, 64], &device);
            let total = x.clone().matmul(x).sum().into_scalar().elem();
            (outer, inner, total)
        }
    }
    let mut devices = vec!["flex"];
    if cfg!(feature = "ndarray") {
        devices.push("ndarray");
    }
    for device in devices {
        let (outer, inner, total) = run_task(device, Where).unwrap();
        assert!(outer.is_some(), "{device}: the task ran outside rayon's pool");
        assert_eq!(inner, outer, "{device}: a nested on_cpu_pool moved to another thread");
        assert_eq!(total, 64.0 * 64.0 * 64.0);
    }
    assert_eq!(rayon::current_thread_index(), None);
    let caught = std::panic::catch_unwind(|| on_cpu_pool(|| panic!("inside the pool")));
    assert!(caught.is_err());
}

/// Strided (sliced) inputs give the same results as contiguous copies on wgpu, op by op.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_ops_accept_strided_inputs() {
    use burn::nn::{LayerNormConfig, LinearConfig};
    use burn::prelude::*;
    use burn::tensor::Distribution;
    type B = burn::backend::Wgpu;
    let device = burn::backend::wgpu::WgpuDevice::default();
    let full = Tensor::<B, 3>::random([2, 7, 32], Distribution::Normal(0.0, 1.0), &device);
    let strided = full.clone().slice([0..2, 3..4, 0..32]);
    let contiguous = Tensor::<B, 3>::from_data(strided.clone().into_data(), &device);
    let ln = LayerNormConfig::new(32).init::<B>(&device);
    let lin = LinearConfig::new(32, 16).init::<B>(&device);
    let mut bad = Vec::new();
    let mut cmp = |name: &str, a: Tensor<B, 3>, b: Tensor<B, 3>| {
        let d: f32 = (a - b).abs().max().into_scalar();
        eprintln!("{name}: {d}");
        if d > 1e-5 {
            bad.push(name.to_string());
        }
    };
    cmp("identity", strided.clone() * 1.0, contiguous.clone() * 1.0);
    cmp(
        "layer_norm",
        ln.forward(strided.clone()),
        ln.forward(contiguous.clone()),
    );
    cmp("linear", lin.forward(strided.clone()), lin.forward(contiguous.clone()));
    cmp(
        "gelu",
        burn::tensor::activation::gelu(strided.clone()),
        burn::tensor::activation::gelu(contiguous.clone()),
    );
    cmp(
        "add",
        strided.clone() + strided.clone(),
        contiguous.clone() + contiguous.clone(),
    );
    cmp(
        "reshape",
        strided.clone().reshape([2, 1, 4, 8]).reshape([2, 1, 32]),
        contiguous.clone().reshape([2, 1, 4, 8]).reshape([2, 1, 32]),
    );
    cmp(
        "layer_norm+linear",
        lin.forward(ln.forward(strided.clone())),
        lin.forward(ln.forward(contiguous.clone())),
    );
    assert!(bad.is_empty(), "ops that mishandle strided input on wgpu: {bad:?}");
}

/// The KV cache and what reads it give the same values as contiguous tensors on wgpu.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_cache_views_are_read_correctly() {
    use burn::prelude::*;
    use burn::tensor::Distribution;
    use kosmos_core::{KvCache, XposConfig};
    type B = burn::backend::Wgpu;
    let device = burn::backend::wgpu::WgpuDevice::default();
    let host = |t: Tensor<B, 4>| Tensor::<B, 4>::from_data(t.into_data(), &device);
    let mut bad = Vec::new();
    let mut cmp = |name: &str, a: Tensor<B, 4>, b: Tensor<B, 4>| {
        let d: f32 = (a - b).abs().max().into_scalar();
        eprintln!("{name}: {d}");
        if d > 1e-5 {
            bad.push(name.to_string());
        }
    };
    let k = Tensor::<B, 4>::random([2, 1, 4, 8], Distribution::Normal(0.0, 1.0), &device);
    let mut cache = KvCache::<B>::new();
    cache.append(k.clone(), k.clone());
    let (keys, _) = cache.get().unwrap();
    let expected = host(k.clone().swap_dims(1, 2));
    cmp("cache get", keys.clone(), expected.clone());
    cmp("cache get via host", host(keys.clone()), expected.clone());
    let xpos = XposConfig::new(8).init();
    cmp(
        "xpos on cache view",
        xpos.apply(keys.clone(), 0, true),
        xpos.apply(expected.clone(), 0, true),
    );
    cmp(
        "reshape of cache view",
        keys.clone().reshape([2, 4, 1, 4, 2]).reshape([2, 4, 1, 8]),
        expected.clone(),
    );
    cmp(
        "matmul with cache view",
        expected.clone().matmul(keys.clone().swap_dims(2, 3)),
        expected.clone().matmul(expected.clone().swap_dims(2, 3)),
    );
    let k2 = Tensor::<B, 4>::random([2, 1, 4, 8], Distribution::Normal(0.0, 1.0), &device);
    cache.append(k2.clone(), k2.clone());
    let (keys2, _) = cache.get().unwrap();
    cmp(
        "cache second append",
        keys2,
        host(Tensor::cat(vec![k, k2], 1).swap_dims(1, 2)),
    );
    assert!(bad.is_empty(), "wrong on wgpu: {bad:?}");
}

/// One-token inputs (the decode step) on wgpu against flex, module by module and composed.
/// (Burn 0.21's fusion backend computed a whole layer wrongly for one-token inputs although each
/// module was right; the wgpu and cuda backends are therefore built without fusion.)
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_single_token_modules_match_flex() {
    use burn::prelude::*;
    use kosmos_core::testing::Fixture;
    use kosmos_core::{AttentionImpl, AttentionMask};
    type W = burn::backend::Wgpu;
    type F = burn::backend::Flex;
    let wd = burn::backend::wgpu::WgpuDevice::default();
    let fd = Default::default();
    let fx = Fixture::open("decoder/layer_noxpos");
    let dw = crate::decoder_parity::load_case::<W>(&fx, AttentionImpl::Explicit, &wd);
    let df = crate::decoder_parity::load_case::<F>(&fx, AttentionImpl::Explicit, &fd);
    let io = fx.file("io.safetensors");
    let xf: Tensor<F, 3> = io.tensor("x", &fd).unwrap();
    for t in [1usize, 2, 7] {
        let xf = Tensor::<F, 3>::from_data(xf.clone().slice([0..2, 0..t, 0..32]).into_data(), &fd);
        let xw = Tensor::<W, 3>::from_data(xf.clone().into_data(), &wd);
        let cmp = |name: &str, a: Tensor<W, 3>, b: Tensor<F, 3>| {
            let a = a.into_data().to_vec::<f32>().unwrap();
            let b = b.into_data().to_vec::<f32>().unwrap();
            let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(d < 1e-4, "{t} token(s), {name}: wgpu differs from flex by {d}");
        };
        let lw = &dw.layers[0];
        let lf = &df.layers[0];
        cmp(
            "self_attn_layer_norm",
            lw.self_attn_layer_norm.forward(xw.clone()),
            lf.self_attn_layer_norm.forward(xf.clone()),
        );
        cmp(
            "q_proj",
            lw.self_attn.q_proj.forward(xw.clone()),
            lf.self_attn.q_proj.forward(xf.clone()),
        );
        cmp(
            "attention",
            lw.self_attn.forward(xw.clone(), None, &AttentionMask::causal(), None),
            lf.self_attn.forward(xf.clone(), None, &AttentionMask::causal(), None),
        );
        cmp(
            "attention nomask",
            lw.self_attn.forward(xw.clone(), None, &AttentionMask::none(), None),
            lf.self_attn.forward(xf.clone(), None, &AttentionMask::none(), None),
        );
        cmp("ffn", lw.ffn.forward(xw.clone()), lf.ffn.forward(xf.clone()));
        cmp(
            "layer",
            lw.forward(xw.clone(), &AttentionMask::causal(), None),
            lf.forward(xf.clone(), &AttentionMask::causal(), None),
        );
    }
}
