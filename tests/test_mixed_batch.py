"""Mixed-adapter batches (PEFT's ``adapter_names=[...]``): the gathered LoRA kernels, the op, both front doors.

1. The shrink / expand kernels (``peft_fast/kernels/lora_mixed.py``) against their torch reference
   and float64: odd row counts, adapters with no rows, every row one adapter, every row
   ``"__base__"``, segments longer than a row tile, ranks above one rank tile, split K, ``lora_bias``;
   NaN-poisoned scratch buffers, and base rows left bit for bit.
2. ``patch(peft_model)``: row-by-row equality with PEFT's own mixed-batch output on a tiny Llama with
   three adapters (different ranks, alphas, rsLoRA, targets) plus ``"__base__"`` rows, in eval mode,
   dense and bitsandbytes 4-bit NF4; ``generate(adapter_names=...)``; PEFT's refusals with its messages.
3. A model ``peft_fast.patch`` gave LoRA: ``model(ids, adapter_names=...)`` and ``generate`` equal each
   sample run alone with its adapter; the same refusals; the adapter stack's cache invalidation.
"""

from __future__ import annotations

import itertools

import peft
import pytest
import tiny_models
import torch
import transformers

import peft_fast
from peft_fast import peft_interop
from peft_fast.kernels import lora_mixed as kernels
from peft_fast.kernels.lora_mixed import group_rows, lora_mixed_forward, lora_mixed_reference_forward
from peft_fast.ops import lora_mixed_batch, stack_adapters

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
VOCAB = tiny_models.VOCAB


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("PEFT_FAST_BACKEND", request.param)
    return request.param


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


# -- 1. the kernels ------------------------------------------------------------------------------------

# (slots per sample, rows per sample, K, N, ranks of the stacked adapters, lora_bias)
KERNEL_CASES = [
    ([2, -1, 0, 2, 2, -1, 0], 5, 72, 40, (4, 8, 12), False),  # M = 35, adapter 1 has no row
    ([1] * 9, 1, 48, 130, (3, 16), False),  # every row one adapter; N over one N tile
    ([0, 1, 0, 1, 1], 30, 33, 17, (16, 80), True),  # segments of 60 / 90 rows; rank 80: two rank tiles
    ([-1, -1, -1], 4, 24, 24, (8,), False),  # every row "__base__"
    ([3, 0, 2, 1, 0, 3], 3, 100, 64, (1, 5, 2, 9), True),  # four adapters, rank 1 among them
]


def kernel_case(slots, rows_per_sample, k, n, ranks, bias, dtype):
    device = KERNEL_DEVICE
    m = len(slots) * rows_per_sample
    factors = []
    for i, r in enumerate(ranks):
        a = torch.randn(r, k, device=device) / k**0.5
        b = torch.randn(n, r, device=device) / r**0.5
        factors.append((a.to(dtype), b.to(dtype), 0.5 + i, torch.randn(n, device=device).to(dtype) if bias else None))
    stack = stack_adapters(factors, dtype)
    x = torch.randn(m, k, device=device).to(dtype)
    y = torch.randn(m, n, device=device).to(dtype)
    return x, y, stack, group_rows(slots, rows_per_sample, device)


