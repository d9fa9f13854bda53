"""``peft-fast bench``: peft_fast against PEFT + bitsandbytes, side by side, in one run.

Suites: NF4 dequantization (vs bitsandbytes and a plain copy of the same output size), the QLoRA
linear forward and forward+backward (vs PEFT over bnb ``Linear4bit``, PEFT over a dense Linear and
the plain matmul), dense-base LoRA (vs PEFT), bytes saved for backward per layer and per model,
peak memory of streaming quantization, and a whole training step of a Llama-architecture model.

CUDA times come from ``triton.testing.do_bench`` (L2 cleared, median with p20/p80); CPU times from
``torch.utils.benchmark``. Every row carries op, shapes, dtype, backend, implementation, time,
TFLOP/s, GB/s and peak memory; the file carries the run's metadata (device, library versions,
git commit, date). Output: ``<date>-<device>-bench.json`` + ``.md`` + ``.png`` in ``out``.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from peft_fast.io import atomic_write
from peft_fast.layers import LoraLinear, NF4Linear
from peft_fast.nf4 import dequantize_nf4, quantize_nf4
from peft_fast.ops import backend_name

__all__ = ["run_benchmarks", "run_metadata", "saved_bytes", "target_checks", "time_ms", "write_results"]

GPU_SHAPES = [(4096, 4096), (4096, 11008), (4096, 14336), (14336, 4096)]
GPU_M = [1, 16, 512, 4096, 16384]
CPU_SHAPES = [(1024, 1024), (1024, 2816)]
CPU_M = [1, 16, 256]
RANK = 16


# -- measuring -----------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def run_metadata() -> dict:
    """Device, library versions, git commit and date of this run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "backend": backend_name("cuda" if cuda else "cpu"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft_fast": _version("peft_fast"),
        "git_commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def time_ms(fn: Callable[[], object], device: str, min_run_time: float = 0.2) -> dict[str, float]:
    """Median, p20 and p80 of ``fn``'s run time in milliseconds."""
    if device == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "ms_p20": p20, "ms_p80": p80}
    from torch.utils.benchmark import Timer

    fn()  # warm-up
    measurement = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times = sorted(measurement.times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3
    return {"ms": measurement.median * 1e3, "ms_p20": pick(0.2), "ms_p80": pick(0.8)}


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak GPU memory allocated while ``fn`` runs; None on CPU (saved bytes are reported there)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def saved_bytes(run: Callable[[], object], module: torch.nn.Module) -> int:
    """Bytes of distinct storages saved for backward by ``run``, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def timed_row(
    op: str,
    impl: str,
    timing: dict[str, float],
    *,
    dtype: torch.dtype,
    device: str,
    flops: float = 0.0,
    bytes_moved: float = 0.0,
    peak_mem_bytes: int | None = None,
    **fields,
) -> dict:
    """One timed result with the fields every timed row carries (None where a figure does not apply).

    ``backend`` says which code ran: ours through :func:`peft_fast.ops.backend_name`, the others by
    their library. ``tflops`` and ``gb_per_s`` are achieved rates from ``flops`` and ``bytes_moved``.
    """
    ms = timing["ms"]
    return {
        "op": op, "impl": impl, "backend": _backend_of(impl, device), **fields, "dtype": _name(dtype), **timing,
        "tflops": flops / ms / 1e9 if flops else None, "gb_per_s": bytes_moved / ms / 1e6 if bytes_moved else None,
        "peak_mem_bytes": peak_mem_bytes,
    }  # fmt: skip


def _backend_of(impl: str, device: str) -> str:
    if impl.startswith("peft_fast"):
        return backend_name(device)
    if "bnb" in impl or impl.startswith("bitsandbytes"):
        return f"bitsandbytes {_version('bitsandbytes')}"
    return f"torch {torch.__version__}"


# -- what is measured -------------------------------------------------------------------------


def _our_layer(dense: torch.nn.Linear, quantized: bool, dropout: float = 0.0) -> torch.nn.Module:
    base = NF4Linear(quantize_nf4(dense.weight.detach(), 64, True)) if quantized else dense
    layer = LoraLinear(base)
    layer.update_layer("default", r=RANK, lora_alpha=32, lora_dropout=dropout, init_lora_weights=False)
    return layer.to(dense.weight.dtype)


def _peft_layer(dense: torch.nn.Linear, quantized: bool, dropout: float = 0.0) -> torch.nn.Module:
    import peft

    holder = torch.nn.Module()
    holder.proj = _bnb_linear4bit(dense) if quantized else dense
    if holder.proj is None:
        raise RuntimeError("bitsandbytes is not usable here")
    config = peft.LoraConfig(r=RANK, lora_alpha=32, lora_dropout=dropout, target_modules=["proj"],
                             init_lora_weights=False)  # fmt: skip
    return peft.get_peft_model(holder, config).base_model.model.proj.to(dense.weight.dtype)


def _implementations(dense: torch.nn.Linear) -> dict[str, torch.nn.Module]:
    impls = {"peft_fast qlora": _our_layer(dense, True), "peft_fast lora": _our_layer(dense, False)}
    try:
        impls["peft+bnb qlora"] = _peft_layer(dense, True)
    except Exception as exc:
        print(f"skipping PEFT + bitsandbytes: {exc}", file=sys.stderr)
    impls["peft lora"] = _peft_layer(dense, False)
    return impls


def bench_dequantize(shapes, device: str, dtype: torch.dtype) -> list[dict]:
    rows = []
    for k, n in shapes:
        weight = torch.randn(n, k, device=device, dtype=dtype)
        nf4 = quantize_nf4(weight, 64, True)
        out_bytes = n * k * weight.element_size()
        impls: dict[str, Callable[[], object]] = {"copy (bandwidth ceiling)": lambda w=weight: w.clone()}
        if device == "cuda":
            from peft_fast.kernels.nf4_dequant import dequantize_nf4_triton

            impls["peft_fast triton"] = lambda q=nf4: dequantize_nf4_triton(q, dtype)
        else:
            impls["peft_fast torch"] = lambda q=nf4: dequantize_nf4(q, dtype)
        try:
            import bitsandbytes.functional as bnb_f

            packed, state = bnb_f.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
            impls["bitsandbytes"] = lambda p=packed, s=state: bnb_f.dequantize_4bit(p, s)
        except Exception as exc:
            print(f"skipping bitsandbytes dequantize: {exc}", file=sys.stderr)
        for name, fn in impls.items():
            # A copy reads and writes the output size; a dequantization reads the 4-bit codes + scales.
            moved = out_bytes * (2 if name.startswith("copy") else 1) + nf4.nbytes * (not name.startswith("copy"))
            timing, peak = time_ms(fn, device), peak_memory_bytes(fn, device)
            rows.append(timed_row("nf4_dequantize", name, timing, dtype=dtype, device=device, bytes_moved=moved,
                                  peak_mem_bytes=peak, M=None, K=k, N=n))  # fmt: skip
    return rows


def bench_lora_linear(shapes, ms, device: str, dtype: torch.dtype) -> list[dict]:
    """Forward and forward+backward of each implementation, and the no-grad 4-bit inference path.

    Phase "infer" (no autograd, inputs without grad) compares our QLoRA layer with bitsandbytes'
    own 4-bit inference (``Linear4bit`` alone, which takes its GEMV kernel at M = 1).
    """
    rows = []
    for k, n in shapes:
        dense = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        impls = _implementations(dense)
        inference = {"peft_fast qlora": impls["peft_fast qlora"]}
        bnb_4bit = _bnb_linear4bit(dense)
        if bnb_4bit is not None:
            inference["bnb 4bit inference"] = bnb_4bit.eval()
        weight = dense.weight.detach()
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(m, n, device=device, dtype=dtype)
            flops = 2 * m * n * k + 2 * m * RANK * (n + k)
            calls = [("matmul alone", "fwd", lambda x=x, w=weight: x.detach() @ w.t(), 2 * m * n * k, weight.nbytes)]
            for name, module in impls.items():
                w_bytes = _weight_bytes(module)
                calls.append((name, "fwd", lambda mod=module, x=x: mod(x), flops, w_bytes))
                calls.append((name, "fwd+bwd", lambda mod=module, x=x, g=grad: mod(x).backward(g), 3 * flops, w_bytes))
            x_infer = x.detach()
            for name, module in inference.items():
                infer = lambda mod=module, x=x_infer: _no_grad_call(mod, x)
                calls.append((name, "infer", infer, flops if name.startswith("peft_fast") else 2 * m * n * k,
                              _weight_bytes(module)))  # fmt: skip
            for name, phase, fn, phase_flops, w_bytes in calls:
                # Bytes, the least any implementation moves: the stored weight (4-bit codes + scales, or
                # dense) read once per GEMM, X read and Y written (fwd+bwd: two GEMMs, and dY, dX, X again).
                backward = phase == "fwd+bwd"
                moved = w_bytes * (1 + backward) + (m * k + m * n) * x.element_size() * (1 + 2 * backward)
                timing, peak = time_ms(fn, device), peak_memory_bytes(fn, device)
                shape = {"phase": phase, "M": m, "K": k, "N": n, "r": RANK}
                rows.append(timed_row("lora_linear", name, timing, dtype=dtype, device=device, flops=phase_flops,
                                      bytes_moved=moved, peak_mem_bytes=peak, **shape))  # fmt: skip
    return rows


def _no_grad_call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def _weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's frozen base weight as stored (packed codes + scales for 4-bit)."""
    frozen = [t for t in [*module.parameters(), *module.buffers()] if not t.requires_grad]
    # bitsandbytes keeps the scales in the weight's quant_state, not in parameters or buffers.
    states = [t.quant_state for t in frozen if getattr(t, "quant_state", None) is not None]
    frozen += [s.absmax for s in states] + [s.state2.absmax for s in states if s.nested]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in frozen}.values())


