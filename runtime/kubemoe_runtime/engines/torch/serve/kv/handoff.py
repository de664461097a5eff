"""The torch engine's side of vLLM's P/D protocol: a prefill keeps a finished prompt's KV under a handle,
a decode pulls it and continues without recomputing the prompt.

    router  -> prefill   request + kv_transfer_params {"do_remote_decode": true}, max_tokens=1
    prefill              runs the prompt, samples the first token, copies the slot's KV (every layer,
                         positions 0..n-1) into `KVStore` under a fresh handle (kept `ttl_s`, read once)
    prefill -> router    the answer + kv_transfer_params {"do_remote_prefill": true, "remote_handle": H,
                         "remote_host": HOST, "remote_port": PORT, ...}
    router  -> decode    the original request + those kv_transfer_params (the router signs what it sends
                         and servers verify it: pod/kv_auth.py; a client's own are dropped)
    decode               GET http://HOST:PORT/v1/kv/H (safetensors bytes, below); checks the prompt
                         matches; the scheduler imports the KV into the request's slot on its rank and
                         emits the first token, so decode's first forward is the first generated token at
                         position n — the prompt is never run again (kubemoe_prompt_tokens_total does not
                         move; kubemoe_kv_pulled_tokens_total does). A failed pull falls back to a local
                         prefill (and counts kubemoe_kv_pull_failures_total), as does a KV that does
                         not fit the model (serve/kv/layout.py).
    router  -> prefill   only when no decode will fetch H (the decode refused the request, none could be
                         reached, the client left first): DELETE /v1/kv/H, signed, drops it at once
                         (serve/kv/release.py; the router's side: router/kv_release.py)

Wire format: one safetensors file, tensors "L.NAME" (layer L, cache field NAME: "k", "v", or MLA's
"latent", "k_rope"), each [n, ...]; metadata first_token, prompt_tokens and prompt_sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

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

    @property
    def nbytes(self) -> int:
        """The bytes of its tensors."""
        return sum(t.nbytes for layer in self.kv for t in layer.values())

    def wire(self) -> tuple[list[memoryview], int]:
        """The safetensors file as pieces, without copying a tensor: the 8-byte length and the header, then
        each tensor's memory in place; and the total size. What the prefill sends (serve/app.py)."""
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
        prefix = memoryview(len(head).to_bytes(8, "little") + head)
        return [prefix, *views], prefix.nbytes + offset

    def encode(self) -> bytes:
        """The safetensors bytes in one copy of the tensors (safetensors' `save` makes two)."""
        return b"".join(self.wire()[0])

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> PrefilledKV:
        """Parse the wire format; ValueError, saying what is wrong, if it is not one.

        The bytes are untrusted: the header must be one JSON object of known dtypes, shapes that match
        their byte counts, and offsets that tile the data exactly (in bounds, in order, no gap, no
        overlap), as safetensors' own reader requires; every tensor is [prompt_tokens, ...], and the
        layers run 0..L-1. The tensors are views of `data` (no copy) when it is writable (a bytearray, as
        serve/kv/pull.py reads into); read-only bytes are copied once first. Each tensor has its own storage
        over its slice, so pickling one (the step broadcast to other ranks) carries only its bytes.
        """
        view = memoryview(data).cast("B")
        if view.readonly:
            view = memoryview(bytearray(view))
        try:
            header, start = _header(view)
            metadata = header.pop("__metadata__", None)
            if not isinstance(metadata, dict):
                raise ValueError("no __metadata__ object in the header")
            first_token = int(metadata["first_token"])
            prompt_tokens = int(metadata["prompt_tokens"])
            digest = metadata["prompt_sha256"]
            if not isinstance(digest, str):
                raise ValueError("prompt_sha256 is not a string")
            if prompt_tokens < 0:
                raise ValueError(f"prompt_tokens {prompt_tokens} < 0")
            layers = _tensors(header, view, start=start, rows=prompt_tokens)
        except (KeyError, ValueError, TypeError, ArithmeticError, RecursionError) as err:
            # ArithmeticError: int() of a metadata number JSON reads as inf (1e400: OverflowError);
            # RecursionError: a header nested deeper than json.loads recurses. Untrusted bytes are a
            # ValueError whatever is wrong with them: the decode then prefills the prompt itself.
            raise ValueError(f"not a KV hand-off payload: {type(err).__name__}: {err}") from err
        return cls(kv=layers, first_token=first_token, prompt_tokens=prompt_tokens, prompt_sha256=digest)


_DTYPES = {name: dtype for dtype, name in _WIRE_DTYPES.items()}
_MAX_HEADER = 64 << 20  # bytes of JSON; a 61-layer MLA KV needs about 12 KB


