//! Matrix products in bf16 with f32 accumulation: the `bf16`
//! [`MatmulPrecision`](super::MatmulPrecision), PyTorch's
//! `fp32_precision = "bf16"` for oneDNN. Both operands are rounded to bf16
//! (nearest even) while they are packed; every product and sum after that is
//! f32, so the result is the f32 product of the rounded operands up to
//! summation order.
//!
//! Two engines read the same packed operands:
//! - AMX tiles (Intel Sapphire Rapids and later): one `tdpbf16ps` does
//!   16×16×32 multiply-adds; a Sapphire Rapids core runs it at about
//!   3.8 TFLOP/s, twenty times its f32 FMA peak.
//! - AVX512_BF16 dot products, on request only (see [`engine`]): one
//!   `vdpbf16ps` does 16×2 multiply-adds, twice an f32 FMA's.
//!
//! What is left to pay is packing the operands, O(m·k + k·n) against O(m·n·k).

use super::Shared;
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// How a product is written: `dst = beta·A·B`, or with `accumulate`
/// `dst += beta·A·B`; `parallel` splits it over rayon's threads. (The caller's
/// `Product`, seen from here: this module imports nothing of its caller.)
#[derive(Clone, Copy)]
pub(super) struct Write {
    pub beta: f32,
    pub accumulate: bool,
    pub parallel: bool,
}

/// Rows of an A or C tile, and k-pairs of a B tile.
const TILE_ROWS: usize = 16;
/// Depth of one tile product: an A-tile row holds 32 bf16 (64 bytes).
const TILE_K: usize = 32;
/// bf16 values in one packed tile (1 KiB).
const TILE_ELEMS: usize = TILE_ROWS * TILE_K;
/// Rows and columns one micro-kernel call covers: 2×2 tiles of 16×16.
const PANEL: usize = 32;
/// Micro-kernel panels in one job: 128 rows × 256 columns of the result, so one
/// job's packed A (128 × k) stays in L2 while its B panels stream past it.
const JOB_M_PANELS: usize = 4;
const JOB_N_PANELS: usize = 8;
/// Rows of A, depth and columns of B packed at a time (2 MiB of A and 8 MiB of
/// B in bf16): the whole of a linear layer's weight in one block.
const BLOCK_M: usize = 512;
const BLOCK_K: usize = 2048;
const BLOCK_N: usize = 2048;

/// What computes bf16 products on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Engine {
    /// AMX tiles.
    Tiles,
    /// AVX512_BF16 dot products in zmm registers.
    Dot,
}

impl Engine {
    pub(super) fn name(self) -> &'static str {
        match self {
            Engine::Tiles => "AMX",
            Engine::Dot => "AVX512_BF16",
        }
    }
}

/// The engine this CPU and OS offer, if any (checked once): AMX where the CPU
/// has it and Linux grants the tile state. The AVX512_BF16 dot products only
/// where `PIXART_BF16_ENGINE=avx512_bf16` asks for them. On a Sapphire Rapids
/// core they ran `bench dit` 1.5× slower than f32, since one `vdpbf16ps` a cycle
/// is no more multiply-adds than two f32 FMAs. They are not yet measured on the
/// AMD cores (Zen 4, Zen 5) that could run them at twice f32's rate.
pub(super) fn engine() -> Option<Engine> {
    static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();
    *ENGINE.get_or_init(detect)
}

fn detect() -> Option<Engine> {
    if !is_x86_feature_detected!("avx512bf16") || !is_x86_feature_detected!("avx512bw") {
        return None;
    }
    let dot_asked = std::env::var("PIXART_BF16_ENGINE")
        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("avx512_bf16"));
    if dot_asked {
        Some(Engine::Dot)
    } else if tiles_granted() {
        Some(Engine::Tiles)
    } else {
        None
    }
}

/// Whether the CPU has AVX512_BF16, which [`Engine::Dot`] needs (tests).
#[cfg(test)]
fn dot_available() -> bool {
    is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw")
}

