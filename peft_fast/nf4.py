"""The NF4 (4-bit NormalFloat) format of QLoRA, bit-exact with bitsandbytes 0.50.2.

Everything here is plain, vectorised torch and runs on any device. The Triton kernel in
``peft_fast/kernels/nf4_dequant.py`` computes the same dequantization and is tested against
:func:`dequantize_nf4` bit for bit.

Format (see DESIGN.md §3): a weight of shape [N, K] is flattened row-major into blocks of
``blocksize`` elements; each block stores its absolute maximum (fp32) and each element the index
(0..15) of the nearest NF4 code to ``x / absmax``, two indices per byte, the even element in the
high nibble. With double quantization the fp32 absmax vector is itself quantized: its mean is
subtracted (``offset``) and the result is stored as 8-bit indices into bitsandbytes' signed
dynamic map, blockwise with 256 elements per block and one fp32 scale per block.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch

__all__ = [
    "NF4_CODE",
    "NF4Weight",
    "check_blocksize",
    "dequantize_nf4",
    "dynamic_map",
    "nf4_code",
    "quantize_nf4",
]

# The 16 NF4 levels (quantiles of N(0, 1) scaled to [-1, 1]) exactly as fp32 values.
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

MIN_BLOCKSIZE, MAX_BLOCKSIZE = 32, 4096
NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed block size for the double-quantized absmax
# bitsandbytes clamps absmax from below before taking its reciprocal, so an all-zero block
# divides by this instead of by zero (its codes become 7, the exact zero).
_ABSMAX_FLOOR = 1e-38
# Elements quantized per step: bounds the temporaries of one huge layer to a few tens of MB.
_QUANT_CHUNK = 1 << 22
_LUT_SIZE = 65536  # grid points of bitsandbytes' 8-bit CPU quantizer

_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _TORCH_DTYPE_NAMES.items()}


@functools.cache
def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 codebook as an fp32 tensor of 16 values on ``device`` (cached, do not modify)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.cache
def _nf4_midpoints(device: torch.device | str) -> torch.Tensor:
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


@functools.cache
def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map (256 sorted fp32 values, cached).

    Seven exponent levels 10^-6 .. 10^0; level ``i`` splits [0.1, 1] into ``2**i`` equal
    intervals and takes their midpoints, with both signs; then 0 and 1.0 complete the 256.
    Each step is computed in fp32 as bitsandbytes does, so the values agree bit for bit.
    """
    values: list[float] = []
    for level in range(7):
        edges = torch.linspace(0.1, 1, 2**level + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (level - 6)
        values += (scale * midpoints).tolist()
        values += (-scale * midpoints).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def check_blocksize(blocksize: int) -> None:
    """A ValueError unless ``blocksize`` is a power of two in [MIN_BLOCKSIZE, MAX_BLOCKSIZE] (bools refused)."""
    if (
        not isinstance(blocksize, int)
        or isinstance(blocksize, bool)
        or blocksize < MIN_BLOCKSIZE
        or blocksize > MAX_BLOCKSIZE
        or blocksize & (blocksize - 1)
    ):
        raise ValueError(f"blocksize must be a power of two in [{MIN_BLOCKSIZE}, {MAX_BLOCKSIZE}], got {blocksize!r}")


def _check_float_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in _TORCH_DTYPE_NAMES:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {dtype}")


@dataclass(eq=False)
class NF4Weight:
    """A weight quantized to NF4: the packed codes and the per-block scales.

    Attributes:
        packed: uint8 [(numel + 1) // 2, 1], two 4-bit codes per byte, even element high.
        absmax: per-block scale; fp32 [n_blocks] without double quantization, uint8 indices
            into :func:`dynamic_map` with it.
        shape: the original weight shape.
        dtype: the original weight dtype (the default dequantization dtype).
        blocksize: elements per block.
        nested_absmax: fp32 [ceil(n_blocks / 256)] scales of the quantized absmax (DQ only).
        nested_offset: fp32 0-d tensor, the mean subtracted from absmax before DQ (DQ only).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("packed", "absmax", "nested_absmax", "nested_offset"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) and (value is not None or name in ("packed", "absmax")):
                raise TypeError(f"NF4Weight.{name} must be a torch.Tensor, got {type(value).__name__}")
        self.shape = torch.Size(self.shape)
        check_blocksize(self.blocksize)
        _check_float_dtype(self.dtype, "NF4Weight.dtype")
        numel = self.numel
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (numel + 1) // 2:
            raise ValueError(
                f"packed must be uint8 with {(numel + 1) // 2} bytes for shape {tuple(self.shape)}, "
                f"got {self.packed.dtype} with {self.packed.numel()}"
            )
        if self.absmax.numel() != self.n_blocks:
            raise ValueError(
                f"absmax must have {self.n_blocks} entries (one per block of {self.blocksize}), "
                f"got {self.absmax.numel()}"
            )
        if (self.nested_absmax is None) != (self.nested_offset is None):
            raise ValueError("nested_absmax and nested_offset must be given together")
        if self.double_quant:
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"double-quantized absmax must be uint8, got {self.absmax.dtype}")
            n_nested = math.ceil(self.n_blocks / NESTED_BLOCKSIZE)
            if self.nested_absmax.dtype != torch.float32 or self.nested_absmax.numel() != n_nested:
                raise ValueError(
                    f"nested_absmax must be float32 with {n_nested} entries, got "
                    f"{self.nested_absmax.dtype} with {self.nested_absmax.numel()}"
                )
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 without double quantization, got {self.absmax.dtype}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.numel / self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized tensors (codes plus scales)."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.nested_offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block fp32 scales, reconstructed from their double-quantized form if needed."""
        if not self.double_quant:
            return self.absmax
        return dequantize_absmax(self.absmax, self.nested_absmax, self.nested_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Shorthand for :func:`dequantize_nf4`."""
        return dequantize_nf4(self, dtype)

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)
        return NF4Weight(
            move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
            move(self.nested_absmax), move(self.nested_offset),
        )  # fmt: skip

    # -- bitsandbytes interop ------------------------------------------------------------

    def quant_state_json(self) -> bytes:
        """The JSON bitsandbytes stores under ``weight.quant_state.bitsandbytes__nf4``."""
        state: dict[str, object] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _TORCH_DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        if self.double_quant:
            state.update(
                nested_blocksize=NESTED_BLOCKSIZE,
                nested_dtype="float32",
                nested_offset=self.nested_offset.item(),
            )
        return json.dumps(state).encode("utf-8")

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors a bitsandbytes ``Linear4bit`` saves for its weight, keys under ``prefix``."""
        device = self.device
        out = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": nf4_code(device).clone()}
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = dynamic_map(device).clone()
        blob = torch.frombuffer(bytearray(self.quant_state_json()), dtype=torch.uint8)
        out[f"{prefix}.quant_state.bitsandbytes__nf4"] = blob.to(device)
        return out

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Weight:
        """Read the weight of a bitsandbytes ``Linear4bit`` from its state dict.

        ``prefix`` is the weight's own key (e.g. ``"model.layers.0.mlp.up_proj.weight"``).
        Raises ``ValueError`` naming the problem for missing keys, fp4 quantization, a quant
        map that is not NF4, or tensors whose sizes disagree with the recorded shape.
        """
        qs_key = f"{prefix}.quant_state.bitsandbytes__nf4"
        if qs_key not in state_dict:
            if f"{prefix}.quant_state.bitsandbytes__fp4" in state_dict:
                raise ValueError(f"{prefix}: fp4 quantization is not supported, only nf4")
            raise ValueError(f"{prefix}: missing key {qs_key!r}; not a bitsandbytes 4-bit nf4 weight")
        try:
            state = json.loads(bytes(state_dict[qs_key].cpu().tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{qs_key}: corrupt quant_state JSON ({exc})") from None
        if state.get("quant_type") != "nf4":
            raise ValueError(f"{prefix}: quant_type {state.get('quant_type')!r} is not supported, only 'nf4'")
        for key in ("blocksize", "dtype", "shape"):
            if key not in state:
                raise ValueError(f"{qs_key}: quant_state has no {key!r}")
        if state["dtype"] not in _DTYPES_BY_NAME:
            raise ValueError(f"{qs_key}: unsupported dtype {state['dtype']!r}")

        def need(name: str) -> torch.Tensor:
            key = f"{prefix}.{name}" if name else prefix
            if key not in state_dict:
                raise ValueError(f"{prefix}: missing key {key!r}")
            return state_dict[key]

        quant_map = need("quant_map")
        if quant_map.numel() != 16 or not torch.equal(quant_map.float().cpu(), nf4_code("cpu")):
            raise ValueError(f"{prefix}.quant_map is not the NF4 codebook")
        nested = "nested_absmax" in state
        nested_absmax = nested_offset = None
        if f"{prefix}.nested_absmax" in state_dict or "nested_offset" in state:
            nested_absmax = need("nested_absmax")
            nested_map = need("nested_quant_map")
            if not torch.equal(nested_map.float().cpu(), dynamic_map("cpu")):
                raise ValueError(f"{prefix}.nested_quant_map is not bitsandbytes' dynamic map")
            if state.get("nested_blocksize") != NESTED_BLOCKSIZE or "nested_offset" not in state:
                raise ValueError(f"{qs_key}: nested quantization needs nested_blocksize 256 and nested_offset")
            nested_offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
            nested_offset = nested_offset.to(nested_absmax.device)
        del nested
        packed = need("")
        if packed.dtype != torch.uint8:
            # bitsandbytes can store the codes in another dtype (quant_storage); the bytes are the same.
            packed = packed.contiguous().view(torch.uint8)
        return cls(
            packed=packed.reshape(-1, 1),
            absmax=need("absmax").reshape(-1),
            shape=torch.Size(state["shape"]),
            dtype=_DTYPES_BY_NAME[state["dtype"]],
            blocksize=int(state["blocksize"]),
            nested_absmax=None if nested_absmax is None else nested_absmax.reshape(-1),
            nested_offset=nested_offset,
        )


# -- quantization --------------------------------------------------------------------------


def _blockwise_scale(flat: torch.Tensor, blocksize: int, is_last_chunk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the elements scaled into [-1, 1], in fp32, as bitsandbytes does.

    Full blocks multiply by the reciprocal of their (floored) absmax; a trailing partial block
    divides by its floored absmax and also stores the floored value. The two paths round
    differently, and matching them is what makes the codes bit-exact.
    """
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = (head * (1.0 / absmax.clamp(min=_ABSMAX_FLOOR)).unsqueeze(1)).clamp_(-1, 1).reshape(-1)
    if full < n:
        assert is_last_chunk, "only the last chunk may hold a partial block"
        tail_absmax = flat[full:].abs().amax().clamp(min=_ABSMAX_FLOOR)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp_(-1, 1)])
    return absmax, scaled


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        # bitsandbytes pads the scaled values with 0.0 before coding: the pad nibble is code 7.
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


@functools.cache
def _dynamic_map_lut(device: torch.device | str) -> torch.Tensor:
    """bitsandbytes' CPU quantizer table: 65536 evenly spaced points of [-1, 1] -> nearest code.

    Entry ``i`` is the number of code midpoints strictly below ``-1 + 2i/65535`` (fp32), so a
    value on a midpoint keeps the lower code.
    """
    code = dynamic_map(device)
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of fp32 block scales: (uint8 codes, fp32 nested scales, fp32 offset).

    ``offset = mean(absmax)``; ``absmax - offset`` is quantized in blocks of 256 elements with
    the 8-bit :func:`dynamic_map`, exactly as bitsandbytes' CPU quantizer does it: scale by
    the reciprocal of the block's absolute maximum, round the result onto a 65536-point grid
    of [-1, 1] (``trunc(((v + 1) · 0.5) · 65535 + 0.5)``, fp32 at each step) and read the
    code from a table. A block whose values are all zero stores code 0.
    """
    offset = absmax.mean()
    if not torch.isfinite(offset):
        # Block scales near the fp32 maximum overflow the fp32 mean; bitsandbytes then stores an
        # infinite offset and dequantizes every weight to NaN. Refuse instead.
        raise ValueError(
            f"double quantization overflows: the mean of the block scales is {offset.item()} in fp32 (largest "
            f"scale {absmax.max().item():.3e}); quantize with double_quant=False"
        )
    centered = absmax - offset
    n = centered.numel()
    n_nested = math.ceil(n / NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(centered, (0, n_nested * NESTED_BLOCKSIZE - n))
    nested_absmax = padded.view(n_nested, NESTED_BLOCKSIZE).abs().amax(dim=1)
    # An all-zero block gets scale 0 here (not 1/0) so its values stay finite before masking.
    inverse = torch.where(nested_absmax == 0, 0.0, 1.0 / nested_absmax)
    inverse = inverse.repeat_interleave(NESTED_BLOCKSIZE)[:n]
    # A block whose nested absmax is subnormal has an infinite inverse, and 0 · inf is NaN for the
    # entries equal to the offset. NaN has no grid index (it crashed the lookup); bitsandbytes
    # stores code 0 for it, which is what -1.0 looks up.
    normed = (centered * inverse).nan_to_num_(nan=-1.0).clamp_(-1.0, 1.0)
    grid_index = (((normed + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _dynamic_map_lut(absmax.device)[grid_index]
    zero_block = (nested_absmax == 0).repeat_interleave(NESTED_BLOCKSIZE)[:n]
    codes = codes.masked_fill_(zero_block, 0)
    return codes, nested_absmax, offset


def dequantize_absmax(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_absmax`: ``fp32(code2[q] · nested_absmax) + offset``, rounded per step."""
    values = dynamic_map(codes.device).index_select(0, codes.reshape(-1).int())
    return _scale_blocks(values, nested_absmax, NESTED_BLOCKSIZE) + offset


def check_double_quant(weight: torch.Tensor, blocksize: int) -> None:
    """Raise the ValueError :func:`quantize_nf4` would raise for double quantization of ``weight``.

    The fp32 block scales are computed in chunks exactly as :func:`quantize_nf4` stores them, and
    their mean is checked, without quantizing: callers validate every layer of a model before
    the first is replaced (a failure on the 5th layer must not leave the first four in NF4).
    """
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    chunk = max(blocksize, _QUANT_CHUNK // blocksize * blocksize)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=weight.device)
    for start in range(0, n, chunk):
        part = flat[start : start + chunk].float()
        full = part.numel() - part.numel() % blocksize
        scales = part[:full].view(-1, blocksize).abs().amax(dim=1)
        if full < part.numel():
            scales = torch.cat([scales, part[full:].abs().amax().clamp(min=_ABSMAX_FLOOR).reshape(1)])
        absmax[start // blocksize : start // blocksize + scales.numel()] = scales
    offset = absmax.mean()
    if not torch.isfinite(offset):
        raise ValueError(
            f"double quantization overflows: the mean of the block scales is {offset.item()} in fp32 (largest "
            f"scale {absmax.max().item():.3e}); quantize with double_quant=False"
        )


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float weight to NF4, byte-for-byte as bitsandbytes 0.50.2 does on CPU.

    Args:
        weight: a 2-D fp32, fp16 or bf16 tensor [N, K] (any device).
        blocksize: elements per scale block, a power of two in [32, 4096].
        double_quant: also quantize the block scales (QLoRA's double quantization).

    Raises:
        ValueError: non-2-D, empty or meta weight, bad blocksize, NaN/Inf in the weight, or (with
            double quantization) block scales whose fp32 mean overflows (bitsandbytes silently
            stores garbage for the last two; we refuse).
        TypeError: a weight that is not fp32/fp16/bf16, or a double_quant that is not a bool.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    _check_float_dtype(weight.dtype, "weight dtype")
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)})")
    if weight.device.type == "meta":
        raise ValueError("weight is on the meta device (it has no values to quantize); load the weights first")

    flat = weight.detach().reshape(-1)
    n = flat.numel()
    # Chunks are whole blocks, so every block and every byte lies inside one chunk.
    chunk = max(blocksize, _QUANT_CHUNK // blocksize * blocksize)
    midpoints = _nf4_midpoints(weight.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=weight.device)
    for start in range(0, n, chunk):
        part = flat[start : start + chunk].float()
        if not torch.isfinite(part).all():
            bad = start + int((~torch.isfinite(part)).nonzero()[0])
            row, col = divmod(bad, weight.shape[1])
            raise ValueError(
                f"weight holds a non-finite value ({flat[bad].item()}) at [{row}, {col}]; "
                "NF4 cannot represent NaN or Inf"
            )
        block_absmax, scaled = _blockwise_scale(part, blocksize, is_last_chunk=start + chunk >= n)
        # bucketize against midpoints: a value exactly on a midpoint takes the lower code.
        codes = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
        packed[start // 2 : start // 2 + (codes.numel() + 1) // 2] = _pack_nibbles(codes)
        absmax[start // blocksize : start // blocksize + block_absmax.numel()] = block_absmax
    packed = packed.unsqueeze(1)
    if not double_quant:
        return NF4Weight(packed, absmax, weight.shape, weight.dtype, blocksize)
    codes, nested_absmax, offset = quantize_absmax(absmax)
    return NF4Weight(packed, codes, weight.shape, weight.dtype, blocksize, nested_absmax, offset)


def dequantize_nf4(nf4: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reconstruct the weight: ``dtype(fp32(code[q]) · absmax)``, one rounding at the end.

    Equal bit for bit to ``bitsandbytes.functional.dequantize_4bit``. ``dtype`` defaults to
    the dtype the weight had before quantization; float64 is accepted too (for references).
    """
    if not isinstance(nf4, NF4Weight):
        raise TypeError(f"nf4 must be an NF4Weight (from quantize_nf4), got {type(nf4).__name__}")
    dtype = nf4.dtype if dtype is None else dtype
    if dtype != torch.float64:  # float64 serves float64 references and gradcheck
        _check_float_dtype(dtype, "dtype")
    numel, blocksize = nf4.numel, nf4.blocksize
    packed = nf4.packed.reshape(-1)
    # One table lookup per byte gives both of its codes (5x faster than shifting and gathering),
    # written straight into the buffer that is then scaled in place: one large allocation, not
    # three (on a CPU each fresh large buffer costs its page faults).
    values = torch.empty(2 * packed.numel(), dtype=torch.float32, device=nf4.device)
    torch.index_select(_byte_pair_lut(nf4.device), 0, packed.int(), out=values.view(-1, 2))
    values = _scale_blocks(values[:numel], nf4.absmax_fp32(), blocksize, in_place=True)
    return values.to(dtype).reshape(nf4.shape)


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int, in_place: bool = False) -> torch.Tensor:
    """``values[i] · scales[i // blocksize]`` in fp32, broadcasting instead of repeating scales."""
    n = values.numel()
    full = n - n % blocksize
    out = values if in_place else torch.empty_like(values)
    torch.mul(values[:full].view(-1, blocksize), scales[: full // blocksize, None], out=out[:full].view(-1, blocksize))
    if full < n:
        torch.mul(values[full:], scales[-1], out=out[full:])
    return out


@functools.cache
def _byte_pair_lut(device: torch.device | str) -> torch.Tensor:
    """[256, 2] fp32: byte -> (code of its high nibble, code of its low nibble)."""
    code = nf4_code(device)
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()
