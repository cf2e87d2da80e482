"""A preallocated KV cache that the decoder writes into directly.

Two contracts, chosen by the manifest's attention form (`in_place`):
- fused (`manifest["attention"]["form"] == "gqa"`, graph_passes/fuse_attention.py): one buffer per layer and kind,
  [B, KVH, max_len, D], bound once per pass as both `past_key_values.*` and `present.*` at the same address;
  GroupQueryAttention reads the first `length` slots and writes only the new tokens after them, in place. Nothing
  is copied, whatever the context length (FIELD-NOTES: the unfused form's Concat copied the whole cache per step).
- unfused (opset 18/23 as exported), described below.

The decoder graph takes `past_key_values.{i}.{key,value}` [B, KVH, P, D] and returns `present.*` [B, KVH, P+S, D].
Each layer owns two flat buffers per kind, each big enough for [B, KVH, max_len, D]. A pass reads its past from
one buffer and the graph writes its present into the other through IOBinding (ping-pong), so no step allocates or
copies the cache on the host: a C-contiguous [B, KVH, n, D] array is the first B*KVH*n*D elements of a flat buffer,
whatever n is. On a GPU the buffers are device OrtValues and the cache never leaves the device.

`allocator(n, dtype)`: another source of flat buffers (anything with `data_ptr()` and `numpy()`), e.g. the TensorRT
backend's device memory, so that the cache needs no onnxruntime-gpu there. Without one, OrtValues on `device`.
On CUDA a step then moves only the small per-step tensors between host and device (embeds [B, 1, d], the mask
[B, T], positions, and the last position's logits [B, V]); the cache itself is read and written in place.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype=np.float32, device: str = "cpu", device_id: int = 0, allocator=None, in_place: bool = False):
        self.num_layers, self.batch, self.kv_heads, self.head_dim = num_layers, batch, kv_heads, head_dim
        self.max_len = max_len
        self.dtype = np.dtype(dtype)
        self.device, self.device_id = device, device_id
        self.length = 0  # tokens held
        self.in_place = in_place
        self._flip = 0
        self._shared = None  # (session, IOBinding, host output array or None) of shared_binding
        self.bound_extra: dict = {}  # inputs bound to the shared binding that stay bound (name -> array)
        n = batch * kv_heads * max_len * head_dim
        if allocator is None:
            import onnxruntime as ort

            def allocator(size, dtype):
                return ort.OrtValue.ortvalue_from_shape_and_type([size], dtype, device, device_id)
        # buffers[side][layer][0=key, 1=value]; one side when the decoder writes in place
        sides = 1 if in_place else 2
        self._buffers = [[[allocator(n, self.dtype) for _ in range(2)] for _ in range(num_layers)]
                         for _ in range(sides)]

    def shape(self, length: int) -> list[int]:
        return [self.batch, self.kv_heads, length, self.head_dim]  # [B, KVH, T, D]

    def bind(self, binding, new_tokens: int) -> None:
        """Bind past (this side, current length) as inputs and present (other side, +new_tokens) as outputs."""
        total = self.check_room(new_tokens)
        if self.in_place:
            self._bind_shared(binding, 0, self.batch)
            return
        src, dst = self._buffers[self._flip], self._buffers[1 - self._flip]
        for layer in range(self.num_layers):
            for kind, name in enumerate(("key", "value")):
                binding.bind_input(f"past_key_values.{layer}.{name}", self.device, self.device_id, self.dtype,
                                   self.shape(self.length), src[layer][kind].data_ptr())
                binding.bind_output(f"present.{layer}.{name}", self.device, self.device_id, self.dtype,
                                    self.shape(total), dst[layer][kind].data_ptr())

    def bind_rows_prefill(self, binding, row_start: int, rows: int) -> None:
        """Bind a prefill of `rows` batch rows (no past) whose present goes straight into rows row_start.. of the
        current side, at the current length. In a C-contiguous [B, KVH, T, D] buffer, rows r..r+n are one block,
        so a batch-n present is written in place; the other rows are untouched and nothing flips (IAVA writes its
        contrastive stream's prefill into the slots of the general-instruction rows this way)."""
        if row_start < 0 or row_start + rows > self.batch:
            raise ValueError(f"rows {row_start}..{row_start + rows - 1} are outside a cache of {self.batch} rows")
        if self.in_place:  # a prompt of the current length: GroupQueryAttention writes slots 0..length-1 of the rows
            self._bind_shared(binding, row_start, rows)
            return
        row_bytes = self.kv_heads * self.length * self.head_dim * self.dtype.itemsize
        cur = self._buffers[self._flip]
        empty = [rows, self.kv_heads, 0, self.head_dim]
        for layer in range(self.num_layers):
            for kind, name in enumerate(("key", "value")):
                ptr = cur[layer][kind].data_ptr()
                binding.bind_input(f"past_key_values.{layer}.{name}", self.device, self.device_id, self.dtype, empty,
                                   ptr)
                binding.bind_output(f"present.{layer}.{name}", self.device, self.device_id, self.dtype,
                                    [rows, self.kv_heads, self.length, self.head_dim], ptr + row_start * row_bytes)

    def _bind_shared(self, binding, row_start: int, rows: int) -> None:
        """Past and present of rows row_start.. as one [rows, KVH, max_len, D] block, input and output alike."""
        shape = [rows, self.kv_heads, self.max_len, self.head_dim]  # [B, KVH, M, D]
        offset = row_start * self.kv_heads * self.max_len * self.head_dim * self.dtype.itemsize
        for layer in range(self.num_layers):
            for kind, name in enumerate(("key", "value")):
                ptr = self._buffers[0][layer][kind].data_ptr() + offset
                binding.bind_input(f"past_key_values.{layer}.{name}", self.device, self.device_id, self.dtype, shape,
                                   ptr)
                binding.bind_output(f"present.{layer}.{name}", self.device, self.device_id, self.dtype, shape, ptr)

    def check_room(self, new_tokens: int) -> int:
        """-> the length after `new_tokens` more; ValueError when the buffers cannot hold it."""
        total = self.length + new_tokens
        if total > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {total} requested")
        return total

    def shared_binding(self, session, first_output: str = "logits", first_host=None):
        """One IOBinding per session for the in-place form, its KV buffers bound once: past and present are the
        same [B, KVH, M, D] blocks every step, so only the inputs (rebound by name, which replaces them) change.
        `first_output` is bound first (get_outputs() follows the binding order). `first_host(batch)` -> (shape,
        dtype) or None, asked only when the binding is made: that output is written into one host array of that
        shape, bound once too (onnxruntime refuses a pass
        whose output has another shape), and returned: reading it needs no `get_outputs()`, which wraps all
        2L + 1 outputs in Python objects (76 us a step measured on the issue-18 bench decoder, L = 16, ORT 1.32),
        and onnxruntime allocates nothing for it. -> (binding, that array or None)"""
        if not self.in_place:
            raise ValueError("only the in-place cache keeps one binding")
        if self._shared is None or self._shared[0] is not session:
            binding = session.io_binding()
            spec = first_host(self.batch) if first_host is not None else None
            host = None
            if spec is None:
                binding.bind_output(first_output, "cpu")  # logits come back to the host
            else:
                host = np.empty(*spec)
                binding.bind_output(first_output, "cpu", 0, host.dtype, list(host.shape), host.ctypes.data)
            self._bind_shared(binding, 0, self.batch)
            self._shared = (session, binding, host)  # the array stays referenced while the binding writes into it
            self.bound_extra = {}  # the caller's record of inputs bound once to this binding (Pipeline._bind_inputs)
        return self._shared[1], self._shared[2]

    def update(self, new_tokens: int) -> None:
        """The pass wrote past+new into the other side (in place: after the past): make it current."""
        self.length += new_tokens
        if not self.in_place:
            self._flip = 1 - self._flip

    def rewind(self, tokens: int) -> None:
        """Forget the last `tokens` tokens (benchmarks that repeat one step): in place the slots are simply written
        again; ping-pong, the other side still holds the shorter past."""
        self.length -= tokens
        if not self.in_place:
            self._flip = 1 - self._flip

    @property
    def compactable(self) -> bool:
        """Rows can be compacted in place (`compact_row`): one shared buffer in host memory."""
        return self.in_place and self.device == "cpu" and all(
            hasattr(buf, "data_ptr") for layer in self._buffers[0] for buf in layer)

    def compact_row(self, row: int, keep: np.ndarray) -> int:
        """Move the slots `keep` (ascending indices below `length`) of batch row `row` to the front of that row, in
        every layer's key and value buffer, in place -> the row's new length (len(keep)).

        Only for a decoder that reads each row's length from its mask (Manifest.row_lengths): the row is then decoded
        with a mask of ones up to its length (runtime/iava.py `append_token`), its new tokens go after the kept slots
        and each step reads len(keep) + steps slots instead of `length` + steps. The slots after the kept ones keep
        stale (finite) values, never read. Positions are unaffected: the rotary is applied before the cache."""
        return self.move_slots(row, keep, row)

    def move_slots(self, src_row: int, slots: np.ndarray, dst_row: int) -> int:
        """Write the slots `slots` (ascending, below `length`) of row `src_row` to slots 0..len(slots)-1 of row
        `dst_row`, every layer, key and value, in place (`compactable` caches only) -> len(slots). IAVA copies the
        prompt prefix its two streams share this way (runtime/pipeline.py `_contrastive_prefill`)."""
        slots = np.asarray(slots, dtype=np.int64)
        if not self.compactable:
            raise ValueError("only an in-place KV cache in host memory can be compacted")
        for row in (src_row, dst_row):
            if not 0 <= row < self.batch:
                raise ValueError(f"row {row} is outside a cache of {self.batch} rows")
        if slots.ndim != 1 or (slots.size and (slots[0] < 0 or slots[-1] >= self.length
                                               or np.any(np.diff(slots) <= 0))):
            raise ValueError(f"slots to keep must be ascending and below the cache length {self.length}")
        shape = self.shape(self.max_len)
        for layer in self._buffers[0]:
            for buf in layer:
                view = _host_view(buf, shape, self.dtype)  # [B, KVH, M, D]
                view[dst_row, :, : slots.size] = view[src_row][:, slots]  # fancy indexing copies first: overlap is safe
        return int(slots.size)

    def load(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """Write host arrays [B, KVH, n, D] into the current buffers of one layer, in this cache's layout (for
        benchmarks that start from a synthetic past; set `length` after loading every layer)."""
        for kind, array in enumerate((key, value)):
            n = array.shape[2]
            if n > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} tokens; {n} given")
            rows = self.max_len if self.in_place else n
            flat = np.zeros(self.batch * self.kv_heads * self.max_len * self.head_dim, self.dtype)
            flat[: self.batch * self.kv_heads * rows * self.head_dim].reshape(self.shape(rows))[:, :, :n] = array
            self._buffers[self._flip][layer][kind].update_inplace(flat)

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of the current key/value of one layer, [B, KVH, T, D] (for tests and debugging)."""
        out = []
        for kind in range(2):
            flat = self._buffers[self._flip][layer][kind].numpy()
            if self.in_place:
                full = flat[: int(np.prod(self.shape(self.max_len)))].reshape(self.shape(self.max_len))
                out.append(full[:, :, : self.length].copy())
                continue
            out.append(flat[: int(np.prod(self.shape(self.length)))].reshape(self.shape(self.length)).copy())
        return out[0], out[1]


def _host_view(buf, shape: list[int], dtype: np.dtype) -> np.ndarray:
    """A writable numpy view of a host buffer (an OrtValue's `data_ptr()`), no copy."""
    import ctypes

    count = int(np.prod(shape))
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(buf.data_ptr())
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