def _bnb_linear4bit(dense: torch.nn.Linear) -> torch.nn.Module | None:
    """bitsandbytes' own 4-bit layer (NF4, double quantization) of ``dense``, or None without bnb."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=dense.weight.dtype,
                                  compress_statistics=True, quant_type="nf4")  # fmt: skip
        layer.load_state_dict(dense.state_dict())
        return layer.to(dense.weight.device)
    except Exception as exc:
        print(f"skipping bitsandbytes 4-bit inference: {exc}", file=sys.stderr)
        return None


def bench_saved_bytes(device: str) -> list[dict]:
    """Per layer (q, k, v over one X, dropout 0.1) and per model (tiny Llama, all-linear, bf16)."""
    rows = []
    hidden, tokens = 512, 256
    x = torch.randn(tokens, hidden, device=device, requires_grad=True)
    denses = [torch.nn.Linear(hidden, hidden, bias=False, device=device) for _ in range(3)]
    for name, build in (("peft_fast qlora", _our_layer), ("peft+bnb qlora", _peft_layer)):
        try:
            layers = torch.nn.ModuleList([build(d, True, dropout=0.1).train() for d in denses])
        except Exception as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        total = saved_bytes(lambda layers=layers: [layer(x) for layer in layers], layers)
        rows.append({"op": "saved_for_backward", "impl": name, "scope": "q,k,v layers sharing X", "M": tokens,
                     "K": hidden, "N": hidden, "r": RANK, "dtype": "float32", "bytes": total})  # fmt: skip
    for name, count in _model_saved_bytes(device).items():
        rows.append({"op": "saved_for_backward", "impl": name, "scope": "tiny Llama, all-linear, dropout 0.05",
                     "dtype": "bfloat16", "r": RANK, "bytes": count})  # fmt: skip
    return rows


def tiny_llama_config(hidden: int = 256, layers: int = 2):
    import transformers

    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                                    max_position_embeddings=512, attention_dropout=0.0)  # fmt: skip


def _model_saved_bytes(device: str) -> dict[str, int]:
    """Bytes saved for backward by a whole patched tiny Llama: ours vs PEFT + bitsandbytes."""
    import tempfile

    import transformers

    import peft_fast

    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 128), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).save_pretrained(tmp)
        ours = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to(device)
        config = {"r": RANK, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
        peft_fast.patch(ours, peft_fast.LoraConfig(**config, quantize="nf4")).train()
        result = {"peft_fast qlora": saved_bytes(lambda: ours(ids).logits, ours)}
        try:
            import peft

            quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True,
                                                    bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
            theirs = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, quantization_config=quant, dtype=torch.bfloat16, device_map=device
            )
            theirs = peft.get_peft_model(theirs, peft.LoraConfig(**config)).train()
            result["peft+bnb qlora"] = saved_bytes(lambda: theirs(ids).logits, theirs)
        except Exception as exc:
            print(f"skipping PEFT + bitsandbytes model: {exc}", file=sys.stderr)
    return result


def bench_train_step(device: str, quick: bool) -> list[dict]:
    """One forward + backward + AdamW step of a Llama-architecture model: tokens/s and memory.

    On CUDA: "1B" and "8B-slice" at seq 2048, batch 1 and 4, gradient checkpointing off and on.
    """
    rows = []
    if device == "cuda":
        setups = [("1B", dict(hidden=2048, layers=16, inter=8192), 2048),
                  ("8B-slice", dict(hidden=4096, layers=4, inter=14336), 2048)]  # fmt: skip
        batches, checkpointing = (1, 4), (False, True)
    else:
        setups, batches, checkpointing = [("tiny", dict(hidden=256, layers=2, inter=512), 128)], (2,), (False, True)
    if quick:
        setups, batches, checkpointing = setups[:1], batches[:1], (False,)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for label, size, seq in setups:
        for batch in batches:
            for gc in checkpointing:
                for name in ("peft_fast qlora", "peft+bnb qlora"):
                    row = _train_step_row(name, label, size, seq, batch, gc, device, dtype)
                    if row is not None:
                        rows.append(row)
    return rows


def _train_step_row(name, label, size, seq, batch, gc, device, dtype) -> dict | None:
    import transformers

    import peft_fast

    config = transformers.LlamaConfig(
        hidden_size=size["hidden"], intermediate_size=size["inter"], num_hidden_layers=size["layers"],
        num_attention_heads=16 if device == "cuda" else 4, vocab_size=32000 if device == "cuda" else 512,
        max_position_embeddings=seq,
    )  # fmt: skip
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    lora = {"r": RANK, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
    try:
        if name.startswith("peft_fast"):
            peft_fast.patch(model, peft_fast.LoraConfig(**lora, quantize="nf4"))
        else:
            model = _peft_bnb_model(model, lora, dtype)
    except Exception as exc:
        print(f"skipping {name} train step: {exc}", file=sys.stderr)
        return None
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = time_ms(step, device, min_run_time=0.5)
    # Model FLOPs of forward + backward: 6 per parameter per token (the usual training estimate).
    flops = 6 * sum(p.numel() for p in model.parameters()) * batch * seq
    row = timed_row("train_step", name, timing, dtype=dtype, device=device, flops=flops,
                    peak_mem_bytes=peak_memory_bytes(step, device), model=label, batch=batch, seq=seq, grad_ckpt=gc,
                    M=batch * seq)  # fmt: skip
    return {**row, "tokens_per_s": batch * seq / timing["ms"] * 1e3}


def _peft_bnb_model(model, lora: dict, dtype: torch.dtype):
    """PEFT over bitsandbytes 4-bit: the same random model saved and reloaded with load_in_4bit."""
    import tempfile

    import peft
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        device = next(model.parameters()).device
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quant, dtype=dtype, device_map=str(device)
        )
    return peft.get_peft_model(reloaded, peft.LoraConfig(**lora))


_LOAD_PROBE = """
import json, sys
from pathlib import Path
import torch

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)

