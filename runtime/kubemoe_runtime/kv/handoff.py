"""The torch engine's side of vLLM's P/D protocol: a prefill keeps a finished prompt's KV under a handle,
a decode pulls it and continues without recomputing the prompt.

    router  -> prefill   request + kv_transfer_params {"do_remote_decode": true}, max_tokens=1
    prefill              runs the prompt, samples the first token, copies the slot's KV (every layer,
                         positions 0..n-1) into `KVStore` under a fresh handle (kept `ttl_s`, read once)
    prefill -> router    the answer + kv_transfer_params {"do_remote_prefill": true, "remote_handle": H,
                         "remote_host": HOST, "remote_port": PORT, ...}
    router  -> decode    the original request + those kv_transfer_params
    decode               GET http://HOST:PORT/v1/kv/H (safetensors bytes, below); checks the prompt
                         matches; the scheduler imports the KV into the request's slot on its rank and
                         emits the first token, so decode's first forward is the first generated token at
                         position n — the prompt is never run again (kubemoe_prompt_tokens_total does not
                         move; kubemoe_kv_pulled_tokens_total does). A failed pull falls back to a local
                         prefill (and counts kubemoe_kv_pull_failures_total).

Wire format: one safetensors file, tensors "L.NAME" (layer L, cache field NAME: "k", "v", or MLA's
"latent", "k_rope"), each [n, ...]; metadata first_token, prompt_tokens and prompt_sha256.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

KV = list[dict[str, torch.Tensor]]  # per layer: cache field -> [n, ...]
ENGINE_ID = "kubemoe-torch"
DEFAULT_TTL_S = 60.0
DEFAULT_MAX_ENTRIES = 1024
_WIRE_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}  # KV-cache dtypes, by safetensors' names


def prompt_digest(prompt_ids: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, prompt_ids)).encode()).hexdigest()


@dataclass(frozen=True)
class PrefilledKV:
    """A finished prefill: the prompt's KV and the token sampled after it."""

    kv: KV
    first_token: int
    prompt_tokens: int
    prompt_sha256: str

    def encode(self) -> bytes:
        """The safetensors bytes, laid out here with one copy of the tensors: safetensors' `save` makes
        two (its buffer, then `bytes`), each into fresh pages — twice the time (bench/bench_kv_handoff.py)."""
        header: dict[str, object] = {
            "__metadata__": {
                "first_token": str(self.first_token),
                "prompt_tokens": str(self.prompt_tokens),
                "prompt_sha256": self.prompt_sha256,
            }
        }
        views: list[memoryview] = []
        offset = 0
        for i, layer in enumerate(self.kv):
            for name, t in layer.items():
                data = t.contiguous().reshape(-1).view(torch.uint8).numpy().data  # no copy
                header[f"{i}.{name}"] = {
                    "dtype": _WIRE_DTYPES[t.dtype],
                    "shape": list(t.shape),
                    "data_offsets": [offset, offset + data.nbytes],
                }
                views.append(data)
                offset += data.nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
        return b"".join([len(head).to_bytes(8, "little"), head, *views])

    @classmethod
    def decode(cls, data: bytes) -> PrefilledKV:
        """Parse the wire format; ValueError if it is not one."""
        try:
            tensors = st_load(data)
            metadata = _metadata(data)
            first_token = int(metadata["first_token"])
            prompt_tokens = int(metadata["prompt_tokens"])
            digest = metadata["prompt_sha256"]
        except (KeyError, ValueError, SafetensorError) as err:
            raise ValueError(f"not a KV hand-off payload: {err}") from err
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            index, _, name = key.partition(".")
            layers.setdefault(int(index), {})[name] = tensor
        kv = [layers[i] for i in sorted(layers)]
        if sorted(layers) != list(range(len(layers))):
            raise ValueError("KV hand-off payload skips layers")
        return cls(kv=kv, first_token=first_token, prompt_tokens=prompt_tokens, prompt_sha256=digest)


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (8-byte little-endian length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ValueError("bad metadata")
    return {str(k): str(v) for k, v in metadata.items()}


def remote_prefill_params(*, handle: str, host: str | None, port: int | None) -> dict[str, object]:
    """The kv_transfer_params a prefill answers with (vLLM's keys, plus the torch engine's handle)."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": ENGINE_ID,
        "remote_handle": handle,
        "remote_host": host,
        "remote_port": port,
    }


class KVStore:
    """Prefilled KV waiting for its decode: read once, or dropped after `ttl_s`; at most `max_entries`."""

    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, PrefilledKV]] = OrderedDict()

    def put(self, prefilled: PrefilledKV) -> str:
        handle = secrets.token_urlsafe(16)
        with self._lock:
            self._expire()
            self._entries[handle] = (self.clock() + self.ttl_s, prefilled)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return handle

    def take(self, handle: str) -> PrefilledKV | None:
        with self._lock:
            self._expire()
            entry = self._entries.pop(handle, None)
        return None if entry is None else entry[1]

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def _expire(self) -> None:
        now = self.clock()
        while self._entries:
            handle, (deadline, _) = next(iter(self._entries.items()))
            if deadline > now:
                return
            del self._entries[handle]
