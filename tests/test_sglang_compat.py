"""Drop-in for SGLang users: SGLang's flags, model names and endpoints, `python -m
radixfair.launch_server`, and models from the local Hugging Face cache (never the network)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import requires_real_model
from fixtures.gguf_writer import write_gguf
from fixtures.live_server import LiveServer
from fixtures.tiny_models import CHATML

from radixfair.cli import build_parser, engine_args, main, server_args
from radixfair.engine.engine import Engine
from radixfair.engine.loaders import ModelLoadError, clean_model_name, inspect_model
from radixfair.engine.model_source import open_tokenizer
from radixfair.engine_args import EngineArgs
from radixfair.server import create_app
from radixfair.tokenizer import Tokenizer
from radixfair.tokenizer.named_templates import NAMED_CHAT_TEMPLATES, load_chat_template

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hf_cache(cache: Path, repo: str, files: dict[str, Path], commit: str = COMMIT, ref: str = "main") -> Path:
    """Put `files` (name in the repo -> local file) in a Hugging Face cache folder the way `hf download`
    leaves them: content-addressed blobs, a snapshot folder of links to them, refs/<ref> naming it."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    for name, src in files.items():
        data = src.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hf_cache(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding acme/tiny-llama (a Hugging Face folder) and acme/tiny-llama-GGUF (two quantizations,
    a multimodal projector and a split model beside them)."""
    cache = tmp_path_factory.mktemp("hf_cache") / "hub"
    add_to_hf_cache(cache, "acme/tiny-llama", {p.name: p for p in tiny_llama.iterdir() if p.is_file()})
    from radixfair.engine.loaders import load_state_dict

    files = inspect_model(str(tiny_llama))
    gguf = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(gguf, files.config, load_state_dict(files, torch.float32),
               str(tiny_llama / "tokenizer.json"), CHATML)
    add_to_hf_cache(cache, "acme/tiny-llama-GGUF", {
        "tiny-llama-Q4_K_M.gguf": gguf, "tiny-llama-Q8_0.gguf": gguf, "mmproj-tiny-llama-F16.gguf": gguf,
        "big/tiny-llama-Q2_K-00001-of-00002.gguf": gguf})
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: the cache lookup must be offline."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---- model names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "name"), [
    ("/models/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    ("/m/Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Llama-3.2-1B-Instruct"),
    ("/m/qwen2.5-0.5b-instruct-q4_k_m.gguf", "qwen2.5-0.5b-instruct"),
    ("/m/Qwen3-0.6B-BF16.gguf", "Qwen3-0.6B"),
    ("/m/Qwen3-0.6B-UD-IQ4_XS-00001-of-00002.gguf", "Qwen3-0.6B-UD"),
    ("/m/tinyllama-1.1b-chat-v1.0.Q8_0.gguf", "tinyllama-1.1b-chat-v1.0"),
    ("/m/model.gguf", "model"),
    ("/home/me/models/Qwen3-0.6B", "Qwen3-0.6B"),
])
def test_model_names_come_from_the_file_name_without_quantization(path: str, name: str) -> None:
    assert clean_model_name(path) == name


def test_a_cache_snapshot_folder_is_named_by_its_repo(hf_cache: Path) -> None:
    snapshot = hf_cache / "models--acme--tiny-llama" / "snapshots" / COMMIT
    assert clean_model_name(str(snapshot)) == "acme/tiny-llama"  # not the commit hash


@requires_real_model
def test_default_model_is_named_smollm2() -> None:
    from radixfair.engine.loaders import default_model_path

    assert clean_model_name(default_model_path()) == "SmolLM2-135M-Instruct"


# ---- the local Hugging Face cache ---------------------------------------------------------------------
def test_repo_id_resolves_from_the_local_cache_offline(hf_cache: Path, no_network: None) -> None:
    files = inspect_model("acme/tiny-llama", cache_dir=str(hf_cache))
    assert files.format == "hf" and files.repo_id == "acme/tiny-llama" and files.name == "acme/tiny-llama"
    assert files.path == str(hf_cache / "models--acme--tiny-llama" / "snapshots" / COMMIT)
    assert files.config.num_hidden_layers == 2

    q4 = inspect_model("acme/tiny-llama-GGUF:Q4_K_M", cache_dir=str(hf_cache))
    assert q4.format == "gguf" and q4.path.endswith("tiny-llama-Q4_K_M.gguf")
    assert q4.name == "acme/tiny-llama-GGUF"
    assert inspect_model("acme/tiny-llama-GGUF:q8_0", cache_dir=str(hf_cache)).path.endswith("-Q8_0.gguf")
    picked = inspect_model("acme/tiny-llama-GGUF", gguf_file="tiny-llama-Q8_0.gguf", cache_dir=str(hf_cache))
    assert picked.path.endswith("tiny-llama-Q8_0.gguf")


def test_cache_lookup_errors_say_what_to_do(hf_cache: Path, no_network: None) -> None:
    with pytest.raises(ModelLoadError) as e:
        inspect_model("acme/not-here", cache_dir=str(hf_cache))
    msg = str(e.value)
    assert str(hf_cache / "models--acme--not-here") in msg and "hf download acme/not-here" in msg
    assert "never downloads" in msg

    with pytest.raises(ModelLoadError, match="revision 'v9'"):
        inspect_model("acme/tiny-llama", revision="v9", cache_dir=str(hf_cache))
    # several quantizations and no choice: the error lists them (projector and split parts aside)
    with pytest.raises(ModelLoadError) as e:
        inspect_model("acme/tiny-llama-GGUF", cache_dir=str(hf_cache))
    msg = str(e.value)
    assert "tiny-llama-Q4_K_M.gguf" in msg and "tiny-llama-Q8_0.gguf" in msg and "acme/tiny-llama-GGUF:" in msg
    assert "mmproj" not in msg.split("(")[1].split(")")[0]
    with pytest.raises(ModelLoadError, match="no GGUF file for quantization 'Q5_K_M'"):
        inspect_model("acme/tiny-llama-GGUF:Q5_K_M", cache_dir=str(hf_cache))
    with pytest.raises(ModelLoadError, match="split GGUF"):
        inspect_model("acme/tiny-llama-GGUF:Q2_K", cache_dir=str(hf_cache))
    with pytest.raises(ModelLoadError, match=r"--gguf-file 'nope\.gguf' is not in"):
        inspect_model("acme/tiny-llama-GGUF", gguf_file="nope.gguf", cache_dir=str(hf_cache))
    # neither a path nor a repo id
    for spelling in ("./no/such/thing.gguf", "models/thing.gguf"):  # a path with a typo is not a repo id
        with pytest.raises(ModelLoadError, match="does not exist"):
            inspect_model(spelling, cache_dir=str(hf_cache))


# ---- flags --------------------------------------------------------------------------------------------
def test_sglang_flag_names_set_the_same_settings() -> None:
    ns = build_parser().parse_args([
        "serve", "--model-path", "org/m", "--tokenizer-path", "org/t", "--chat-template", "chatml",
        "--served-model-name", "bot", "--tp", "1", "--trust-remote-code", "--log-requests",
        "--log-requests-level", "2", "--gguf-file", "m-Q4_K_M.gguf", "--revision", "v1", "--download-dir", "/c",
        "--log-level", "DEBUG"])
    args = engine_args(ns)
    assert (args.model, args.tokenizer_path, args.chat_template, args.served_model_name) == (
        "org/m", "org/t", "chatml", "bot")
    assert (args.tp_size, args.trust_remote_code, args.gguf_file, args.revision, args.download_dir) == (
        1, True, "m-Q4_K_M.gguf", "v1", "/c")
    opts = server_args(ns)
    assert opts.log_requests and opts.log_requests_level == 2
    assert ns.log_level == "debug"
    for spelling in ("--tp-size", "--tensor-parallel-size", "--tp"):
        assert engine_args(build_parser().parse_args(["serve", spelling, "1"])).tp_size == 1
    assert engine_args(build_parser().parse_args(["generate", "hi", "--model", "x"])).model == "x"


def test_log_level_before_or_after_the_command() -> None:
    p = build_parser()
    assert p.parse_args(["serve"]).log_level == "warning"
    assert p.parse_args(["--log-level", "info", "serve"]).log_level == "info"
    assert p.parse_args(["serve", "--log-level", "error"]).log_level == "error"
    assert p.parse_args(["bench", "sim", "--log-level", "debug"]).log_level == "debug"
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--log-level", "loud"])


def test_tp_above_one_points_to_the_router(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="radixfair launch --workers N"):
        EngineArgs(tp_size=2)
    assert main(["serve", "--tp", "2"]) == 2  # refused before any model is loaded
    err = capsys.readouterr().err
    assert "--tp-size 2" in err and "router" in err
    with pytest.raises(ValueError, match="--served-model-name is empty"):
        EngineArgs(served_model_name=" ")


def test_unknown_flags_name_the_closest_known_one(capsys: pytest.CaptureFixture[str]) -> None:
    from radixfair import launch_server

    cases = [
        (lambda: main(["serve", "--model-pth", "m"]), "--model-pth: did you mean --model-path?"),
        (lambda: main(["serve", "--port", "1", "--servd-model-name=x"]),
         "--servd-model-name: did you mean --served-model-name?"),
        (lambda: main(["generate", "hi", "--temprature", "0"]), "--temprature: did you mean --temperature?"),
        (lambda: main(["bench", "engine", "--num-requets", "3"]), "--num-requets: did you mean --num-requests?"),
        (lambda: launch_server.main(["--chat-templte", "chatml"]), "--chat-templte: did you mean --chat-template?"),
        (lambda: main(["serve", "--zzzzzz"]), "--zzzzzz: no such flag"),
    ]
    for run, hint in cases:
        with pytest.raises(SystemExit) as e:
            run()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "unrecognized arguments" in err and hint in err, err
    with pytest.raises(SystemExit):
        launch_server.main(["--help"])
    assert "python -m radixfair.launch_server" in capsys.readouterr().out


# ---- chat templates and tokenizers --------------------------------------------------------------------
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "How are you?"}]


def test_named_chat_templates_render_sglangs_prompts(tiny_llama: Path) -> None:
    """The prompts SGLang's conversation templates (sglang.srt.conversation) build for the same chats."""
    def _render(name: str, messages: list[dict[str, str]]) -> str:
        tok = Tokenizer.from_hf_dir(tiny_llama)
        tok.set_chat_template(load_chat_template(name))
        return tok.apply_chat_template(messages)

    no_system = CONVERSATION[1:]
    assert _render("chatml", CONVERSATION) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n")
    assert _render("chatml", no_system).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert _render("llama-2", CONVERSATION) == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] How are you? [/INST]")
    assert _render("llama-2", no_system[:1]) == "[INST] Hi [/INST]"
    assert _render("vicuna_v1.1", no_system) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello</s>USER: How are you? "
        "ASSISTANT:")
    with pytest.raises(Exception, match="not tool"):
        _render("chatml", [{"role": "tool", "content": "x"}])


