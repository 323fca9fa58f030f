"""Preference tuning (DPO) of a champion adapter on the tiny Llama: the held-out win rate moves,
the reference is the champion, the result is an adapter the endpoint loads, bad pairs fail."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from genops_assets.lib.preference import (
    DpoTrainConfig,
    PreferenceInputError,
    PreferencePair,
    answer_logprobs,
    heldout_win_rates,
    plan_preference,
    preference_accuracy,
    preference_shift,
    to_preference_pairs,
    train_dpo,
    validate_pairs,
    win_rate_change,
)
from genops_assets.lib.probes import probe_pairs
from genops_assets.lib.stats import wilson_interval
from genops_assets.lib.tasks import load_task
from genops_assets.lib.training import SftExample, tokenize_example

REPO_TASKS = Path(__file__).resolve().parents[1] / "tasks"
# Seconds on the tiny model: a learning rate a real model would never take, so the few steps show.
TINY_DPO = DpoTrainConfig(beta=0.1, learning_rate=5e-3, max_steps=6, batch_size=4, warmup_steps=0, max_length=512,
                          seed=0)


@pytest.fixture(scope="module")
def spec():
    return load_task(REPO_TASKS, "support_triage")


def task_rows(spec, n: int):
    rows = [json.loads(line) for line in (REPO_TASKS / "support_triage" / "examples.jsonl").read_text().splitlines()]
    return [(f"ex{i:03d}", r["message"], {f: r[f] for f in spec.output_fields}) for i, r in enumerate(rows[:n])]


def pair_frame(spec, n: int = 16, heldout: int = 6) -> pd.DataFrame:
    """Preference-pairs mart rows: the reference answer chosen over its truncated copy; the last
    ``heldout`` examples held out."""
    examples = task_rows(spec, n)
    probes = probe_pairs(examples, spec, kinds=("truncated",))
    held = {e[0] for e in examples[-heldout:]}
    return pd.DataFrame([{"pair_id": f"p-{p.example_id}", "item_id": p.probe_id, "example_id": p.example_id,
                          "input_text": p.input_text, "chosen_json": p.good, "rejected_json": p.bad,
                          "split": "heldout" if p.example_id in held else "train"} for p in probes])


def champion_pairs(spec, model_dir, champion_dir, n: int = 16, heldout: int = 6) -> pd.DataFrame:
    """What raters of a weak champion produce: the reference answer chosen over the champion's
    own greedy answer, which the champion of course finds likely (a low win rate before)."""
    from genops_assets.lib.formatting import build_messages
    from genops_assets.lib.probes import answer_text
    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.generation import generate

    examples = task_rows(spec, n)
    loaded = load_model(model_dir, {"champion": champion_dir}, dtype="float32")
    answers = generate(loaded, [build_messages(spec, text) for _, text, _ in examples], "champion", max_new_tokens=24)
    return pd.DataFrame([{"pair_id": f"p-{eid}", "item_id": f"i-{eid}", "example_id": eid, "input_text": text,
                          "chosen_json": answer_text(out), "rejected_json": a.text,
                          "split": "heldout" if i >= n - heldout else "train"}
                         for i, ((eid, text, out), a) in enumerate(zip(examples, answers, strict=True))])


@pytest.fixture(scope="module")
def pairs(spec, tiny_model_dir, tiny_adapter_dir):
    df = champion_pairs(spec, tiny_model_dir, tiny_adapter_dir)
    return (to_preference_pairs(spec, df[df["split"] == "train"]),
            to_preference_pairs(spec, df[df["split"] == "heldout"]))


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir, tiny_adapter_dir, pairs):
    out = tmp_path_factory.mktemp("dpo")
    progress = []
    result = train_dpo(tiny_model_dir, tiny_adapter_dir, pairs[0], TINY_DPO, out / "adapter", out / "work",
                       on_progress=progress.append)
    return result, progress


def test_wilson_interval_matches_hand_computed_values():
    iv = wilson_interval(8, 10)
    assert iv.estimate == 0.8 and iv.low == pytest.approx(0.49016, abs=1e-4) and iv.high == pytest.approx(0.94332,
                                                                                                           abs=1e-4)
    zero = wilson_interval(0, 5)
    assert zero.low == 0.0 and zero.high == pytest.approx(0.43448, abs=1e-4)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


@pytest.mark.graph  # trains or runs the tiny Llama
def test_prompt_rendered_as_sft_renders_it(spec, pairs, tiny_model_dir):
    """TRL's tokenisation of a pair (chat-template prompt, answer, end-of-turn) equals SFT's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    p = pairs[0][0]
    prompt = tok.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
    trl_ids = tok(prompt + p.chosen + tok.eos_token)["input_ids"]
    sft = tokenize_example(tok, SftExample(p.pair_id, p.messages, p.chosen), 10_000)
    assert trl_ids == sft["input_ids"]


