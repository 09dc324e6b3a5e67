"""The device code in the compiled extension, read with the CUDA tools Triton ships (no GPU needed): SASS for
sm_80 and sm_90, PTX for compute_90 (which the driver JIT-compiles for newer GPUs: checked here by assembling
it for sm_100 and sm_120 with ptxas), and every op's CUDA kernel registered. The tensor-core kernel's memory
access: its global-load widths and register/local-memory use in the SASS, and (compiled for the host with nvcc)
the sectors and shared-memory banks of its load mappings and MMA fragment reads; on a GPU, its results on odd
shapes and on views that must take the scalar loads."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import relative_error, requires_cuda

from pfa_kernels.backends import cpp

TC_KERNEL = "linear_sequence_tc_bwd_kernel"  # fp16 and bf16, CuTe on tensor cores
FMA_KERNEL = "linear_sequence_bwd_kernel"    # fp32 and fp64, CUDA cores


def _tool(name: str) -> Path:
    triton = pytest.importorskip("triton")
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _run(*command) -> str:
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def library() -> str:
    assert cpp.has_cuda_kernels(), "the extension was built without CUDA"
    return importlib.util.find_spec("pfa_kernels._C").origin


@pytest.fixture(scope="module")
def sass(library) -> str:
    return _run(_tool("cuobjdump"), "-sass", library)


def test_library_carries_cuda_kernels_for_sm80_and_sm90(sass):
    """cuobjdump lists device code per architecture; every op has a CUDA kernel."""
    assert "arch = sm_80" in sass and "arch = sm_90" in sass
    assert sass.count(FMA_KERNEL) >= 4  # fp32 and fp64 (CUDA cores) x 2 architectures
    assert sass.count(TC_KERNEL) >= 4  # fp16 and bf16 on CuTe x 2 architectures
    assert "HMMA" in sass  # the CuTe kernels run on tensor cores
    for op in cpp.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pfa_kernels::{op}", "CUDA"), op


def test_library_embeds_ptx_for_compute_90(library):
    """PTX of every kernel for compute_90, the newest architecture built: GPUs newer than sm_90 run it."""
    assert re.search(r"PTX file\s+\d+: \S+\.sm_90\.ptx", _run(_tool("cuobjdump"), "-lptx", library))
    ptx = _run(_tool("cuobjdump"), "-ptx", library)
    assert ".target sm_90" in ptx
    entries = re.findall(r"^(?:\.visible )?\.entry (\S+)\(", ptx, flags=re.MULTILINE)
    assert sum(TC_KERNEL in entry for entry in entries) == 2 and sum(FMA_KERNEL in entry for entry in entries) == 2
    assert "mma.sync.aligned.m16n8k16" in ptx


@pytest.mark.parametrize("arch", ["sm_100", "sm_120"])
def test_ptx_assembles_for_newer_gpus(library, arch, tmp_path):
    """What the driver does on a B200 (sm_100) or an RTX 50 (sm_120): compile the compute_90 PTX for it. Done here
    with Triton's ptxas for Blackwell; every kernel assembles, without spilling to local memory."""
    subprocess.run([str(_tool("cuobjdump")), "-xptx", "all", library], cwd=tmp_path, check=True, capture_output=True)
    (ptx,) = tmp_path.glob("*.ptx")
    report = subprocess.run([str(_tool("ptxas-blackwell")), f"-arch={arch}", "-v", "-o", str(tmp_path / "out.cubin"),
                             str(ptx)], capture_output=True, text=True, check=True).stderr
    compiled = re.findall(rf"Compiling entry function '(\S+)' for '{arch}'", report)
    assert sum(TC_KERNEL in name for name in compiled) == 2 and sum(FMA_KERNEL in name for name in compiled) == 2
    assert "0 bytes spill stores, 0 bytes spill loads" in report
    assert not re.search(r"[1-9]\d* bytes spill", report), report


def _functions(sass: str) -> dict[tuple[str, str], str]:
    """{(arch, mangled name): SASS text} from cuobjdump -sass."""
    functions, arch = {}, None
    for block in re.split(r"(?=^\s*(?:arch = sm_\d+|Function : \S+)\s*$)", sass, flags=re.MULTILINE):
        if match := re.match(r"\s*arch = (sm_\d+)", block):
            arch = match.group(1)
        elif match := re.match(r"\s*Function : (\S+)", block):
            functions[arch, match.group(1)] = block
    return functions