def test_chat_template_files_and_bad_names(tmp_path: Path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    assert load_chat_template(str(f)) == f.read_text()
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="not a valid jinja template"):
        load_chat_template(str(bad))
    with pytest.raises(ValueError, match="neither a built-in template") as e:
        load_chat_template("chatml-nope")
    assert all(name in str(e.value) for name in NAMED_CHAT_TEMPLATES)
    j = tmp_path / "conv.json"
    j.write_text("{}")
    with pytest.raises(ValueError, match="JSON conversation templates"):
        load_chat_template(str(j))


def test_tokenizer_path_and_chat_template(tiny_llama: Path, tmp_path: Path) -> None:
    other = tmp_path / "tok"
    other.mkdir()
    shutil.copy(tiny_llama / "tokenizer.json", other / "tokenizer.json")
    (other / "tokenizer_config.json").write_text(json.dumps({"chat_template": "OTHER {{ messages[0]['content'] }}"}))
    files = inspect_model(str(tiny_llama))
    msgs = [{"role": "user", "content": "x"}]
    assert open_tokenizer(EngineArgs(model=str(tiny_llama)), files).apply_chat_template(msgs).startswith("<|im_start|>")
    tok = open_tokenizer(EngineArgs(model=str(tiny_llama), tokenizer_path=str(other)), files)
    assert tok.apply_chat_template(msgs) == "OTHER x"
    tok = open_tokenizer(EngineArgs(model=str(tiny_llama), tokenizer_path=str(other), chat_template="llama-2"), files)
    assert tok.apply_chat_template(msgs) == "[INST] x [/INST]"
    with pytest.raises(ModelLoadError, match="--tokenizer-path"):
        open_tokenizer(EngineArgs(model=str(tiny_llama), tokenizer_path=str(tmp_path)), files)  # no tokenizer.json


