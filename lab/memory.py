"""Memory of a training step: estimated from a config, measured on a model.

Both run the step itself and read off what it keeps (the parts are explained in
``lab.formulas``): parameters, their gradients and optimizer state, 16-bit weight
copies under autocast, and the activations, every tensor that autograd saves for the
backward pass, seen through ``torch.autograd.graph.saved_tensors_hooks`` block by block.

- ``estimate_memory(config, ...)`` builds ``GPT(config)`` on fake tensors
  (``FakeTensorMode``: meta tensors, no data, that claim a device so autocast applies)
  and runs the step on them. Nothing is allocated, so a 70B config takes a second, and
  a registered component of your own is counted exactly, with no formula.
- ``measure_memory(model, batch, ...)`` runs the step on real tensors (and on CUDA
  also reads the allocator's peak), so the two can be compared on any machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.multiprocessing.reductions import StorageWeakRef

from lab import formulas
from lab.config import Config
from lab.finetune import lora
from lab.finetune.adapter import apply_adapter, mark_only_adapter_as_trainable
from lab.finetune.adapter_v2 import apply_adapter_v2
from lab.formulas import DTYPES, OPTIMIZERS, FineTuning, choice
from lab.loss import chunked_cross_entropy
from lab.model import GPT

# Operations whose output shape or value depends on the data (a mixture of experts
# routes by the values of its inputs): fake tensors cannot run them.
DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException)


def require_formulas(config: Config, measure: str) -> None:
    """For a model that fake tensors cannot run (``DATA_DEPENDENT``): fine if
    ``lab.formulas`` covers every layer, else a ``ValueError`` saying to ``measure``."""
    if not formulas.covers(config):
        raise ValueError(
            f"{config.name or 'this config'}: a layer's output depends on the data (MoE "
            "routing), so fake tensors cannot count it, and lab.formulas does not cover it "
            "(a registered component, or an MoE variant in lab.formulas.UNCOUNTED); count "
            f"a real model with {measure}"
        )


# --- the breakdown ---------------------------------------------------------------------


@dataclass
class MemoryBreakdown:
    """Bytes per component of one training step (or of inference). ``total`` is the
    sum: a step holds its parameters, gradients and optimizer state while the
    activations of the whole forward pass wait for the backward pass. The allocator's
    real peak (``peak``, measured on CUDA) also holds temporaries and fragmentation,
    and gradients of early layers appear only as late activations are freed."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    weight_copies: int = 0
    kv_cache: int = 0
    activations_per_layer: tuple[int, ...] = ()
    peak: int | None = None
    trainable_parameters: int = 0
    notes: str = ""

    COMPONENTS = (
        "parameters", "weight_copies", "gradients", "optimizer_state",
        "activations", "logits", "kv_cache",
    )  # fmt: skip

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in self.COMPONENTS)

    def as_dict(self) -> dict[str, int]:
        """Component -> bytes, ``total`` last (what a plot or widget stacks)."""
        return {**{name: getattr(self, name) for name in self.COMPONENTS}, "total": self.total}

    def __repr__(self) -> str:
        rows = [f"{name:<16}{format_bytes(size):>12}" for name, size in self.as_dict().items()]
        if self.peak is not None:
            rows.append(f"{'peak (allocator)':<16}{format_bytes(self.peak):>12}")
        return "MemoryBreakdown(\n  " + "\n  ".join(rows) + "\n)"


