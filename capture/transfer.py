"""Host -> GPU copies that do not wait for the GPU.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory returns only once the copy is
done, and the copy waits for everything already queued on the stream: the whole previous
forward.  Between two batches the capture loop makes several such copies (the next batch's
inputs, the token indices, the answer positions); each one would hold the loop until the GPU
drained, then leave the GPU idle while the loop builds records, collates and sets up the next
trace.  Copied from pinned memory with ``non_blocking=True`` they are queued like kernels instead
(PyTorch's pinned-memory cache keeps the staging buffer until the copy has run).

>>> import torch
>>> host_to_device(torch.arange(3), torch.device("cpu")).tolist()
[0, 1, 2]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


def host_to_device(tensor: torch.Tensor, device: Any) -> torch.Tensor:
    """``tensor`` on ``device``: from the host to a GPU as a queued copy out of pinned memory
    (the loop does not wait for the GPU); any other move as ``tensor.to(device)``."""
    import torch

    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