def _tc_kernels(sass: str) -> dict[tuple[str, str], str]:
    kernels = {key: text for key, text in _functions(sass).items() if TC_KERNEL in key[1]}
    assert sorted({arch for arch, _ in kernels}) == ["sm_80", "sm_90"] and len(kernels) == 4
    return kernels


def test_tc_kernel_loads_16_bytes_at_a_time(sass):
    """g, B and R reach the tensor-core kernel through 16-byte loads (LDG.E.128: 2 per tile of g, B and R; the
    2-byte LDG.E.U16 that remain are the scalar path for unaligned sources), and g's 16 bytes go to shared memory
    in one 16-byte store. Before, every global load was a 2-byte LDG.E.U16 (21 per kernel and architecture, no
    LDG.E.128)."""
    for (arch, name), text in _tc_kernels(sass).items():
        wide = len(re.findall(r"\bLDG\.E\.128\b", text))
        assert wide >= 6, f"{arch} {name}: {wide} LDG.E.128"
        assert len(re.findall(r"\bSTS\.128\b", text)) >= 2, f"{arch} {name}: no 16-byte shared stores"


def test_tc_kernel_registers_without_local_memory(library, sass):
    """No local memory (spills or stack) in the tensor-core kernels, and registers within what keeps the
    occupancy the 2-byte loads had: at most 96 per thread on sm_80 (5 blocks of 128 threads in 64K registers)
    and 80 on sm_90 (6 blocks). Measured: 96 and 80, against 94-96 and 76 before."""
    for (arch, name), text in _tc_kernels(sass).items():
        assert not re.search(r"\b(?:LDL|STL)\b", text), f"{arch} {name} uses local memory"
    usage = _run(_tool("cuobjdump"), "-res-usage", library)
    arch, seen = None, 0
    lines = usage.splitlines()
    for line, following in zip(lines, lines[1:] + [""], strict=True):
        if match := re.search(r"arch = (sm_\d+)", line):
            arch = match.group(1)
        if re.match(rf"\s*Function \S*{TC_KERNEL}\S*:", line):
            fields = dict(re.findall(r"(\w+):(\d+)", following))
            assert fields["LOCAL"] == "0" and fields["STACK"] == "0", (arch, following)
            assert int(fields["REG"]) <= {"sm_80": 96, "sm_90": 80}[arch], (arch, following)
            seen += 1
    assert seen == 4


