"""The one owner of what is applied to a pipeline's loaded networks.

Every change to the loaded model goes through a ``ModelPatcher`` under a *source* name ("lora:foo",
"offload", "hypernetwork:bar"), so it can be listed and taken back exactly:

- weight patches: functions of a parameter's float32 value that return its new value (a LoRA adds
  its delta, DoRA rescales); several sources compose in the order they were added. The original
  weights are backed up (a CPU copy, taken once) and restored bit for bit when the last patch of a
  parameter is removed; with patches left, the parameter is recomputed from the backup, so adding and
  removing never accumulates rounding.
- forward hooks (pre and post) on any submodule, e.g. the offloader's moves between devices.
- context hooks of the UNet's attention layers (``CrossAttention.context_hook``): hypernetworks.
- the token merge of the UNet's transformer blocks (``BasicTransformerBlock.token_merge``): ToMe; one
  source at a time.

Patches write into the existing parameters (wherever offload has put them), so offload keeps
working; a compiled forward (``compile``) is traced again after hooks change, since traced graphs do
not see hooks added later.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from latentforge.models.unet import BasicTransformerBlock, TokenMerge
from latentforge.nn import CrossAttention
from latentforge.nn.packed import materialize

WeightPatch = Callable[[Tensor], Tensor]  # float32 weight -> new float32 weight
ContextHook = Callable[[CrossAttention, Tensor, Tensor], tuple[Tensor, Tensor]]  # (module, k_ctx, v_ctx)


@dataclass
class _Source:
    patches: dict[str, WeightPatch] = field(default_factory=dict)  # "unet.<param name>" -> patch
    handles: list = field(default_factory=list)
    context_hooks: dict[str, ContextHook] = field(default_factory=dict)  # attention module name -> hook
    token_merges: dict[str, TokenMerge] = field(default_factory=dict)  # transformer block name -> merge
    record: object = None  # what the adapter says it applied (``describe``), for the images' metadata


class ModelPatcher:
    """Owns the patches and hooks applied to the networks named in ``networks`` (a callable returning
    {"unet": ..., "vae": ..., "text_encoder": ..., ...}, read afresh so replaced networks are seen)."""

    def __init__(self, networks: Callable[[], Mapping[str, nn.Module]]):
        self._networks = networks
        self._sources: dict[str, _Source] = {}
        self._backups: dict[str, Tensor] = {}
        self._compiled: dict[str, tuple[Callable, dict]] = {}  # network -> (original forward, options)
        self._pending: dict[str, None] | None = None  # parameters to recompute when ``batched`` ends

    # ----- what is applied -----------------------------------------------------------------------------
    @property
    def sources(self) -> list[str]:
        return list(self._sources)

    def describe(self, source: str, record: object) -> None:
        """Say what ``source`` applied (an adapter's file and strengths): kept while the source is, dropped
        with it, replaced when the source is applied again."""
        if source in self._sources:
            self._sources[source].record = record

    def records(self) -> list[tuple[str, object]]:
        """(source, record) of the sources that have one, in the order they were applied."""
        return [(name, s.record) for name, s in self._sources.items() if s.record is not None]

    def patched(self) -> list[str]:
        """Names of the parameters whose value differs from the loaded weights."""
        return sorted(self._backups)

    def _param(self, name: str) -> nn.Parameter:
        network, _, path = name.partition(".")
        nets = self._networks()
        if network not in nets:
            raise KeyError(f"no network {network!r} to patch; have {', '.join(nets)}")
        try:
            return nets[network].get_parameter(path)
        except AttributeError:
            raise KeyError(f"{network} has no parameter {path!r}") from None

    def _source(self, name: str) -> _Source:
        return self._sources.setdefault(name, _Source())

    # ----- weight patches ------------------------------------------------------------------------------
    @torch.no_grad()
    def patch(self, source: str, patches: Mapping[str, WeightPatch]) -> None:
        """Apply ``patches`` ({"unet.<param>": fn(weight float32) -> weight}) under ``source``."""
        params = {name: self._param(name) for name in patches}  # check every name before changing any
        src = self._source(source)
        for name in patches:
            if name in src.patches:
                raise ValueError(f"{source} already patches {name}; remove it first")
        done: list[str] = []
        try:
            for name, fn in patches.items():
                materialize(params[name])  # a weight swapped out by a packed session comes back first
                if name not in self._backups:
                    self._backups[name] = params[name].detach().to("cpu", copy=True)
                src.patches[name] = fn
                done.append(name)
                self._update(name, params[name])
        except BaseException:  # a patch that fails leaves every weight as it was before this call
            for name in done:
                src.patches.pop(name, None)
                self._update(name, params[name])
            raise

    @contextmanager
    def batched(self):
        """Patches and removals made inside recompute each parameter they touch once, when the block ends
        (also when it raises): N sources on one weight then cost N patch functions, not N(N+1)/2 (a prompt
        of 150 LoRA tags took 4 minutes). A patch function that fails at the end raises from here with the
        sources registered: the caller removes them (``pipelines.networks.activate`` does)."""
        if self._pending is not None:  # nested: the outer block recomputes
            yield
            return
        self._pending = {}
        try:
            yield
        finally:
            pending, self._pending = self._pending, None
            for name in pending:
                self._recompute(name, self._param(name))

    def _update(self, name: str, param: nn.Parameter) -> None:
        if self._pending is not None:
            self._pending[name] = None
        else:
            self._recompute(name, param)

    @torch.no_grad()
    def _recompute(self, name: str, param: nn.Parameter) -> None:
        materialize(param)
        original = self._backups[name]
        fns = [s.patches[name] for s in self._sources.values() if name in s.patches]
        if not fns:
            param.copy_(original)
            del self._backups[name]
            return
        value = original.to(param.device, torch.float32)
        for fn in fns:
            value = fn(value)
        param.copy_(value.to(param.dtype))

    # ----- hooks ---------------------------------------------------------------------------------------
    def add_hook(self, source: str, module: nn.Module, *, pre=None, post=None, with_kwargs: bool = True) -> None:
        """Forward hooks on ``module``: ``pre(module, args, kwargs) -> (args, kwargs) | None`` (with
        ``with_kwargs``), ``post(module, args, output) -> output | None``."""
        src = self._source(source)
        if pre is not None:
            src.handles.append(module.register_forward_pre_hook(pre, with_kwargs=with_kwargs))
        if post is not None:
            src.handles.append(module.register_forward_hook(post))
        self._hooks_changed()

    def add_context_hook(self, source: str, hook: ContextHook, where: Callable[[str, CrossAttention], bool]) -> int:
        """Install ``hook(module, k_context, v_context) -> (k_context, v_context)`` on the UNet's attention
        layers for which ``where(name, module)`` holds; returns how many. Hooks of several sources run in
        the order the sources were added."""
        src = self._source(source)
        count = 0
        for name, module in self._networks()["unet"].named_modules():
            if isinstance(module, CrossAttention) and where(name, module):
                src.context_hooks[name] = hook
                count += 1
        self._install_context_hooks()
        return count

    def _install_context_hooks(self) -> None:
        for name, module in self._networks()["unet"].named_modules():
            if not isinstance(module, CrossAttention):
                continue
            hooks = [s.context_hooks[name] for s in self._sources.values() if name in s.context_hooks]
            module.context_hook = _compose(module, hooks) if hooks else None
        self._hooks_changed()

    def add_token_merge(self, source: str, merge: TokenMerge, where=None) -> int:
        """Install ``merge(x, h, w) -> (merge, unmerge)`` as the token merge of the UNet's transformer blocks
        (those for which ``where(name, block)`` holds, default all); returns how many. Only one source may
        merge tokens at a time."""
        others = [name for name, s in self._sources.items() if s.token_merges and name != source]
        if others:
            raise ValueError(f"{others[0]} already merges tokens; remove it first")
        src = self._source(source)
        count = 0
        for name, module in self._networks()["unet"].named_modules():
            if isinstance(module, BasicTransformerBlock) and (where is None or where(name, module)):
                src.token_merges[name] = merge
                count += 1
        self._install_token_merges()
        return count

    def _install_token_merges(self) -> None:
        merges = {name: fn for s in self._sources.values() for name, fn in s.token_merges.items()}
        for name, module in self._networks()["unet"].named_modules():
            if isinstance(module, BasicTransformerBlock):
                module.token_merge = merges.get(name)
        self._hooks_changed()

    # ----- removal -------------------------------------------------------------------------------------
    def remove(self, source: str) -> None:
        """Take back everything ``source`` applied: weights exactly as loaded (or as the remaining
        sources make them), its hooks removed."""
        src = self._sources.pop(source, None)
        if src is None:
            return
        for name in src.patches:
            self._update(name, self._param(name))
        for handle in src.handles:
            handle.remove()
        if src.context_hooks:
            self._install_context_hooks()
        if src.token_merges:
            self._install_token_merges()
        self._hooks_changed()

    def clear(self) -> None:
        with self.batched():
            for source in list(self._sources):
                self.remove(source)

    # ----- compile -------------------------------------------------------------------------------------
    def compile(self, network: str, **options) -> None:
        """Compile ``network``'s forward with torch.compile; traced again whenever hooks change. Modes that
        replay CUDA graphs (``mode="reduce-overhead"``, fixed shapes on a GPU) get their output copied out
        of the graph's memory, which the next call overwrites (samplers keep earlier steps' results)."""
        module = self._networks()[network]
        original = self._compiled[network][0] if network in self._compiled else module.forward
        self._compiled[network] = (original, options)
        module.forward = _compiled_forward(original, options)

    @property
    def compiled(self) -> list[str]:
        return list(self._compiled)

    def _hooks_changed(self) -> None:
        if not self._compiled:
            return
        # Traced graphs do not guard on module hooks: drop them, so the next call traces the new hooks.
        torch._dynamo.reset()
        for network, (original, options) in self._compiled.items():
            self._networks()[network].forward = _compiled_forward(original, options)


def _uses_cuda_graphs(options: dict) -> bool:
    """Whether ``torch.compile(**options)`` replays CUDA graphs (inductor's ``triton.cudagraphs``)."""
    inductor = options.get("options") or {}
    if "triton.cudagraphs" in inductor:
        return bool(inductor["triton.cudagraphs"])
    return options.get("mode") in ("reduce-overhead", "max-autotune")


def _copy_out(out):
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_copy_out(o) for o in out)
    return out


def _compiled_forward(original: Callable, options: dict) -> Callable:
    compiled = torch.compile(original, **options)
    if not _uses_cuda_graphs(options):
        return compiled

    def forward(*args, **kwargs):
        return _copy_out(compiled(*args, **kwargs))

    return forward


def _compose(module: CrossAttention, hooks: list[ContextHook]) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def run(context: Tensor) -> tuple[Tensor, Tensor]:
        k, v = context, context
        for hook in hooks:
            k, v = hook(module, k, v)
        return k, v

    return run
