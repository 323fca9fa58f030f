"""Model names, routing and the prompt a bare chat request gets, without a model: the pure
parts of one endpoint serving every task."""

from __future__ import annotations

import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from genops_assets.lib.prompts import PromptError, PromptTemplate
from genops_assets.serving.protocol import ModelName, ModelNameError, judge_name, served_name
from genops_assets.serving.routing import DeployedPrompts, ModelNotFound, Router, bare_chat, prompt_file
from genops_assets.serving.settings import ServerSettings


@pytest.mark.parametrize("name, task, slot, canonical", [
    ("base", None, "base", "base"),
    ("support_triage", "support_triage", "champion", "support_triage"),
    ("support_triage:champion", "support_triage", "champion", "support_triage"),
    ("support_triage:challenger", "support_triage", "challenger", "support_triage:challenger"),
    ("expenses:v3", "expenses", "v3", "expenses:v3"),
    ("support_triage:judge", "support_triage", "judge", "support_triage:judge"),
    ("support_triage:judge-v2", "support_triage", "judge-v2", "support_triage:judge-v2"),
])
def test_model_names(name, task, slot, canonical):
    model = ModelName.parse(name)
    assert (model.task, model.slot, model.served) == (task, slot, canonical)
    assert model.version_number == ("3" if slot == "v3" else None)


@pytest.mark.parametrize("name, says", [
    ("", "is not a model name"), ("a b", "is not a model name"), ("x:v0", "not a version of task 'x'"),
    ("x:latest", "not a version of task 'x'"), ("base:v1", "names the base model"), (":v1", "is not a model name"),
    ("x:judge-v0", "not a version of task 'x'"), ("x:judge-2", "not a version of task 'x'"),
    ("x:judges", "not a version of task 'x'"),
])
def test_bad_model_names_say_why(name, says):
    with pytest.raises(ModelNameError, match=says):
        ModelName.parse(name)


def test_judge_names():
    assert judge_name("qa") == "qa:judge" and judge_name("qa", 3) == "qa:judge-v3"
    # A judge version is no task version: nothing fetches it from the task's model registry.
    assert ModelName.parse("qa:judge-v3").version_number is None
    with pytest.raises(ModelNameError):
        judge_name("base")


def test_a_task_judge_is_routed_as_itself_without_a_canary(tmp_path):
    r = router(tmp_path, {"a": "/x", "a:challenger": "/y", "a:judge": "/j", "a:judge-v2": "/j2"},
               canary_share=1.0)
    assert r.resolve("a:judge").served.served == "a:judge" and r.resolve("a:judge").adapter == "a:judge"
    assert r.resolve("a:judge-v2").adapter == "a:judge-v2"
    assert r.resolve("a").served.served == "a:challenger"  # the canary share is the champion's alone
    assert "a:judge" in r.names()
    with pytest.raises(ModelNotFound, match="task 'a' has no judge-v3 loaded"):
        r.resolve("a:judge-v3")
    r2 = router(tmp_path, {"a": "/x"})
    with pytest.raises(ModelNotFound, match="task 'a' has no judge loaded"):
        r2.resolve("a:judge")


def test_served_name_of_a_role():
    assert served_name("qa", "champion") == "qa" and served_name("qa", "challenger") == "qa:challenger"
    with pytest.raises(ModelNameError):
        served_name("base", "champion")


TEMPLATE = PromptTemplate("Triage the message into JSON.", "Message: {message}", "message", max_new_tokens=5)


def test_bare_chat_gets_the_deployed_prompt_around_its_last_user_message():
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi, what happened?"},
                {"role": "user", "content": "my camera is offline"}]
    applied, variables = bare_chat(TEMPLATE, messages)
    assert variables == {"message": "my camera is offline"}
    assert applied == [{"role": "system", "content": "Triage the message into JSON."}, *messages[:2],
                       {"role": "user", "content": "Message: my camera is offline"}]
    # One user message: exactly what prompt_variables render.
    assert bare_chat(TEMPLATE, messages[2:])[0] == TEMPLATE.render({"message": "my camera is offline"})
    # A request with a system message of its own keeps its messages.
    assert bare_chat(TEMPLATE, [{"role": "system", "content": "Be brief."}, *messages]) is None
    with pytest.raises(ValueError, match="needs a user message"):
        bare_chat(TEMPLATE, [{"role": "assistant", "content": "hi"}])
    rag = PromptTemplate("Use the passages.\n{contexts}", "Q: {question}", "question")
    with pytest.raises(PromptError, match="contexts"):
        bare_chat(rag, messages)


