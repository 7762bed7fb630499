"""Device, precision and seeding, decided once: CUDA when present, bf16 autocast there, fp32 on CPU."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def get_device(local_rank: int | None = None) -> torch.device:
    if torch.cuda.is_available():
        _allow_tf32()
        return torch.device("cuda", local_rank if local_rank is not None else 0)
    return torch.device("cpu")


def _allow_tf32() -> None:
    # The float32 matmuls left outside autocast (losses, similarity tables) run on the tensor cores in TF32:
    # 10 mantissa bits, the precision CLIP-style training tolerates, several times the speed on Ampere and later.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op on CPU, where fp32 is both faster and exact. Every trainer's and encoder's
    forward pass runs inside it."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def weights_dtype(device: torch.device) -> torch.dtype:
    """The dtype to load large pretrained models in: bf16 on CUDA (a 7B model does not fit in fp32 on one card),
    fp32 on CPU. Passed to `from_pretrained`, never set as torch's global default."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pretrained_dtype_kwargs(device: torch.device) -> dict[str, torch.dtype]:
    """The keyword that sets the load dtype of `from_pretrained` (`dtype` in transformers v5 and diffusers >= 0.40;
    both deprecate `torch_dtype`). Every hub model the project loads passes it, so none loads in a library's
    default."""
    return {"dtype": weights_dtype(device)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (run seed, item id, round, role...), independent of PYTHONHASHSEED."""
    import hashlib

    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def set_threads(threads: int) -> None:
    """Torch CPU threads for this process: 0 keeps torch's default (one per core).

    Every stage takes a `threads` setting and passes it here, so the choice lives in one place. One thread
    is the better choice only when the CPU is shared with other busy processes (OpenMP spin-waits).
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
