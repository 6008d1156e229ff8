"""The scale-out seams without their optional engines: the executor choice, the measured-task contract, the
replica set's config, and the request bodies vLLM's router sends (captured from vllm-router 0.1.17)."""

from __future__ import annotations

import pytest

from apexlib.cluster.executor import ProcessExecutor, RayExecutor, choose_executor
from apexlib.cluster.measured import MeasuredTask, TaskFailure, accelerator_resource
from apexlib.serve.protocol import ApiError, parse_chat, parse_completion
from apexlib.serve.replicas import ReplicaSetConfig, replica_command

# what vllm-router forwards for {"model", "prompt", "max_tokens", "temperature"} and for a streamed chat
ROUTER_COMPLETION = {"model": "tiny", "prompt": "hello there", "max_tokens": 8, "temperature": 0.0, "stream": False,
                     "echo": False, "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True,
                     "return_hidden_states": False}
ROUTER_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4,
               "logprobs": False, "no_stop_trim": False, "ignore_eos": False, "continue_final_message": False,
               "skip_special_tokens": True, "separate_reasoning": True, "stream_reasoning": True,
               "return_hidden_states": False, "include_reasoning": True}


def test_the_routers_request_bodies_are_accepted():
    assert parse_completion(dict(ROUTER_COMPLETION)).sampling.max_tokens == 8
    assert parse_chat(dict(ROUTER_CHAT)).stream


@pytest.mark.parametrize("field, value", [("no_stop_trim", True), ("return_hidden_states", True),
                                          ("include_reasoning", False)])
def test_a_non_neutral_router_extra_is_refused_by_name(field, value):
    with pytest.raises(ApiError) as error:
        parse_completion({**ROUTER_COMPLETION, field: value})
    assert error.value.status == 400 and error.value.param == field and field in error.value.message


def test_executor_choice(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("APEX_EXECUTOR", raising=False)
    assert isinstance(choose_executor(), ProcessExecutor)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert isinstance(choose_executor(), RayExecutor)  # built without connecting
    monkeypatch.setenv("APEX_EXECUTOR", "process")
    assert isinstance(choose_executor(), ProcessExecutor)
    with pytest.raises(ValueError, match="executor must be one of process, ray, got 'dask'"):
        choose_executor("dask")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        choose_executor("process", workers=0)


def test_process_executor_keeps_the_order():
    assert list(ProcessExecutor(2).map(abs, [-3, 2, -1, 0])) == [3, 2, 1, 0]
    assert list(ProcessExecutor(1).map(abs, [-5])) == [5]


def test_measured_task_asks_for_its_kind():
    task = MeasuredTask("profile", "T4", abs, (-1,))
    assert accelerator_resource("T4") == "accelerator_type:T4"
    assert task.ray_options() == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": {"accelerator_type:T4": 0.001},
                                  "max_retries": 0}
    assert MeasuredTask("sim", "cpu", abs).ray_options()["resources"] == {}
    with pytest.raises(ValueError, match="kind must name"):
        MeasuredTask("x", "", abs)
    failure = TaskFailure("profile", "T4", "node-3", "RuntimeError: CUDA error", 2)
    assert str(failure) == "profile [T4] failed on node-3 after 2 attempt(s): RuntimeError: CUDA error"


def test_replica_set_config():
    config = ReplicaSetConfig(replicas=2, port=9000, serve_args=("--model", "tiny-demo"))
    assert replica_command(config, 9001)[-6:] == ["--host", "127.0.0.1", "--port", "9001", "--model", "tiny-demo"]
    with pytest.raises(ValueError, match="replicas must be >= 1, got 0"):
        ReplicaSetConfig(replicas=0)
    with pytest.raises(ValueError, match="must not set --port"):
        ReplicaSetConfig(serve_args=("--port", "1"))
    with pytest.raises(ValueError, match="policy must be one of"):
        ReplicaSetConfig(policy="fastest")