/// Whether the CPU has AMX-BF16 and the OS lets this process use the tiles:
/// Linux hands the 8 KiB tile state only to processes that ask for it.
#[cfg(target_os = "linux")]
fn tiles_granted() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let leaf = __cpuid_count(7, 0);
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a request for a process permission; no memory is passed.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn tiles_granted() -> bool {
    false
}

/// Whether a product is large enough in every direction for tiles to pay for
/// the packing and the padding to whole 32-row and 32-column panels.
pub(super) fn worth_it(m: usize, n: usize, k: usize) -> bool {
    m >= PANEL && n >= PANEL && k >= TILE_K && m * n * k >= 1 << 20
}

/// The tile configuration every job loads: eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = {
    let mut bytes_per_row = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 8 {
        bytes_per_row[t] = 64;
        rows[t] = TILE_ROWS as u8;
        t += 1;
    }
    TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row,
        rows,
    }
};

/// f32 → bf16, nearest even, as `vcvtneps2bf16` does it (subnormals to zero,
/// NaN stays NaN).
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    if x.is_subnormal() {
        return ((bits >> 16) & 0x8000) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// A strided f32 matrix: element (r, c) at `ptr + r·rs + c·cs`.
#[derive(Clone, Copy)]
struct Strided {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}
// SAFETY: read-only views that tasks share; the caller keeps the buffer alive.
unsafe impl Send for Strided {}
unsafe impl Sync for Strided {}

impl Strided {
    /// # Safety
    /// (r, c) must lie in the matrix.
    unsafe fn at(&self, r: usize, c: usize) -> f32 {
        *self.ptr.add(r * self.rs + c * self.cs)
    }
}

/// Packs one tile of A `[m×k]`: rows `r0..r0+16` (`r0 < m`), depth tile `kt`;
/// 16 rows of 32 bf16, 64 bytes apart, zeros past the matrix.
///
/// # Safety
/// `a` must address an `m×k` matrix; `tile` holds [`TILE_ELEMS`] values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_a_tile(a: Strided, (m, k): (usize, usize), r0: usize, kt: usize, tile: &mut [u16]) {
    let rows = (m - r0).min(TILE_ROWS);
    let k0 = kt * TILE_K;
    if a.cs == 1 {
        for r in 0..TILE_ROWS {
            let row = if r < rows {
                let src = a.ptr.add((r0 + r) * a.rs);
                let lo = load_f32x16(src.wrapping_add(k0), k.saturating_sub(k0));
                let hi = load_f32x16(src.wrapping_add(k0 + 16), k.saturating_sub(k0 + 16));
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
            } else {
                _mm512_setzero_si512()
            };
            _mm512_storeu_si512(tile.as_mut_ptr().add(r * TILE_K).cast(), row);
        }
    } else if a.rs == 1 {
        // Columns are contiguous (a transposed operand, as dyᵀ in a weight
        // gradient): two columns make one pair per row; 16 pairs of 16 rows
        // are transposed into the tile's rows.
        let interleave = interleave_pairs();
        let column = |c: usize| {
            if c < k {
                load_f32x16(a.ptr.add(r0 + c * a.cs), rows)
            } else {
                _mm512_setzero_ps()
            }
        };
        let mut pairs = [_mm512_setzero_si512(); 16];
        for (p, pair) in pairs.iter_mut().enumerate() {
            let c = k0 + 2 * p;
            let both = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(
                column(c + 1),
                column(c),
            ));
            *pair = _mm512_permutexvar_epi16(interleave, both);
        }
        for (r, row) in transpose_16x16(pairs).iter().enumerate() {
            _mm512_storeu_si512(tile.as_mut_ptr().add(r * TILE_K).cast(), *row);
        }
    } else {
        tile.fill(0);
        for r in 0..rows {
            for (j, c) in (k0..k.min(k0 + TILE_K)).enumerate() {
                tile[r * TILE_K + j] = to_bf16(a.at(r0 + r, c));
            }
        }
    }
}