# ---- the server: names, endpoints, the request log ------------------------------------------------------
@pytest.fixture(scope="module")
def cached_engine(hf_cache: Path) -> Iterator[Engine]:
    with Engine("acme/tiny-llama", download_dir=str(hf_cache), dtype="float32", max_total_tokens=2048) as e:
        yield e


@pytest.fixture(scope="module")
def logged_server(cached_engine: Engine) -> Iterator[LiveServer]:
    srv = LiveServer(create_app(cached_engine, log_requests=True, log_requests_level=0))
    yield srv
    srv.stop()


def test_models_are_listed_by_name_and_found_by_repo_id(logged_server: LiveServer, hf_cache: Path) -> None:
    oai = openai.OpenAI(base_url=logged_server.url + "/v1", api_key="x", max_retries=0, timeout=30)
    models = oai.models.list().data
    assert [m.id for m in models] == ["acme/tiny-llama"]
    raw = httpx.get(logged_server.url + "/v1/models").text
    assert str(hf_cache) not in raw and "snapshots" not in raw
    assert oai.models.retrieve("acme/tiny-llama").id == "acme/tiny-llama"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("acme/other")
    r = oai.chat.completions.create(model=models[0].id, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.usage is not None and r.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="tiny-llama", prompt="x", max_tokens=1)
    for old, new in (("/get_model_info", "/model_info"), ("/get_server_info", "/server_info")):
        a, b = httpx.get(logged_server.url + old).json(), httpx.get(logged_server.url + new).json()
        a.pop("stats", None), b.pop("stats", None)
        assert a == b
        assert a["model_path"] == "acme/tiny-llama" and a["served_model_name"] == "acme/tiny-llama"


