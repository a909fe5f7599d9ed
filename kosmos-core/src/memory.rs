//! Huge pages under the weights on the CPU: 2 MiB pages instead of 4 KiB ones for the memory that
//! a decode step streams.
//!
//! A decode step reads every weight of the model once (5.4 GB at the full KOSMOS-2 size in f32),
//! so its speed is the speed at which memory delivers them. With 4 KiB pages that stream crosses a
//! page every 1,024 floats: each crossing needs an address translation (a page walk, and on a
//! virtual machine a two-level one), and the hardware prefetchers stop at page boundaries. Linux's
//! transparent huge pages back a range with 2 MiB pages instead, but on most distributions only
//! where the program asks (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`). On this
//! project's 2-core machine the same 2 GiB sum reads at 26-30 GB/s on 4 KiB pages and 29-32 GB/s
//! on 2 MiB pages (`kosmos-bandwidth --huge-pages`, alternating pairs). In a whole decode step the
//! difference is within the machine's noise (the decode kernels read four rows at once, and those
//! streams already run near the read rate; the book's benchmark chapter has the A/B runs), so this
//! is a floor under the weights' read rate rather than a measured speed-up. transformers' weights
//! are its mapping of the safetensors file, on page-cache folios of whatever size the kernel chose
//! when it read the file (0.65 to 4.97 of 6.7 GB on 2 MiB folios here, depending on the day); ours
//! are copied into anonymous memory (transposed on the way), which gets 4 KiB pages unless asked.
//!
//! [`use_huge_pages`] asks for them on the parameters of a module that live in the flex CPU
//! backend's storage: for each tensor it marks the 2 MiB-aligned span of its buffer
//! `MADV_HUGEPAGE` and asks the kernel to rebuild it at once from huge pages (`MADV_COLLAPSE`,
//! Linux 6.1 and later; the kernel copies the values into the new pages, about a second for the
//! full-size model). Both are hints: the values, addresses and ownership of the buffers do not
//! change, and where the kernel declines (older kernels, `never` in the setting above, no free
//! huge page) the memory simply stays as it was; the returned [`HugePages`] says how much was
//! moved. Other backends' tensors (GPU memory, ndarray, autodiff) are left alone: the call is a
//! no-op there, so model code may call it whatever the backend.
//!
//! Moving values that are already written costs a copy, so the loader avoids it: [`host_bytes`]
//! gives each tensor it reads (and each weight it transposes) a zeroed buffer of its own mapping,
//! marked for huge pages before anything touches it, which the kernel then backs by 2 MiB pages
//! as the values are written, and which Burn's flex tensors take over without a copy. What other
//! code allocates (a dtype cast, merged LoRA weights, reduced-precision copies) is moved
//! afterwards with [`use_huge_pages`], which `kosmos_models::Kosmos2::from_pretrained` and
//! [`crate::packed::PackedWeight`] call. `KOSMOS_HUGE_PAGES=0` turns both off (for comparisons).

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use cubecl_common::bytes::Bytes;

/// The size of a huge page on x86-64 and (with 4 KiB base pages) AArch64 Linux.
pub const HUGE_PAGE: usize = 2 << 20;

/// What [`use_huge_pages`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HugePages {
    /// Tensors whose storage was found in host memory (flex tensors).
    pub tensors: usize,
    /// Their bytes.
    pub bytes: usize,
    /// How many of those bytes now sit on huge pages (whole 2 MiB pages only).
    pub huge_bytes: usize,
}

impl HugePages {
    fn add(&mut self, other: HugePages) {
        self.tensors += other.tensors;
        self.bytes += other.bytes;
        self.huge_bytes += other.huge_bytes;
    }
}

/// Whether [`use_huge_pages`] and [`host_bytes`] ask for huge pages: not when the environment sets
/// `KOSMOS_HUGE_PAGES=0`.
pub fn enabled() -> bool {
    std::env::var("KOSMOS_HUGE_PAGES").map_or(true, |v| v.trim() != "0")
}