/// Packs one tile of B `[k×n]`: columns `c0..c0+16` (`c0 < n`), depth tile
/// `kt`, in the pair-interleaved order `tdpbf16ps` reads: tile row `p` holds,
/// for each column, the bf16 pair (B[2p][c], B[2p+1][c]) of the tile's rows.
///
/// # Safety
/// `b` must address a `k×n` matrix; `tile` holds [`TILE_ELEMS`] values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_b_tile(b: Strided, (k, n): (usize, usize), c0: usize, kt: usize, tile: &mut [u16]) {
    let cols = (n - c0).min(TILE_ROWS);
    let k0 = kt * TILE_K;
    if b.rs == 1 {
        // Each column is contiguous along k (a weight `[O, K]` read as Wᵀ): 32
        // values of a column are its 16 pairs; 16 columns are transposed into
        // the tile's rows.
        let mut columns = [_mm512_setzero_si512(); 16];
        for (c, column) in columns.iter_mut().take(cols).enumerate() {
            let src = b.ptr.add((c0 + c) * b.cs);
            let lo = load_f32x16(src.wrapping_add(k0), k.saturating_sub(k0));
            let hi = load_f32x16(src.wrapping_add(k0 + 16), k.saturating_sub(k0 + 16));
            *column = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        }
        for (p, row) in transpose_16x16(columns).iter().enumerate() {
            _mm512_storeu_si512(tile.as_mut_ptr().add(p * TILE_K).cast(), *row);
        }
    } else if b.cs == 1 {
        // Rows are contiguous along n: two rows of k interleave into one tile row.
        let interleave = interleave_pairs();
        let row = |r: usize| {
            if r < k {
                load_f32x16(b.ptr.add(r * b.rs + c0), cols)
            } else {
                _mm512_setzero_ps()
            }
        };
        for p in 0..TILE_ROWS {
            let r = k0 + 2 * p;
            let both =
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(row(r + 1), row(r)));
            let pairs = _mm512_permutexvar_epi16(interleave, both);
            _mm512_storeu_si512(tile.as_mut_ptr().add(p * TILE_K).cast(), pairs);
        }
    } else {
        tile.fill(0);
        for r in k0..k.min(k0 + TILE_K) {
            for c in 0..cols {
                tile[(r - k0) / 2 * TILE_K + 2 * c + (r - k0) % 2] = to_bf16(b.at(r, c0 + c));
            }
        }
    }
}

/// The index vector that interleaves two 16-value halves: (x0, y0, x1, y1, …)
/// from (x0…x15, y0…y15).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn interleave_pairs() -> __m512i {
    _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    )
}

/// The transpose of a 16×16 matrix of 32-bit values held one row a register:
/// pairs within 128-bit lanes, then quadruples, then the lanes themselves.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose_16x16(rows: [__m512i; 16]) -> [__m512i; 16] {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
    }
    // u[4i + j], lane l: column 4l + j of rows 4i..4i+4.
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    let mut out = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        // Lanes (0, 2) and (1, 3) of rows 0–7, then of rows 8–15.
        let v0 = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]);
        let v1 = _mm512_shuffle_i32x4::<0xDD>(u[j], u[4 + j]);
        let w0 = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]);
        let w1 = _mm512_shuffle_i32x4::<0xDD>(u[8 + j], u[12 + j]);
        out[j] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        out[4 + j] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        out[8 + j] = _mm512_shuffle_i32x4::<0xDD>(v0, w0);
        out[12 + j] = _mm512_shuffle_i32x4::<0xDD>(v1, w1);
    }
    out
}

/// Up to 16 f32 from `src` (the first `available` of them), zeros after.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_f32x16(src: *const f32, available: usize) -> __m512 {
    if available >= 16 {
        _mm512_loadu_ps(src)
    } else {
        let mask: __mmask16 = (1u32 << available).wrapping_sub(1) as __mmask16;
        _mm512_maskz_loadu_ps(mask, src)
    }
}