_LAYOUT_PROBE = r"""
// Host-side count of the tensor-core kernel's shared-memory banks and global sectors, from its own layouts,
// MMA partitioning and load mappings (linear_sequence_tc.cuh).
#include "linear_sequence_tc.cuh"

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <vector>

using namespace cute;
using namespace pfa_kernels::tc;

// Conflict degree of one warp-wide shared access: the most distinct 4-byte words one bank serves. 16-byte
// accesses are served per quarter warp, 8-byte ones per half warp.
static int ways(const std::vector<long>& bytes, int width) {
  const size_t phase = width == 16 ? 8 : width == 8 ? 16 : 32;
  int worst = 0;
  for (size_t p0 = 0; p0 < bytes.size(); p0 += phase) {
    std::map<long, std::set<long>> banks;
    for (size_t l = p0; l < std::min(bytes.size(), p0 + phase); ++l)
      for (int b = 0; b < std::max(width, 4); b += 4) banks[(bytes[l] + b) / 4 % 32].insert((bytes[l] + b) / 4);
    for (auto& bank : banks) worst = std::max(worst, static_cast<int>(bank.second.size()));
  }
  return worst;
}

// Bytes a warp-wide global load asks for over the bytes of the 32-byte sectors it touches.
static double efficiency(const std::vector<long>& bytes, int width) {
  std::set<long> sectors;
  for (long a : bytes)
    for (int b = 0; b < width; ++b) sectors.insert((a + b) / 32);
  return bytes.size() * width / (32.0 * sectors.size());
}

static half_t buffer[64 * 32];

// Worst conflict over every warp's fragment reads ('A', 'B') or accumulator stores ('C') of a tile.
template <class L>
static int mma_ways(L layout, char operand) {
  auto mma = make_tiled_mma(SM80_16x8x16_F32F16F16F32_TN{}, Layout<Shape<_2, _2, _1>>{});
  Tensor s = make_tensor(static_cast<half_t*>(buffer), layout);
  int worst = 0;
  for (int warp = 0; warp < THREADS / 32; ++warp) {
    std::vector<std::vector<long>> per_value;
    for (int lane = 0; lane < 32; ++lane) {
      auto thr = mma.get_slice(warp * 32 + lane);
      auto add = [&](auto part) {
        per_value.resize(size(part));
        for (int j = 0; j < size(part); ++j) per_value[j].push_back(2L * (&part(j) - buffer));
      };
      if (operand == 'A') add(thr.partition_A(s));
      else if (operand == 'B') add(thr.partition_B(s));
      else add(thr.partition_C(s));
    }
    for (auto& bytes : per_value) worst = std::max(worst, ways(bytes, 2));
  }
  return worst;
}

template <int Rows>
static bool bijective() {
  std::set<int> offsets;
  for (int r = 0; r < Rows; ++r)
    for (int k = 0; k < TILE_K; ++k) offsets.insert(smem_tile_layout<Rows>()(r, k));
  return offsets.size() == Rows * TILE_K && *offsets.begin() == 0 && *offsets.rbegin() == Rows * TILE_K - 1;
}

// load_tile_rows (tile(r, k) = source[r * ld + k]) or load_tile_transposed (source[k * ld + r]) over a whole
// tile: worst store conflict, worst load efficiency, and whether the pieces cover the tile once, each 16-byte
// piece one aligned chunk (rows) or each (r, k..k+1) one 32-bit word (transposed).
template <int Rows, bool Transposed>
static void loads(long ld) {
  constexpr auto layout = smem_tile_layout<Rows>();
  constexpr int slots = Transposed ? transposed_units<Rows> : Rows * TILE_K / VEC;
  std::set<std::pair<int, int>> seen;
  int store = 0;
  double load = 1.0;
  bool covers = true;
  for (int warp0 = 0; warp0 < slots; warp0 += 32) {
    std::vector<long> lo, hi, rows_store;
    std::vector<std::vector<long>> column_store(VEC);
    for (int lane = 0; lane < 32; ++lane) {
      if (Transposed) {
        const auto [r, k] = transposed_piece<Rows>(warp0 + lane);
        lo.push_back(2L * (k * ld + r));
        hi.push_back(2L * ((k + 1) * ld + r));
        for (int e = 0; e < VEC; ++e) {
          column_store[e].push_back(2L * layout(r + e, k));
          covers &= layout(r + e, k) % 2 == 0 && layout(r + e, k + 1) == layout(r + e, k) + 1;
          covers &= seen.insert({r + e, k}).second && seen.insert({r + e, k + 1}).second;
        }
      } else {
        const auto [r, k] = row_piece(warp0 + lane);
        lo.push_back(2L * (r * ld + k));
        hi.push_back(2L * (r * ld + k));
        rows_store.push_back(2L * layout(r, k));
        for (int e = 0; e < VEC; ++e)
          covers &= seen.insert({r, k + e}).second && layout(r, k + e) == layout(r, k) + e && layout(r, k) % VEC == 0;
      }
    }
    if (Transposed)
      for (auto& bytes : column_store) store = std::max(store, ways(bytes, 4));
    else
      store = std::max(store, ways(rows_store, 16));
    load = std::min({load, efficiency(lo, 16), efficiency(hi, 16)});
  }
  covers &= seen.size() == Rows * TILE_K;
  std::printf("%s%d ld=%ld store_ways=%d load_efficiency=%.4f covers=%d\n", Transposed ? "transposed" : "rows",
              Rows, ld, store, load, covers);
}

int main() {
  std::printf("plain_A=%d\n", mma_ways(make_layout(make_shape(Int<TILE_P>{}, Int<TILE_K>{}), LayoutRight{}), 'A'));
  std::printf("sA=%d sT=%d sB=%d sR=%d accumulators=%d\n", mma_ways(smem_tile_layout<TILE_P>(), 'A'),
              mma_ways(smem_tile_layout<TILE_P>(), 'A'), mma_ways(smem_tile_layout<TILE_MID>(), 'B'),
              mma_ways(smem_tile_layout<TILE_C>(), 'B'), mma_ways(smem_tile_layout<TILE_P>(), 'C'));
  std::printf("bijective=%d\n", bijective<TILE_P>() && bijective<TILE_MID>() && bijective<TILE_C>());
  for (long ld : {64L, 1024L}) {
    loads<TILE_P, false>(ld);
    loads<TILE_MID, true>(ld);
    loads<TILE_C, true>(ld);
  }
}
"""