def _header(view: memoryview) -> tuple[dict[str, object], int]:
    """The safetensors header (8-byte little-endian length, then a JSON object) and where the data starts."""
    if view.nbytes < 8:
        raise ValueError(f"{view.nbytes} bytes: shorter than the 8-byte header length")
    size = int.from_bytes(view[:8], "little")
    if size > min(_MAX_HEADER, view.nbytes - 8):
        raise ValueError(f"header length {size} does not fit in {view.nbytes} bytes")
    header = json.loads(bytes(view[8 : 8 + size]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + size


def _tensors(header: dict[str, object], view: memoryview, *, start: int, rows: int) -> KV:
    """Views of `view`'s data section per the header entries, checked against it; layers in order."""
    entries: list[tuple[int, int, str, torch.dtype, list[int]]] = []
    data_size = view.nbytes - start
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{key}: not a tensor entry")
        dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise ValueError(f"{key}: dtype {entry.get('dtype')!r} is not a KV dtype ({', '.join(_DTYPES)})")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{key}: shape {shape!r} is not a list of sizes")
        if not shape or shape[0] != rows:
            raise ValueError(f"{key}: shape {shape} is not [prompt_tokens={rows}, ...]")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ValueError(f"{key}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise ValueError(f"{key}: data_offsets {offsets} out of the {data_size}-byte data section")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{key}: {end - begin} bytes for shape {shape} of {entry['dtype']}")
        entries.append((begin, end, key, dtype, shape))
    entries.sort()
    at = 0
    for begin, end, key, _, _ in entries:
        if begin != at:
            raise ValueError(
                f"{key}: data_offsets start at {begin}, not where the previous tensor ends ({at})"
            )
        at = end
    if at != data_size:
        raise ValueError(f"the tensors cover {at} bytes of a {data_size}-byte data section")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for begin, end, key, dtype, shape in entries:
        index, dot, name = key.partition(".")
        if not (dot and index.isdigit() and name):
            raise ValueError(f"tensor name {key!r} is not LAYER.FIELD")
        layer = layers.setdefault(int(index), {})
        if name in layer:
            raise ValueError(f"tensor {key!r}: layer {int(index)} has {name!r} twice")
        if end == begin:
            tensor = torch.empty(shape, dtype=dtype)
        else:
            tensor = torch.frombuffer(
                view, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin
            )
        layer[name] = tensor.view(shape)
    if sorted(layers) != list(range(len(layers))):
        raise ValueError(f"layers {sorted(layers)} are not 0..{len(layers) - 1}")
    return [layers[i] for i in range(len(layers))]


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
    """Prefilled KV waiting for its decode: read once, or dropped after `ttl_s`; at most `max_entries`,
    and at most `max_bytes` of tensors (None: no bound), the oldest dropped first. Each entry is a copy
    of a prompt's KV held in the API pod's memory, so the bytes bound is what keeps prefills whose
    decode never comes from filling it: the router releases those it knows of at once (kv/release.py),
    and the server drops those whose answer, naming the handle, reached no one (its caller left first:
    serve/in_flight.py); one whose router read the answer and then died or could not reach this pod
    expires."""

    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, PrefilledKV]] = OrderedDict()
        self._bytes = 0

    def put(self, prefilled: PrefilledKV) -> str:
        handle = secrets.token_urlsafe(16)
        with self._lock:
            self._expire()
            self._entries[handle] = (self.clock() + self.ttl_s, prefilled)
            self._bytes += prefilled.nbytes
            while len(self._entries) > self.max_entries or (
                self.max_bytes is not None and self._bytes > self.max_bytes and len(self._entries) > 1
            ):
                self._drop(next(iter(self._entries)))
        return handle

    @property
    def nbytes(self) -> int:
        with self._lock:
            self._expire()
            return self._bytes

    def _drop(self, handle: str) -> PrefilledKV | None:
        entry = self._entries.pop(handle, None)
        if entry is None:
            return None
        self._bytes -= entry[1].nbytes
        return entry[1]

    def take(self, handle: str) -> PrefilledKV | None:
        with self._lock:
            self._expire()
            return self._drop(handle)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def expire(self) -> None:
        """Drop what has passed its ttl now. put/take/len/nbytes do so too, but nothing may call them for
        a long while (the router died, or its decode answered without pulling, and no P/D request came
        since): the scheduler's loop calls this, idle or not (serve/scheduler.py). Cheap when nothing is
        due: the oldest entry's deadline is looked at, nothing else."""
        with self._lock:
            self._expire()

    def _expire(self) -> None:
        now = self.clock()
        while self._entries:
            handle, (deadline, _) = next(iter(self._entries.items()))
            if deadline > now:
                return
            self._drop(handle)