/// A 32×32 block of A·B: packed A tiles `a0` (rows 0–15) and `a1` (rows 16–31),
/// packed B tiles `b0` (columns 0–15) and `b1` (16–31), each `k_tiles` tiles
/// long; the f32 result goes row-major into `out`.
///
/// # Safety
/// The tile configuration must be loaded on this thread; each pointer must hold
/// `k_tiles ≥ 1` tiles.
unsafe fn micro_kernel(
    a0: *const u16,
    a1: *const u16,
    b0: *const u16,
    b1: *const u16,
    k_tiles: usize,
    out: &mut [f32; PANEL * PANEL],
) {
    let c = out.as_mut_ptr();
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a0} + {s}*1]",
        "tileloadd tmm6, [{b0} + {s}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{b1} + {s}*1]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a1} + {s}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 1024",
        "add {a1}, 1024",
        "add {b0}, 1024",
        "add {b1}, 1024",
        "dec {n}",
        "jnz 2b",
        "tilestored [{c0} + {cs}*1], tmm0",
        "tilestored [{c1} + {cs}*1], tmm1",
        "tilestored [{c2} + {cs}*1], tmm2",
        "tilestored [{c3} + {cs}*1], tmm3",
        a0 = inout(reg) a0 => _,
        a1 = inout(reg) a1 => _,
        b0 = inout(reg) b0 => _,
        b1 = inout(reg) b1 => _,
        n = inout(reg) k_tiles => _,
        s = in(reg) 64usize,
        c0 = in(reg) c,
        c1 = in(reg) c.add(16),
        c2 = in(reg) c.add(16 * PANEL),
        c3 = in(reg) c.add(16 * PANEL + 16),
        cs = in(reg) PANEL * 4,
        options(nostack),
    );
}

/// The calling thread's packing buffer, kept from one product to the next: a
/// fresh one would be zeroed, or faulted in page by page, on every product.
struct Scratch {
    buffer: Vec<u16>,
    len: usize,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Scratch {
    /// `len` elements of unspecified value. A product that starts on this
    /// thread while another waits in it (rayon steals work while it waits)
    /// finds the buffer gone and makes its own.
    fn take(len: usize) -> Scratch {
        let mut buffer = SCRATCH.with(|cell| cell.take());
        if buffer.len() < len {
            buffer = vec![0; len];
        }
        Scratch { buffer, len }
    }

    fn buffer(&mut self) -> &mut [u16] {
        &mut self.buffer[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.buffer);
        SCRATCH.with(|cell| {
            // Keep the larger of the two if a nested product left one behind.
            let other = cell.take();
            cell.set(if other.len() > buffer.len() {
                other
            } else {
                buffer
            });
        });
    }
}

/// The destination of a product, shared by jobs that write disjoint blocks.
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    rs: usize,
    cs: usize,
}
// SAFETY: each job writes only its own rows × columns block.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// `dst[m×n] (+)= beta·lhs[m×k]·rhs[k×n]` in bf16 tiles, as `how` says; the
/// same contract as the kernels' `gemm::matmul`. Blocked as GotoBLAS does: a block
/// of B (`BLOCK_K × BLOCK_N`) is packed once and multiplied by each block of A
/// (`BLOCK_M × BLOCK_K`) in turn, so the packed copies stay small (10 MiB at
/// most) whatever the matrices.
///
/// # Safety
/// As for the kernels' `gemm::matmul`; and `engine` must be what [`engine`]
/// returned (or [`Engine::Dot`] where it returned [`Engine::Tiles`]).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul(
    engine: Engine,
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    how: Write,
) {
    if k == 0 {
        // An empty sum: zeros, or the destination as it is.
        for r in 0..m {
            for c in 0..n {
                if !how.accumulate {
                    *dst.add(r * dst_rs + c * dst_cs) = 0.0;
                }
            }
        }
        return;
    }
    let parallel = how.parallel && rayon::current_num_threads() > 1;
    let a_panel_len = BLOCK_K.min(k).div_ceil(TILE_K) * TILE_ELEMS;
    let a_len = BLOCK_M.min(m).div_ceil(PANEL) * 2 * a_panel_len;
    let b_len = BLOCK_N.min(n).div_ceil(PANEL) * 2 * a_panel_len;
    let mut scratch = Scratch::take(a_len + b_len);
    let (packed_a, packed_b) = scratch.buffer().split_at_mut(a_len);
    for n0 in (0..n).step_by(BLOCK_N) {
        let nb = BLOCK_N.min(n - n0);
        for k0 in (0..k).step_by(BLOCK_K) {
            let kb = BLOCK_K.min(k - k0);
            // Later slices of k add to what the first wrote.
            let how = if k0 == 0 {
                how
            } else {
                Write {
                    accumulate: true,
                    ..how
                }
            };
            let b = Strided {
                ptr: rhs.wrapping_add(k0 * rhs_rs + n0 * rhs_cs),
                rs: rhs_rs,
                cs: rhs_cs,
            };
            let along_depth = b.cs == 1 && b.rs != 1;
            let packed_b = pack(packed_b, (nb, kb), parallel, along_depth, |tile, c0, kt| {
                // SAFETY: the caller's matrix; the tile is this block's.
                unsafe { pack_b_tile(b, (kb, nb), c0, kt, tile) }
            });
            for m0 in (0..m).step_by(BLOCK_M) {
                let mb = BLOCK_M.min(m - m0);
                let a = Strided {
                    ptr: lhs.wrapping_add(m0 * lhs_rs + k0 * lhs_cs),
                    rs: lhs_rs,
                    cs: lhs_cs,
                };
                let along_depth = a.rs == 1 && a.cs != 1;
                let packed_a = pack(packed_a, (mb, kb), parallel, along_depth, |tile, r0, kt| {
                    // SAFETY: as above, for a tile of A.
                    unsafe { pack_a_tile(a, (mb, kb), r0, kt, tile) }
                });
                let out = Dst {
                    ptr: dst.wrapping_add(m0 * dst_rs + n0 * dst_cs),
                    rs: dst_rs,
                    cs: dst_cs,
                };
                multiply(
                    engine,
                    (packed_a, packed_b),
                    (mb, nb, kb),
                    out,
                    how,
                    parallel,
                );
            }
        }
    }
}