@pytest.mark.graph  # trains or runs the tiny Llama
def test_dpo_moves_heldout_win_rate_from_the_champion(dpo_run, pairs, tiny_model_dir, tiny_adapter_dir):
    result, progress = dpo_run
    assert result.steps == TINY_DPO.max_steps and result.train_pairs == len(pairs[0])
    rates = heldout_win_rates(tiny_model_dir, {"champion": tiny_adapter_dir, "dpo": result.adapter_dir}, pairs[1])
    before, after = rates["champion"], rates["dpo"]
    assert before.n == after.n == len(pairs[1])
    assert after.interval.estimate > before.interval.estimate, (before.as_dict(), after.as_dict())
    change = win_rate_change(before, after)
    assert change.estimate == pytest.approx(after.interval.estimate - before.interval.estimate)
    # Every held-out pair moved towards its chosen answer; a model compared with itself moves none.
    shift = preference_shift(before, after)
    assert shift["moved"] > shift["n"] / 2 and shift["mean_margin_change"]["low"] > 0, shift
    assert preference_shift(before, before)["moved"] == 0
    # Progress: every step logged with its loss, reward accuracy and ETA.
    assert [int(r["step"]) for r in progress] == list(range(1, TINY_DPO.max_steps + 1))
    assert all({"loss", "reward_accuracy", "reward_margin", "eta_s"} <= set(r) for r in progress)
    assert progress[-1]["reward_accuracy"] >= progress[0]["reward_accuracy"]


@pytest.mark.graph  # trains or runs the tiny Llama
def test_reference_is_the_champion_not_the_base(dpo_run, pairs, tiny_model_dir, tiny_adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = dpo_run
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base_lp = answer_logprobs(base, tok, pairs[0], normalise=False)
    champion = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_adapter_dir).eval()
    champion_lp = answer_logprobs(champion, tok, pairs[0], normalise=False)
    assert set(result.reference_logps) == set(champion_lp)
    for pid, (c, r) in result.reference_logps.items():
        assert c == pytest.approx(champion_lp[pid][0], abs=1e-3) and r == pytest.approx(champion_lp[pid][1], abs=1e-3)
    # The champion's adapter changes the answers' likelihood, so the base would be told apart.
    assert max(abs(result.reference_logps[p][0] - base_lp[p][0]) for p in base_lp) > 0.1


@pytest.mark.graph  # trains or runs the tiny Llama
def test_tuned_adapter_has_the_champions_shape_and_loads_in_the_endpoint(dpo_run, tiny_model_dir, tiny_adapter_dir):
    from safetensors.torch import load_file

    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.generation import generate  # noqa: F401  (the endpoint's module loads)

    result, _ = dpo_run
    tuned = load_file(f"{result.adapter_dir}/adapter_model.safetensors")
    champion = load_file(f"{tiny_adapter_dir}/adapter_model.safetensors")
    assert {k: v.shape for k, v in tuned.items()} == {k: v.shape for k, v in champion.items()}
    assert any((tuned[k] != champion[k]).any() for k in tuned)  # trained, not copied
    assert json.loads(Path(result.adapter_dir, "adapter_config.json").read_text())["r"] == 4
    loaded = load_model(tiny_model_dir, {"dpo": result.adapter_dir}, dtype="float32")
    assert loaded.adapters == {"dpo": result.adapter_dir}


