"""LoRA's ``trainable_token_indices``: only the listed rows of an embedding (and of a head tied to it) train.

As PEFT 0.21 does it (its TrainableTokensWrapper around a TrainableTokensLayer): the embedding is wrapped,
under PEFT's module names (``<emb>.token_adapter.base_layer`` is the original layer), and each adapter
holds ``trainable_tokens_delta`` (the new values of its rows, starting as the originals; PEFT's name) and
``trainable_tokens_original`` (a frozen copy, not saved). A head whose weight is the embedding's
(``tie_word_embeddings``) is wrapped too and reads the same rows, so it is never saved on its own. The file
holds ``<emb>.token_adapter.trainable_tokens_delta`` per untied wrapper.

Unlike PEFT's forward, which copies the whole [vocab, dim] weight with the rows replaced at every call, the
embedding looks its tokens up in the frozen weight and swaps in the trained rows where a token is listed;
the tied head computes its logits from the frozen weight and replaces only the listed columns. Duplicate
indices are kept as PEFT keeps them (one row each, saved): the last one's value is used and every one of
them gets the gradient of its token, as PEFT's ``index_copy`` gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_fast.host import set_submodule
from peft_fast.targeting import output_head_names

__all__ = [
    "TrainableTokensLayer",
    "TrainableTokensWrapper",
    "token_targets",
    "token_wrappers",
    "wrap_tokens",
]


class _Buffers(nn.Module):
    """PEFT's BufferDict: one non-persistent buffer per adapter (state_dict leaves them out, as PEFT's)."""

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)


class TrainableTokensLayer(nn.Module):
    """PEFT's TrainableTokensLayer: ``base_layer``, ``trainable_tokens_delta``, ``trainable_tokens_original``.

    ``tied_to`` (the embedding's layer) makes this one a tied head's: it holds no rows of its own (they are
    not registered here, so neither trained twice nor saved) and uses the embedding's.
    """

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tied = [tied_to] if tied_to is not None else []  # a list: not a submodule
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = _Buffers()
            self.token_indices: dict[str, list[int]] = {}
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    @property
    def owner(self) -> TrainableTokensLayer:
        """The layer holding the rows: this one, or the embedding's for a tied head."""
        return self._tied[0] if self._tied else self

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    def update_layer(self, adapter_name: str, indices: list[int]) -> None:
        """Rows ``indices`` of the base weight become adapter ``adapter_name``'s, starting as they are."""
        weight = self.base_layer.weight
        with torch.no_grad():
            rows = weight[torch.tensor(indices, dtype=torch.long, device=weight.device)].detach().clone()
        self.token_indices[adapter_name] = list(indices)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(rows.clone(), requires_grad=False)
        self.trainable_tokens_original[adapter_name] = rows

    def adapters(self) -> list[str]:
        return list(self.owner.token_indices)

    def _used(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [name for name in self.active_adapters if name in self.owner.token_indices]

    def rows(self, adapters: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct indices, their rows) of ``adapters`` (overlaps refused, as PEFT refuses them).

        A duplicated index takes its last row's value, and the gradient of that row goes to each duplicate.
        """
        owner = self.owner
        seen: set[int] = set()
        for name in adapters:
            if seen & set(owner.token_indices[name]):
                raise ValueError(
                    f"the token indices of adapter {name!r} overlap another active adapter's on this layer; "
                    "only disjoint token indices can be active (or merged) together, as in PEFT"
                )
            seen |= set(owner.token_indices[name])
        store = owner.trainable_tokens_delta
        device = self.base_layer.weight.device
        indices = [i for name in adapters for i in owner.token_indices[name]]
        delta = torch.cat([store[name] for name in adapters]) if len(adapters) > 1 else store[adapters[0]]
        if len(set(indices)) == len(indices):
            return torch.tensor(indices, dtype=torch.long, device=device), delta
        last = {index: position for position, index in enumerate(indices)}
        slot = {index: n for n, index in enumerate(last)}
        group = torch.tensor([slot[i] for i in indices], dtype=torch.long, device=device)
        value = delta.detach()[torch.tensor(list(last.values()), dtype=torch.long, device=device)]
        grads = torch.zeros_like(value).index_add(0, group, delta - delta.detach())  # 0, with every row's grad
        return torch.tensor(list(last), dtype=torch.long, device=device), value + grads

    def merged_weight(self, adapters: list[str] | None = None) -> torch.Tensor:
        """The base weight with the rows of ``adapters`` (default: the active ones) written in."""
        weight = self.base_layer.weight
        adapters = self._used() if adapters is None else adapters
        if not adapters:
            return weight
        indices, rows = self.rows(adapters)
        return weight.index_copy(0, indices, rows.to(weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self._used()
        base = self.base_layer
        if not adapters:
            return base(x, *args, **kwargs)
        if isinstance(base, nn.Embedding):
            if base.max_norm is not None or base.scale_grad_by_freq or base.sparse:
                return self._embedding_whole(x, adapters)  # PEFT's way: these act on the whole weight
            return self._embedding(x, adapters)
        return self._head(x, adapters)

    def _embed_scale(self) -> torch.Tensor | None:
        scale = getattr(self.base_layer, "embed_scale", None)  # Gemma 3's scaled word embedding
        return scale if isinstance(scale, torch.Tensor) else None

    def _embedding(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        out = self.base_layer(x)
        indices, rows = self.rows(adapters)
        order = torch.argsort(indices)
        indices, rows = indices[order], rows[order]
        slot = torch.searchsorted(indices, x).clamp_(max=len(indices) - 1)
        hit = indices[slot] == x
        picked = rows.to(out.dtype)[slot]
        padding = self.base_layer.padding_idx
        if padding is not None and padding in indices.tolist():  # as F.embedding: no gradient to the padding row
            picked = torch.where((x == padding).unsqueeze(-1), picked.detach(), picked)
        scale = self._embed_scale()
        if scale is not None:
            picked = picked * scale.to(out.dtype)
        return torch.where(hit.unsqueeze(-1), picked, out)

    def _embedding_whole(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        base = self.base_layer
        out = F.embedding(x, self.merged_weight(adapters), base.padding_idx, base.max_norm, base.norm_type,
                          base.scale_grad_by_freq, base.sparse)  # fmt: skip
        scale = self._embed_scale()
        return out if scale is None else out * scale.to(out.dtype)

    def _head(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """A (tied) output head: x·Wᵀ from the frozen weight, the listed logits from the trained rows (no
        bias: PEFT's head computes F.linear(x, W), and heads with a bias are refused at patch)."""
        weight = self.base_layer.weight
        indices, rows = self.rows(adapters)
        out = F.linear(x, weight)
        return out.index_copy(-1, indices, F.linear(x, rows.to(weight.dtype)))


class TrainableTokensWrapper(nn.Module):
    """PEFT's TrainableTokensWrapper: the module in place of the embedding (or tied head), ``token_adapter`` inside.

    Other attributes (``num_embeddings``, ``padding_idx``, ...) are the wrapped layer's; ``weight`` is the
    weight with the active rows written in, as PEFT's wrapper gives it.
    """

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__()
        self.token_adapter = TrainableTokensLayer(base_layer, tied_to)

    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.token_adapter.merged_weight()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "token_adapter":
                raise
            return getattr(self.token_adapter.base_layer, name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.token_adapter(x, *args, **kwargs)


def token_wrappers(model: nn.Module) -> list[tuple[str, TrainableTokensWrapper]]:
    """(name, wrapper) for every trainable-tokens wrapper of the model, the embeddings before the tied heads."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableTokensWrapper)]
    return sorted(found, key=lambda item: item[1].token_adapter.tied)


def _input_embedding_name(model: nn.Module) -> str:
    """PEFT's choice for a list of indices: the module ``get_input_embeddings`` returns, else ``embed_tokens``."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    for name, module in model.named_modules():
        if embedding is not None and module is embedding:
            return name
    return "embed_tokens"


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TrainableTokensWrapper) else module


def _check_indices(name: str, module: nn.Module, indices: list[int]) -> None:
    rows = module.weight.shape[0]
    bad = [i for i in indices if not 0 <= i < rows]
    if bad:
        raise ValueError(
            f"trainable_token_indices for {name}: indices {bad[:8]} are out of range; {name} has {rows} rows "
            f"(0 to {rows - 1})"
        )


def token_targets(
    model: nn.Module, indices: list[int] | dict[str, list[int]], lora_targets: list[str], modules_to_save
) -> tuple[dict[str, list[int]], list[str]]:
    """({embedding name: indices}, [names of heads tied to a wrapped embedding]) for ``trainable_token_indices``.

    Raises, before anything changes, as PEFT does (a name matching nothing, an embedding also in
    ``modules_to_save`` or a LoRA target) and where PEFT would fail later or compute something else: an index
    out of range, a module that is not an Embedding (nor a bias-free Linear output head), a tied head given
    other indices than its embedding.
    """
    wanted = dict(indices) if isinstance(indices, dict) else {_input_embedding_name(model): list(indices)}
    for key in wanted:
        if key in (modules_to_save or ()):
            raise ValueError(
                f"{key} is in modules_to_save (trained whole) and in trainable_token_indices (some rows trained): "
                f"give it to one of them, as PEFT asks"
            )
    modules = dict(model.named_modules())
    heads = output_head_names(model)
    out: dict[str, list[int]] = {}
    for key, rows in wanted.items():
        names = [n for n in modules if n and n.endswith(key)]  # PEFT's rule: a plain suffix of the name
        if not names:
            raise ValueError(f"trainable_token_indices names {key!r}, which matches no module of the model")
        for name in names:
            if name in lora_targets or any(name.startswith(t + ".") for t in lora_targets):
                raise ValueError(
                    f"{name} is a LoRA target and in trainable_token_indices: PEFT applies trainable tokens to "
                    "plain embeddings only; leave it out of target_modules"
                )
            module = _unwrapped(modules[name])
            head = type(module) is nn.Linear and module.bias is None and name in heads
            if not isinstance(module, nn.Embedding) and not head:
                raise ValueError(
                    f"trainable_token_indices names {name} ({type(module).__name__}), which is not an embedding "
                    "layer (an nn.Embedding, or the model's output head: a Linear without a bias)"
                )
            _check_indices(name, module, rows)
            out[name] = list(rows)
    return out, _tied_heads(model, out)


def _tied_heads(model: nn.Module, targets: dict[str, list[int]]) -> list[str]:
    """Heads sharing a wrapped embedding's weight when the model ties them, as PEFT wraps them: PEFT ties when
    ``config.tie_word_embeddings`` is set and the input embedding is wrapped. A tied head named too must have
    the embedding's indices (it is then wrapped as the tied head, as PEFT skips it)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return []
    embedding = _input_embedding_name(model)
    if embedding not in targets:
        return []
    weight = _unwrapped(model.get_submodule(embedding)).weight
    modules = dict(model.named_modules())
    inside = [n for n, m in modules.items() if isinstance(m, TrainableTokensWrapper)]
    heads = [
        name
        for name, module in modules.items()
        if name != embedding
        and not any(name.startswith(w + ".") for w in inside)
        and getattr(_unwrapped(module), "weight", None) is weight
    ]
    for head in heads:
        if head in targets and targets.pop(head) != targets[embedding]:
            raise ValueError(
                f"trainable_token_indices gives {head} other indices than {embedding}, whose weight it shares "
                "(tie_word_embeddings): give it the same indices or leave it out"
            )
        if getattr(model.get_submodule(head), "bias", None) is not None:
            raise ValueError(f"{head} shares {embedding}'s weight and has a bias: trainable tokens cannot tie it")
    return heads


def wrap_tokens(model: nn.Module, targets: dict[str, list[int]], tied_heads: list[str], adapter_name: str) -> None:
    """Wrap (or add ``adapter_name`` to the wrappers of) the target embeddings and the heads tied to them."""
    for name, indices in targets.items():
        module = model.get_submodule(name)
        if not isinstance(module, TrainableTokensWrapper):
            module = TrainableTokensWrapper(module)
            set_submodule(model, name, module)
        module.token_adapter.update_layer(adapter_name, indices)
    embedding = model.get_submodule(_input_embedding_name(model)) if tied_heads else None
    for name in tied_heads:
        if not isinstance(model.get_submodule(name), TrainableTokensWrapper):
            set_submodule(model, name, TrainableTokensWrapper(model.get_submodule(name), embedding.token_adapter))