def formula64(x, y, stack, slots, rows_per_sample):
    """Row by row from the slots themselves (not the grouping), in float64."""
    out = y.double().clone()
    for m in range(x.shape[0]):
        slot = slots[m // rows_per_sample]
        if slot < 0:
            continue
        term = x[m].double() @ stack.lora_a[slot].double().t() @ stack.lora_b[slot].double().t()
        if stack.bias is not None:
            term = term + stack.bias[slot].double()
        out[m] += stack.scales[slot].double() * term
    return out


@pytest.mark.parametrize(("case", "dtype"), itertools.product(KERNEL_CASES, TOLERANCE))
def test_kernels_match_reference_and_float64(case, dtype):
    slots, rows_per_sample = case[0], case[1]
    x, y, stack, groups = kernel_case(*case, dtype)
    args = (x, stack.lora_a, stack.lora_b, stack.scales, stack.bias, groups)
    kernel = lora_mixed_forward(y.clone(), *args)
    reference = lora_mixed_reference_forward(y.clone(), *args)
    expected = formula64(x, y, stack, slots, rows_per_sample)
    assert rel_err(kernel, expected) <= TOLERANCE[dtype]
    assert rel_err(reference, expected) <= TOLERANCE[dtype]
    base_rows = [m for m in range(x.shape[0]) if slots[m // rows_per_sample] < 0]
    assert torch.equal(kernel[base_rows], y[base_rows])  # "__base__" rows are never written
    lora_rows = [m for m in range(x.shape[0]) if slots[m // rows_per_sample] >= 0]
    if lora_rows:
        assert not torch.equal(kernel[lora_rows], y[lora_rows])


def test_grouping_is_a_stable_sort_by_slot():
    groups = group_rows([2, -1, 0, 2, 0], 2, "cpu")
    assert groups.rows.tolist() == [4, 5, 8, 9, 0, 1, 6, 7]
    assert groups.seg_start.tolist() == [0, 4, 8] and groups.seg_slot.tolist() == [0, 2]
    assert (groups.max_rows, groups.n_rows, groups.n_segments) == (4, 10, 2)
    empty = group_rows([-1, -1], 3, "cpu")
    assert empty.rows.numel() == 0 and empty.n_segments == 0 and empty.max_rows == 0


@pytest.mark.parametrize("splits", [2, 3])
def test_split_k_partials_are_summed(splits, monkeypatch):
    """H split over K (fp32 partials) gives the unsplit result; the policy's split count is forced here."""
    x, y, stack, groups = kernel_case([0, 1, 1, 0, 1], 3, 256, 40, (8, 16), False, torch.float32)
    args = (x, stack.lora_a, stack.lora_b, stack.scales, stack.bias, groups)
    whole = lora_mixed_forward(y.clone(), *args)
    shapes = []
    original = kernels._empty
    monkeypatch.setattr(kernels, "_shrink_splits", lambda tiles, k, device: splits)
    monkeypatch.setattr(kernels, "_empty", lambda shape, *a: shapes.append(shape) or original(shape, *a))
    split = lora_mixed_forward(y.clone(), *args)
    assert any(len(shape) == 3 and shape[0] == 2 for shape in shapes)  # 256 = two K tiles of 128
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)


def test_scratch_buffers_are_fully_written(monkeypatch):
    monkeypatch.setattr(kernels, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                 device=device))  # fmt: skip
    monkeypatch.setattr(kernels, "_shrink_splits", lambda tiles, k, device: 2)
    for case in KERNEL_CASES:
        x, y, stack, groups = kernel_case(*case, torch.float32)
        out = lora_mixed_forward(y.clone(), x, stack.lora_a, stack.lora_b, stack.scales, stack.bias, groups)
        assert not out.isnan().any()


def test_op_on_every_backend_and_its_refusals(backend):
    x, y, stack, groups = kernel_case([0, -1, 1, 0], 3, 40, 24, (4, 8), True, torch.float32)
    expected = formula64(x, y, stack, [0, -1, 1, 0], 3)
    out = lora_mixed_batch(y.clone().reshape(4, 3, 24), x.reshape(4, 3, 40), stack, groups)
    assert out.shape == (4, 3, 24) and rel_err(out.reshape(12, 24), expected) <= 1e-5
    with pytest.raises(RuntimeError, match="inference only"):
        lora_mixed_batch(y.clone(), x.clone().requires_grad_(), stack, groups)
    with pytest.raises(ValueError, match="grouping is for 12 rows"):
        lora_mixed_batch(y[:6].clone(), x[:6], stack, groups)
    with pytest.raises(TypeError, match="x's dtype"):
        lora_mixed_batch(y.double(), x, stack, groups)


def test_custom_op_registration():
    x, y, stack, groups = kernel_case([0, 1, -1], 2, 24, 16, (4, 8), False, torch.float32)
    args = (y.clone(), x, stack.lora_a, stack.lora_b, stack.scales, None, groups.rows, groups.seg_start,
            groups.seg_slot, groups.max_rows)  # fmt: skip
    torch.library.opcheck(torch.ops.peft_fast.lora_mixed_batch.default, args)


# -- 2. patch(peft_model) ------------------------------------------------------------------------------

NAMES = ["b", "__base__", "default", "c", "b", "default"]


def peft_adapters(model: torch.nn.Module) -> peft.PeftModel:
    """Three adapters: r 4 / alpha 8; r 8 / alpha 3 rsLoRA; r 16 / alpha 16 on q_proj and down_proj only."""
    config = dict(lora_dropout=0.0, init_lora_weights=False, target_modules="all-linear")
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **config))
    pm.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=3, use_rslora=True, **config))
    pm.add_adapter("c", peft.LoraConfig(r=16, lora_alpha=16, **{**config, "target_modules": ["q_proj", "down_proj"]}))
    return pm.eval()