/// Packs the `tiles` side (rows of A or columns of B) of a `tiles × depth`
/// operand block, 16 at a time, into whole 32-wide panels of `buffer`; returns
/// the part used. `along_depth`: the operand's memory rows run along the depth
/// (dyᵀ, or B stored row by row), so tiles go depth tile by depth tile, each
/// reading the same 32 memory rows from start to end, instead of panel by panel
/// down every row.
fn pack(
    buffer: &mut [u16],
    (tiles, depth): (usize, usize),
    parallel: bool,
    along_depth: bool,
    pack_tile: impl Fn(&mut [u16], usize, usize) + Sync,
) -> &[u16] {
    use rayon::prelude::*;
    let k_tiles = depth.div_ceil(TILE_K);
    let panel_len = k_tiles * TILE_ELEMS;
    let used = &mut buffer[..tiles.div_ceil(PANEL) * 2 * panel_len];
    let one = |tile: &mut [u16], i: usize, kt: usize| {
        if i * TILE_ROWS < tiles {
            pack_tile(tile, i * TILE_ROWS, kt)
        } else {
            tile.fill(0);
        }
    };
    if along_depth {
        let count = used.len() / panel_len;
        let base = Shared(used.as_mut_ptr());
        let depth_tile = |kt: usize| {
            for i in 0..count {
                // SAFETY: tile (i, kt) lies in `used`, and only this task
                // writes it.
                let tile = unsafe {
                    std::slice::from_raw_parts_mut(
                        base.ptr().add(i * panel_len + kt * TILE_ELEMS),
                        TILE_ELEMS,
                    )
                };
                one(tile, i, kt);
            }
        };
        if parallel {
            (0..k_tiles).into_par_iter().for_each(depth_tile);
        } else {
            (0..k_tiles).for_each(depth_tile);
        }
    } else {
        let panel = |(i, panel): (usize, &mut [u16])| {
            for (kt, tile) in panel.chunks_mut(TILE_ELEMS).enumerate() {
                one(tile, i, kt);
            }
        };
        if parallel {
            used.par_chunks_mut(panel_len).enumerate().for_each(panel);
        } else {
            used.chunks_mut(panel_len).enumerate().for_each(panel);
        }
    }
    used
}

