"""Block swap: run a stack of transformer blocks whose first N blocks live in host memory.

A swapped block keeps its weights on the host (pinned when the compute device is CUDA, so copies are asynchronous).
Just before it runs, its tensors are copied to the compute device (``non_blocking``) and the block is called with
those copies through ``torch.func.functional_call``; the copies are dropped when it returns, so the host tensors
stay the only owned weights. On CUDA the next swapped block's copy starts on a side stream while the current block
computes, so at most two swapped blocks sit on the device at a time.

What it saves (Wan2.1 I2V 14B + InfiniteTalk, a block 464.2 M parameters = 0.928 GB bf16 / 0.464 GB fp8): the
device holds the non-swapped blocks plus at most 2 swapped ones, i.e. (40 - N + min(N, 2)) blocks instead of 40;
the host holds N blocks. Each step then moves N blocks over PCIe per forward (bf16, N = 40: 37 GB; at ~25 GB/s
about 1.5 s, overlapped with compute).

When the compute device is the host itself (CPU), swapping is a no-op: the blocks run as they are. ``force=True``
makes every swapped block go through the same copy-and-call path even then (the tests use it to check that the
result does not depend on the number of swapped blocks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call

from ..errors import InputError

__all__ = ["BlockSwap", "pin_module_"]


def pin_module_(module: nn.Module) -> nn.Module:
    """Move a module's parameters and buffers to pinned host memory in place (needs CUDA to be available)."""
    for p in module.parameters():
        p.data = p.data.to("cpu").pin_memory()
    for name, b in module.named_buffers():
        parent, _, attr = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        owner._buffers[attr] = b.to("cpu").pin_memory()
    return module


class BlockSwap:
    """Runs ``blocks[i]`` for i < ``num_swapped`` from host memory (see the module docstring).

    blocks: the model's ModuleList; num_swapped: 0 .. len(blocks), how many of the first blocks stay on the host;
    device: the compute device. The non-swapped blocks are moved to ``device`` and the swapped ones to the host
    (pinned on CUDA) unless ``place=False`` (a loader that already put them there). ``fetches`` counts the blocks
    copied so far (for tests and logs).
    """

    def __init__(self, blocks: nn.ModuleList, num_swapped: int, device, *, place: bool = True, force: bool = False,
                 prefetch: bool = True):
        n = int(num_swapped)
        if not 0 <= n <= len(blocks):
            raise InputError(f"The number of swapped blocks must lie in 0..{len(blocks)}, got {num_swapped}.")
        self.device = torch.device(device)
        self.num_swapped = n
        self.active = n > 0 and (force or self.device.type != "cpu")
        self.prefetch = prefetch and self.device.type == "cuda"
        self.fetches = 0
        self._pending: dict[int, tuple[dict, Any]] = {}
        self._stream = torch.cuda.Stream(self.device) if self.prefetch else None
        self._blocks = blocks
        if place:
            for i, blk in enumerate(blocks):
                if i < n and self.device.type == "cuda":
                    pin_module_(blk)
                else:
                    blk.to("cpu" if i < n else self.device)

    def is_swapped(self, index: int) -> bool:
        return self.active and index < self.num_swapped

    def _copy(self, block: nn.Module) -> dict[str, torch.Tensor]:
        state = {**dict(block.named_parameters()), **dict(block.named_buffers())}
        if self.device.type == "cpu":               # force=True on the host: a real copy, same code path
            return {k: v.detach().clone() for k, v in state.items()}
        return {k: v.detach().to(self.device, non_blocking=True) for k, v in state.items()}

    def _fetch(self, index: int) -> dict[str, torch.Tensor]:
        self.fetches += 1
        if index in self._pending:
            state, event = self._pending.pop(index)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in state.values():                # the side stream allocated them; the compute stream frees them
                t.record_stream(current)
            return state
        return self._copy(self._blocks[index])

    def _start_prefetch(self, index: int) -> None:
        if not self.prefetch or not self.is_swapped(index) or index in self._pending:
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            state = self._copy(self._blocks[index])
            event = torch.cuda.Event()
            event.record(self._stream)
        self._pending[index] = (state, event)

    def run(self, index: int, block: nn.Module, *args, **kwargs):
        """``block(*args, **kwargs)``, from host memory when the block is swapped."""
        if not self.is_swapped(index):
            return block(*args, **kwargs)
        state = self._fetch(index)
        self._start_prefetch(index + 1)
        out = functional_call(block, state, args, kwargs, tie_weights=False, strict=True)
        del state
        return out
