"""A preallocated KV cache that the decoder writes into directly.

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
                 dtype=np.float32, device: str = "cpu", device_id: int = 0, allocator=None):
        self.num_layers, self.batch, self.kv_heads, self.head_dim = num_layers, batch, kv_heads, head_dim
        self.max_len = max_len
        self.dtype = np.dtype(dtype)
        self.device, self.device_id = device, device_id
        self.length = 0  # tokens held
        self._flip = 0
        n = batch * kv_heads * max_len * head_dim
        if allocator is None:
            import onnxruntime as ort

            def allocator(size, dtype):
                return ort.OrtValue.ortvalue_from_shape_and_type([size], dtype, device, device_id)
        # buffers[side][layer][0=key, 1=value]
        self._buffers = [[[allocator(n, self.dtype) for _ in range(2)] for _ in range(num_layers)] for _ in range(2)]

    def shape(self, length: int) -> list[int]:
        return [self.batch, self.kv_heads, length, self.head_dim]  # [B, KVH, T, D]

    def bind(self, binding, new_tokens: int) -> None:
        """Bind past (this side, current length) as inputs and present (other side, +new_tokens) as outputs."""
        total = self.length + new_tokens
        if total > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {total} requested")
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

    def update(self, new_tokens: int) -> None:
        """The pass wrote past+new into the other side: make it current."""
        self.length += new_tokens
        self._flip = 1 - self._flip

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of the current key/value of one layer, [B, KVH, T, D] (for tests and debugging)."""
        out = []
        for kind in range(2):
            flat = self._buffers[self._flip][layer][kind].numpy()
            out.append(flat[: int(np.prod(self.shape(self.length)))].reshape(self.shape(self.length)).copy())
        return out[0], out[1]
