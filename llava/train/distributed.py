"""Training over several processes: DDP and FSDP2 strategies, launched with `torchrun`.

Both init the default process group from torchrun's environment (`RANK`, `WORLD_SIZE`,
`LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`): NCCL on `cuda:LOCAL_RANK` when CUDA is there,
gloo on CPU otherwise. Contract with the training loop (tests/test_distributed.py checks it
against the single-process `Strategy` on the same global batch):

* freeze parameters and load weights *before* `wrap`, and build the optimizer *after* it
  (FSDP2 swaps parameters for sharded DTensors);
* every rank runs the same number of forward/backward passes per step, each on a non-empty
  `shard(...)` of the global batch;
* DDP and FSDP2 average gradients over ranks, so a loss normalised by the *global* number of
  target tokens must be multiplied by `world_size`;
* state dicts are complete on the main process; the `load_*` methods read only the main
  process's argument and broadcast it (other ranks may pass `{}`). Optimizer states are
  keyed by parameter name (DCP's full format); a one-process `Optimizer.state_dict()` loads
  too, so a run may resume under another strategy or number of processes.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from llava.device import resolve_device
from llava.errors import DeviceError
from llava.train.strategy import Strategy

_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)
_LOAD = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
# Like `Optimizer.load_state_dict`: a parameter that never had a step (no gradient yet) has no state.
_LOAD_OPTIM = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)


class _ProcessGroupStrategy(Strategy):
    """Shared by DDP and FSDP2: process group set-up, identity, data split and collectives."""

    def __init__(self, device: str | torch.device | None = None, timeout: timedelta | None = None) -> None:
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this PyTorch build")
        self._owns_group = not dist.is_initialized()
        if self._owns_group and "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                f"the {self.name!r} strategy needs a process group: launch with torchrun, e.g. "
                "`torchrun --nproc_per_node 2 -m llava.train ...` (WORLD_SIZE is not set)")
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = self._pick_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self._owns_group:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
            dist.init_process_group(backend, **kwargs)

    def _pick_device(self, device: str | torch.device | None) -> torch.device:
        if device is None:
            return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        device = resolve_device(device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        if device.type not in ("cuda", "cpu"):
            raise DeviceError(f"distributed training runs on cuda or cpu, not {device.type}")
        return device

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    # Checkpoints: FQN-keyed, gathered to the main process, broadcast from it on load -------------
    def full_state_dict(self, wrapped: nn.Module) -> dict[str, torch.Tensor]:
        return get_model_state_dict(wrapped, options=_SAVE)

    def load_full_state_dict(self, wrapped: nn.Module, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(wrapped, state if self.is_main else {}, options=_LOAD)

    def optimizer_state_dict(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return get_optimizer_state_dict(wrapped, optimizer, options=_SAVE)

    def load_optimizer_state_dict(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        """Load a full optimizer state from the main process: ours (keyed by parameter name) or a
        one-process `Optimizer.state_dict()` (integer ids, matched by position like torch does)."""
        names = {id(p): n for n, p in self.unwrap(wrapped).named_parameters()}
        payload: list[Any] = [None]
        if self.is_main:
            try:
                state = _keyed_by_name(state, optimizer, names)
                payload = [sorted(state.get("state", {}))]
            except ValueError as e:  # tell every rank, or the others would wait in the broadcast
                payload = [str(e)]
        else:
            state = {}
        dist.broadcast_object_list(payload, src=0)
        if isinstance(payload[0], str):
            raise ValueError(payload[0])
        set_optimizer_state_dict(wrapped, optimizer, state, options=_LOAD_OPTIM)
        # DCP first gives every parameter a state with a zero-gradient step; drop it where the
        # checkpoint had none, or that parameter's next update would use the wrong step count.
        keep = set(payload[0])
        for param in [p for p in optimizer.state if names.get(id(p)) not in keep]:
            del optimizer.state[param]

    # Communication ---------------------------------------------------------------------------------
    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over ranks, on `value`'s device (the input is left unchanged)."""
        total = value.detach().to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(value.device)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        """Barrier, then tear the group down (a bare destroy can crash at exit under FSDP2/gloo)."""
        if dist.is_initialized():
            self.barrier()
            if self._owns_group:
                dist.destroy_process_group()