/// Put the float and int parameters of `module` that live in host memory on huge pages (see the
/// [module documentation](self)). Returns what was found and moved; a no-op (zero tensors) on
/// backends whose tensors are not in host memory and when [`enabled`] is false.
pub fn use_huge_pages<B: Backend, M: Module<B>>(module: &M) -> HugePages {
    struct Visitor(HugePages);
    impl<B: Backend> ModuleVisitor<B> for Visitor {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.add(float_tensor(&param.val()));
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, Int>>) {
            self.0.add(int_tensor(&param.val()));
        }
    }
    if !enabled() {
        return HugePages::default();
    }
    let mut visitor = Visitor(HugePages::default());
    module.visit(&mut visitor);
    visitor.0
}

/// [`use_huge_pages`] for one float tensor.
pub fn float_tensor<B: Backend, const D: usize>(tensor: &Tensor<B, D>) -> HugePages {
    if !enabled() {
        return HugePages::default();
    }
    #[cfg(feature = "flex")]
    if let burn::tensor::TensorPrimitive::Float(p) = tensor.clone().into_primitive() {
        return primitive(&p);
    }
    let _ = tensor;
    HugePages::default()
}

/// [`use_huge_pages`] for one int tensor (e.g. the int8 values of a Q8 weight).
pub fn int_tensor<B: Backend, const D: usize>(tensor: &Tensor<B, D, Int>) -> HugePages {
    if !enabled() {
        return HugePages::default();
    }
    #[cfg(feature = "flex")]
    return primitive(&tensor.clone().into_primitive());
    #[cfg(not(feature = "flex"))]
    {
        let _ = tensor;
        HugePages::default()
    }
}

/// The storage of a flex tensor, advised; other primitives are not in host memory we can see.
#[cfg(feature = "flex")]
fn primitive<T: std::any::Any>(p: &T) -> HugePages {
    let Some(flex) = crate::packed::flex_io::flex(p) else {
        return HugePages::default();
    };
    let bytes = flex.bytes();
    HugePages {
        tensors: 1,
        bytes: bytes.len(),
        huge_bytes: advise(bytes),
    }
}

