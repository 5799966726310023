//! Launch geometry of the CUDA kernels as plain functions: block sizes, rows per chunk, shared
//! memory, split counts, workspace lengths and the default token chunk. The launches
//! (`cuda::kernels`, `cuda::layer`), the memory model (`memory.rs`) and the tests all read them
//! here, so none keeps its own copy; nothing here needs a device. The constants named after a
//! `.cu` define must equal it (the test below reads them from the kernel sources).

/// Threads per block of every kernel.
pub const BLOCK: u32 = 128;
/// Batch rows per thread in the core-apply kernels (`SVFT_APPLY_ROWS` in core_apply.cu).
pub const APPLY_ROWS: usize = 4;
/// Diagonals per thread in the band SDDMM (`SVFT_SDDMM_OFFSETS` in sddmm.cu).
pub const SDDMM_OFFSETS: usize = 4;
/// Diagonals per thread in the fused backward (`SVFT_FUSED_OFFSETS` in fused_bwd.cu).
pub const FUSED_OFFSETS: usize = 4;
/// Dynamic shared memory available without opt-in.
pub const SMEM_LIMIT: usize = 48 * 1024;
/// Largest grid y (and z) dimension.
pub const GRID_Y_MAX: usize = 65_535;
/// Tokens per chunk of the skinny kernels (`SVFT_SKINNY_TOKENS` in skinny_gemm.cu).
pub const SKINNY_TOKENS: usize = 16;
/// Rows of B per staging tile of `skinny_nn` (`SVFT_SKINNY_NN_KT`).
pub const SKINNY_NN_KT: usize = 128;
/// Columns of B per staging tile of `skinny_nt` (`SVFT_SKINNY_NT_KT`).
pub const SKINNY_NT_KT: usize = 256;
/// Rows of B per warp in `skinny_nt` (`SVFT_SKINNY_NT_ROWS`).
pub const SKINNY_NT_ROWS: usize = 2;
/// Blocks the split-K product aims for: at 128 threads, about 8 resident blocks per SM of a
/// 132-SM card, so that enough loads of B are in flight to stream it at full bandwidth. Fixed
/// (not read from the device) so the split count, hence the bits of the result and the
/// workspace size, do not depend on the card.
pub const SKINNY_TARGET_BLOCKS: usize = 1024;
/// Most splits of one split-K product.
pub const SKINNY_MAX_SPLITS: usize = 256;

pub(crate) fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

/// Whether the band stencils fit shared memory for half-width `d` (else use the CSR kernels).
pub fn band_fits(d: usize) -> bool {
    4 * APPLY_ROWS * (BLOCK as usize + 2 * d) <= SMEM_LIMIT
        && 4 * band_sddmm_chunk_rows(d) * (2 * BLOCK as usize + 2 * d + SDDMM_OFFSETS - 1) <= SMEM_LIMIT
}

/// Batch rows per chunk of the band SDDMM: as many as shared memory allows, at most 32.
pub fn band_sddmm_chunk_rows(d: usize) -> usize {
    let per_row = 4 * (2 * BLOCK as usize + 2 * d + SDDMM_OFFSETS - 1);
    (SMEM_LIMIT / per_row).clamp(1, 32)
}

/// Dynamic shared memory of the fused band SDDMM + backward apply (A and X windows per chunk row).
pub fn fused_bwd_smem(d: usize) -> usize {
    4 * band_sddmm_chunk_rows(d) * (2 * BLOCK as usize + 4 * d + FUSED_OFFSETS - 1)
}

/// Whether the fused band backward fits shared memory for half-width `d` with the unfused band
/// SDDMM's `chunk_rows` (kept equal so both modes give the unfused chunks, and the deterministic
/// workspace keeps its size); else the host runs the unfused pair.
pub fn fused_bwd_fits(d: usize) -> bool {
    band_fits(d) && fused_bwd_smem(d) <= SMEM_LIMIT
}

/// Batch rows per chunk of the COO SDDMM: at most 64 chunks, so a deterministic workspace
/// stays at most 64 |Omega| floats.
pub fn coo_sddmm_chunk_rows(n: usize) -> usize {
    ceil_div(n, 64).max(32)
}

/// Chunks the COO SDDMM splits `n` rows into: at most 64, and `ceil(n / 32)` below 2048 rows.
/// Not monotone in `n` above 2048 (2049 rows make 63 chunks, 2048 make 64).
pub fn coo_sddmm_chunks(n: usize) -> usize {
    ceil_div(n, coo_sddmm_chunk_rows(n))
}

/// Workspace floats the SDDMM needs for any batch of at most `n` rows: `nnz` (fast mode: dC
/// itself) or `nchunks * nnz`. The workspace is grown once for the largest token chunk and
/// reused by smaller ones (the last chunk of a batch), so the COO count is bounded by its
/// monotone envelope `min(ceil(n / 32), 64)`, not by the count at `n` alone.
pub fn sddmm_workspace_len(band: Option<usize>, deterministic: bool, n: usize, nnz: usize) -> usize {
    if !deterministic {
        return nnz;
    }
    let chunks = match band {
        Some(d) => ceil_div(n, band_sddmm_chunk_rows(d)),
        None => ceil_div(n, 32).min(64),
    };
    chunks * nnz
}