class DDPStrategy(_ProcessGroupStrategy):
    """Replicated model, gradients all-reduced (averaged) during backward.

    `find_unused_parameters=True` by default: a rank whose shard is text-only never runs the
    projector, and without it the ranks' gradient all-reduces fall out of step (gloo aborts
    with a size mismatch; NCCL may hang). `static_graph` is no alternative: the set of used
    parameters changes from step to step. DDP still needs at least one trainable parameter
    used on every rank: with only the projector trainable (stage 1), a text-only shard cannot
    train (its loss has no gradient).
    """

    name = "ddp"

    def __init__(self, device: str | torch.device | None = None, timeout: timedelta | None = None,
                 find_unused_parameters: bool = True) -> None:
        super().__init__(device, timeout)
        self.find_unused_parameters = find_unused_parameters

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model.to(self.device), device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters)

    def unwrap(self, wrapped: nn.Module) -> nn.Module:
        return getattr(wrapped, "module", wrapped)

    def gradient_sync(self, wrapped: nn.Module, sync: bool) -> ContextManager:
        """DDP's `no_sync` for all but the last micro-batch: one all-reduce per optimizer step,
        not one per micro-batch (with find_unused_parameters, DDP also syncs what only an
        earlier micro-batch used)."""
        return contextlib.nullcontext() if sync else wrapped.no_sync()


class FSDPStrategy(_ProcessGroupStrategy):
    """FSDP2 (`fully_shard`): each language-model decoder layer is one unit, the rest the root.

    Frozen parameters outside the decoder layers (the vision tower, frozen embeddings) are left
    out of sharding and replicated, like DDP would: no all-gather for weights that never change.
    The vision tower and projector stay in the root unit on purpose: a rank whose shard is
    text-only skips them, and a unit of their own would leave the other ranks waiting in its
    all-gather. Unused-on-this-rank root parameters reduce-scatter zeros instead (so a step with
    no image on any rank gives the projector a zero gradient, not `None`, unlike one process).
    With frozen token embeddings, their output is made to require grad: otherwise a text-only
    rank's first decoder layer gets an input without gradient, FSDP2 reduces that layer at the
    end of backward instead of in order, and the ranks' reduce-scatters no longer match.
    """

    name = "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model.to(self.device)
        embeddings = _input_embeddings(model)
        if embeddings is not None and not any(p.requires_grad for p in embeddings.parameters()):
            embeddings.register_forward_hook(_require_grad_output)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        layers = decoder_layers(model)
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        frozen = {p for p in model.parameters() if not p.requires_grad and id(p) not in in_layers}
        fully_shard(model, mesh=mesh, ignored_params=frozen or None)
        model.set_reduce_scatter_unused_params(True)
        return model

    def clip_grad_norm(self, wrapped: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip over the global (all-shard) norm; returns it as a plain tensor."""
        from torch.distributed.tensor import DTensor

        norm = super().clip_grad_norm(wrapped, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _keyed_by_name(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                   names: dict[int, str]) -> dict[str, Any]:
    """`state` keyed by parameter name; raises ValueError when it does not fit `optimizer`."""
    groups = state.get("param_groups", [])
    saved = [k for g in groups for k in g["params"]]
    current = [names.get(id(p), "?") for g in optimizer.param_groups for p in g["params"]]
    if saved and not isinstance(saved[0], str):  # integer ids: the optimizer's parameter order
        if len(saved) != len(current) or len(groups) != len(optimizer.param_groups):
            raise ValueError(f"optimizer state has {len(saved)} parameters in {len(groups)} groups, the optimizer "
                             f"{len(current)} in {len(optimizer.param_groups)}")
        rename = dict(zip(saved, current))
        state = {"state": {rename[k]: v for k, v in state.get("state", {}).items()},
                 "param_groups": [{**g, "params": [rename[k] for k in g["params"]]} for g in groups]}
    unknown = sorted(set(state.get("state", {})) - set(current))
    if unknown:
        raise ValueError(f"optimizer state for parameters this optimizer does not have: {unknown[:5]}")
    return state


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    """The token embedding module of a LlavaModel (`input_embeddings`) or a transformers model."""
    for getter in ("input_embeddings", "get_input_embeddings"):
        if hasattr(model, getter):
            return getattr(model, getter)()
    return None


def _require_grad_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    """Forward hook: make a frozen module's output part of the autograd graph (when training)."""
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's transformer blocks: modules whose class name ends in `DecoderLayer`
    or is listed in the model's `_no_split_modules`, outermost match only."""
    lm = getattr(model, "language_model", model)
    names = set(getattr(lm, "_no_split_modules", None) or [])
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in lm.modules():
        if id(module) in inside:
            continue
        cls = type(module).__name__
        if cls.endswith("DecoderLayer") or cls in names:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found
