"""Decode graphs whose GEMMs are chosen for their lane (``--bullet-decode-linear cublaslt-target``).

cuBLAS picks a GEMM's kernel (tile shape, split-K, persistent or not) for the SM count the device
reports, 132 on an H200, also when the stream runs inside a 32-SM green context: a grid planned
for one wave on 132 SMs then runs in several ragged ones on the lane. cuBLASLt takes the lane's
size as a hint (its SM-count target, which torch sets from its SM carveout):
:func:`bullet_kernels.kernels.blas_target.cublaslt_sm_target`. In our own engine this made decode
steps 8-10% faster on 32-80 SM lanes on the H200 (batch 128, 2048 context; docs/roofline.md),
which is why its decode GEMMs use it by default.

SGLang's Llama reaches the same ``F.linear`` (its unquantized linear method, the default bf16
backend), and its decode graphs are captured once per stream group on that group's decode stream
(``DecodeCudaGraphRunner._capture_one_stream(stream_idx)``). The subclass here captures each
split's decode graphs inside the target of that split's decode lane; the graph keeps the kernels
chosen at capture, so replays need nothing. The whole-GPU groups capture as SGLang does.
Prefill runs eagerly outside any target (cuBLAS, as in our engine, where the target made prefill
slower). SGLang's deterministic mode replaces these matmuls with its own Triton kernels, so there
the option changes nothing.

The default since measured inside SGLang on the H200 (962cddb, one lease, SGLang's own benchmark
client on the standard trace): the 10 ms policy served 25 req/s within P90 TPOT 10 ms against 22
with SGLang's cuBLAS choice, and in those sweeps its steps on the 32-SM lane came 0.3-0.5 ms over
the latency profile against 0.6-1.1 ms. ``--bullet-decode-linear cublas`` keeps SGLang's choice.
"""

from __future__ import annotations

from typing import Sequence

DECODE_LINEARS = ("cublas", "cublaslt-target")


def lane_targeted_runner_class(base: type, decode_sms: Sequence[int], device_sms: int) -> type:
    """A subclass of SGLang's ``DecodeCudaGraphRunner`` (``base``) whose graphs of stream group i
    are captured with cuBLASLt told ``decode_sms[i]`` SMs (the group's decode lane; 0 or the whole
    GPU: captured as SGLang does)."""
    decode_sms = tuple(decode_sms)
    for n in decode_sms:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= device_sms:
            raise ValueError(f"decode SMs per stream group must be ints in 0..{device_sms}, got {decode_sms}")

    class LaneTargetedDecodeCudaGraphRunner(base):
        bullet_decode_sms = decode_sms

        def _capture_one_stream(self, stream_idx=None):
            sms = None if stream_idx is None else self.bullet_decode_sms[stream_idx]
            if not sms or sms == device_sms:
                return super()._capture_one_stream(stream_idx)
            from bullet_kernels.kernels.blas_target import cublaslt_sm_target

            with cublaslt_sm_target(sms):
                return super()._capture_one_stream(stream_idx)

    LaneTargetedDecodeCudaGraphRunner.__qualname__ = f"LaneTargeted{base.__name__}"
    return LaneTargetedDecodeCudaGraphRunner


def install(runner_module, decode_sms: Sequence[int], device_sms: int) -> type:
    """Make SGLang's model runner build the lane-targeted runner: it imports
    ``DecodeCudaGraphRunner`` from ``runner_module`` when it captures (checked by a hook point)."""
    cls = lane_targeted_runner_class(runner_module.DecodeCudaGraphRunner, decode_sms, device_sms)
    runner_module.DecodeCudaGraphRunner = cls
    return cls
