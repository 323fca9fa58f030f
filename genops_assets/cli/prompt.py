"""`genops prompt ...`: try a prompt file on validation examples; list, alias, promote and roll
back prompt versions in the registry."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

from genops_assets.cli.home import init_home, tracking


def prompt_try(task_name: str | None, prompt_file: str, model: str, n: int, batch_size: int = 8,
               base_model: str | None = None) -> int:
    """Outputs and metrics of a prompt file on a sample of validation examples, in seconds."""
    import duckdb

    from genops_assets.lib.base_model import convert_gguf, find_embedded_gguf
    from genops_assets.lib.cache import CallCache
    from genops_assets.lib.evaluation import EvalExample, evaluate_model, examples_from_frame
    from genops_assets.lib.hashing import sha256_json
    from genops_assets.lib.prompts import PRODUCTION, load_prompt_file, prompt_registry_name
    from genops_assets.lib.tasks import load_task, read_raw_file
    from resources.warehouse import mart_schema

    root = init_home()
    mlflow, gh, task_res = tracking()
    spec = load_task(task_res.tasks_dir, task_name or task_res.name)
    production = mlflow.prompt_alias(prompt_registry_name(spec.name), PRODUCTION, spec.input_field)
    base_template = production.template if production else spec.prompt
    template = load_prompt_file(prompt_file, base_template)

    examples: list[EvalExample] = []
    source = ""
    db = root / "warehouse.duckdb"
    if db.exists():
        try:
            with duckdb.connect(str(db), read_only=True) as con:
                rows = con.execute(f"select * from {mart_schema(spec.name)}.sft_dataset "
                                   "where split = 'validation' order by example_id limit ?", [n]).df()
            examples = examples_from_frame(rows)
            source = f"validation split of {db}"
        except duckdb.Error:
            examples = []
    if not examples:  # no marts yet: the first rows of the task's raw files
        for path in spec.raw_files():
            for ex in read_raw_file(path, spec):
                examples.append(EvalExample(f"{ex.source_file}:{ex.source_row}", ex.input_text, ex.output,
                                            ex.contexts or (), ex.reference_contexts or ()))
                if len(examples) >= n:
                    break
            if len(examples) >= n:
                break
        source = "raw task files (run `make demo` to try on the validation split)"

    if base_model:
        from genops_assets.lib.base_model import resolve_local_folder

        info = resolve_local_folder(Path(base_model).expanduser().resolve())
    else:
        info = convert_gguf(find_embedded_gguf(), root / "models" / "base", log=lambda m: None)
    adapters, adapter, digest = {}, None, info.folder_digest
    if model != "base":
        from resources.tracking import registered_model_name

        name = registered_model_name(spec.name)
        ref = mlflow.alias(name, model) if not model.isdigit() else mlflow.get_version(name, model)
        if ref is None:
            print(f"{name} has no alias or version '{model}'", file=sys.stderr)
            return 2
        adapters = {"adapter": str(mlflow.fetch_registered_adapter(gh.registry_cache, name, ref.version))}
        adapter = "adapter"
        digest = sha256_json([info.folder_digest, ref.tags.get("genops.adapter_digest", ref.version)])

    @functools.cache
    def load():
        from genops_assets.serving.adapters import load_model

        return load_model(info.path, adapters)

    started = time.monotonic()
    ev = evaluate_model(load, adapter, "try", digest, spec, examples, [], CallCache(root / "cache" / "calls.sqlite"),
                        batch_size, log=lambda m: print("  " + m, flush=True), prompt=template)
    print(f"\nprompt {prompt_file} (digest {template.digest[:12]}) on {len(examples)} examples from {source}, "
          f"model {model}:\n")
    for p in ev.predictions:
        ok = "ok " if all(p["field_match"].values()) else "ERR"
        print(f"[{ok}] {p['example_id']}: {p['input'][:70]!r}\n      -> {p['prediction'][:140]!r}")
    print("\nmetrics:")
    for k, v in ev.metrics.items():
        print(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}")
    print(f"\n{ev.model_calls} model calls, {time.monotonic() - started:.1f}s")
    return 0


def prompt_admin(args) -> int:
    """list / alias / promote / rollback on the task's prompt registry."""
    from genops_assets.lib.prompts import CANDIDATE, PRODUCTION, PromptError, prompt_registry_name
    from genops_assets.lib.tasks import load_task

    init_home()
    mlflow, _, task_res = tracking()
    spec = load_task(task_res.tasks_dir, args.task or task_res.name)
    name = prompt_registry_name(spec.name)
    try:
        if args.prompt_cmd == "list":
            for ref in mlflow.prompt_versions(name, spec.input_field):
                print(f"v{ref.version:<3} {','.join(ref.aliases):22s} {ref.digest[:12]}  {ref.commit_message}")
        elif args.prompt_cmd == "alias":
            mlflow.set_prompt_alias(name, args.alias, args.version)
            print(f"{name}: {args.alias} -> v{args.version}")
        elif args.prompt_cmd == "promote":
            cand = mlflow.require_prompt_alias(name, CANDIDATE, spec.input_field)
            prev = mlflow.prompt_alias(name, PRODUCTION, spec.input_field)
            mlflow.set_prompt_alias(name, PRODUCTION, cand.version)
            if prev is not None:
                mlflow.set_prompt_alias(name, "previous_production", prev.version)
            print(f"{name}: production -> v{cand.version} (was v{prev.version if prev else 'unset'})")
        elif args.prompt_cmd == "rollback":
            prev = mlflow.require_prompt_alias(name, "previous_production", spec.input_field)
            cur = mlflow.require_prompt_alias(name, PRODUCTION, spec.input_field)
            mlflow.set_prompt_alias(name, PRODUCTION, prev.version)
            mlflow.set_prompt_alias(name, "previous_production", cur.version)
            print(f"{name}: production -> v{prev.version} (was v{cur.version})")
    except PromptError as exc:
        print(f"genops prompt: {exc}", file=sys.stderr)
        return 2
    return 0


def prompt_command(args) -> int:
    if args.prompt_cmd != "try":
        return prompt_admin(args)
    from genops_assets.lib.prompts import PromptError
    from genops_assets.lib.tasks import TaskConfigError

    try:
        return prompt_try(args.task, args.prompt, args.model, args.n, base_model=args.base_model)
    except (PromptError, TaskConfigError) as exc:
        print(f"genops prompt try: {exc}", file=sys.stderr)
        return 2