def _nvcc() -> Path | None:
    for candidate in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc", shutil.which("nvcc")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def layout_probe(tmp_path_factory) -> str:
    """The probe above, compiled for the host against the kernel's header, and its output."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc (CUDA_HOME)")
    cutlass = importlib.util.find_spec("cutlass_library")
    if cutlass is None:
        pytest.skip("needs the CUTLASS headers (nvidia-cutlass)")
    directory = tmp_path_factory.mktemp("layout_probe")
    (directory / "probe.cu").write_text(_LAYOUT_PROBE)
    header_dir = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
    include = Path(cutlass.submodule_search_locations[0]) / "source" / "include"
    _run(nvcc, "-std=c++20", "-O1", "--expt-relaxed-constexpr", "-arch=sm_80", f"-I{include}", f"-I{header_dir}",
         "-o", directory / "probe", directory / "probe.cu")
    return _run(directory / "probe")


def test_tc_shared_tiles_without_bank_conflicts(layout_probe):
    """Every MMA fragment read of the four shared tiles (g, B, the g·B tile, R) and the accumulator stores into
    the g·B tile hit 32 distinct banks. Plain row-major, as the tiles were, a 64-byte row spans 16 banks and the
    A-fragment reads are 4-way conflicts: the count is checked on that layout too. The swizzle is a permutation
    of each tile."""
    assert re.search(r"^plain_A=4$", layout_probe, flags=re.MULTILINE), layout_probe
    assert re.search(r"^sA=1 sT=1 sB=1 sR=1 accumulators=1$", layout_probe, flags=re.MULTILINE), layout_probe
    assert re.search(r"^bijective=1$", layout_probe, flags=re.MULTILINE), layout_probe


def test_tc_tile_loads_coalesced_and_conflict_free(layout_probe):
    """The 16-byte loads of g (rows), B and R (transposed: 32 and 64 tile rows) use every byte of the sectors a
    warp touches when source rows are 32-byte aligned (ld 64 and 1024 elements), write shared memory without
    conflicts (16-byte stores of g per quarter warp, 32-bit (r, k..k+1) stores of B and R per warp) and cover
    each tile exactly once. The B and R loads they replace took one 32-byte sector per 2-byte element."""
    results = re.findall(r"^(rows|transposed)(\d+) ld=(\d+) store_ways=(\d+) load_efficiency=([\d.]+) covers=(\d)$",
                         layout_probe, flags=re.MULTILINE)
    assert len(results) == 6, layout_probe
    for kind, rows, ld, store_ways, load_efficiency, covers in results:
        assert (store_ways, float(load_efficiency), covers) == ("1", 1.0, "1"), (kind, rows, ld)


def _tc_cases():
    # (P, C_out, C_mid, C_in): which of g (C_out), B (C_mid) and R (C_in) can take 16-byte loads, partial tiles
    # everywhere, odd extents along the transposed loads' row pairs (C_out for B, C_mid for R).
    yield "all-16-byte", (130, 96, 40, 72)
    yield "g-scalar-B-odd-pairs", (67, 33, 48, 64)
    yield "B-scalar-R-odd-pairs", (64, 64, 37, 136)
    yield "all-scalar", (9, 7, 5, 3)
    yield "one-row", (1, 8, 8, 8)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1, 8], ids=["aligned", "misaligned-view", "aligned-view"])
@pytest.mark.parametrize("shape", [shape for _, shape in _tc_cases()], ids=[name for name, _ in _tc_cases()])
def test_tc_kernel_against_float64(shape, offset, dtype):
    """The tensor-core kernel (fp16/bf16) against the float64 product of the same low-precision values, within 3x
    of PyTorch's own low-precision error (plus a floor): 16-byte and scalar loads, zero-filled partial tiles. With
    offset 1 every operand is a contiguous view starting 2 bytes past a 16-byte boundary, which must take the
    scalar loads (a 16-byte load there would fault or read the wrong elements); offset 8 is an aligned view."""
    P, C_out, C_mid, C_in = shape

    def operand(rows, cols, scale=1.0):
        storage = (torch.randn(rows * cols + offset, device="cuda") * scale).to(dtype)
        return storage[offset:].view(rows, cols)

    g, B, R = operand(P, C_out), operand(C_out, C_mid, C_out ** -0.5), operand(C_mid, C_in)
    if offset:
        assert g.data_ptr() % 16 == offset * 2 % 16 and B.storage_offset() == offset
    fused = torch.ops.pfa_kernels.cpp_linear_sequence_input_grad(g, B, R)
    torch.cuda.synchronize()
    exact = (g.double() @ B.double()) @ R.double()
    own = relative_error((g @ B) @ R, exact)
    assert fused.dtype == dtype and fused.shape == (P, C_in)
    assert relative_error(fused, exact) <= 3 * own + {torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
