"""How training is spread over processes: one process, DDP or FSDP2.

The training loop only talks to a `Strategy`; the single-process one is the default and
the reference the distributed ones are tested against (same global batch -> same weights
within float tolerance).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, ContextManager

import torch
from torch import nn

from llava.device import resolve_device
from llava.errors import InputError


class Strategy:
    """One process. Subclasses override what changes with several processes."""

    name = "single"

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = resolve_device(device) if device else _default_device()

    # Identity of this process -------------------------------------------------------------
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # Model ----------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """Return the module the loop calls forward on (DDP wrapper, FSDP-sharded module, or itself)."""
        return model.to(self.device)

    def unwrap(self, wrapped: nn.Module) -> nn.Module:
        return wrapped

    def full_state_dict(self, wrapped: nn.Module) -> dict[str, torch.Tensor]:
        """Unsharded CPU state dict; complete on the main process (may be empty elsewhere)."""
        return {k: v.detach().cpu() for k, v in self.unwrap(wrapped).state_dict().items()}

    def load_full_state_dict(self, wrapped: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.unwrap(wrapped).load_state_dict(state)

    def optimizer_state_dict(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def clip_grad_norm(self, wrapped: nn.Module, max_norm: float) -> torch.Tensor:
        params = [p for p in wrapped.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def gradient_sync(self, wrapped: nn.Module, sync: bool) -> ContextManager:
        """Context for one micro-batch's backward; `sync=False` (all but the last micro-batch of
        an accumulated step) lets gradients accumulate locally without communication."""
        return contextlib.nullcontext()

    # Data --------------------------------------------------------------------------------------
    def shard(self, global_batch: list[int]) -> list[int]:
        """This process's share of one global batch (indices in a fixed, seed-determined order)."""
        return global_batch[self.rank::self.world_size]

    # Communication ----------------------------------------------------------------------------
    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def _default_device() -> torch.device:
    """The best device; under torchrun, this process's own GPU."""
    device = resolve_device()
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device.type == "cuda" else device


def make_strategy(name: str = "auto", device: str | None = None) -> Strategy:
    """`auto`: DDP under torchrun with several processes, else one process; or `single`/`ddp`/`fsdp`."""
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if name == "auto":
        name = "ddp" if under_torchrun else "single"
    if name == "single":
        return Strategy(device)
    if name in ("ddp", "fsdp"):
        from llava.train.distributed import DDPStrategy, FSDPStrategy

        return (DDPStrategy if name == "ddp" else FSDPStrategy)(device)
    raise InputError(f"unknown strategy {name!r}; valid: auto, single, ddp, fsdp")