def format_bytes(size: float) -> str:
    """``1536`` -> ``'1.50 KiB'`` (binary units, as GPU memory is sold and reported)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# --- one step, recorded --------------------------------------------------------------------


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights counted once)."""
    seen = {StorageWeakRef(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


class _SavedTensors:
    """Records, by bucket, the storages autograd saves for backward (through
    ``torch.autograd.graph.saved_tensors_hooks``). A storage is counted once, in the
    bucket that saved it first: views (q, k and v of one QKV output, a weight's
    transpose) share their storage, which identifies it also on fake tensors, where
    there is no data pointer. Parameters and the inputs are not activations; 16-bit
    copies of weights that autocast makes go to ``weight_copies``."""

    def __init__(self, model: nn.Module, excluded: Iterable[torch.Tensor], autocast: bool) -> None:
        self.autocast = autocast  # asked up front: autocast's own kernels turn it off inside
        self.seen = {StorageWeakRef(t.untyped_storage()) for t in excluded}
        self.param_shapes = {tuple(p.shape) for p in model.parameters()}
        self.buckets: dict[str, int] = {}
        self.inputs: dict[str, int] = {}  # bucket -> bytes of the block's input
        self.bucket = "other"

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = StorageWeakRef(storage)
        if key not in self.seen:
            self.seen.add(key)
            bucket = f"weight_copies/{self.bucket}" if self._is_weight_copy(t) else self.bucket
            self.buckets[bucket] = self.buckets.get(bucket, 0) + storage.nbytes()
        return t

    def _is_weight_copy(self, t: torch.Tensor) -> bool:
        t = t if t._base is None else t._base  # linear layers save weight.t(), a view
        node = t.grad_fn
        if node is not None and node.name() == "ToCopyBackward0":
            source = node.next_functions[0][0]
            return source is not None and hasattr(source, "variable")  # AccumulateGrad
        # a frozen weight's autocast copy: 16-bit, no history, a parameter's shape
        return (
            node is None
            and self.autocast
            and t.dtype in (torch.bfloat16, torch.float16)
            and tuple(t.shape) in self.param_shapes
        )

    def total(self, bucket: str) -> int:
        """Bytes saved in ``bucket`` (``"weight_copies"``: in all of them)."""
        if bucket == "weight_copies":
            return sum(v for k, v in self.buckets.items() if k.startswith("weight_copies/"))
        return self.buckets.get(bucket, 0)

    def enter(self, bucket: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.bucket = bucket
            if args and isinstance(args[0], torch.Tensor):
                self.inputs[bucket] = args[0].untyped_storage().nbytes()

        return hook

    def leave(self, *_: object) -> None:
        self.bucket = "other"


class _Repeats:
    """Runs each distinct block of a fake model once: a block that repeats one already
    run (the same class, structure, parameters and layer config, after the same kind
    of block, on the same kind of input) is replaced by a copy of its input and
    counted as that one. Exact, since a block's saved tensors and FLOPs follow from
    those alone; a component whose forward depends on its ``block_idx`` in another
    way than through ``config.for_layer`` would be miscounted. ``runs`` maps each
    replaced block to the block it repeats."""

    def __init__(self) -> None:
        self.runs: dict[int, int] = {}

    @contextmanager
    def wrap(self, blocks: list[nn.Module], saved: _SavedTensors) -> Iterator[None]:
        kinds = _kinds(blocks)
        seen: dict[tuple, tuple[int, torch.Size, torch.dtype, bool, bool]] = {}

        def wrapper(i: int, block: nn.Module) -> Callable:
            def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
                key = (kinds[i - 1] if i else None, kinds[i], x.shape, x.dtype, x.requires_grad)
                if key in seen and seen[key][1:3] == (x.shape, x.dtype):
                    first, _, _, grad, self_saved = seen[key]
                    self.runs[i] = first
                    y = x.clone() if x.requires_grad else x.clone().requires_grad_(grad)
                    if self_saved:  # its output was saved inside it, as the first's was
                        saved.seen.add(StorageWeakRef(y.untyped_storage()))
                    return y
                y = type(block).forward(block, x, *args, **kwargs)
                self_saved = StorageWeakRef(y.untyped_storage()) in saved.seen
                seen[key] = (i, y.shape, y.dtype, y.requires_grad, self_saved)
                return y

            return forward

        for i, block in enumerate(blocks):
            block.forward = wrapper(i, block)
        try:
            yield
        finally:
            for block in blocks:
                del block.forward


def _kinds(blocks: list[nn.Module]) -> list[int]:
    """For each block, the index of the first block built the same way."""
    signatures: list[tuple] = []
    kinds = []
    for block in blocks:
        params = [(n, p.shape, p.dtype, p.requires_grad) for n, p in block.named_parameters()]
        signature = (type(block), repr(block), params, getattr(block, "config", None))
        if signature not in signatures:
            signatures.append(signature)
        kinds.append(signatures.index(signature))
    return kinds


def _record_step(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    precision: str,
    optimizer: torch.optim.Optimizer | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_forward: Callable[[], None] | None = None,
    repeats: _Repeats | None = None,
    loss_chunk_size: int | None = None,
) -> tuple[MemoryBreakdown, _SavedTensors]:
    """One training step of ``model`` on ``batch``; what it kept, part by part (the
    optimizer's state only when one is given), and the recorder (for block inputs).
    ``on_forward`` is called between the forward and the backward pass; ``repeats``
    runs each distinct block once (on fake tensors only); ``loss_chunk_size`` computes
    the loss with ``lab.loss.chunked_cross_entropy`` (no full logits)."""
    x, y = batch
    params = list(model.parameters())
    device = params[0].device if params else x.device
    autocast = DTYPES[precision][1]
    context = nullcontext() if autocast is None else torch.autocast(device.type, dtype=autocast)
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    saved = _SavedTensors(model, [*params, x, y], autocast is not None)
    blocks = list(getattr(getattr(model, "transformer", None), "h", []))
    handles = [b.register_forward_pre_hook(saved.enter(f"layer{i}")) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(saved.leave) for b in blocks]
    try:
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), context:
            with repeats.wrap(blocks, saved) if repeats else nullcontext():
                out = model(x) if loss_chunk_size is None else model.hidden_states(x)
            saved.bucket = "loss"
            if loss_chunk_size is None:
                loss, logits_bytes = loss_fn(out, y), out.untyped_storage().nbytes()
            else:  # the head runs a chunk at a time: no (B, T, V) tensor is kept
                loss = chunked_cross_entropy(out, model.head, y, loss_chunk_size) / y.numel()
                logits_bytes = 0
        if on_forward is not None:
            on_forward()
        loss.backward()
        gradients = _storage_bytes(p.grad for p in params if p.grad is not None)
        for i, first in (repeats.runs if repeats else {}).items():
            gradients += _storage_bytes(
                p.grad for p in blocks[first].parameters() if p.grad is not None
            )
            for bucket in (f"layer{i}", f"weight_copies/layer{i}"):
                saved.buckets[bucket] = saved.total(bucket.replace(f"layer{i}", f"layer{first}"))
            saved.inputs[f"layer{i}"] = saved.inputs[f"layer{first}"]
        if optimizer is not None:
            optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    state = [] if optimizer is None else optimizer.state.values()
    per_layer = tuple(saved.total(f"layer{i}") for i in range(len(blocks)))
    result = MemoryBreakdown(
        parameters=_storage_bytes(params),
        weight_copies=saved.total("weight_copies"),
        gradients=gradients,
        optimizer_state=_storage_bytes(
            t for s in state for t in s.values() if isinstance(t, torch.Tensor)
        ),
        activations=sum(per_layer) + saved.total("other"),
        activations_per_layer=per_layer,
        logits=logits_bytes + saved.total("loss"),
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
    )
    model.zero_grad(set_to_none=True)
    return result, saved


# --- measurement ----------------------------------------------------------------------------


def _make_optimizer(name: str | None, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
    choice("optimizer", name, OPTIMIZERS)
    if name is None or not params:
        return None
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError(
            "optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes"
        ) from error
    return bnb.optim.AdamW8bit(params, lr=1e-4)


def measure_memory(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    optimizer: str | torch.optim.Optimizer | None = "adamw",
    precision: str = "32-true",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    memory_history: str | Path | None = None,
    loss_chunk_size: int | None = None,
) -> MemoryBreakdown:
    """Run one training step of ``model`` on ``batch = (x, y)`` and measure what
    ``estimate_memory`` estimates, from the tensors themselves:

    - parameters, gradients and optimizer state: bytes of the distinct storages of
      ``model.parameters()``, their ``.grad`` and the optimizer's state after a step;
      trainable parameters are those with ``requires_grad`` (freeze for LoRA first);
    - activations: every tensor autograd saves for backward during the forward pass
      (``saved_tensors_hooks``), per block of ``model.transformer.h`` when the model
      has them; ``logits`` is the logits tensor plus what the loss saves;
    - on CUDA also ``peak``: the allocator's ``max_memory_allocated`` over the step,
      and with ``memory_history`` a snapshot of every allocation written to that
      pickle file (drag it onto https://pytorch.org/memory_viz).

    ``precision`` ``*-mixed`` runs the forward pass under ``torch.autocast``; for
    ``*-true`` convert the model first (``model.to(torch.bfloat16)``). ``optimizer``
    is a name (as for ``estimate_memory``; ``sgd`` with momentum) or an optimizer
    over the model's trainable parameters. ``loss_chunk_size`` computes the loss as
    ``fit(..., loss_chunk_size=...)`` does (``lab.loss``; the model needs
    ``hidden_states`` and ``head``). The model's gradients are cleared after.
    """
    choice("precision", precision, DTYPES)
    if loss_chunk_size is not None and loss_fn is not None:
        raise ValueError("pass loss_fn or loss_chunk_size, not both")
    params = list(model.parameters())
    want, autocast = DTYPES[precision]
    if autocast is None and any(p.dtype != want for p in params):
        raise ValueError(
            f"precision={precision!r} needs a {want} model; call model.to({want}) first "
            "or use a mixed precision"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = _make_optimizer(optimizer, [p for p in params if p.requires_grad])
    device = params[0].device if params else batch[0].device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        if memory_history is not None:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        result, _ = _record_step(
            model, batch, precision, optimizer, loss_fn, loss_chunk_size=loss_chunk_size
        )
        if cuda:
            torch.cuda.synchronize(device)
            result.peak = torch.cuda.max_memory_allocated(device)
            if memory_history is not None:
                torch.cuda.memory._dump_snapshot(str(memory_history))
    finally:
        if cuda and memory_history is not None:
            torch.cuda.memory._record_memory_history(enabled=None)
    return result


# --- estimate: the same step on fake tensors ------------------------------------------------


def _fine_tune(model: nn.Module, method: FineTuning) -> None:
    """Add ``method``'s modules to ``model`` and freeze the rest, as a user would."""
    if method.method == "lora":
        lora.apply_lora(model, r=method.lora_r, targets=method.lora_targets)
        lora.mark_only_lora_as_trainable(model)
    elif method.method in ("adapter", "adapter_v2"):
        apply = apply_adapter if method.method == "adapter" else apply_adapter_v2
        apply(model, method.adapter_prompt_length, method.adapter_start_layer)
        mark_only_adapter_as_trainable(model)


def fake_model(
    config: Config, precision: str = "32-true", method: FineTuning | None = None
) -> tuple[GPT, FakeTensorMode]:
    """``GPT(config)`` in ``precision``'s parameter dtype with ``method`` applied, on
    fake CPU tensors: the real modules, no storage behind them. Run it under the
    returned mode."""
    # real tensors the model keeps as constants (RoPE's frequencies) become fake when used
    method, mode = method or FineTuning(), FakeTensorMode(allow_non_fake_inputs=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[precision][0])  # fake parameters cannot be converted
    try:
        with torch.device("meta"):  # fast, and skips the initialisation
            model = GPT(config)
        with mode:
            _to_fake_cpu(model)
            _fine_tune(model, method)
    finally:
        torch.set_default_dtype(default)
    return model, mode


def _to_fake_cpu(model: nn.Module) -> None:
    """Replace the meta parameters and buffers of ``model`` by uninitialised ones on the
    CPU, which under a ``FakeTensorMode`` are fake (tied parameters stay tied). Assigned
    directly: ``to_empty`` would swap tensors, which fake tensors refuse."""
    new: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is not None and id(t) not in new:
                    empty = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                    is_param = isinstance(t, nn.Parameter)
                    new[id(t)] = nn.Parameter(empty, t.requires_grad) if is_param else empty
                if t is not None:
                    tensors[name] = new[id(t)]


def parameter_count(config: Config) -> int:
    """All parameters of ``GPT(config)``, tied embeddings counted once (built on the
    meta device, so any registered component counts, and a 70B config is instant)."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())


def trainable_parameters(
    config: Config,
    finetune: str = "full",
    lora_r: int = 8,
    lora_targets: Iterable[str] = lora.DEFAULT_TARGETS,
    adapter_prompt_length: int = 10,
    adapter_start_layer: int = 2,
) -> int:
    """Parameters that train under ``finetune`` (options as for ``estimate_memory``),
    counted on the fake model with the method really applied."""
    method = FineTuning(finetune, lora_r, lora_targets, adapter_prompt_length, adapter_start_layer)
    method.check(config)
    if method.method == "none":
        return 0
    model, _ = fake_model(config, method=method)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def estimate_memory(
    config: Config,
    batch_size: int,
    seq_len: int | None = None,
    precision: str = "32-true",
    optimizer: str | None = "adamw",
    activation_checkpointing: bool = False,
    finetune: str = "full",
    fused_attention: bool = True,
    lora_r: int = 8,
    lora_targets: Iterable[str] = lora.DEFAULT_TARGETS,
    adapter_prompt_length: int = 10,
    adapter_start_layer: int = 2,
    loss_chunk_size: int | None = None,
) -> MemoryBreakdown:
    """Memory of one training step (or, with ``finetune="none"``, of inference with a
    KV cache of ``seq_len`` positions) of ``GPT(config)``, from a step on fake tensors.

    - ``precision`` (Lightning's names, see ``lab.formulas.DTYPES``): ``32-true`` keeps
      everything in fp32; ``bf16-true`` everything in bf16 (optimizer state too);
      ``bf16-mixed`` and ``16-mixed`` keep fp32 weights, gradients and state, and run
      under ``torch.autocast``: matmuls on 16-bit copies of the weights
      (``weight_copies``) and 16-bit activations, the residual stream and norms in fp32.
    - ``optimizer``: ``adamw`` keeps two states per trainable parameter, ``sgd`` (with
      momentum) one, ``adamw8bit`` two of one byte plus an fp32 scale per 2048 values
      (bitsandbytes), ``None`` none.
    - ``activation_checkpointing``: each block keeps only its input, and recomputes
      one block at a time during the backward pass (Chen et al. 2016), so the
      activations are the blocks' inputs plus the largest block.
    - ``finetune``: ``full``, ``lora`` (``lora_r``, ``lora_targets``: ``lab.lora``'s
      names and default), ``adapter`` or ``adapter_v2`` (``adapter_prompt_length``,
      ``adapter_start_layer``), ``none``; applied to the fake model with ``lab.lora``,
      ``lab.adapter``, ``lab.adapter_v2`` and frozen as for training.
    - ``fused_attention=False``: attention materialises its scores (the path a probe's
      ``attention_hook`` takes).
    - ``loss_chunk_size``: the loss as ``lab.loss.chunked_cross_entropy`` computes it
      (``fit(..., loss_chunk_size=...)``): the head runs a chunk of tokens at a time and
      again in the backward pass, so no (B, T, vocab) logits are kept (``logits`` then
      counts what the loss keeps: the final hidden states).

    Temporaries of the backward pass (a layer's gradients in flight) are not counted;
    inference counts the largest block's saved tensors as its working set. A mixture
    of experts routes by the data, which fake tensors do not have: a model with MoE
    layers is counted by ``lab.formulas`` (every token routed, dropless).
    """
    choice("precision", precision, DTYPES)
    choice("optimizer", optimizer, OPTIMIZERS)
    method = FineTuning(finetune, lora_r, lora_targets, adapter_prompt_length, adapter_start_layer)
    seq_len = seq_len or config.block_size
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} ({value!r}) must be a positive integer")
    method.check(config)
    try:
        return _fake_step(
                config, batch_size, seq_len, precision, optimizer,
                activation_checkpointing, fused_attention, method, loss_chunk_size,
            )  # fmt: skip
    except DATA_DEPENDENT:
        require_formulas(config, "measure_memory(model, batch)")
    parts = formulas.memory(
        config, batch_size, seq_len, precision, optimizer,
        activation_checkpointing, fused_attention, method,
    )  # fmt: skip
    return MemoryBreakdown(**parts, notes="MoE routing depends on the data: from lab.formulas")


def fake_step(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    precision: str = "32-true",
    on_forward: Callable[[], None] | None = None,
    loss_chunk_size: int | None = None,
) -> tuple[MemoryBreakdown, _SavedTensors, dict[int, int]]:
    """A training step of a fake ``model`` (``fake_model``; run under its mode) on ``batch_size`` sequences of ``seq_len`` tokens, each distinct block run once:
    what it kept, the recorder, and which blocks repeat which (``_Repeats.runs``)."""
    x = torch.zeros(batch_size, seq_len, dtype=torch.long)
    repeats = _Repeats()
    step, saved = _record_step(
        model, (x, x), precision, None, None, on_forward, repeats, loss_chunk_size
    )
    return step, saved, repeats.runs


def _fake_step(
    config: Config,
    batch_size: int,
    seq_len: int,
    precision: str,
    optimizer: str | None,
    activation_checkpointing: bool,
    fused_attention: bool,
    method: FineTuning,
    loss_chunk_size: int | None,
) -> MemoryBreakdown:
    model, mode = fake_model(config, precision, method)
    if not fused_attention:  # the probe's path: scores materialised
        for module in model.modules():
            if hasattr(module, "attention_hook"):
                module.attention_hook = lambda name, t: t
    with mode:
        step, saved, _ = fake_step(model, batch_size, seq_len, precision, None, loss_chunk_size)
        if method.method == "none":
            model.set_kv_cache(batch_size, seq_len)
    if method.method == "none":
        kv = sum(b.nbytes for name, b in model.named_buffers() if "kv_cache" in name)
        return MemoryBreakdown(
            parameters=step.parameters, gradients=0, optimizer_state=0,
            activations=max(step.activations_per_layer, default=0),
            logits=step.logits - saved.total("loss"), kv_cache=kv,
            notes="inference: activations are the working set of one layer",
        )  # fmt: skip
    step.optimizer_state = formulas.optimizer_state(
        step.trainable_parameters, optimizer, DTYPES[precision][0].itemsize
    )
    if activation_checkpointing:  # blocks keep their inputs; one is recomputed at a time
        per_layer = step.activations_per_layer
        inputs = [saved.inputs[f"layer{i}"] if a else 0 for i, a in enumerate(per_layer)]
        step.activations += sum(inputs) - sum(per_layer) + max(per_layer, default=0)
        step.activations_per_layer = tuple(inputs)
    return step
