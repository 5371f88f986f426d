"""The SGLang extension points the adapter relies on, checked against SGLang's source.

Each :class:`HookPoint` names a function or method by file and qualified name and the
parameters we call it with or override it with. :func:`check_hook_points` reads the installed
(or unpacked) SGLang source with ``ast``, without importing it (importing SGLang needs its GPU
stack), and lists every point that moved, vanished or changed its parameters: an SGLang upgrade
fails loudly here, not as a wrong call at serving time. The points and why each matters are in
docs/sglang-adapter.md.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class HookPoint:
    path: str  # relative to the directory that holds the ``sglang`` package
    qualname: str  # "function", "Class.method", or "Class.ATTRIBUTE" for a class attribute
    params: tuple[str, ...] | None  # the exact parameter names; None for an attribute
    why: str


HOOK_POINTS = (
    HookPoint("sglang/srt/entrypoints/http_server.py", "launch_server",
              ("server_args", "init_tokenizer_manager_func", "run_scheduler_process_func",
               "run_detokenizer_process_func", "execute_warmup_func", "launch_callback"),
              "we pass our own scheduler-process entry, which installs the hooks in the spawned child"),
    HookPoint("sglang/srt/managers/scheduler.py", "run_scheduler_process",
              ("server_args", "port_args", "gpu_id", "tp_rank", "attn_cp_rank", "moe_dp_rank", "moe_ep_rank",
               "pp_rank", "dp_rank", "pipe_writer"),
              "our child entry calls it after patching, with the same arguments"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.__init__",
              ("self", "server_args", "port_args", "gpu_id", "tp_rank", "moe_ep_rank", "pp_rank", "attn_cp_rank",
               "moe_dp_rank", "dp_rank"),
              "our scheduler subclass is constructed in its place"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.get_next_batch_to_run", ("self",),
              "SGLang's normal loop; the split-prefill loop admits and merges batches itself"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.run_batch", ("self", "batch", "pp_proxy_tensors"),
              "runs a decode step, or the next layers of a split prefill, on the current stream"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.process_batch_result", ("self", "batch", "result"),
              "results of both lanes are processed by SGLang's own code"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.run_event_loop", ("self",),
              "makes the scheduler stream current, then dispatch_event_loop picks the loop"),
    HookPoint("sglang/srt/managers/tp_worker.py", "TpModelWorker.forward_batch_generation",
              ("self", "batch", "forward_batch", "pp_proxy_tensors", "is_verify", "skip_attn_backend_init"),
              "one decode step on a lane"),
    HookPoint("sglang/srt/managers/tp_worker.py", "TpModelWorker.forward_batch_split_prefill", ("self", "batch"),
              "one layer group of a prefill on the prefill lane"),
    HookPoint("sglang/srt/model_executor/model_runner.py", "ModelRunner.forward",
              ("self", "forward_batch", "skip_attn_backend_init", "pp_proxy_tensors", "reinit_attn_backend",
               "split_forward_count"),
              "the forward both lanes reach"),
    HookPoint("sglang/srt/model_executor/model_runner.py", "ModelRunner.forward_split_prefill",
              ("self", "forward_batch", "reinit_attn_backend", "forward_count"),
              "layer-group prefill"),
    HookPoint("sglang/srt/model_executor/model_runner.py", "ModelRunner.init_decode_cuda_graph", ("self",),
              "where decode graphs are built: one set per stream group (our lanes)"),
    HookPoint("sglang/srt/model_executor/runner/decode_cuda_graph_runner.py", "DecodeCudaGraphRunner.__init__",
              ("self", "model_runner", "attn_backend", "speculative_num_steps", "speculative_num_draft_tokens"),
              "captures a graph set per stream group on that group's decode stream"),
    HookPoint("sglang/srt/model_executor/runner/decode_cuda_graph_runner.py", "DecodeCudaGraphRunner.can_run_graph",
              ("self", "forward_batch"), "bucket check before a graph replay"),
    HookPoint("sglang/srt/model_executor/runner/decode_cuda_graph_runner.py", "DecodeCudaGraphRunner.execute",
              ("self", "forward_batch", "pp_proxy_tensors"), "graph replay on the chosen lane"),
    HookPoint("sglang/srt/model_executor/forward_batch_info.py", "ForwardMode.SPLIT_PREFILL", None,
              "prefill batches run as layer groups are marked with it"),
    HookPoint("sglang/srt/server_args.py", "prepare_server_args", ("argv",),
              "SGLang's own argument parsing, after our options are removed"),
    # -- what SGLang's split-prefill loop calls on the scheduler (docs/sglang-adapter.md) --
    HookPoint("sglang/srt/managers/scheduler.py", "dispatch_event_loop", ("scheduler",),
              "picks the split-prefill loop when enable_pdmux is set (our scheduler entry sets it)"),
    HookPoint("sglang/srt/managers/scheduler_components/request_receiver.py", "SchedulerRequestReceiver.recv_requests",
              ("self",), "takes the requests the tokenizer process sent (the scheduler's request_receiver)"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.process_input_requests", ("self", "recv_reqs"),
              "new requests reach SGLang's own queues"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.get_new_batch_prefill", ("self",),
              "admits the next prefill batch (prepared for extend) without touching the running batch"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.update_running_batch", ("self", "batch"),
              "prepares the running batch's next decode step"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.on_idle", ("self",), "nothing to run"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler._relay_forward_payload",
              ("self", "future_indices", "batch_result"),
              "run_batch's hand-off of sampled tokens to the next step (called by run_batch)"),
    HookPoint("sglang/srt/managers/overlap_utils.py", "resolve_forward_inputs", ("batch", "future_map"),
              "decode input ids gathered from the tokens the previous step left on the GPU"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.merge_batch", ("self", "other"),
              "a prefill whose last layer group landed joins the running batch"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.filter_batch",
              ("self", "chunked_req_to_exclude", "keep_indices"), "finished requests leave a batch"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.split_index", None,
              "the layer a split prefill reached; the scheduler advances it"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.split_forward_count", None,
              "layers the next split-prefill call runs"),
    HookPoint("sglang/srt/model_executor/forward_batch_info.py", "ForwardBatch.split_index", None,
              "the model runner's own count of layers done"),
    # -- decode graphs per SM configuration --
    HookPoint("sglang/srt/model_executor/runner/decode_cuda_graph_runner.py", "DecodeCudaGraphRunner.maybe_init_pdmux",
              ("self",), "runs before capture: where our subclass sets one stream group per decode lane"),
    HookPoint("sglang/srt/model_executor/runner/decode_cuda_graph_runner.py", "DecodeCudaGraphRunner.capture",
              ("self",), "captures every (batch, stream group) graph"),
    HookPoint("sglang/srt/model_executor/runner/decode_cuda_graph_runner.py",
              "DecodeCudaGraphRunner._capture_one_stream", ("self", "stream_idx"),
              "one stream group's graphs: --bullet-decode-linear cublaslt-target wraps it in the lane's GEMM target"),
    HookPoint("sglang/srt/model_executor/runner/decode_cuda_graph_runner.py", "DecodeCudaGraphRunner.capture_prepare",
              ("self", "size", "stream_idx"), "the attention backend of a stream group during capture"),
    HookPoint("sglang/srt/model_executor/runner/decode_cuda_graph_runner.py", "DecodeCudaGraphRunner.load_batch",
              ("self", "forward_batch", "pp_proxy_tensors"),
              "copies a batch into the graph's buffers on the current stream before replay"),
    HookPoint("sglang/srt/model_executor/runner/decode_cuda_graph_runner.py", "DecodeCudaGraphRunner._make_graph_key",
              ("self", "bs", "stream_idx", "variant_label"), "graphs are keyed by (batch, stream group)"),
    HookPoint("sglang/srt/model_executor/runner/decode_cuda_graph_runner.py", "DecodeCudaGraphRunner.recapture_if_needed",
              ("self", "forward_batch"), "re-captures at serving time: must capture on the lanes too"),
    HookPoint("sglang/srt/multiplex/pdmux_context.py", "get_current_stream_idx", (),
              "the stream group a replay picks its graphs by"),
    HookPoint("sglang/srt/multiplex/pdmux_context.py", "set_current_stream_idx", ("idx",),
              "set before each decode replay to the lane chosen"),
    # -- split prefill on the prefill lane --
    HookPoint("sglang/srt/model_executor/model_runner.py", "ModelRunner.init_attention_backend", ("self",),
              "one prefill backend with its own workspace and one decode backend per stream group"),
    HookPoint("sglang/srt/model_executor/model_runner.py", "ModelRunner.update_decode_attn_backend",
              ("self", "stream_idx"), "switches the decode backend to a stream group's"),
    HookPoint("sglang/srt/model_executor/model_runner.py", "ModelRunner._get_attention_backend",
              ("self", "init_new_workspace"), "a backend that does not share FlashInfer's global workspace"),
    HookPoint("sglang/srt/distributed/parallel_state.py", "graph_capture", ("stream",),
              "capture on a given stream (the lane's) instead of a new one"),
    # -- SGLang's split-prefill loop (pdmux), which --enable-bullet runs on our lanes --
    HookPoint("sglang/srt/multiplex/multiplexing_mixin.py", "SchedulerMultiplexMixin.init_pdmux", ("self",),
              "overridden: the stream groups are our verified lanes"),
    HookPoint("sglang/srt/multiplex/multiplexing_mixin.py", "SchedulerMultiplexMixin.adjust_stream_groups", ("self",),
              "overridden: the group comes from our SLO policy"),
    HookPoint("sglang/srt/multiplex/multiplexing_mixin.py", "SchedulerMultiplexMixin.event_loop_pdmux", ("self",),
              "the loop we run: decode and split-prefill layers on their lanes, merge after an event"),
    HookPoint("sglang/srt/multiplex/multiplexing_mixin.py", "SchedulerMultiplexMixin.update_split_prefill_batch",
              ("self", "sm_count"), "admits the next prefill as a split-prefill batch"),
    HookPoint("sglang/srt/multiplex/pdmux_context.py", "STREAM_GROUPS", None,
              "module state the graph runner and the loop read: set to our groups"),
    HookPoint("sglang/srt/multiplex/pdmux_context.py", "SM_COUNTS", None, "the (prefill, decode) SMs of each group"),
    HookPoint("sglang/srt/multiplex/pdmux_context.py", "PDMuxConfig.sm_group_num", None,
              "the group count the model runner sizes its decode attention backends by"),
    HookPoint("sglang/srt/multiplex/pdmux_context.py", "PDMuxConfig.split_forward_token_budget", None,
              "event_loop_pdmux runs budget // prefill tokens layers a turn; we size it to one policy layer group"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.batch_size", ("self",),
              "the decode batch the policy plans for"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.is_empty", ("self",), "no work on a lane"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.extend_num_tokens", None,
              "the prefill's tokens the policy plans for"),
    HookPoint("sglang/srt/distributed/parallel_state_wrapper.py", "ParallelState.gpu_id", None,
              "where 0.5.15 keeps the scheduler's GPU (pdmux reads self.gpu_id)"),
    HookPoint("sglang/srt/distributed/parallel_state_wrapper.py", "ParallelState.tp_size", None,
              "where 0.5.15 keeps the tensor-parallel size (pdmux reads self.tp_size)"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.set_internal_state", ("self", "recv_req"),
              "overridden: /set_internal_state also sets our policy's targets"),
    HookPoint("sglang/srt/managers/io_struct.py", "SetInternalStateReq.server_args", None,
              "the settings a /set_internal_state request carries"),
    HookPoint("sglang/srt/managers/io_struct.py", "SetInternalStateReqOutput.updated", None,
              "our answer to /set_internal_state: whether the targets changed"),
    HookPoint("sglang/srt/managers/io_struct.py", "SetInternalStateReqOutput.server_args", None,
              "our answer to /set_internal_state: the policy's targets now"),
    # -- the overlapped loop (overlap.py, the default; --bullet-overlap off keeps pdmux's) --
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.is_fully_idle", ("self", "for_health_check"),
              "overridden: not idle while a split prefill or an overlapped step is in flight (flush_cache asks it)"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.split_forward_batch", None,
              "the split prefill's ForwardBatch (its activations), dropped once the prefill has landed"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.top_logprobs_nums", None,
              "input top-k logprobs: the prefill's last run then reads results on the host"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.token_ids_logprobs", None,
              "input token-id logprobs: the prefill's last run then reads results on the host"),
    HookPoint("sglang/srt/sampling/sampling_batch_info.py", "SamplingBatchInfo.has_custom_logit_processor", None,
              "custom logit processors make filter_batch wait on the host: such batches are not overlapped"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.init_batch_result_processor", ("self",),
              "overridden: the result processor SGLang builds (after init_pdmux) gets enable_overlap on"),
    HookPoint("sglang/srt/managers/scheduler_components/batch_result_processor.py",
              "SchedulerBatchResultProcessor.enable_overlap", None,
              "set on (dataclasses.replace): results of requests finished while their next step ran are skipped"),
    HookPoint("sglang/srt/managers/scheduler_components/batch_result_processor.py",
              "SchedulerBatchResultProcessor.process_batch_result_decode", ("self", "batch", "result"),
              "waits on the result's copy_done, then skips finished or retracted requests under enable_overlap"),
    HookPoint("sglang/srt/managers/scheduler_components/batch_result_processor.py",
              "SchedulerBatchResultProcessor.process_batch_result_prefill", ("self", "batch", "result"),
              "a landed prefill's result, copied on its lane: waits on its copy_done, not the decode lane"),
    HookPoint("sglang/srt/managers/utils.py", "GenerationBatchResult.copy_done", None,
              "the event the overlapped loop records after the result's copy to the host"),
    HookPoint("sglang/srt/managers/utils.py", "GenerationBatchResult.copy_to_cpu",
              ("self", "return_logprob", "return_hidden_states"), "the result copied to pinned host memory"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.copy", ("self",),
              "the snapshot of a launched decode step, processed one iteration later"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.enable_overlap", None,
              "marked on the running batch: prepare_for_decode makes new seq-len tensors"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.prepare_for_decode", ("self",),
              "prepares step k+1 while step k is unprocessed"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.has_grammar", None,
              "grammar batches are never overlapped (their mask needs the previous token)"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.sampling_info", None,
              "batches with penalties are never overlapped (prepare_for_decode counts the last token)"),
    HookPoint("sglang/srt/managers/schedule_batch.py", "ScheduleBatch.split_prefill_finished", None,
              "a split prefill whose last layers are enqueued"),
    HookPoint("sglang/srt/managers/scheduler.py", "Scheduler.init_overlap", ("self",),
              "makes copy_stream and copy_stream_ctx, with or without overlap"),
    HookPoint("sglang/srt/distributed/parallel_state.py", "set_pdmux_status", ("enable_prefill_multiplexing",),
              "the prefill-or-decode flag the loop sets per stream, as pdmux's does"),
    # -- the parsed settings the launcher refuses or sets (options.check_parsed, child.py) --
    HookPoint("sglang/srt/server_args.py", "ServerArgs.add_cli_args", ("parser",),
              "SGLang's own parser for the arguments as given (options.parse_sglang_argv)"),
    HookPoint("sglang/srt/server_args.py", "ServerArgs.model_path", None, "the model whose profile the policy plans with"),
    HookPoint("sglang/srt/server_args.py", "ServerArgs.base_gpu_id", None, "the GPU whose partitions are checked"),
    HookPoint("sglang/srt/server_args.py", "ServerArgs.chunked_prefill_size", None,
              "chunked prefill is refused; the launcher sets -1 (whole-prompt prefill)"),
    *(HookPoint("sglang/srt/server_args.py", f"ServerArgs.{field}", None,
                "the launcher refuses setups from the parsed arguments (abbreviated options included)")
      for field in ("tp_size", "pp_size", "dp_size", "speculative_algorithm", "disaggregation_mode", "enable_pdmux",
                    "disable_cuda_graph_padding", "pdmux_config_path", "enable_mixed_chunk", "grpc_mode", "use_ray")),
    HookPoint("sglang/srt/server_args.py", "ServerArgs.sm_group_num", None,
              "our scheduler entry sets it: the decode attention backends per stream group"),
    HookPoint("sglang/srt/utils/common.py", "kill_process_tree", ("parent_pid", "include_parent", "skip_pid", "wait_timeout"),
              "the launcher's clean-up of SGLang's processes on the way out, as sglang.launch_server does"),
)


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ...]:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args)]
    names += [a.vararg.arg] if a.vararg else []
    names += [x.arg for x in a.kwonlyargs]
    names += [a.kwarg.arg] if a.kwarg else []
    return tuple(names)


def _find(tree: ast.Module, qualname: str):
    node: ast.AST = tree
    for part in qualname.split("."):
        body = getattr(node, "body", [])
        match = None
        for child in body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and child.name == part:
                match = child
            elif isinstance(child, ast.Assign) and any(isinstance(t, ast.Name) and t.id == part for t in child.targets):
                match = child
            elif isinstance(child, ast.AnnAssign) and isinstance(child.target, ast.Name) and child.target.id == part:
                match = child
        if match is None:
            return None
        node = match
    return node


def check_hook_points(source_root: str | Path, points: Sequence[HookPoint] = HOOK_POINTS) -> list[str]:
    """Problems found (empty: every point is where and as we expect) in the SGLang source under
    ``source_root`` (the directory that holds the ``sglang`` package)."""
    root, problems = Path(source_root), []
    trees: dict[str, ast.Module | None] = {}
    for p in points:
        if p.path not in trees:
            f = root / p.path
            trees[p.path] = ast.parse(f.read_text(encoding="utf-8"), str(f)) if f.is_file() else None
        tree = trees[p.path]
        if tree is None:
            problems.append(f"{p.path} is missing ({p.qualname}: {p.why})")
            continue
        node = _find(tree, p.qualname)
        if node is None:
            problems.append(f"{p.path}: {p.qualname} is missing ({p.why})")
        elif p.params is not None:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                problems.append(f"{p.path}: {p.qualname} is no longer a function ({p.why})")
            elif _params(node) != p.params:
                problems.append(f"{p.path}: {p.qualname} takes ({', '.join(_params(node))}), we rely on "
                                f"({', '.join(p.params)}) ({p.why})")
    return problems


def installed_source_root() -> Path:
    """The directory holding the installed ``sglang`` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("sglang is not installed (pip install 'bullet_sglang[sglang]')")
    return Path(list(spec.submodule_search_locations)[0]).parent