def router(tmp_path, adapters: dict[str, str], rng=lambda: 0.0, **settings) -> Router:
    loaded = SimpleNamespace(adapters=adapters)
    versions = dict.fromkeys(adapters, "1")
    return Router(loaded, versions, ServerSettings(**settings), DeployedPrompts(tmp_path), rng=rng)


def test_routes_per_task_with_a_canary_share_of_its_own(tmp_path):
    r = router(tmp_path, {"a": "/x", "a:challenger": "/y", "b": "/z", "b:challenger": "/w"},
               canary_share=0.0, canary_shares={"a": 0.5})
    assert r.names() == ["base", "a", "a:challenger", "b", "b:challenger"]
    # rng 0.0 < 0.5: a's champion requests go to its challenger; b has no share.
    assert r.resolve("a").served.served == "a:challenger" and r.resolve("a").task == "a"
    assert r.resolve("a:champion").served.served == "a:challenger"
    assert r.resolve("b").served.served == "b" and r.resolve("a:challenger").served.served == "a:challenger"
    assert r.resolve("base").adapter is None
    r.rng = lambda: 0.9
    assert r.resolve("a").served.served == "a"
    with pytest.raises(ModelNotFound, match=r"no task 'c' is served here \(served: \['base', 'a'"):
        r.resolve("c")
    with pytest.raises(ModelNotFound, match="task 'b' has no v2 loaded"):
        r.resolve("b:v2")


def test_a_removed_task_folder_is_no_longer_served(tmp_path):
    tasks = tmp_path / "tasks"
    (tasks / "a").mkdir(parents=True)
    r = router(tmp_path, {"a": "/x", "b": "/y"}, tasks_dir=tasks)
    assert r.names() == ["base", "a"] and r.tasks() == ["a", "b"]
    with pytest.raises(ModelNotFound, match=f"the folder of task 'b' was removed from {tasks}"):
        r.resolve("b")
    assert r.resolve("a").served.served == "a"
    with pytest.raises(ModelNotFound, match="no task 'c' is served"):  # never deployed, not "removed"
        r.resolve("c")
    # A folder whose task.yaml names the task defines it too.
    (tasks / "b-folder").mkdir()
    (tasks / "b-folder" / "task.yaml").write_text("name: b\ninput_field: message\n")
    r._present.clear()
    assert r.names() == ["base", "a", "b"]


def test_each_task_has_its_deployed_prompt(tmp_path):
    prompts = DeployedPrompts(tmp_path)
    assert prompts.current("a") is None and prompts.tasks() == []
    for task, version in (("a", 3), ("b", 1)):
        path = prompt_file(tmp_path, task)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": version, "template": asdict(TEMPLATE)}))
    assert prompts.current("a") == ("3", TEMPLATE) and prompts.current("b")[0] == "1"
    assert prompts.tasks() == ["a", "b"]
    prompt_file(tmp_path, "b").write_text("{not json")
    prompts._cache.clear()
    with pytest.raises(ValueError, match=r"b\.json: not a deployed prompt"):
        prompts.current("b")
    assert prompts.current("a")[0] == "3"  # one task's broken file leaves the others alone


def test_canary_shares_setting(monkeypatch):
    s = ServerSettings.from_env({"GENOPS_CANARY_SHARE": "0.1", "GENOPS_CANARY_SHARES": "a=0.5, b=0"})
    assert (s.canary("a"), s.canary("b"), s.canary("c")) == (0.5, 0.0, 0.1)
    with pytest.raises(ValueError, match="GENOPS_CANARY_SHARES"):
        ServerSettings.from_env({"GENOPS_CANARY_SHARES": "a=2"})
    with pytest.raises(ValueError, match="expected task=share"):
        ServerSettings.from_env({"GENOPS_CANARY_SHARES": "a"})