/// Ask for huge pages under `buffer`; returns how many of its bytes now lie on huge pages that
/// the kernel built.
///
/// The buffer is taken rounded out to huge-page boundaries (the values its first and last pages
/// share with neighbours in the same mapping are moved too, which the neighbours cannot observe;
/// where those pages leave the mapping they are skipped), and collapsed one huge page at a time,
/// each tried twice: the kernel answers for a whole range with one error when any of its pages
/// failed (a page busy at that moment, no free huge page), and per page the count is exact.
pub fn advise(buffer: &[u8]) -> usize {
    #[cfg(target_os = "linux")]
    {
        let start = buffer.as_ptr() as usize;
        let end = start + buffer.len();
        let down = |a: usize| a & !(HUGE_PAGE - 1);
        let up = |a: usize| down(a + HUGE_PAGE - 1);
        if end - start < HUGE_PAGE {
            return 0;
        }
        let mut moved = 0;
        for page in (down(start)..up(end)).step_by(HUGE_PAGE) {
            if linux::collapse(page) || linux::collapse(page) {
                moved += (page + HUGE_PAGE).min(end) - page.max(start);
            }
        }
        moved
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = buffer;
        0
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::mem::MaybeUninit;

    use cubecl_common::bytes::{AllocationController, AllocationProperty};

    use super::HUGE_PAGE;

    /// An anonymous private mapping, 2 MiB-aligned, a whole number of huge pages long, marked
    /// `MADV_HUGEPAGE` before first use; unmapped on drop.
    pub(super) struct Mapping {
        ptr: *mut u8,
        len: usize,
    }

    // SAFETY: the mapping is plain memory owned by this value alone; access goes through `&self`
    // / `&mut self` as for a `Vec<u8>`.
    unsafe impl Send for Mapping {}
    // SAFETY: as above; shared references only read.
    unsafe impl Sync for Mapping {}

    impl Mapping {
        /// A zeroed mapping of at least `len` bytes, or `None` if the kernel refuses one.
        pub(super) fn new(len: usize) -> Option<Self> {
            let rounded = len.checked_add(HUGE_PAGE - 1)? & !(HUGE_PAGE - 1);
            let reserve = rounded.checked_add(HUGE_PAGE)?;
            // SAFETY: a fresh anonymous private mapping (no file, no fixed address).
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    reserve,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                return None;
            }
            // Keep the 2 MiB-aligned part and give the rest back.
            let start = base as usize;
            let aligned = (start + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
            let (head, tail) = (aligned - start, start + reserve - (aligned + rounded));
            // SAFETY: both ranges lie inside the mapping just made and outside the part kept.
            unsafe {
                if head > 0 {
                    libc::munmap(base, head);
                }
                if tail > 0 {
                    libc::munmap((aligned + rounded) as *mut libc::c_void, tail);
                }
                // A hint: where the kernel declines, the pages are 4 KiB ones.
                libc::madvise(aligned as *mut libc::c_void, rounded, libc::MADV_HUGEPAGE);
            }
            Some(Self {
                ptr: aligned as *mut u8,
                len: rounded,
            })
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: the range is the mapping this value owns; nothing refers to it any more.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    impl AllocationController for Mapping {
        fn alloc_align(&self) -> usize {
            // What Burn's byte buffers promise at most (the mapping is aligned far beyond it).
            std::mem::align_of::<u128>()
        }

        fn property(&self) -> AllocationProperty {
            AllocationProperty::Other
        }

        unsafe fn memory_mut(&mut self) -> &mut [MaybeUninit<u8>] {
            // SAFETY: `len` bytes mapped readable and writable, owned by `self`.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.cast(), self.len) }
        }

        fn memory(&self) -> &[MaybeUninit<u8>] {
            // SAFETY: as above, shared.
            unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len) }
        }
    }

    /// `MADV_COLLAPSE` (Linux 6.1; the value is the kernel's, not every libc names it).
    const MADV_COLLAPSE: libc::c_int = 25;

    /// Mark the huge page at `page` (aligned) for huge pages and have the kernel build it now.
    /// `false` when either call fails (the page leaves a mapping, or the kernel declines).
    pub(super) fn collapse(page: usize) -> bool {
        let ptr = page as *mut libc::c_void;
        // SAFETY: both advices leave the contents of the range unchanged (they only choose the
        // page size backing it); a range outside a mapping makes the call fail, nothing else.
        unsafe {
            libc::madvise(ptr, HUGE_PAGE, libc::MADV_HUGEPAGE) == 0 && libc::madvise(ptr, HUGE_PAGE, MADV_COLLAPSE) == 0
        }
    }
}

/// A zero-filled buffer of `len` bytes for tensor values, aligned to at least 16 bytes. From one
/// huge page up (and when [`enabled`]), on Linux, an anonymous mapping of its own, 2 MiB-aligned,
/// marked for huge pages before anything touches it, so that the kernel backs it by 2 MiB pages
/// as it is written (and unmaps it when the last tensor using it is dropped); otherwise, or where
/// the mapping fails, an ordinary allocation.
pub fn host_bytes(len: usize) -> Bytes {
    #[cfg(target_os = "linux")]
    if len >= HUGE_PAGE && enabled() {
        if let Some(mapping) = linux::Mapping::new(len) {
            // SAFETY: the mapping holds at least `len` bytes, zero-filled by the kernel
            // (initialised memory).
            return unsafe { Bytes::from_controller(Box::new(mapping), len) };
        }
    }
    if len % 16 == 0 {
        // 16-byte elements give the alignment tensor readers require without a copy.
        return Bytes::from_elems(vec![0u128; len / 16]);
    }
    // `from_bytes_vec` copies into a 16-byte aligned allocation.
    Bytes::from_bytes_vec(vec![0u8; len])
}

/// Bytes of this process's memory mapped by huge pages (`AnonHugePages`, `ShmemPmdMapped` and
/// `FilePmdMapped` in `/proc/self/smaps_rollup`: anonymous memory such as the weights here, and
/// files mapped whole, as transformers maps safetensors files), or `None` where that file does not
/// exist (not Linux).
pub fn process_huge_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let keys = ["AnonHugePages:", "ShmemPmdMapped:", "FilePmdMapped:"];
    let kib = text
        .lines()
        .filter(|l| keys.iter().any(|k| l.starts_with(k)))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        .sum::<usize>();
    Some(kib * 1024)
}