path, loader = Path(sys.argv[1]), sys.argv[2]
from peft_fast.quantize import _build_empty_model, quantize_model
_build_empty_model(path)  # warm-up: import the modeling code before measuring (set-up, not data)
if loader == "bitsandbytes":
    import transformers
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
baseline = status("VmRSS")
if loader == "bitsandbytes":
    transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu",
                                                      dtype=torch.float32)
else:
    quantize_model(path, progress=False)
print(json.dumps({"peak": status("VmHWM") - baseline}))
"""


def write_random_llama_checkpoint(path: str | Path, layers: int = 12) -> int:
    """Save a random fp32 Llama (hidden 768, ~8M parameters per layer, ~97M at 12 layers) to ``path``.

    Built on the meta device and materialised once, so writing it costs one model's memory.
    Returns the parameter count.
    """
    import transformers

    config = transformers.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                                      num_attention_heads=12, num_key_value_heads=12, vocab_size=8000,
                                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def quantize_peak_rss(path: str | Path, loader: str = "peft_fast") -> int:
    """Peak RSS (bytes over the baseline) of loading a checkpoint in 4-bit, in a fresh process.

    ``loader``: ``peft_fast`` (streaming :func:`quantize_model`) or ``bitsandbytes``
    (transformers' ``load_in_4bit``). Linux only (reads /proc).
    """
    result = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(path), loader], capture_output=True, text=True,
                            timeout=900, check=True)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])["peak"]


def bench_quantize_memory(quick: bool) -> list[dict]:
    """Peak RSS of turning an fp32 Llama checkpoint into a 4-bit model: ours vs transformers + bnb."""
    import tempfile

    if not Path("/proc/self/clear_refs").exists():
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        params = write_random_llama_checkpoint(tmp, layers=2 if quick else 12)
        for loader in ("peft_fast", "bitsandbytes"):
            try:
                peak = quantize_peak_rss(tmp, loader)
            except subprocess.CalledProcessError as exc:
                print(f"skipping {loader} load: {exc.stderr[-300:]}", file=sys.stderr)
                continue
            rows.append({"op": "quantize_peak_rss", "impl": "peft_fast quantize_model" if loader == "peft_fast"
                         else "transformers+bnb load_in_4bit", "params": params, "fp32_bytes": 4 * params,
                         "bytes": peak})  # fmt: skip
    return rows


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- running and writing ------------------------------------------------------------------------


SUITES = ("dequantize", "lora_linear", "saved_bytes", "train_step", "quantize_memory")


def run_benchmarks(
    quick: bool = False,
    suites: tuple[str, ...] | None = None,
    after_suite: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Every suite (or those named) on the GPU if there is one, else on the CPU.

    A suite that raises (out of memory, a library missing) adds a ``suite_error`` row and the run
    goes on with the next. ``after_suite(rows so far)`` runs after each suite, so a caller can
    write partial results that survive a run killed by a time limit.
    """
    chosen = suites or SUITES
    unknown = [suite for suite in chosen if suite not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SUITES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes, ms = (GPU_SHAPES, GPU_M) if device == "cuda" else (CPU_SHAPES, CPU_M)
    if quick:
        shapes, ms = shapes[:1], [ms[0], ms[-1]]
    run_suite = {
        "dequantize": lambda: bench_dequantize(shapes, device, dtype),
        "lora_linear": lambda: bench_lora_linear(shapes, ms, device, dtype),
        "saved_bytes": lambda: bench_saved_bytes(device),
        "train_step": lambda: bench_train_step(device, quick),
        "quantize_memory": lambda: bench_quantize_memory(quick),
    }
    rows: list[dict] = []
    for suite in chosen:
        print(f"[bench] {suite} on {device} ...", flush=True)
        try:
            rows += run_suite[suite]()
        except Exception as exc:
            print(f"[bench] {suite} failed: {exc!r}", file=sys.stderr, flush=True)
            rows.append({"op": "suite_error", "impl": suite, "error": repr(exc)[:500]})
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()  # the next suite starts from free memory
        if after_suite is not None:
            after_suite(rows)
    return rows


# The H100 goals of the benchmark issue (bf16, r=16), each a ratio between rows of one run:
# (name, comparison, goal). A check reports the worst case over the rows it covers.
TARGETS = (
    ("NF4 dequantize GB/s / bf16 copy GB/s", ">=", 0.85),
    ("QLoRA fwd time / bf16 GEMM time (M >= 512)", "<=", 1.15),
    ("QLoRA fwd speed-up vs PEFT + bnb (M >= 512)", ">=", 1.3),
    ("QLoRA fwd+bwd speed-up vs PEFT + bnb (M >= 512)", ">=", 1.5),
    ("M = 1 speed-up vs bnb 4-bit inference", ">=", 1.5),
    ("train step speed-up vs PEFT + bnb", ">=", 1.5),
    ("train step peak memory / PEFT + bnb", "<=", 0.75),
)
_LARGE_M = 512
_WHERE = ("K", "N", "M", "model", "batch", "grad_ckpt")  # the fields that identify one case


def target_checks(rows: list[dict]) -> list[dict]:
    """Each goal of :data:`TARGETS`: the measured worst-case ratio, where it occurred and whether it is met.

    ``measured`` is None (and ``met`` None) when the run holds no rows for that ratio, e.g. a CPU
    run has no M >= 512 and no Triton dequantization.
    """

    def where(row: dict) -> tuple:
        return tuple(row.get(f) for f in _WHERE)

    def pick(op: str, impl: str, phase: str | None = None, large_m: bool = False, m: int | None = None) -> dict:
        return {
            where(r): r for r in rows
            if r["op"] == op and r["impl"].startswith(impl) and (phase is None or r.get("phase") == phase)
            and (not large_m or r["M"] >= _LARGE_M) and (m is None or r["M"] == m)
        }  # fmt: skip

    def ratios(num: dict, den: dict, field: str) -> list[tuple[float, tuple]]:
        return [(num[k][field] / den[k][field], k) for k in num.keys() & den.keys()
                if num[k][field] is not None and den[k][field]]  # fmt: skip

    linear = lambda impl, phase, **kw: pick("lora_linear", impl, phase, **kw)
    measured = [
        ratios(pick("nf4_dequantize", "peft_fast"), pick("nf4_dequantize", "copy"), "gb_per_s"),
        ratios(linear("peft_fast qlora", "fwd", large_m=True), linear("matmul alone", "fwd", large_m=True), "ms"),
        ratios(linear("peft+bnb qlora", "fwd", large_m=True), linear("peft_fast qlora", "fwd", large_m=True), "ms"),
        ratios(
            linear("peft+bnb qlora", "fwd+bwd", large_m=True), linear("peft_fast qlora", "fwd+bwd", large_m=True), "ms"
        ),
        ratios(linear("bnb 4bit inference", "infer", m=1), linear("peft_fast qlora", "infer", m=1), "ms"),
        ratios(pick("train_step", "peft+bnb"), pick("train_step", "peft_fast"), "ms"),
        ratios(pick("train_step", "peft_fast"), pick("train_step", "peft+bnb"), "peak_mem_bytes"),
    ]
    checks = []
    for (name, comparison, goal), values in zip(TARGETS, measured, strict=True):
        worst = (min if comparison == ">=" else max)(values, default=None)
        value = None if worst is None else worst[0]
        met = None if value is None else (value >= goal if comparison == ">=" else value <= goal)
        at = {} if worst is None else dict(zip(_WHERE, worst[1], strict=True))
        checks.append({"target": name, "goal": f"{comparison} {goal}", "measured": value, "met": met,
                       "cases": len(values), "worst_at": {k: v for k, v in at.items() if v is not None}})  # fmt: skip
    return checks


def write_results(rows: list[dict], out_dir: str | Path, name: str = "bench") -> dict[str, Path]:
    """JSON (rows + metadata), a markdown table and a PNG plot; returns their paths."""
    meta = run_metadata()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "-" for c in meta["device"].split("(")[0].strip()).strip("-").lower()
    stem = out_dir / f"{meta['date'][:10]}-{tag}-{name}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md"), "png": stem.with_suffix(".png")}
    targets = target_checks(rows)
    with atomic_write(paths["json"], "w") as handle:
        handle.write(json.dumps({"metadata": meta, "targets": targets, "rows": rows}, indent=1) + "\n")
    with atomic_write(paths["md"], "w") as handle:
        handle.write(markdown_table(rows, meta, targets))
    try:
        plot(rows, meta, paths["png"])
    except ImportError:  # matplotlib is a bench/test extra; the numbers matter more than the picture
        print("matplotlib is not installed: no PNG plot written", file=sys.stderr)
        del paths["png"]
    return paths


