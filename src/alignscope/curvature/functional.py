"""A causal LM seen as a pure function of the selected parameters, flattened to one vector.

Every curvature routine differentiates ``theta -> logits``. Keeping that function pure (the
unselected parameters enter as detached constants, no attention mask, no KV cache) is what lets
torch.func compose vmap, grad and jvp over it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from alignscope.curvature.head import LMHead, find_head
from alignscope.curvature.prefix import DEFAULT_PREFIX_MEMORY_BUDGET, PrefixCache
from alignscope.data.encode import LMBatch
from alignscope.params import ParamSelection


def response_weights(batch: LMBatch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T-1] weights that turn a sum over predicting positions into a per-example mean.

    Weight ``1 / n_b`` on each response prediction of example ``b`` and zero elsewhere, so that
    ``(w * token_loss).sum(-1)`` is example ``b``'s mean token loss.
    """
    mask = batch.target_mask.to(dtype)
    counts = mask.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("an example has no response tokens; every example needs a response")
    return mask / counts


class ResponsePositions:
    """The response-predicting positions of a batch, flattened, with their loss weights.

    ``weights[n] = 1 / (B * n_b)`` for position ``n`` of example ``b`` (``B`` = ``n_total``):
    summing any per-position quantity against them gives the mean over examples of the
    per-example token mean.
    """

    def __init__(self, batch: LMBatch, dtype: torch.dtype, n_total: int | None = None) -> None:
        # n_total: the size of the whole batch when this is one chunk of it.
        self.batch = batch
        self.mask = batch.target_mask  # [B, T-1]
        w = response_weights(batch, dtype) / (n_total or batch.size)
        self.weights = w[self.mask]  # [N]
        rows = torch.arange(batch.size, device=self.mask.device)
        self.example = rows[:, None].expand_as(self.mask)[self.mask]  # [N]

    @property
    def count(self) -> int:
        return int(self.weights.numel())

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` logits at the response-predicting positions from ``[B, T, V]`` logits."""
        return logits[:, :-1, :][self.mask]

    def per_example(self, values: torch.Tensor) -> torch.Tensor:
        """``[B]``: the per-position ``values`` ``[N]`` weighted and summed per example."""
        out = torch.zeros(self.batch.size, dtype=values.dtype, device=values.device)
        return out.index_add(0, self.example, self.weights * values)


def _under_vmap(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform (vmap's batched ids): boolean-mask
    gathers and the prefix cache's lookups are data-dependent and cannot run on it.

    torch has no public test for this; the private one is looked up so that, should it go, the
    answer is "wrapped" and callers take their transform-safe path (same result, slower)."""
    test = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return True if test is None else bool(test(t))


def _skip_padding_check(model: nn.Module) -> None:
    """Turn off transformers' "input looks padded, pass an attention mask" check (GPT-2 and
    others run it when the config has a pad token): it tests ``pad_id in input_ids``, which is
    data-dependent control flow that vmap cannot trace. The inputs here are unmasked on purpose
    (right padding, loss masked by response weights)."""
    for module in model.modules():
        if hasattr(type(module), "warn_if_padding_and_no_attention_mask"):
            module.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None


class FunctionalLM:
    """``theta -> logits`` for a Hugging Face causal LM and a parameter selection.

    ``theta0`` is a detached copy of the selected parameters at construction time (the point at
    which curvature is measured). The model is put in eval mode: dropout would make every
    curvature product a different random matrix.

    ``prefix_cache`` (default on): when every selected parameter lies in decoder layer ``L`` or
    above of a recognised decoder (see :mod:`alignscope.curvature.prefix`), the hidden states
    entering layer ``L`` are computed once per batch of token ids and kept within
    ``prefix_memory_budget`` bytes; every logits evaluation then runs layers ``L..`` only. The
    numbers are the same as the whole network's. ``self.prefix`` is None when the model or the
    selection does not allow it (the reason is logged at debug level).
    """

    def __init__(
        self,
        model: nn.Module,
        selection: ParamSelection,
        *,
        prefix_cache: bool = True,
        prefix_memory_budget: int = DEFAULT_PREFIX_MEMORY_BUDGET,
        copy_unselected: Iterable[str] = (),
    ) -> None:
        self.model = model.eval()
        self.selection = selection
        live = selection.tensors(model)
        self.theta0 = selection.flatten(live).detach().clone()
        selected = set(selection.names)
        # Unselected parameters are passed as detached constants so no autograd graph is built
        # for them (they may still have requires_grad=True on the module). They alias the live
        # tensors, except those in ``copy_unselected``: parameters that train while graphs built
        # here must keep their values at construction (the curvature guard's LoRA factors).
        copies = set(copy_unselected)
        self._frozen = {
            n: p.detach().clone() if n in copies else p.detach()
            for n, p in model.named_parameters()
            if n not in selected
        }
        _skip_padding_check(model)
        self.prefix = (
            PrefixCache.build(model, selection, prefix_memory_budget) if prefix_cache else None
        )
        self._single: dict[int, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}
        # The decoder body and linear LM head, when recognised: products then gather the
        # response positions before the head (and may work in hidden space, curvature/head.py).
        self.head: LMHead | None = find_head(model, selection)

    @property
    def dim(self) -> int:
        return self.selection.size

    @property
    def dtype(self) -> torch.dtype:
        return self.theta0.dtype

    @property
    def device(self) -> torch.device:
        return self.theta0.device

    def logits(self, theta: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` (or ``[T, V]`` for a 1-D ``input_ids``) at parameters ``theta``."""
        single = input_ids.dim() == 1
        ids = input_ids[None] if single else input_ids
        params = {**self._frozen, **self.selection.unflatten(theta)}
        state = self._prefix_state(ids)
        if state is not None:
            logits = self.prefix.logits(params, state.hidden, state.layer_inputs)
            return logits[0] if single else logits
        out = functional_call(self.model, params, (ids,), {"use_cache": False})
        logits = out.logits if hasattr(out, "logits") else out
        return logits[0] if single else logits

    def hidden(self, theta: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, H]`` (what the LM head is applied to) at
        ``theta``; needs a recognised head (``self.head``)."""
        if self.head is None:
            raise ValueError("hidden states need a recognised decoder and linear LM head")
        params = {**self._frozen, **self.selection.unflatten(theta)}
        state = self._prefix_state(input_ids)
        if state is not None:
            return self.prefix.hidden(params, state.hidden, state.layer_inputs)
        pre = self.head.body_prefix
        body = {n[len(pre) :]: p for n, p in params.items() if n.startswith(pre)}
        out = functional_call(self.head.body, body, (input_ids,), {"use_cache": False})
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def head_params(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight ``[V, H]`` and bias at ``theta`` (constants unless selected)."""
        head = self.head
        if head is None:
            raise ValueError("no recognised linear LM head")
        params = self.selection.unflatten(theta) if head.selected else {}

        def get(name: str | None) -> torch.Tensor | None:
            return None if name is None else params.get(name, self._frozen.get(name))

        return get(head.weight_name), get(head.bias_name)

    def position_hidden(
        self, theta: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``[N, H]`` hidden states at the positions ``mask`` ``[B, T-1]`` selects."""
        return self.hidden(theta, input_ids)[:, :-1][mask]

    def position_logits(
        self, theta: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``[N, V]`` logits at the positions ``mask`` ``[B, T-1]`` selects: with a recognised
        head the positions are gathered before it, so it projects only those."""
        if self.head is None:
            return self.logits(theta, input_ids)[:, :-1][mask]
        weight, bias = self.head_params(theta)
        h = self.position_hidden(theta, input_ids, mask)
        return torch.nn.functional.linear(h, weight, bias)

    def _prefix_state(self, ids: torch.Tensor):
        # Token ids batched by vmap (per-sample gradients) cannot be looked up: those calls run
        # the whole network unless the caller passes the hidden states (example_extra).
        if self.prefix is None or _under_vmap(ids):
            return None
        return self.prefix.state({**self._frozen, **self._theta0_params()}, ids)

    def _theta0_params(self) -> dict[str, torch.Tensor]:
        return self.selection.unflatten(self.theta0)

    def example_extra(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Extra per-example inputs for :meth:`example_nll` under vmap: ``(hidden,)``, the
        ``[B, T, H]`` hidden states entering the first selected layer, when the prefix is
        cached (and fits its budget); ``()`` otherwise."""
        state = self._prefix_state(input_ids)
        if state is None:
            return ()
        width = int(input_ids.shape[1])
        if width not in self._single:
            # What each layer is called with for one example: vmap runs examples one by one.
            params = {**self._frozen, **self._theta0_params()}
            self._single[width] = self.prefix.capture(params, input_ids[:1]).layer_inputs
        return (state.hidden,)

    def example_logits(
        self, theta: torch.Tensor, input_ids: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[T, V]`` of one example, from its cached ``hidden`` states when given."""
        if hidden is None:
            return self.logits(theta, input_ids)
        params = {**self._frozen, **self.selection.unflatten(theta)}
        layer_inputs = self._single[int(input_ids.shape[-1])]
        return self.prefix.logits(params, hidden[None], layer_inputs)[0]

    def token_logprobs(
        self, theta: torch.Tensor, input_ids: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Log-probabilities of the observed next tokens, ``[..., T-1]``."""
        logits = self.example_logits(theta, input_ids, hidden)
        logp = torch.log_softmax(logits[..., :-1, :], dim=-1)
        return logp.gather(-1, input_ids[..., 1:, None]).squeeze(-1)

    def example_nll(
        self,
        theta: torch.Tensor,
        input_ids: torch.Tensor,
        weights: torch.Tensor,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted token NLL of one example (1-D inputs) or per example (2-D): vmap-friendly.

        ``hidden``: that example's row of :meth:`example_extra` (one example only)."""
        return -(weights * self.token_logprobs(theta, input_ids, hidden)).sum(dim=-1)

    def per_example_nll(self, theta: torch.Tensor, batch: LMBatch) -> torch.Tensor:
        """``[B]`` mean token NLL over each example's response tokens.

        With a recognised head the response-predicting positions are gathered before it
        (:meth:`position_logits`), so the head and the log-softmax see only those (a third of
        the positions of a typical fine-tuning batch; the rest have weight zero): the same sum
        in another order, with vocabulary-sized tensors that much smaller in its derivatives.
        """
        ids = batch.input_ids
        if self.head is None or _under_vmap(ids):
            return self.example_nll(theta, ids, response_weights(batch, self.dtype))
        pos = ResponsePositions(batch, self.dtype, n_total=1)  # per-example means, not / B
        logp = torch.log_softmax(self.position_logits(theta, ids, pos.mask), dim=-1)
        return pos.per_example(-logp.gather(-1, batch.targets[pos.mask][:, None])[:, 0])

    def mean_nll(
        self, theta: torch.Tensor, batch: LMBatch, n_total: int | None = None
    ) -> torch.Tensor:
        """Mean over examples of the per-example mean response-token NLL (the fine-tuning loss).

        ``n_total``: the size of the whole batch when ``batch`` is one process' shard of it; the
        result is then the shard's share of the whole batch's mean (the shares sum to it)."""
        if n_total is None or n_total == batch.size:
            return self.per_example_nll(theta, batch).mean()
        return self.per_example_nll(theta, batch).sum() / n_total


EXACT_EAGER = "alignscope_eager"


def _exact_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose softmax runs in at least float32 *and* in the model's dtype.

    Transformers' eager kernel computes the softmax in float32 even for float64 models, which caps
    float64 curvature checks at float32 precision; this one is the same math without that cap.
    """
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    weights = query @ key.transpose(2, 3) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[..., : key.shape[-2]]
    soft_dtype = torch.promote_types(query.dtype, torch.float32)
    weights = torch.softmax(weights, dim=-1, dtype=soft_dtype).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def _register_exact_eager() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(EXACT_EAGER, _exact_eager_attention)
    AttentionMaskInterface.register(EXACT_EAGER, eager_mask)


_register_exact_eager()


def has_forward_ad_attention(model: nn.Module) -> bool:
    """True when the model's attention implementation supports forward-mode AD (eager kernels)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    return impl in (None, "eager", EXACT_EAGER)


def ensure_eager_attention(model: nn.Module) -> bool:
    """Switch a Hugging Face model to eager attention (fused kernels lack forward-mode AD).

    Returns True when the model now uses eager attention (or has no attention config at all).
    """
    if has_forward_ad_attention(model):
        return True
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter is not None:
            setter("eager")
        else:
            model.config._attn_implementation = "eager"
    except Exception as err:  # noqa: BLE001 - any failure means: stay on double backward
        warnings.warn(
            f"could not switch attention to eager ({err}); forward-mode AD is unavailable",
            stacklevel=2,
        )
        return False
    return has_forward_ad_attention(model)