def test_log_requests_one_line_per_request_without_the_text(logged_server: LiveServer, cached_engine: Engine,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="radixfair.requests")
    body = {"text": "a secret prompt", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
    r = httpx.post(logged_server.url + "/generate", json=body, headers={"X-Client-Id": "carol"}, timeout=30)
    assert r.status_code == 200
    meta = r.json()["meta_info"]
    deadline = time.monotonic() + 5
    while not caplog.records and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "radixfair.requests"]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "client=carol" in line and f"prompt_tokens={meta['prompt_tokens']}" in line
    assert "output_tokens=3" in line and "finish=length" in line and "latency=" in line
    assert "secret" not in line and "sampling_params" not in line


@pytest.mark.parametrize("level", [1, 2, 3])
def test_log_requests_levels_add_params_then_text(cached_engine: Engine, caplog: pytest.LogCaptureFixture,
                                                  level: int) -> None:
    caplog.set_level(logging.INFO, logger="radixfair.requests")
    srv = LiveServer(create_app(cached_engine, log_requests=True, log_requests_level=level))
    try:
        prompt = "a secret prompt " + "x" * 400
        body = {"text": prompt, "sampling_params": {"max_new_tokens": 2, "ignore_eos": True, "temperature": 0}}
        assert httpx.post(srv.url + "/generate", json=body, timeout=30).status_code == 200
        deadline = time.monotonic() + 5
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        srv.stop()
    (line,) = [rec.getMessage() for rec in caplog.records if rec.name == "radixfair.requests"]
    assert '"temperature": 0' in line and '"max_new_tokens": 2' in line
    assert ("secret" in line) is (level >= 2)
    assert (prompt in line) is (level == 3)


# ---- SGLang's launch command, with sglang replaced -------------------------------------------------------
def test_sglang_launch_command_with_radixfair(hf_cache: Path, tiny_llama: Path) -> None:
    """`python -m sglang.launch_server --model-path M --port P --served-model-name N --chat-template T`
    with `sglang` replaced: a model from the Hugging Face cache (HF_HUB_CACHE), served under N, chats
    rendered with T; the OpenAI client works with N and with the repo id."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache)}
    cmd = [sys.executable, "-m", "radixfair.launch_server", "--model-path", "acme/tiny-llama", "--port", str(port),
           "--served-model-name", "tiny-chat", "--chat-template", "llama-2", "--trust-remote-code", "--tp", "1",
           "--log-requests", "--log-level", "info", "--dtype", "float32", "--max-total-tokens", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
        deadline = time.monotonic() + 60
        while not any("serving" in x for x in lines) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert any("serving tiny-chat" in x and f":{port}" in x for x in lines), lines
        url = f"http://127.0.0.1:{port}"
        oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        assert [m.id for m in oai.models.list().data] == ["tiny-chat"]
        msgs = [{"role": "user", "content": "Hi"}]
        want_prompt = len(Tokenizer.from_hf_dir(tiny_llama).encode("[INST] Hi [/INST]"))
        for model in ("tiny-chat", "acme/tiny-llama"):
            r = oai.chat.completions.create(model=model, messages=msgs, max_tokens=2)  # type: ignore[arg-type]
            assert r.usage is not None and r.usage.prompt_tokens == want_prompt  # rendered with llama-2
        with pytest.raises(openai.NotFoundError):
            oai.chat.completions.create(model="acme/tiny", messages=msgs, max_tokens=2)  # type: ignore[arg-type]
        info = httpx.get(url + "/model_info", timeout=10).json()
        assert info["model_path"] == "acme/tiny-llama" and info["served_model_name"] == "tiny-chat"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    out = "".join(lines)
    assert out.count("--trust-remote-code has no effect") == 1
    assert out.count("radixfair.requests: finished") == 2