def markdown_table(rows: list[dict], meta: dict, targets: list[dict] | None = None) -> str:
    lines = [f"# peft_fast benchmarks — {meta['device']}", ""]
    lines.append(", ".join(f"{k} {v}" for k, v in meta.items() if k != "device"))
    if targets:
        lines += ["", "## targets", "",
                  "Goals set for an H100 in bf16; on another device the same ratios, for reference only. "
                  "Worst case over the cases each covers.", "",
                  "| target | goal | measured | met | cases | worst at |", "|" + " --- |" * 6]  # fmt: skip
        for check in targets:
            value = "n/a" if check["measured"] is None else f"{check['measured']:.3g}"
            met = {None: "n/a", True: "yes", False: "**no**"}[check["met"]]
            at = ", ".join(f"{k}={v}" for k, v in check["worst_at"].items())
            lines.append(f"| {check['target']} | {check['goal']} | {value} | {met} | {check['cases']} | {at} |")
    for op in dict.fromkeys(r["op"] for r in rows):
        subset = [r for r in rows if r["op"] == op]
        columns = [c for c in dict.fromkeys(k for r in subset for k in r) if c != "op"]
        lines += ["", f"## {op}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for row in subset:
            cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Speed-up of peft_fast over PEFT + bnb vs M per shape, and saved-bytes bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    linear = [r for r in rows if r["op"] == "lora_linear"]
    for k, n, phase in dict.fromkeys((r["K"], r["N"], r["phase"]) for r in linear):
        ours = {
            r["M"]: r["ms"]
            for r in linear
            if (r["K"], r["N"], r["phase"], r["impl"]) == (k, n, phase, "peft_fast qlora")
        }
        theirs = {
            r["M"]: r["ms"]
            for r in linear
            if (r["K"], r["N"], r["phase"], r["impl"]) == (k, n, phase, "peft+bnb qlora")
        }
        common = sorted(set(ours) & set(theirs))
        if common:
            speed.plot(common, [theirs[m] / ours[m] for m in common], marker="o", label=f"K={k} N={n} {phase}")
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.set_xscale("log")
    speed.set_xlabel("M (tokens)")
    speed.set_ylabel("speed-up vs PEFT + bitsandbytes")
    speed.set_title("QLoRA linear")
    if speed.lines[1:]:
        speed.legend(fontsize=7)
    saved = [r for r in rows if r["op"] == "saved_for_backward"]
    labels = [f"{r['impl']}\n{r['scope'][:18]}" for r in saved]
    memory.bar(range(len(saved)), [r["bytes"] / 2**20 for r in saved], color=["C0" if "fast" in r["impl"] else "C1"
                                                                               for r in saved])  # fmt: skip
    memory.set_xticks(range(len(saved)), labels, fontsize=6)
    memory.set_ylabel("MiB saved for backward")
    memory.set_title("activation memory")
    fig.suptitle(f"{meta['device']} — {meta['date'][:10]}", fontsize=9)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:  # like the JSON and markdown: whole or not at all
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