/// `dst (+)= beta·A·B` for packed blocks A `m×k` and B `k×n` (`k ≥ 1`), in jobs
/// of 128 rows × 256 columns.
fn multiply(
    engine: Engine,
    (packed_a, packed_b): (&[u16], &[u16]),
    (m, n, k): (usize, usize, usize),
    out: Dst,
    how: Write,
    parallel: bool,
) {
    use rayon::prelude::*;
    let k_tiles = k.div_ceil(TILE_K);
    let tile_len = k_tiles * TILE_ELEMS;
    let m_panels = m.div_ceil(PANEL);
    let n_panels = n.div_ceil(PANEL);
    let jobs_m = m_panels.div_ceil(JOB_M_PANELS);
    let jobs_n = n_panels.div_ceil(JOB_N_PANELS);
    let job = |j: usize| {
        let (jm, jn) = (j % jobs_m, j / jobs_m);
        let mut block = [0f32; PANEL * PANEL];
        // SAFETY: the engine is this CPU's (the caller's contract); AMX's
        // configuration is loaded on the thread that runs the tiles and
        // released after. The packed blocks hold whole panels of k_tiles
        // tiles; this job writes only its own block of the result.
        unsafe {
            if engine == Engine::Tiles {
                asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack));
            }
            for pn in jn * JOB_N_PANELS..((jn + 1) * JOB_N_PANELS).min(n_panels) {
                let b0 = packed_b.as_ptr().add(2 * pn * tile_len);
                for pm in jm * JOB_M_PANELS..((jm + 1) * JOB_M_PANELS).min(m_panels) {
                    let a0 = packed_a.as_ptr().add(2 * pm * tile_len);
                    let (a1, b1) = (a0.add(tile_len), b0.add(tile_len));
                    match engine {
                        Engine::Tiles => micro_kernel(a0, a1, b0, b1, k_tiles, &mut block),
                        Engine::Dot => {
                            let c = block.as_mut_ptr();
                            dot_kernel(a0, b0, k_tiles, c);
                            dot_kernel(a0, b1, k_tiles, c.add(16));
                            dot_kernel(a1, b0, k_tiles, c.add(16 * PANEL));
                            dot_kernel(a1, b1, k_tiles, c.add(16 * PANEL + 16));
                        }
                    }
                    write_block(&block, out, (pm * PANEL, pn * PANEL), (m, n), how);
                }
            }
            if engine == Engine::Tiles {
                asm!("tilerelease", options(nostack));
            }
        }
    };
    if parallel {
        (0..jobs_m * jobs_n).into_par_iter().for_each(job);
    } else {
        (0..jobs_m * jobs_n).for_each(job);
    }
}

/// A 16×16 block of A·B with AVX512_BF16 from one packed A tile column `a` and
/// one packed B tile column `b` (`k_tiles` tiles each), into `out` (rows
/// [`PANEL`] apart). Each of the 16 accumulators is one row of the block: per
/// k-pair, `vdpbf16ps` adds that row's pair of A, broadcast, times the B tile
/// row holding the pair for every column.
///
/// # Safety
/// `a` and `b` must hold `k_tiles ≥ 1` tiles; `out` 16 rows of 16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_kernel(a: *const u16, b: *const u16, k_tiles: usize, out: *mut f32) {
    let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
    for kt in 0..k_tiles {
        let (at, bt) = (a.add(kt * TILE_ELEMS), b.add(kt * TILE_ELEMS));
        for p in 0..TILE_ROWS {
            let column_pairs = _mm512_loadu_si512(bt.add(p * TILE_K).cast());
            let column_pairs = std::mem::transmute::<__m512i, __m512bh>(column_pairs);
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = at.add(r * TILE_K + 2 * p).cast::<i32>().read_unaligned();
                let row_pair = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
                *acc = _mm512_dpbf16_ps(*acc, row_pair, column_pairs);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add(r * PANEL), *acc);
    }
}