@pytest.mark.graph  # trains or runs the tiny Llama
def test_same_seed_same_adapter(dpo_run, pairs, tiny_model_dir, tiny_adapter_dir, tmp_path):
    from safetensors.torch import load_file

    result, _ = dpo_run
    again = train_dpo(tiny_model_dir, tiny_adapter_dir, pairs[0], TINY_DPO, tmp_path / "adapter", tmp_path / "work")
    a = load_file(f"{result.adapter_dir}/adapter_model.safetensors")
    b = load_file(f"{again.adapter_dir}/adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.graph  # trains or runs the tiny Llama
def test_preference_accuracy_counts_wins(tiny_model_dir, tiny_adapter_dir, pairs):
    """A pair and its mirror image: the model prefers exactly one of them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    p = pairs[1][0]
    mirrored = [p, PreferencePair("mirror", p.messages, p.rejected, p.chosen)]
    acc = preference_accuracy(model, tok, mirrored)
    assert acc.n == 2 and acc.wins == 1 and acc.margins["mirror"] == pytest.approx(-acc.margins[p.pair_id])
    assert acc.interval.low < 0.5 < acc.interval.high


def test_bad_pairs_fail_clearly(spec):
    df = pair_frame(spec, n=4, heldout=1)
    same = df.copy()
    same.loc[1, "rejected_json"] = same.loc[1, "chosen_json"]
    with pytest.raises(PreferenceInputError, match=f"pair {same.loc[1, 'pair_id']}: chosen and rejected are the same"):
        to_preference_pairs(spec, same)
    empty = df.copy()
    empty.loc[0, "chosen_json"] = "  "
    with pytest.raises(PreferenceInputError, match="chosen answer is empty"):
        to_preference_pairs(spec, empty)
    p = to_preference_pairs(spec, df)[0]
    with pytest.raises(PreferenceInputError, match="appears twice"):
        validate_pairs([p, p])
    with pytest.raises(PreferenceInputError, match=r"has 3 'train' pair\(s\).*at least 8"):
        plan_preference(df, "b", {"adapter_digest": "a", "version": "1"}, "p", {}, "c", min_train_pairs=8)
    with pytest.raises(PreferenceInputError, match=r"lacks column\(s\) \['split'\]"):
        plan_preference(df.drop(columns=["split"]), "b", {"adapter_digest": "a", "version": "1"}, "p", {}, "c")


def test_version_key_follows_every_input(spec):
    df = pair_frame(spec, n=8, heldout=2)
    parent = {"adapter_digest": "a", "version": "1"}
    key = plan_preference(df, "b", parent, "p", {"beta": 0.1}, "c").version_key
    assert plan_preference(df.sample(frac=1, random_state=1), "b", parent, "p", {"beta": 0.1}, "c").version_key == key
    changed = df.copy()
    changed.loc[0, "rejected_json"] = "{}"
    for other in (plan_preference(changed, "b", parent, "p", {"beta": 0.1}, "c"),
                  plan_preference(df, "b", {"adapter_digest": "a", "version": "2"}, "p", {"beta": 0.1}, "c"),
                  plan_preference(df, "b", parent, "p", {"beta": 0.2}, "c"),
                  plan_preference(df, "b", parent, "p2", {"beta": 0.1}, "c")):
        assert other.version_key != key
    capped = plan_preference(df, "b", parent, "p", {"beta": 0.1}, "c", max_pairs=3)
    assert len(capped.train) == 3 and len(capped.heldout) == 2


def test_pairs_of_a_task_with_contexts_show_their_passages():
    spec = load_task(REPO_TASKS, "product_qa")
    df = pd.DataFrame([{"pair_id": "p1", "example_id": "ex1", "input_text": "How often is the filter replaced?",
                        "chosen_json": '{"answerable": "yes", "answer": "Every 6 to 8 months."}',
                        "rejected_json": '{"answerable": "no", "answer": "Not covered."}', "split": "train"}])
    with pytest.raises(PreferenceInputError, match="pair p1: task 'product_qa' shows retrieved passages, and "
                                                   "example 'ex1' has none"):
        to_preference_pairs(spec, df)
    (pair,) = to_preference_pairs(spec, df, contexts={"ex1": ("Replace the NF-300 filter every 6 to 8 months.",)})
    text = "\n".join(m["content"] for m in pair.messages)
    assert "Replace the NF-300 filter every 6 to 8 months." in text and "How often is the filter replaced?" in text


@pytest.mark.graph  # trains or runs the tiny Llama
def test_bench_seeds_pairs_tunes_and_reports(tmp_path, spec, tiny_model_dir, tiny_adapter_dir, capsys):
    """The real-model benchmark, end to end on the tiny Llama: pairs seeded from the marts."""
    import duckdb
    from graph_support import genops_env

    from genops_assets.bench.preference import main
    from resources.warehouse import mart_schema

    home = tmp_path / "home"
    home.mkdir()
    schema = mart_schema("support_triage")
    con = duckdb.connect(str(home / "warehouse.duckdb"))
    con.execute(f"create schema {schema}")
    rows = [(eid, text, json.dumps(out), "train" if i < 6 else "golden") for i, (eid, text, out)
            in enumerate(task_rows(spec, 10))]
    con.execute(f"create table {schema}.sft_dataset (example_id varchar, input_text varchar, output_json varchar, "
                "split varchar)")
    con.executemany(f"insert into {schema}.sft_dataset values (?, ?, ?, ?)", [r for r in rows if r[3] == "train"])
    con.execute(f"create table {schema}.golden_eval_dataset as select example_id, input_text, output_json "
                f"from {schema}.sft_dataset limit 0")
    con.executemany(f"insert into {schema}.golden_eval_dataset values (?, ?, ?)",
                    [r[:3] for r in rows if r[3] == "golden"])
    con.close()
    with genops_env(home=str(home), tasks_dir=str(REPO_TASKS)):
        code = main(["--train", "6", "--heldout", "4", "--steps", "2", "--lr", "5e-3",
                     "--champion-adapter", str(tiny_adapter_dir), "--base-model", str(tiny_model_dir)])
    assert code == 0
    report = json.loads((home / "bench" / "preference.json").read_text())
    assert report["train_pairs"] == 6 and report["heldout_pairs"] == 4 and report["steps"] == 2
    assert sum(k["n"] for k in report["heldout_by_kind"].values()) == 4
    before = report["heldout_win_rate"]["before"]
    assert before["n"] == 4 and before["low"] <= before["estimate"] <= before["high"]
    assert "held-out human-preference win rate on 4 golden-prompt pairs" in capsys.readouterr().out
