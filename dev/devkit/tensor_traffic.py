"""What a run would make a GPU wait for or copy, counted on any device, per evaluation of the model and per place
in the code: host reads of tensor values ('read', each a host sync on a GPU), calls that put a tensor on a device
or make one from host data ('transfer', on a GPU a copy, from the host a blocking one), and conversions to a dtype
on the tensor's device ('conversion'). On a CPU nothing is on a device, so every such call is counted, also those
that would find the tensor already there: compare two runs that differ in one thing.

    traffic = TensorTraffic()
    with traffic:                      # a TorchFunctionMode: sees every torch call made inside
        ...                            # call traffic.next_evaluation() at the start of each model evaluation
    traffic.per_evaluation("read")     # [reads in evaluation 0, 1, ...]; before the first: traffic.count(None, "read")
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

# Python's and torch's ways of reading tensor values on the host; nonzero and unique size their output by the
# values, so they wait for them too.
HOST_READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero", "unique",
                        "equal", "allclose"})
# Calls that put a tensor on a device (`to` with a device or another tensor), and tensors made from host data.
TRANSFERS = frozenset({"copy_", "cuda", "cpu", "pin_memory", "tensor", "as_tensor", "new_tensor", "from_numpy"})
# Calls that convert a tensor to a dtype on its device (`to` with a dtype alone).
CONVERSIONS = frozenset({"type", "float", "half", "double", "bfloat16", "long", "int", "bool"})
_TORCH = str(Path(torch.__file__).parent)


def kind_of(name: str, args: tuple, kwargs: dict) -> str | None:
    """'read', 'transfer', 'conversion' or None for a torch function called with these arguments."""
    if name in HOST_READS:
        return "read"
    if name in TRANSFERS:
        return "transfer"
    if name in CONVERSIONS:
        return "conversion"
    if name == "to":
        targets = [*args[1:], *kwargs.values()]
        if "device" in kwargs or any(isinstance(target, (torch.device, str, int, torch.Tensor)) and not isinstance(target, bool)
                                     for target in targets):
            return "transfer"
        return "conversion"
    return None


class TensorTraffic(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.evaluation: int | None = None  # None before the first evaluation
        self.counts: collections.Counter = collections.Counter()  # (evaluation, kind, place) -> calls

    def next_evaluation(self) -> None:
        self.evaluation = 0 if self.evaluation is None else self.evaluation + 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        kind = kind_of(name, args, kwargs)
        if kind is not None:
            self.counts[self.evaluation, kind, f"{_caller()}:{name}"] += 1
        return func(*args, **kwargs)

    def count(self, evaluation: int | None, kind: str, places: str = "") -> int:
        """Calls of a kind in one evaluation, at places ('folder/file.py:function:call') that contain `places`."""
        return sum(n for (at, counted_kind, place), n in self.counts.items()
                   if at == evaluation and counted_kind == kind and places in place)

    def per_evaluation(self, kind: str, places: str = "") -> list[int]:
        evaluations = 0 if self.evaluation is None else self.evaluation + 1
        return [self.count(evaluation, kind, places) for evaluation in range(evaluations)]

    def places(self, evaluation: int | None, kind: str) -> dict[str, int]:
        return {place: n for (at, counted_kind, place), n in self.counts.items() if at == evaluation and counted_kind == kind}


def _caller() -> str:
    """folder/file:function of the innermost frame outside torch (the code that made the call)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = Path(frame.f_code.co_filename)
    return f"{path.parent.name}/{path.name}:{frame.f_code.co_name}"