/// Writes the part of a 32×32 block at (`r0`, `c0`) that lies inside `m×n`.
///
/// # Safety
/// `dst` must hold the `m×n` result at its strides, and no other task may write
/// this block.
unsafe fn write_block(
    block: &[f32; PANEL * PANEL],
    dst: Dst,
    (r0, c0): (usize, usize),
    (m, n): (usize, usize),
    how: Write,
) {
    let rows = (m - r0).min(PANEL);
    let cols = (n - c0).min(PANEL);
    for r in 0..rows {
        let src = &block[r * PANEL..r * PANEL + cols];
        let row = dst.ptr.add((r0 + r) * dst.rs + c0 * dst.cs);
        if dst.cs == 1 {
            let row = std::slice::from_raw_parts_mut(row, cols);
            if how.accumulate {
                for (d, s) in row.iter_mut().zip(src) {
                    *d += how.beta * s;
                }
            } else {
                for (d, s) in row.iter_mut().zip(src) {
                    *d = how.beta * s;
                }
            }
        } else {
            for (c, s) in src.iter().enumerate() {
                let d = row.add(c * dst.cs);
                *d = if how.accumulate {
                    *d + how.beta * s
                } else {
                    how.beta * s
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matrix stored in a buffer at strides (rs, cs), filled with values of
    /// mixed sign and magnitude.
    struct Matrix {
        data: Vec<f32>,
        rs: usize,
        cs: usize,
    }

    impl Matrix {
        /// `rows×cols`, row-major when `col_major` is false; with `gap`, every
        /// element sits `gap` slots apart (neither stride is 1).
        fn new(rows: usize, cols: usize, col_major: bool, gap: usize, seed: usize) -> Matrix {
            let (rs, cs) = if col_major {
                (gap, rows * gap)
            } else {
                (cols * gap, gap)
            };
            let mut data = vec![f32::NAN; rows * cols * gap];
            for r in 0..rows {
                for c in 0..cols {
                    let i = (r * 131 + c * 71 + seed * 17) % 997;
                    data[r * rs + c * cs] = (i as f32 / 498.5 - 1.0) * (1.0 + (i % 7) as f32);
                }
            }
            Matrix { data, rs, cs }
        }

        fn at(&self, r: usize, c: usize) -> f32 {
            self.data[r * self.rs + c * self.cs]
        }
    }

    fn round(x: f32) -> f64 {
        f32::from_bits((to_bf16(x) as u32) << 16) as f64
    }

    /// The engines this CPU can run: AMX tiles where it has them, and the
    /// AVX512_BF16 dot products wherever the CPU has that (every AMX CPU does).
    fn engines() -> Vec<Engine> {
        let mut engines = Vec::new();
        if engine() == Some(Engine::Tiles) {
            engines.push(Engine::Tiles);
        }
        if dot_available() {
            engines.push(Engine::Dot);
        }
        if engines.is_empty() {
            eprintln!("no AMX or AVX512_BF16 on this CPU: bf16 products not exercised");
        }
        engines
    }

    /// For each engine, every element of the product equals the product of the
    /// operands rounded to bf16, summed in f64, up to f32 summation error
    /// (relative to Σ|a·b| of that element); and the rounding itself costs
    /// about 2⁻⁸.
    fn check(dims: (usize, usize, usize), layout: (bool, bool, usize), how: Write) {
        for engine in engines() {
            check_engine(engine, dims, layout, how);
        }
    }

    fn check_engine(
        engine: Engine,
        (m, n, k): (usize, usize, usize),
        (a_col_major, b_col_major, gap): (bool, bool, usize),
        how: Write,
    ) {
        let a = Matrix::new(m, k, a_col_major, gap, 1);
        let b = Matrix::new(k, n, b_col_major, gap, 2);
        let (dst_rs, dst_cs) = if gap > 1 { (1, m + 3) } else { (n, 1) };
        let prior = |r: usize, c: usize| ((r * 7 + c * 3) % 11) as f32 - 5.0;
        let mut dst = vec![0f32; dst_cs.max(1) * n.max(1) + dst_rs * m + 4];
        for r in 0..m {
            for c in 0..n {
                dst[r * dst_rs + c * dst_cs] = prior(r, c);
            }
        }
        // SAFETY: every matrix lies in its buffer at its strides.
        unsafe {
            matmul(
                engine,
                (m, n, k),
                dst.as_mut_ptr(),
                (dst_rs, dst_cs),
                a.data.as_ptr(),
                (a.rs, a.cs),
                b.data.as_ptr(),
                (b.rs, b.cs),
                how,
            )
        };
        let (mut worst, mut rounding) = (0f64, 0f64);
        for r in 0..m {
            for c in 0..n {
                let (mut exact, mut rounded, mut magnitude) = (0f64, 0f64, 1e-30f64);
                for i in 0..k {
                    let (x, y) = (a.at(r, i), b.at(i, c));
                    exact += x as f64 * y as f64;
                    rounded += round(x) * round(y);
                    magnitude += (round(x) * round(y)).abs();
                }
                let base = if how.accumulate {
                    prior(r, c) as f64
                } else {
                    0.0
                };
                let got = dst[r * dst_rs + c * dst_cs] as f64 - base;
                let beta = how.beta as f64;
                worst = worst.max((got - beta * rounded).abs() / (beta.abs() * magnitude));
                rounding = rounding.max((rounded - exact).abs() / magnitude);
            }
        }
        assert!(
            worst < 2e-6,
            "{m}×{n}×{k}: {worst:e} of Σ|a·b| off the rounded product"
        );
        assert!(rounding < 1.0 / 128.0, "bf16 rounding error {rounding:e}");
    }

    #[test]
    fn bf16_products_equal_the_rounded_f32_product() {
        let plain = Write {
            beta: 1.0,
            accumulate: false,
            parallel: true,
        };
        let one = Write {
            parallel: false,
            ..plain
        };
        let scaled_sum = Write {
            beta: -0.5,
            accumulate: true,
            parallel: true,
        };
        // Square, ragged in every direction, one element, and longer than a job.
        for dims in [
            (64, 64, 64),
            (37, 45, 70),
            (1, 1, 1),
            (129, 300, 33),
            (300, 17, 97),
        ] {
            // A·B, A·Wᵀ (weights read in place), dyᵀ·x, and no unit stride.
            for layout in [
                (false, false, 1),
                (false, true, 1),
                (true, false, 1),
                (false, false, 2),
            ] {
                check(dims, layout, plain);
            }
        }
        check((70, 600, 40), (false, true, 1), one);
        // More than one block of A's rows, of the depth, and of B's columns.
        check((600, 40, 2100), (false, true, 1), plain);
        check((40, 2100, 40), (false, false, 1), plain);
        check((33, 35, 2100), (true, false, 1), scaled_sum);
        // Larger than a block with each operand read across its rows, no unit
        // stride over several depth blocks, and depth-major packing on one thread.
        check((600, 40, 70), (true, false, 1), plain);
        check((40, 2100, 40), (false, true, 1), plain);
        check((40, 40, 2100), (false, false, 2), plain);
        check((45, 37, 130), (true, false, 1), one);
        // A scale without accumulation (attention's 1/√d).
        let scaled = Write {
            beta: 0.125,
            ..plain
        };
        check((64, 100, 72), (false, true, 1), scaled);
        check((3, 2, 0), (false, false, 1), plain);
        check((3, 2, 0), (false, false, 1), scaled_sum);
        check((45, 37, 130), (false, true, 2), scaled_sum);
        check((45, 37, 130), (true, false, 1), scaled_sum);
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // Halfway between 1.0 and the next bf16 goes to the even one; above it up.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert_eq!(to_bf16(f32::MIN_POSITIVE / 2.0), 0);
        assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
    }
}
