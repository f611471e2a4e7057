"""The engine's settings, declared once: `Engine(args)` takes them, the command line's engine flags
are generated from them (`radixfair.config_flags`), and they build the scheduler's and the policy's
configs, whose defaults they share. Torch-free, so that the command line and the benchmarks can read
them without loading the executor."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

from radixfair.config_flags import flag
from radixfair.io_struct import RequestLimits
from radixfair.sched.policies import DEFAULT_POLICY, POLICIES, PolicyConfig
from radixfair.sched.scheduler import SchedulerConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
# weight formats (radixfair.engine.quant: the kernels, and what auto picks)
QUANTIZATIONS = ("auto", "none", "int8", "int4")
# structured outputs: the grammar libraries (README, "Structured outputs", says why llguidance is the default)
GRAMMAR_BACKENDS = ("llguidance", "xgrammar", "outlines", "none")
DEFAULT_GRAMMAR_BACKEND = "llguidance"


def parse_client_weights(text: str) -> dict[str, float]:
    """`alice=2,bob=1.5` -> {"alice": 2.0, "bob": 1.5}; every weight finite and > 0."""
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, eq, value = item.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not eq or not name.strip() or not w > 0 or w == float("inf"):
            raise argparse.ArgumentTypeError(f"expected CLIENT=WEIGHT with a weight > 0, got {item!r}")
        out[name.strip()] = w
    return out


# where a request for more than one GPU per model copy is sent (tensor parallelism is not implemented)
TP_HINT = ("radixfair runs one model copy per worker process; to use several GPUs run one worker per GPU "
           "behind the router (`radixfair launch --workers N`, or `radixfair router --worker-urls ...` in front "
           "of `radixfair serve` workers)")


@dataclass(frozen=True)
class EngineArgs:
    model: str | None = flag(None, "a .gguf file, a Hugging Face folder, or a repo id already in the local Hugging "
                                   "Face cache (org/name; org/name:Q4_K_M picks a GGUF quantization); nothing is "
                                   "downloaded", none_means="SmolLM2-135M-Instruct", aliases=("--model-path",),
                             metavar="PATH")
    tokenizer_path: str | None = flag(None, "the tokenizer from another .gguf file, Hugging Face folder or cached repo "
                                            "id", none_means="the model's", metavar="PATH")
    gguf_file: str | None = flag(None, "which .gguf file of a folder or cached repo holding several "
                                       "(its name, relative to the repo)", metavar="NAME")
    revision: str | None = flag(None, "branch, tag or commit of a cached repo id", none_means="main")
    download_dir: str | None = flag(None, "the Hugging Face cache to look repo ids up in",
                                    none_means="HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub",
                                    metavar="DIR")
    served_model_name: str | None = flag(None, "the model's name in the OpenAI API (/v1/models) and in "
                                               "/get_model_info", none_means="the repo id given, else the file or "
                                                                             "folder name without its quantization")
    chat_template: str | None = flag(None, "a built-in template name (chatml, llama-2, vicuna_v1.1) or a .jinja file; "
                                           "replaces the model's chat template", none_means="the model's")
    dtype: str = flag("auto", "weights and activations; auto: bfloat16 on CUDA and on CPUs with native "
                              "bf16, float32 on other CPUs", choices=DTYPES)
    device: str = flag("auto", "auto | cpu | cuda | cuda:N")
    quantization: str = flag("auto", "weights kept quantized: int8 (per channel) or int4 (groups of 32), "
                                     "multiplied by PyTorch's weight-only kernels, AVX512-VNNI kernels with "
                                     "int8 activations, int8 x int8 or dense matmuls, whichever is fastest per "
                                     "pass size (measured at load); auto: int4 for a Q4_* GGUF, int8 for Q8_0, "
                                     "none for safetensors", choices=QUANTIZATIONS)
    disable_activation_quant: bool = flag(False, "quantized layers never quantize activations: only PyTorch's "
                                                 "weight-only kernels and the dense copy, not the VNNI kernels "
                                                 "(int8 activations per 32 inputs) or int8 x int8 matmuls "
                                                 "(per-token int8 activations)")
    enable_torch_compile: bool = flag(False, "compile the decode step's layers with torch.compile (slow first "
                                             "steps per batch size; off by default: see README, Engine speed)")
    enable_mixed_chunk: bool = flag(False, "decode steps of running requests ride along with a prefill chunk "
                                           "(one mixed pass) instead of waiting for it")
    cuda_graph_max_bs: int = flag(32, "largest decode batch replayed from a captured CUDA graph")
    disable_cuda_graph: bool = flag(False, "run CUDA decode steps eagerly")
    decode_workspace_tokens: int = flag(32768, "bound (rows x per-row capacity, in tokens) of the contiguous copy "
                                               "of decoding requests' K/V that decode attention reads without a "
                                               "gather; past it, or 0, decode gathers from the paged pool")
    single_thread_pass_tokens: int = flag(16, "CPU passes of at most this many tokens run on one thread: their "
                                              "ops are too small to pay for the others' wake-ups; 0: every pass "
                                              "uses --num-threads")
    max_total_tokens: int | None = flag(None, "KV pool size in tokens", none_means="from --mem-fraction-static")
    mem_fraction_static: float | None = flag(None, "memory share for the KV pool when --max-total-tokens is not given",
                                             none_means="0.85 on CUDA, 0.15 of RAM on CPU")
    max_running_requests: int = flag(SchedulerConfig.max_running_requests, "decode batch limit")
    max_prefill_tokens: int = flag(SchedulerConfig.max_prefill_tokens, "input tokens per prefill batch")
    chunked_prefill_size: int = flag(SchedulerConfig.chunked_prefill_size,
                                     "long prompts are prefilled in chunks of this many tokens; -1 disables "
                                     "chunked prefill")
    context_length: int | None = flag(None, "cap on prompt + output tokens", none_means="the model's")
    schedule_policy: str = flag(DEFAULT_POLICY, "waiting-queue policy", choices=tuple(POLICIES))
    w_in: float = flag(PolicyConfig.w_in, "cost of an uncached prompt token; vtc charges cached ones too")
    w_out: float = flag(PolicyConfig.w_out, "cost of an output token")
    dlpm_quantum: float = flag(PolicyConfig.dlpm_quantum,
                               "service (in cost units) each client gets per DLPM round, times its weight")
    client_weights: dict[str, float] = flag({}, "per-client shares for vtc and dlpm; unnamed clients weigh 1",
                                            parse=parse_client_weights, metavar="ALICE=2,BOB=1")
    max_clients: int = flag(PolicyConfig.max_clients,
                            "clients whose state vtc and dlpm keep; past it idle clients that owe nothing are "
                            "forgotten, and new ones share one overflow client while none can be")
    disable_row_share: bool = flag(False, "vtc and dlpm: no guaranteed share of the batch's rows per active client "
                                          "(a client with credit may then fill every free row at once)")
    disable_radix_cache: bool = flag(False, "no prefix reuse: every request prefills its whole prompt")
    # what one call (one /generate or /v1/* body) may ask for; past a limit it is refused (HTTP 400)
    max_prompts_per_request: int = flag(RequestLimits.max_prompts_per_request, "prompts in one request")
    max_sequences_per_request: int = flag(RequestLimits.max_sequences_per_request,
                                          "prompts x n in one request: the sequences it generates")
    max_request_tokens: int = flag(RequestLimits.max_request_tokens,
                                   "prompt tokens in one request, over all its prompts and samples")
    max_stop_token_ids: int = flag(RequestLimits.max_stop_token_ids, "stop_token_ids of one request")
    max_logprob_entries: int = flag(RequestLimits.max_logprob_entries,
                                    "logprob values one request may return: (prompt positions from "
                                    "logprob_start_len + max_new_tokens) x (1 + top_logprobs_num), summed")
    grammar_backend: str = flag(DEFAULT_GRAMMAR_BACKEND, "library for structured outputs (regex, json_schema, "
                                "ebnf); none: refuse constrained requests", choices=GRAMMAR_BACKENDS)
    disable_regex_jump_forward: bool = flag(False, "sample every token of a constrained output, even where the "
                                                   "grammar allows only one continuation")
    grammar_compile_timeout: float = flag(10.0, "seconds a request's grammar may take to compile before the "
                                                "request is refused")
    random_seed: int = flag(0, "seed of torch's generator")
    num_threads: int | None = flag(None, "torch CPU threads", none_means="torch's")
    tp_size: int = flag(1, "tensor parallel size: 1 only (" + TP_HINT + ")",
                        aliases=("--tensor-parallel-size", "--tp"))
    trust_remote_code: bool = flag(False, "accepted for SGLang's command lines; no effect: radixfair never runs code "
                                          "from a model repository")
    # not a flag (the tests set it): raise, not just log, when the KV invariant breaks at idle
    debug_invariants: bool = False
    # not a flag (tests and benchmarks set it): every quantized layer's route, (first pass size,
    # path) pairs (radixfair.engine.quant.QuantLinear.set_route); None: measured per layer shape at load
    quant_route: tuple[tuple[int, str], ...] | None = None

    def __post_init__(self) -> None:
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("--served-model-name is empty")
        if self.cuda_graph_max_bs < 1:
            raise ValueError(f"--cuda-graph-max-bs must be >= 1, got {self.cuda_graph_max_bs}")
        if self.decode_workspace_tokens < 0:
            raise ValueError(f"--decode-workspace-tokens must be >= 0, got {self.decode_workspace_tokens}")
        if self.single_thread_pass_tokens < 0:
            raise ValueError(f"--single-thread-pass-tokens must be >= 0, got {self.single_thread_pass_tokens}")
        if self.tp_size != 1:
            raise ValueError(f"--tp-size {self.tp_size}: tensor parallelism is not supported; {TP_HINT}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(self.w_in, self.w_out, self.dlpm_quantum, dict(self.client_weights), self.max_clients,
                            row_share=not self.disable_row_share)

    def request_limits(self) -> RequestLimits:
        return RequestLimits(self.max_prompts_per_request, self.max_sequences_per_request,
                             self.max_request_tokens, self.max_stop_token_ids, self.max_logprob_entries)

    def scheduler_config(self, max_total_tokens: int, max_context_len: int) -> SchedulerConfig:
        """The scheduler's settings once the engine has sized the KV pool and read the model's context."""
        return SchedulerConfig(max_total_tokens=max_total_tokens, max_running_requests=self.max_running_requests,
                               max_prefill_tokens=self.max_prefill_tokens,
                               chunked_prefill_size=self.chunked_prefill_size, max_context_len=max_context_len,
                               disable_radix_cache=self.disable_radix_cache,
                               enable_mixed_chunk=self.enable_mixed_chunk)