def batch_ids(n: int = len(NAMES), length: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def mixed_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = peft_interop.lora_mixed_batch

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(peft_interop, "lora_mixed_batch", counting)
    return calls


def test_patched_peft_model_equals_peft_row_by_row(backend, mixed_calls):
    pm = peft_adapters(tiny_models.build("llama"))
    ids = batch_ids()
    with torch.no_grad():
        expected = pm(ids, adapter_names=NAMES).logits
        peft_fast.patch(pm, fused=False)
        actual = pm(ids, adapter_names=NAMES).logits
    assert mixed_calls[0] == 14  # every LoRA linear of both decoder layers took the gathered op
    for row in range(len(NAMES)):
        assert rel_err(actual[row], expected[row]) <= 1e-5, (row, NAMES[row])
    assert not torch.equal(actual[0], actual[4]) or not torch.equal(ids[0], ids[4])


def test_patched_peft_model_generates_as_peft(mixed_calls):
    pm = peft_adapters(tiny_models.build("llama"))
    ids = batch_ids(4, 5)
    names = ["c", "__base__", "default", "c"]
    settings = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    expected = pm.generate(input_ids=ids, adapter_names=names, **settings)
    peft_fast.patch(pm, fused=False)
    actual = pm.generate(input_ids=ids, adapter_names=names, **settings)
    assert mixed_calls[0] > 0
    assert torch.equal(actual, expected)


def test_patched_peft_model_keeps_grad_path_and_peft_refusals(mixed_calls):
    pm = peft_adapters(tiny_models.build("llama"))
    peft_fast.patch(pm, fused=False)
    ids = batch_ids()
    expected = pm(ids, adapter_names=NAMES).logits  # grad mode: PEFT's own differentiable loop
    assert mixed_calls[0] == 0 and expected.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(pm(ids, adapter_names=NAMES).logits, expected.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter"):
        pm(ids, adapter_names=[*NAMES[:-1], "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        pm(ids, adapter_names=NAMES[:-1])
    pm.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        pm(ids, adapter_names=NAMES)
    pm.eval()
    pm.merge_adapter(["b"])
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        pm(ids, adapter_names=NAMES)


def test_patched_peft_dora_is_refused_as_peft():
    torch.manual_seed(1)
    config = dict(lora_dropout=0.0, init_lora_weights=False, target_modules=["q_proj"])
    pm = peft.get_peft_model(tiny_models.build("llama"), peft.LoraConfig(r=4, use_dora=True, **config))
    pm.add_adapter("plain", peft.LoraConfig(r=4, **config))
    peft_fast.patch(pm.eval(), fused=False)
    with torch.no_grad(), pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        pm(batch_ids(2), adapter_names=["default", "plain"])
    with torch.no_grad():
        pm(batch_ids(2), adapter_names=["__base__", "plain"])  # DoRA not in the batch: fine, as PEFT


def test_patched_bnb_4bit_model_equals_peft_row_by_row(tmp_path, mixed_calls):
    """Over bitsandbytes NF4: the reference is PEFT's single-adapter forward per sample in train mode
    (dropout 0; bitsandbytes' eval-mode CPU path would repack the weight and compute in bf16)."""
    tiny_models.build("llama").save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu",
                                                              dtype=torch.float32)  # fmt: skip
    pm = peft_adapters(model).train()
    ids = batch_ids()
    rows = []
    with torch.no_grad():
        for row, name in enumerate(NAMES):
            if name == "__base__":
                with pm.disable_adapter():
                    rows.append(pm(ids[row : row + 1]).logits[0])
            else:
                pm.set_adapter(name)
                rows.append(pm(ids[row : row + 1]).logits[0])
        peft_fast.patch(pm, fused=False)
        actual = pm.eval()(ids, adapter_names=NAMES).logits
    assert mixed_calls[0] == 14
    for row, expected in enumerate(rows):
        assert rel_err(actual[row], expected) <= 1e-4, (row, NAMES[row])


# -- 3. a peft_fast LoRA model ---------------------------------------------------------------------------


def fast_adapters(**first) -> torch.nn.Module:
    model = tiny_models.build("llama")
    config = dict(lora_dropout=0.0, init_lora_weights=False, target_modules="all-linear")
    torch.manual_seed(1)
    peft_fast.patch(model, peft_fast.LoraConfig(r=4, lora_alpha=8, **{**config, **first}), fused=False)
    peft_fast.add_adapter(model, peft_fast.LoraConfig(r=8, lora_alpha=3, use_rslora=True, **config), "b")
    peft_fast.add_adapter(
        model, peft_fast.LoraConfig(r=16, lora_alpha=16, **{**config, "target_modules": ["q_proj", "down_proj"]}), "c"
    )
    return model.eval()


def one_by_one(model, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Each sample alone, with its adapter active (or adapters disabled for "__base__")."""
    rows = []
    with torch.no_grad():
        for row, name in enumerate(names):
            if name == "__base__":
                with peft_fast.disable_adapters(model):
                    rows.append(model(ids[row : row + 1]).logits[0])
            else:
                peft_fast.set_adapter(model, name)
                rows.append(model(ids[row : row + 1]).logits[0])
    peft_fast.set_adapter(model, "default")
    return torch.stack(rows)


@pytest.fixture
def fast_calls(monkeypatch) -> list[int]:
    from peft_fast import ops

    calls = [0]
    original = ops.lora_mixed_batch

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "lora_mixed_batch", counting)
    return calls


def test_fast_model_mixed_forward_equals_each_sample_alone(backend, fast_calls):
    model = fast_adapters()
    ids = batch_ids()
    expected = one_by_one(model, ids, NAMES)
    with torch.no_grad():
        actual = model(ids, adapter_names=NAMES).logits
    assert fast_calls[0] == 14
    for row in range(len(NAMES)):
        assert rel_err(actual[row], expected[row]) <= 1e-5, (row, NAMES[row])
    actual_grad = model(ids, adapter_names=NAMES).logits  # autograd records: the differentiable torch path
    assert fast_calls[0] == 14 and actual_grad.requires_grad
    torch.testing.assert_close(actual_grad.detach(), actual, rtol=1e-5, atol=1e-5)
    actual_grad.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_A.default" in n for n in grads)  # only the active adapter trains (requires grad)
    assert not any("lora_A.b" in n or "lora_A.c" in n for n in grads)


def test_fast_model_generate_with_adapter_names(fast_calls):
    model = fast_adapters()
    ids = batch_ids(3, 5)
    names = ["b", "__base__", "c"]
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = []
    for row, name in enumerate(names):
        one = ids[row : row + 1]
        if name == "__base__":
            with peft_fast.disable_adapters(model):
                expected.append(model.generate(one, attention_mask=torch.ones_like(one), **settings))
        else:
            peft_fast.set_adapter(model, name)
            expected.append(model.generate(one, attention_mask=torch.ones_like(one), **settings))
    peft_fast.set_adapter(model, "default")
    actual = model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=names, **settings)
    assert fast_calls[0] > 0
    assert torch.equal(actual, torch.cat(expected))
    beams = model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=names, num_beams=2, **settings)
    assert beams.shape[0] == 3  # the names were repeated per beam (a length mismatch would raise)


def test_fast_model_refusals_with_peft_messages():
    model = fast_adapters()
    ids = batch_ids()
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): nope, zzz"):
        model(ids, adapter_names=["zzz", *NAMES[1:-1], "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, but "
                       "got 5 and 6 respectively"):  # fmt: skip
        model(ids, adapter_names=NAMES[:-1])
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(ids, adapter_names=NAMES)
    with pytest.raises(ValueError, match="training mode"):
        model.generate(ids, adapter_names=NAMES, max_new_tokens=1)
    model.eval()
    with torch.no_grad():
        model(ids)  # no names: the usual forward, hooks closed after every call
    assert not any(module._forward_pre_hooks for module in model.modules() if module is not model)


def test_fast_model_dora_modules_to_save_and_parameters_are_refused():
    dora = fast_adapters(use_dora=True)
    with torch.no_grad(), pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        dora(batch_ids(2), adapter_names=["default", "b"])
    saved = fast_adapters(modules_to_save=["lm_head"])
    with torch.no_grad(), pytest.raises(ValueError, match="modules_to_save or trainable_token_indices"):
        saved(batch_ids(2), adapter_names=["default", "b"])


def test_stack_cache_follows_weight_changes_and_unpatch_removes_the_hooks():
    model = fast_adapters()
    ids = batch_ids()
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        model(ids, adapter_names=NAMES)
        stack = layer._mixed_stack._stack
        model(ids, adapter_names=NAMES)
        assert layer._mixed_stack._stack is stack  # same batch adapters, same weights: reused
        layer.lora_B["b"].weight.mul_(3.0)  # in place: a new version
        actual = model(ids, adapter_names=NAMES).logits
    assert layer._mixed_stack._stack is not stack
    expected = one_by_one(model, ids, NAMES)
    assert rel_err(actual[0], expected[0]) <= 1e-5
    peft_fast.unpatch(model)
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks and not model._forward_hooks
