"""teacher.serve without a server: the engines' command lines, GPU shares and settings checks.

The life cycle (start, health, answers, restart, stop, no orphan after SIGKILL) runs against the real
llama.cpp server in tests/test_llamacpp_server.py."""

from __future__ import annotations

import pytest

from compeff.config import ConfigError, load_recipe
from compeff.serving import served_teacher, server_commands


def teacher(*sets: str):
    return load_recipe(None, ["teacher.backend=openai", *sets]).teacher


def test_vllm_replicas_get_their_own_gpus_and_flags():
    t = teacher("teacher.model=Qwen/Qwen2.5-7B-Instruct", "teacher.serve.engine=vllm", "teacher.serve.replicas=2",
                "teacher.tensor_parallel_size=2", "teacher.dtype=bfloat16", "teacher.serve.max_model_len=8192",
                "teacher.serve.gpu_memory_utilization=0.85", "teacher.serve.extra_args=['--enable-prefix-caching']")  # fmt: skip
    commands = server_commands(t)
    assert [env for _, env in commands] == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    cmd = commands[0][0]
    assert cmd[:3] == ["vllm", "serve", "Qwen/Qwen2.5-7B-Instruct"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "{port}"
    assert flags["--tensor-parallel-size"] == "2" and flags["--dtype"] == "bfloat16"
    assert flags["--max-model-len"] == "8192" and flags["--gpu-memory-utilization"] == "0.85"
    assert cmd[-1] == "--enable-prefix-caching"
    listed = teacher("teacher.model=org/m", "teacher.serve.engine=vllm", "teacher.serve.replicas=2",
                     "teacher.serve.gpus=[4,6]")  # fmt: skip
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in server_commands(listed)] == ["4", "6"]
    with pytest.raises(ConfigError, match="need 4 GPUs"):
        server_commands(teacher("teacher.serve.engine=vllm", "teacher.serve.replicas=2",
                                "teacher.tensor_parallel_size=2", "teacher.serve.gpus=[0,1]"))  # fmt: skip


def test_llamacpp_command_and_the_served_teacher(tmp_path):
    gguf = tmp_path / "m.gguf"
    t = teacher("teacher.model=my-model", "teacher.serve.engine=llamacpp", f"teacher.serve.model_file={gguf}",
                "teacher.serve.n_threads=2", "teacher.serve.n_gpu_layers=-1")  # fmt: skip
    ((cmd, env),) = server_commands(t)
    assert cmd[1:3] == ["-m", "llama_cpp.server"] and env == {}
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert flags["--model"] == str(gguf) and flags["--model_alias"] == "my-model"
    assert flags["--n_threads"] == "2" and flags["--n_gpu_layers"] == "-1" and flags["--host"] == "127.0.0.1"
    served = served_teacher(t, ["http://127.0.0.1:5/v1"])
    assert served.backend == "openai" and served.response_format == "json_object" and served.concurrency == 2
    with pytest.raises(ConfigError, match="needs a GGUF file"):
        server_commands(teacher("teacher.model=org/model", "teacher.serve.engine=llamacpp"))


def test_serve_settings_are_checked():
    with pytest.raises(ConfigError):
        load_recipe(None, ["teacher.serve.engine=sglang"])
    with pytest.raises(ConfigError):
        load_recipe(None, ["teacher.serve.replicas=0"])


def test_servers_start_only_for_stages_that_call_the_teacher():
    from compeff.serving import calls_teacher

    recipe = load_recipe(None, ["teacher.serve.engine=vllm"])
    assert calls_teacher(recipe, ["cluster", "generate"]) and not calls_teacher(
        recipe, ["score", "sft", "eval", "kd"]
    )
    served_eval = load_recipe(
        None, ["teacher.serve.engine=vllm", "eval.backend=openai", "kd.soft_labels=llm"]
    )
    assert calls_teacher(served_eval, ["eval"]) and calls_teacher(served_eval, ["kd"])
