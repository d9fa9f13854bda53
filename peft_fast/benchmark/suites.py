"""The benchmark suites: what is measured (NF4 dequantize, LoRA linear, saved bytes, train step, quantize memory)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from peft_fast.benchmark.harness import peak_memory_bytes, saved_bytes, time_ms, timed_row
from peft_fast.layers import LoraLinear, NF4Linear
from peft_fast.nf4 import dequantize_nf4, quantize_nf4

RANK = 16


# -- what is measured -------------------------------------------------------------------------


def peft_fast_lora_layer(dense: torch.nn.Linear, quantized: bool, dropout: float = 0.0) -> torch.nn.Module:
    """Our LoraLinear (rank RANK) over ``dense``'s weight, NF4 when ``quantized``, in its dtype."""
    base = NF4Linear(quantize_nf4(dense.weight.detach(), 64, True)) if quantized else dense
    layer = LoraLinear(base)
    layer.update_layer("default", r=RANK, lora_alpha=32, lora_dropout=dropout, init_lora_weights=False)
    return layer.to(dense.weight.dtype)


def peft_lora_layer(dense: torch.nn.Linear, quantized: bool, dropout: float = 0.0) -> torch.nn.Module:
    """PEFT's LoRA layer (rank RANK) over ``dense``, or over bitsandbytes' ``Linear4bit`` when ``quantized``."""
    import peft

    holder = torch.nn.Module()
    holder.proj = _bnb_linear4bit(dense) if quantized else dense
    if holder.proj is None:
        raise RuntimeError("bitsandbytes is not usable here")
    config = peft.LoraConfig(r=RANK, lora_alpha=32, lora_dropout=dropout, target_modules=["proj"],
                             init_lora_weights=False)  # fmt: skip
    return peft.get_peft_model(holder, config).base_model.model.proj.to(dense.weight.dtype)


def _implementations(dense: torch.nn.Linear) -> dict[str, torch.nn.Module]:
    impls = {"peft_fast qlora": peft_fast_lora_layer(dense, True), "peft_fast lora": peft_fast_lora_layer(dense, False)}
    try:
        impls["peft+bnb qlora"] = peft_lora_layer(dense, True)
    except Exception as exc:
        print(f"skipping PEFT + bitsandbytes: {exc}", file=sys.stderr)
    impls["peft lora"] = peft_lora_layer(dense, False)
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
    for name, build in (("peft_fast qlora", peft_fast_lora_layer), ("peft+bnb qlora", peft_lora_layer)):
        try:
            layers = torch.nn.ModuleList([build(d, True, dropout=0.1).train() for d in denses])
        except Exception as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        total = saved_bytes(lambda layers=layers: [layer(x) for layer in layers], layers)
        rows.append({"op": "saved_for_backward", "impl": name, "scope": "q,k,v layers sharing X", "M": tokens,
                     "K": hidden, "N": hidden, "r": RANK, "dtype": "float32", "bytes": total})  # fmt: skip
    for name, count in model_saved_bytes(device).items():
        rows.append({"op": "saved_for_backward", "impl": name, "scope": "tiny Llama, all-linear, dropout 0.05",
                     "dtype": "bfloat16", "r": RANK, "bytes": count})  # fmt: skip
    return rows


def tiny_llama_config(hidden: int = 256, layers: int = 2):
    import transformers

    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                                    max_position_embeddings=512, attention_dropout=0.0)  # fmt: skip


def model_saved_bytes(device: str) -> dict[str, int]:
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

    On CUDA: "1B" and "8B-slice" at seq 2048, batch 1 and 4, gradient checkpointing off and on;
    ``quick``: "8B-slice" (four layers of Llama-3-8B's widths) at batch 1, checkpointing off and on.
    """
    rows = []
    if device == "cuda":
        setups = [("1B", dict(hidden=2048, layers=16, inter=8192), 2048),
                  ("8B-slice", dict(hidden=4096, layers=4, inter=14336), 2048)]  # fmt: skip
        batches, checkpointing = (1, 4), (False, True)
    else:
        setups, batches, checkpointing = [("tiny", dict(hidden=256, layers=2, inter=512), 128)], (2,), (False, True)
    if quick and device == "cuda":
        setups, batches = setups[1:], batches[:1]
    elif quick:
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
    with torch.device(device):  # initialised where it runs: a 1B model's CPU init takes longer than its timing
        model = transformers.LlamaForCausalLM(config).to(dtype=dtype)
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
