"""SGLang's scheduler process with ``--enable-bullet``: our entry, run in the spawned child.

The launcher hands this function to SGLang as ``run_scheduler_process_func``. SGLang spawns one
scheduler process per rank and calls it there with ``run_scheduler_process``'s arguments; it
installs our scheduler subclass (:mod:`.scheduler`) in SGLang's scheduler module, turns on the
split-prefill machinery for this process only (``server_args.enable_pdmux``, with one stream
group per candidate split and the whole GPU at each end), and calls SGLang's own
``run_scheduler_process``. The options come from ``BULLET_SGLANG_CONFIG`` (spawned children
inherit the environment, not the launcher's Python state).
"""

from __future__ import annotations

import os

_KEEP_OPEN: list = []  # the partitioners whose lanes the stream groups use, for the process's life


def open_lane_groups(backend: str):
    """``open_groups(plan, gpu_id)`` for :func:`.scheduler.bullet_scheduler_class`: the whole GPU
    (two plain streams), one verified partition per split (its lanes' streams), the whole GPU."""

    def open_groups(plan, gpu_id: int) -> list:
        import torch

        from bullet_kernels import Partitioner

        torch.cuda.set_device(gpu_id)  # SGLang's model runner sets it later; the lanes are made now
        parts = Partitioner(backend, device_index=gpu_id)  # every set is verified by a %smid probe when opened
        _KEEP_OPEN.append(parts)
        whole = [(torch.cuda.Stream(device=gpu_id), torch.cuda.Stream(device=gpu_id)) for _ in range(2)]
        return [whole[0], *(lane_streams(parts.get(split)) for split in plan.splits), whole[1]]

    return open_groups


def lane_streams(pset) -> tuple:
    """(prefill stream, decode stream) of an open partition set, refused where its SM limits hold
    only inside our own launch scope (the tpc library's hook mechanism): SGLang launches outside
    it, so those lanes would run on the whole GPU."""
    if pset.needs_scope:
        raise RuntimeError(f"the {pset.split} lanes confine work only inside bullet_kernels' launch scope, which "
                           "SGLang does not enter; use --bullet-partition green, or tpc with the driver's stream "
                           "mask record (BULLET_TPC_MECHANISM=record)")
    return pset.stream("prefill"), pset.stream("decode")


def run_scheduler_process(server_args, port_args, gpu_id, tp_rank, attn_cp_rank, moe_dp_rank, moe_ep_rank,
                          pp_rank, dp_rank, pipe_writer):
    from sglang.srt.managers import scheduler as sglang_scheduler
    from sglang.srt.multiplex import pdmux_context

    from .options import BulletOptions
    from .scheduler import bullet_scheduler_class
    from .setup import build

    opts = BulletOptions.from_env(os.environ)
    if opts is None or not opts.enable:
        raise RuntimeError("bullet_sglang's scheduler entry ran without --enable-bullet options in BULLET_SGLANG_CONFIG")
    setup = build(opts)
    if opts.decode_linear == "cublaslt-target":
        from sglang.srt.model_executor.runner import decode_cuda_graph_runner

        from . import graph_runner

        graph_runner.install(decode_cuda_graph_runner, [d for _, d in setup.plan.sm_counts()], setup.plan.sm_count)
    server_args.enable_pdmux = True
    server_args.sm_group_num = setup.plan.size
    sglang_scheduler.Scheduler = bullet_scheduler_class(
        sglang_scheduler.Scheduler, setup.plan, setup.policy, open_lane_groups(opts.partition), pdmux_context,
        policy_groups=setup.policy_groups, feedback=setup.feedback, overlap=opts.overlap)
    return sglang_scheduler.run_scheduler_process(server_args, port_args, gpu_id, tp_rank, attn_cp_rank,
                                                  moe_dp_rank, moe_ep_rank, pp_rank, dp_rank, pipe_writer)
