//! The one place where a backend *name* becomes a Burn backend type.
//!
//! Model code is generic over `B: Backend` and never asks which backend it runs on. Binaries
//! describe their work as a [`BackendTask`] (or [`AutodiffTask`] for training) and call
//! [`run_task`] with the name the user gave (`flex`, `ndarray`, `wgpu`, `cuda`, optionally with a
//! device index, `cuda:1`); this module picks the backend among those compiled in and runs the
//! generic code on it.

use std::fmt;

use burn::tensor::backend::{AutodiffBackend, Backend};

/// Backends this project knows, compiled in or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// burn-flex, the default CPU backend (rayon threads, SIMD, AVX-512 where present).
    Flex,
    /// burn-ndarray CPU backend (threads and SIMD on).
    Ndarray,
    /// burn-wgpu: Vulkan, Metal or DX12 chosen at run time.
    Wgpu,
    /// burn-cuda: NVIDIA GPUs (CUDA loaded at run time).
    Cuda,
}

impl BackendKind {
    /// Every backend the project supports.
    pub const ALL: [BackendKind; 4] = [Self::Flex, Self::Ndarray, Self::Wgpu, Self::Cuda];

    /// The name users type.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Ndarray => "ndarray",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }

    /// The cargo feature that compiles it in.
    pub fn feature(self) -> &'static str {
        self.name()
    }

    /// Whether this binary was built with the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            Self::Flex => cfg!(feature = "flex"),
            Self::Ndarray => cfg!(feature = "ndarray"),
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The compiled backends, fastest CPU backend first.
    pub fn compiled() -> Vec<BackendKind> {
        Self::ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }

    /// The default backend of this build (the first compiled one).
    pub fn default_compiled() -> Option<BackendKind> {
        Self::compiled().into_iter().next()
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed device specification: backend plus optional device index (`cuda:1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The backend.
    pub kind: BackendKind,
    /// Device index for GPU backends (`None` = the default device).
    pub index: Option<usize>,
}

/// Why a device specification cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// Not a backend name at all.
    #[error("unknown device `{0}`: expected one of flex, ndarray, wgpu, cuda (optionally `:INDEX`)")]
    Unknown(String),
    /// A known backend that this binary was built without.
    #[error(
        "device `{name}` was not compiled into this binary; rebuild with `--features {feature}` (compiled: {compiled})"
    )]
    NotCompiled {
        /// The backend name.
        name: String,
        /// The feature to enable.
        feature: String,
        /// What is compiled in.
        compiled: String,
    },
    /// The index part is not a number, or given for a CPU backend.
    #[error("bad device index in `{0}`")]
    BadIndex(String),
}

impl std::str::FromStr for DeviceSpec {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, index) = match s.split_once(':') {
            Some((n, i)) => (
                n,
                Some(i.parse::<usize>().map_err(|_| BackendError::BadIndex(s.to_string()))?),
            ),
            None => (s, None),
        };
        let kind = BackendKind::ALL
            .into_iter()
            .find(|k| k.name() == name.trim().to_ascii_lowercase())
            .ok_or_else(|| BackendError::Unknown(s.to_string()))?;
        if index.is_some() && matches!(kind, BackendKind::Flex | BackendKind::Ndarray) {
            return Err(BackendError::BadIndex(s.to_string()));
        }
        if !kind.is_compiled() {
            return Err(BackendError::NotCompiled {
                name: kind.name().to_string(),
                feature: kind.feature().to_string(),
                compiled: BackendKind::compiled()
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(Self { kind, index })
    }
}

/// Inference-side work, generic over the backend.
pub trait BackendTask {
    /// What the task returns.
    type Output;
    /// Run on backend `B` and `device`.
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// Training-side work, generic over an autodiff backend.
pub trait AutodiffTask {
    /// What the task returns.
    type Output;
    /// Run on autodiff backend `B` and `device`.
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output;
}

/// The concrete backend types of this build (f32 floats).
pub mod types {
    /// burn-flex.
    #[cfg(feature = "flex")]
    pub type Flex = burn::backend::Flex;
    /// burn-ndarray.
    #[cfg(feature = "ndarray")]
    pub type NdArray = burn::backend::NdArray;
    /// burn-wgpu.
    #[cfg(feature = "wgpu")]
    pub type Wgpu = burn::backend::Wgpu;
    /// burn-cuda.
    #[cfg(feature = "cuda")]
    pub type Cuda = burn::backend::Cuda;
}

macro_rules! dispatch {
    ($spec:expr, $wrap:ident, |$B:ident, $device:ident| $body:expr) => {{
        let spec: DeviceSpec = $spec;
        match spec.kind {
            #[cfg(feature = "flex")]
            BackendKind::Flex => {
                type $B = $wrap<types::Flex>;
                let $device = Default::default();
                Ok($body)
            }
            #[cfg(feature = "ndarray")]
            BackendKind::Ndarray => {
                type $B = $wrap<types::NdArray>;
                let $device = Default::default();
                Ok($body)
            }
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => {
                type $B = $wrap<types::Wgpu>;
                let $device = match spec.index {
                    Some(i) => burn::backend::wgpu::WgpuDevice::DiscreteGpu(i),
                    None => burn::backend::wgpu::WgpuDevice::DefaultDevice,
                };
                Ok($body)
            }
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                type $B = $wrap<types::Cuda>;
                let $device = burn::backend::cuda::CudaDevice::new(spec.index.unwrap_or(0));
                Ok($body)
            }
            #[allow(unreachable_patterns)]
            other => Err(BackendError::NotCompiled {
                name: other.name().to_string(),
                feature: other.feature().to_string(),
                compiled: BackendKind::compiled()
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }};
}

type Plain<B> = B;
type WithAutodiff<B> = burn::backend::Autodiff<B>;
type WithCheckpointing<B> = burn::backend::Autodiff<B, BalancedCheckpointing>;

/// Burn's gradient-checkpointing strategy: during the backward pass, the results of operations
/// marked memory-bound (element-wise operations, activations, reshapes...) are recomputed from
/// their inputs instead of being kept from the forward pass; compute-bound ones (matrix
/// products) keep their results.
pub use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;

/// Run `task` on the backend named by `device` (e.g. `"flex"`, `"cuda:1"`).
///
/// On a CPU backend (flex, ndarray) it first sets the threads of one-row products to the
/// machine's cores ([`crate::gemv::set_threads_for_cpu`]: decode steps stream their weights on
/// every core), then runs the task on a worker thread of rayon's global pool ([`on_cpu_pool`])
/// rather than on the calling thread.
pub fn run_task<T>(device: &str, task: T) -> Result<T::Output, BackendError>
where
    T: BackendTask + Send,
    T::Output: Send,
{
    let spec: DeviceSpec = device.parse()?;
    if matches!(spec.kind, BackendKind::Flex | BackendKind::Ndarray) {
        crate::gemv::set_threads_for_cpu();
        return on_cpu_pool(move || dispatch!(spec, Plain, |B, device| task.run::<B>(device)));
    }
    #[allow(unused_variables)]
    let task = task;
    dispatch!(spec, Plain, |B, device| task.run::<B>(device))
}

/// Stack of rayon's worker threads when this module builds the global pool: the main thread's
/// usual 8 MiB (a worker's default is 2 MiB), since [`run_task`] runs whole tasks there.
pub const CPU_POOL_STACK: usize = 8 << 20;

/// Run `op` on a worker thread of rayon's global pool and wait for it.
///
/// Every parallel operation of the CPU backends (and of this crate's kernels) is a rayon job.
/// Started from a thread outside the pool, each one is injected into the pool while the caller
/// sleeps on a lock until it is done: two or three futex wake-ups per operation, hundreds per
/// decode step. Started from a worker, the job is split on that worker's own queue and the other
/// workers steal from it, with the caller working too. On the full-size KOSMOS-2 decode step (2
/// threads, alternating runs) that was 3 % of the time (see the book's benchmark chapter).
///
/// The global pool is built here first, with [`CPU_POOL_STACK`] per thread and the thread count
/// rayon would choose (`RAYON_NUM_THREADS` or the machine's cores), unless something already
/// built it. Called from a worker, `op` runs in place. A panic in `op` resumes on the caller.
pub fn on_cpu_pool<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    // An error only means the pool exists already (its stack size is then rayon's default).
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(CPU_POOL_STACK)
        .build_global();
    rayon::scope(|_| op())
}

/// Run `task` on the autodiff version of the backend named by `device`.
pub fn run_autodiff_task<T: AutodiffTask>(device: &str, task: T) -> Result<T::Output, BackendError> {
    let spec: DeviceSpec = device.parse()?;
    #[allow(unused_variables)]
    let task = task;
    dispatch!(spec, WithAutodiff, |B, device| task.run::<B>(device))
}

/// As [`run_autodiff_task`]; with `checkpointing`, on the autodiff backend with Burn's
/// [`BalancedCheckpointing`] (gradient checkpointing: less activation memory, some recomputation
/// in the backward pass, the same gradients).
pub fn run_autodiff_task_with<T: AutodiffTask>(
    device: &str,
    task: T,
    checkpointing: bool,
) -> Result<T::Output, BackendError> {
    if !checkpointing {
        return run_autodiff_task(device, task);
    }
    let spec: DeviceSpec = device.parse()?;
    #[allow(unused_variables)]
    let task = task;
    dispatch!(spec, WithCheckpointing, |B, device| task.run::<B>(device))
}
