"""A generation request as the scheduler tracks it, and its sampling parameters."""

from __future__ import annotations

import dataclasses
import enum
import math
import time

from ..errors import BulletError


MODES = ("bullet", "chunked", "sequential")  # how the scheduler runs prefill beside decode
DEFAULT_CHUNK_SIZE = 512  # chunked mode, and bullet's fused prompts: tokens a fused step, decode rows included
PREFILL_AHEAD = 2  # bullet: layer groups kept queued on the prefill lane, topped up once a step


class BadRequest(BulletError, ValueError):
    """The request can never be served as asked (the server answers 400 with this message)."""


class State(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV
    PREFILLING = "prefilling"  # its prompt is being computed (possibly chunk by chunk)
    RUNNING = "running"  # in the decode batch
    FINISHED = "finished"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise BadRequest(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise BadRequest(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        stops = self.stop_token_ids
        if not isinstance(stops, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) for t in stops):
            raise BadRequest(f"stop_token_ids must be a list of token ids, got {stops!r}")
        object.__setattr__(self, "stop_token_ids", tuple(stops))
        if not isinstance(self.ignore_eos, bool):
            raise BadRequest(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise BadRequest(f"seed must be an integer or null, got {self.seed!r}")


@dataclasses.dataclass(eq=False)
class Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    output: list[int] = dataclasses.field(default_factory=list)
    state: State = State.WAITING
    finish_reason: str | None = None  # "length", "stop", "abort", or an error text
    computed: int = 0  # tokens of prefill_tokens whose KV is written (chunked prefill progress)
    preemptions: int = 0
    aborted: bool = False

    @property
    def prefill_tokens(self) -> list[int]:
        """What must be in the KV cache before it can decode: the prompt, and after a preemption
        (KV dropped, recomputed) the tokens generated so far too."""
        return self.prompt + self.output

    @property
    def total_len(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.state is State.FINISHED