/// Blocks of the epilogue for `nnz` coefficients (and floats of its gate partials).
pub fn epilogue_blocks(nnz: usize) -> usize {
    ceil_div(nnz, 256).clamp(1, 1024)
}

/// Row stride (floats) of the skinny kernels' staged tile for `n` tokens: `min(n, 16)` rounded up
/// to 1, 2, 4, 8 or 16 tokens, plus 4 from 8 up (`skinny_stride` in skinny_gemm.cu).
pub fn skinny_stride(n: usize) -> usize {
    let nt = n.clamp(1, SKINNY_TOKENS).next_power_of_two();
    if nt <= 4 {
        nt
    } else {
        nt + 4
    }
}

/// Split count of `skinny_nn` for `out[n x c] = in[n x k] B[k x c]` with `elem`-byte B: enough
/// blocks to fill the card ([`SKINNY_TARGET_BLOCKS`]), but the f32 partials (written and read
/// once, `8 n c` bytes per split) at most a quarter of B's `k c elem` bytes, and no more splits
/// than staging tiles of k.
pub fn skinny_splits(n: usize, k: usize, c: usize, elem: usize) -> usize {
    let blocks = ceil_div(c, BLOCK as usize) * ceil_div(n, SKINNY_TOKENS);
    let want = ceil_div(SKINNY_TARGET_BLOCKS, blocks.max(1));
    let traffic_cap = (k * elem / (32 * n.max(1))).max(1);
    let tile_cap = ceil_div(k, SKINNY_NN_KT).max(1);
    want.min(traffic_cap).min(tile_cap).clamp(1, SKINNY_MAX_SPLITS)
}

/// f32 workspace of `skinny_nn` for these sizes: `splits x n x c` partial sums.
pub fn skinny_workspace_len(n: usize, k: usize, c: usize, elem: usize) -> usize {
    skinny_splits(n, k, c, elem).saturating_mul(n).saturating_mul(c)
}

/// f32 workspace of the small-n plan for `n` tokens: the larger of its two split-K products,
/// `T = X V` (k = d_in) and `A = G U` (k = d_out), both with c = r.
pub fn smalln_workspace_len(d_out: usize, d_in: usize, r: usize, n: usize, elem: usize) -> usize {
    skinny_workspace_len(n, d_in, r, elem).max(skinny_workspace_len(n, d_out, r, elem))
}

/// Elements of one token chunk of the factored plan's scratch (`tokens x r`) at the default
/// chunk size: 8 Mi, 16 MiB in bf16, so each chunk's GEMM still has hundreds of output tiles
/// (several waves on a 132-SM GPU) while a long batch's scratch stops growing with `n`.
pub const SCRATCH_CHUNK_ELEMS: usize = 1 << 23;
/// Fewest tokens of a default chunk (for very wide layers).
pub const SCRATCH_CHUNK_MIN_TOKENS: usize = 2048;

/// Tokens per chunk of the factored plan's `n x r` scratch for rank `r` by default:
/// `max(2^23 / r, 2048)` (2048 at r = 4096, 8192 at r = 1024). At most that many tokens of
/// `S = T C^T`, `A = G U` and `A C` are held at once; see `CudaLayer::set_token_chunk`.
pub fn default_token_chunk(r: usize) -> usize {
    (SCRATCH_CHUNK_ELEMS / r.max(1)).max(SCRATCH_CHUNK_MIN_TOKENS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `#define NAME value` in a kernel source.
    fn define(source: &str, name: &str) -> usize {
        let line = source
            .lines()
            .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
            .unwrap_or_else(|| panic!("#define {name} not found"));
        line.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    }

    /// The host's copies of the kernels' compile-time constants equal the `.cu` defines: a
    /// mismatch would size shared memory, grids or workspaces for a kernel that is not there.
    #[test]
    fn constants_match_the_kernel_sources() {
        let apply = include_str!("../kernels/core_apply.cu");
        let sddmm = include_str!("../kernels/sddmm.cu");
        let fused = include_str!("../kernels/fused_bwd.cu");
        let skinny = include_str!("../kernels/skinny_gemm.cu");
        for (source, name, host) in [
            (apply, "SVFT_APPLY_ROWS", APPLY_ROWS),
            (sddmm, "SVFT_SDDMM_OFFSETS", SDDMM_OFFSETS),
            (fused, "SVFT_FUSED_OFFSETS", FUSED_OFFSETS),
            (skinny, "SVFT_SKINNY_TOKENS", SKINNY_TOKENS),
            (skinny, "SVFT_SKINNY_NN_KT", SKINNY_NN_KT),
            (skinny, "SVFT_SKINNY_NT_KT", SKINNY_NT_KT),
            (skinny, "SVFT_SKINNY_NT_ROWS", SKINNY_NT_ROWS),
        ] {
            assert_eq!(define(source, name), host, "{name}");
        }
    }
}
