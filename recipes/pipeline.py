"""`slimlm pipeline CONFIG`: make every variant a YAML file names, export each, then compare them all.

    slimlm pipeline configs/pipeline/quickstart.yaml [--out DIR] [--overwrite] [--dry-run]

The config names a `base` model and `variants`; each runs one recipe (RECIPES) on the base or, with
`from: NAME`, on an earlier variant's export (prune -> distill -> int4), as a subprocess running the
command a user would type (`slimlm quantize ...`, or with a launcher, `deepspeed --num_gpus 8
recipes/distill.py --config ...`), teed to OUT/logs/NAME.log: a crash fails that variant only. Its
export must then pass the integrity check (`toolkit.export.read`: sha256 of every tensor file). A
failed variant is recorded with its error, its descendants are marked "parent X failed" unrun, the
others go on; then `compare` measures the base and every variant made (OUT/compare/report.md lists
the failed ones too). Recipe, `from:` and argument names, models (resolved, not loaded), config
files and compare settings are all checked before any work. OUT/pipeline.json holds the config's
hash and each variant's status, error, export, seconds, command and identity (`variant_hashes`): a
re-run skips variants whose export verifies and whose definition is unchanged, and re-makes the others
and their descendants (edit one variant's args, add one: only those are made); changed compare settings
measure every model again; an OUT of another base model is refused unless --overwrite, which deletes
the pipeline's files in OUT first.

A variant `{name: N, draft: V}` (optionally `from: W`) makes nothing: compare times the base (or W's
export) with V's export as its draft model (`MODEL+draft:DRAFT`, see compare): lossless speculative
decoding, e.g. the base drafting from its own int4 variant. A variant `{name: N, ngram: true}` (optionally
`from: W`) makes nothing either: compare times the base (or W's export) with prompt-lookup drafts
(`MODEL+ngram`); `{name: N, draft: V, ngram: true}` both, lookup first and V's drafts where nothing
matches (`MODEL+draft:DRAFT+ngram`).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from slimlm.toolkit.errors import SlimlmError

OUR_FILES = ("pipeline.json", "logs", "variants", "compare")
TOP_KEYS = {"base", "out", "variants", "compare"}
VARIANT_KEYS = {"name", "recipe", "from", "config", "args", "launcher", "draft", "ngram"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass(frozen=True)
class Recipe:
    """How to call a recipe. "flags": `slimlm VERB MODEL --out DIR [--config F] --key v ...`;
    "overrides": `slimlm VERB --config F model_key=MODEL out_key=DIR key=v ...` (DistillConfig's kind)."""

    verb: str                      # `slimlm VERB`; the launcher form runs recipes/<module>.py
    module: str
    style: str = "flags"
    model_key: str = ""            # overrides style: the setting that takes the input model
    out_key: str = ""              # overrides style: the setting that takes the output folder
    base_key: str = ""             # overrides style: a setting that defaults to the pipeline's base (the teacher)
    config_class: str = ""         # overrides style: the dataclass its settings are checked against
    needs_config: bool = False
    export_subdir: str = ""        # where in its output folder the recipe writes the export


RECIPES = {
    "quantize": Recipe("quantize", "quantize"),
    "prune": Recipe("prune", "prune"),
    "distill": Recipe("distill", "distill", style="overrides", model_key="student", out_key="out_dir",
                      base_key="teacher", config_class="DistillConfig", needs_config=True, export_subdir="model"),
    "early-exit": Recipe("early-exit", "early_exit", style="overrides", model_key="model", out_key="out_dir",
                         config_class="EarlyExitConfig", needs_config=True, export_subdir="model"),
    "qat": Recipe("qat", "qat", style="overrides", model_key="model", out_key="out_dir", config_class="QATConfig",
                  needs_config=True, export_subdir="model"),
}
OWNED = {"model", "out", "overwrite", "config", "resume", "debug"}  # set by the pipeline, never by args


def add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="make several compressed variants of a model from one YAML, then compare them",
                       description="Runs each variant's recipe as its own command (a failure stops only that "
                       "variant), verifies each export, then compares the base and every variant.")
    p.add_argument("config", metavar="CONFIG", help="pipeline YAML (see configs/pipeline/)")
    p.add_argument("--out", default=None, help="output folder (default: the config's `out`)")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier pipeline's files in --out first")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the commands, marking the exports a run would reuse; run nothing")


# -- the config, checked before any work ------------------------------------------------------------

def _flag_args(args: dict) -> list[str]:
    """{group-size: 64, sym: true, skip: [a, b]} -> --group-size 64 --sym --skip a --skip b (None, false: omitted)."""
    argv = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        values = value if isinstance(value, list) else [value]
        argv += [flag] if value is True else [x for v in values if v is not None and v is not False for x in (flag, str(v))]
    return argv


def _override_args(args: dict, prefix: str = "") -> list[str]:
    argv = []
    for key, value in args.items():
        if isinstance(value, dict):
            argv += _override_args(value, f"{prefix}{key}.")
        else:
            argv.append(f"{prefix}{key}={value if isinstance(value, str) else json.dumps(value)}")
    return argv


def _parse_or_refuse(add, argv: list[str], where: str,
                     hint: str = "Keys under `args:` are the recipe's options (see `slimlm VERB --help`)."):
    """Parse `argv` with a verb's own parser; its complaint becomes a SlimlmError naming `where`."""
    parser = argparse.ArgumentParser(prog="slimlm", add_help=False)
    add(parser.add_subparsers(dest="verb"))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if "error:" in line]
        raise SlimlmError(f"{where}: {lines[-1].split('error:', 1)[1].strip() if lines else 'bad arguments'}.",
                          hint) from None


def _check_override_keys(recipe: Recipe, args: dict, where: str) -> None:
    import dataclasses
    import importlib
    import typing

    cls = getattr(importlib.import_module(f"slimlm.recipes.{recipe.module}"), recipe.config_class)
    for key in _override_args(args):
        node = cls
        for part in key.split("=", 1)[0].split("."):
            fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
            if part not in fields:
                raise SlimlmError(f"{where}: unknown setting {key.split('=', 1)[0]!r} for {recipe.verb}.",
                                  f"Valid settings: {', '.join(fields) or '(none below this key)'}.")
            node = typing.get_type_hints(node)[part]


def _check_values(recipe: Recipe, given, where: str, data: bool = True) -> None:
    """The values a variant gives its recipe (its config file's and its `args:`), checked as the recipe checks them
    before it loads a model: a typo in a later variant's settings must not wait for the earlier variants' work."""
    import importlib

    module = importlib.import_module(f"slimlm.recipes.{recipe.module}")
    try:
        if recipe.verb == "quantize":
            module.check_args(given, data)
        elif recipe.verb == "prune":
            module.check_config(given, data)
        else:
            from slimlm.recipes.config import load_config

            from slimlm.recipes.training import check_data

            config, args = given
            fixed = {recipe.model_key: "MODEL", recipe.out_key: "OUT", **({recipe.base_key: "BASE"} if recipe.base_key
                                                                           else {})}
            overrides = _override_args(fixed | args)
            try:
                settings = load_config(getattr(module, recipe.config_class), config, overrides)
                if data:
                    check_data(settings)
            except SlimlmError as err:  # the pipeline's stand-ins for the model and folders are not the user's words
                mine = " ".join(_override_args(args))
                what = err.what.replace(f" with {' '.join(overrides)}", f" with {mine}" if mine else "", 1)
                raise SlimlmError(what, err.hint) from None
    except SlimlmError as err:
        raise SlimlmError(f"{where}: {err.what}", err.hint) from None


def load_pipeline(path: str | Path, out: str | None = None, data: bool = True) -> dict:
    """Read and check a pipeline YAML; returns a plan: base, out, variants (each with its recipe), compare settings.
    `data=False` leaves the variants' data sources unchecked (a dry run on a machine without a cluster's files)."""
    from slimlm.recipes import compare
    from slimlm.recipes.cli import VERBS
    from slimlm.recipes.config import read_yaml
    from slimlm.toolkit.models import resolve

    path, here, variants = Path(path), Path(path).parent, []
    raw = read_yaml(path)
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise SlimlmError(f"{path}: unknown key(s) {', '.join(unknown)}.", f"Expected: {', '.join(sorted(TOP_KEYS))}.")
    if not raw.get("base"):
        raise SlimlmError(f"{path}: no `base` model.", "Name the model to start from, e.g. base: smollm2-135m.")
    base, out = str(raw["base"]), out or raw.get("out")
    try:
        resolve(base)
    except SlimlmError as err:
        raise SlimlmError(f"{path}: base: {err.what}", err.hint) from None
    if not out:
        raise SlimlmError(f"{path}: no output folder.", "Set `out:` in the config or pass --out DIR.")
    if not isinstance(raw.get("variants"), list) or not raw["variants"]:
        raise SlimlmError(f"{path}: `variants` must be a list of variants.",
                          "Each is a mapping such as {name: int8, recipe: quantize, args: {method: rtn, bits: 8}}.")
    for i, v in enumerate(raw["variants"]):
        where = f"{path}: variant {v.get('name', i + 1) if isinstance(v, dict) else i + 1}"
        if not isinstance(v, dict):
            raise SlimlmError(f"{where} must be a mapping, got {v!r}.")
        bad = sorted(set(v) - VARIANT_KEYS)
        if bad:
            raise SlimlmError(f"{where}: unknown key(s) {', '.join(bad)}.", f"Expected: {', '.join(sorted(VARIANT_KEYS))}.")
        name = str(v.get("name", ""))
        if not NAME.match(name) or name in {x["name"] for x in variants}:
            raise SlimlmError(f"{where}: every variant needs a unique `name` of letters, digits, '.', '_', '-'.",
                              f"Got {name!r}.")
        parent = v.get("from")
        for key, named in (("from", parent), ("draft", v.get("draft"))):
            if named is not None and named not in {x["name"] for x in variants}:
                raise SlimlmError(f"{where}: `{key}: {named}` names no variant listed above it.",
                                  f"Variants so far: {', '.join(x['name'] for x in variants) or '(none)'}; "
                                  f"a variant's `{key}` may name only one listed before it.")
        made = {x["name"]: x["recipe"] for x in variants}
        for key in ("from", "draft"):
            if made.get(v.get(key)) in ("draft", "ngram"):
                raise SlimlmError(f"{where}: `{key}: {v[key]}` names a variant that makes nothing (it times a model "
                                  "with speculative decoding).", "Name the variant it times instead.")
        if v.get("ngram") is not None and v.get("draft") is None:  # served with prompt-lookup drafts: nothing to make
            extra = sorted(set(v) & {"recipe", "config", "args", "launcher"})
            if v["ngram"] is not True or extra:
                raise SlimlmError(f"{where}: an `ngram: true` variant makes nothing, so it takes no "
                                  f"{', '.join(extra) or 'value but true'}.",
                                  "It is the base (or `from:`) timed with prompt-lookup speculative decoding.")
            _refuse_the_same_timing(variants, {"recipe": "ngram", "from": parent}, where)
            variants.append({"name": name, "recipe": "ngram", "from": parent})
            continue
        if v.get("draft") is not None:  # served with another variant as its draft model: nothing to make
            extra = sorted(set(v) & {"recipe", "config", "args", "launcher"})
            if extra:
                raise SlimlmError(f"{where}: a `draft:` variant makes nothing, so it takes no {', '.join(extra)}.",
                                  "It is the base (or `from:`) timed with the named variant as its draft model.")
            if v.get("ngram") not in (None, True):
                raise SlimlmError(f"{where}: `ngram` takes no value but true.",
                                  "With `draft:` it looks the text up first and drafts with the variant elsewhere.")
            timed = {"recipe": "draft", "from": parent, "draft": str(v["draft"]), **({"ngram": True} if v.get("ngram") else {})}
            _refuse_the_same_timing(variants, timed, where)
            variants.append({"name": name, **timed})
            continue
        recipe = RECIPES.get(v.get("recipe"))
        if recipe is None:
            what = f"unknown recipe {v['recipe']!r}" if v.get("recipe") is not None else "no `recipe:`"
            raise SlimlmError(f"{where}: {what}.", f"Expected one of: {', '.join(RECIPES)}, or `draft: VARIANT` to "
                              "time the base with that variant as its draft model, or `ngram: true`.")
        args = v.get("args") or {}
        if not isinstance(args, dict) or OWNED & {str(k).replace("-", "_") for k in args}:
            raise SlimlmError(f"{where}: `args` must be a mapping without {', '.join(sorted(OWNED))}.",
                              "The pipeline sets the input model and the output folder; a config file goes in `config:`.")
        config = None
        if v.get("config"):
            given = Path(v["config"]).expanduser()  # from here, beside the YAML, or from above its configs/ folder
            tops = [d.parent for d in [here.resolve(), *here.resolve().parents] if d.name == "configs"]
            found = [p for p in [given, here / given, *(top / given for top in tops)] if p.is_file()]
            if not found:
                raise SlimlmError(f"{where}: config file {v['config']} does not exist (here, beside {path}"
                                  + "".join(f", or under {top}" for top in tops) + ").")
            config = str(found[0].resolve())
        if recipe.needs_config and not config:
            raise SlimlmError(f"{where}: the {recipe.verb} recipe needs `config:` (a YAML of its settings).")
        launcher = v.get("launcher") or []
        launcher = shlex.split(launcher) if isinstance(launcher, str) else [str(x) for x in launcher]
        if recipe.verb in ("quantize", "prune") and made.get(parent) in ("quantize", "qat"):
            raise SlimlmError(f"{where}: `from: {parent}` is quantized; {recipe.verb} would read its dequantized "
                              "weights and write a dense model whose record of that quantization is gone.",
                              "Make it from an unquantized variant, and quantize last.")
        if recipe.style == "flags":
            argv = [recipe.verb, "MODEL", "--out", "OUT", *(["--config", config] if config else []), *_flag_args(args)]
            _check_values(recipe, _parse_or_refuse(VERBS[recipe.verb][0], argv, where), where, data)
        else:
            _check_override_keys(recipe, args, where)
            for key in (recipe.model_key, recipe.base_key):
                if key in args:
                    resolve(str(args[key]))
            _check_values(recipe, (config, args), where, data)
        variants.append({"name": name, "recipe": v["recipe"], "from": parent, "config": config, "args": args,
                         "launcher": launcher})
    options = raw.get("compare") or {}
    if isinstance(options, dict) and options.get("speculative") is False:  # YAML reads a bare `off` as false
        options = {**options, "speculative": "off"}
    compare_argv = ["compare", "BASE", "VARIANT", *_flag_args(options)]
    cargs = _parse_or_refuse(compare.add_compare, compare_argv, f"{path}: compare",
                             "Keys under `compare:` are the options of `slimlm compare` (see `slimlm compare --help`).")
    plan = {"config": str(path), "base": base, "out": str(out), "variants": variants,
            "compare": compare.settings_from_args(cargs)}
    plan["sha256"] = config_hash(plan)
    plan["variant_sha256"] = variant_hashes(plan)
    return plan


def _refuse_the_same_timing(variants: list[dict], timed: dict, where: str) -> None:
    """Two variants that time the same model the same way would be one row of the comparison, refused there only
    after every variant was made: refused here."""
    same = next((x["name"] for x in variants if {k: x.get(k) for k in ("recipe", "from", "draft", "ngram")}
                 == {k: timed.get(k) for k in ("recipe", "from", "draft", "ngram")}), None)
    if same is not None:
        raise SlimlmError(f"{where}: it times the same model the same way as variant {same}.",
                          "List each timing once.")


def variant_hashes(plan: dict) -> dict[str, str]:
    """Each variant's identity: its definition, its config file's content, the base and its parent's identity.
    A re-run remakes a variant whose identity changed (and its descendants) and reuses the others. A base in a
    local folder or file counts by its files too (`compare.identity`: sizes, times, an export's manifest), so
    a base retrained in place remakes everything made from it; a built-in alias or hub id by its name."""
    from slimlm.recipes import compare

    base_model = compare.check_models([plan["base"]])[0]
    base = compare.identity(base_model) if base_model["kind"] in ("export", "hf_dir", "gguf") else plan["base"]
    out = {}
    for v in plan["variants"]:
        file = hashlib.sha256(Path(v["config"]).read_bytes()).hexdigest() if v.get("config") else None
        blob = {"variant": v, "file": file, "base": base, "from": out.get(v["from"])}
        out[v["name"]] = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out


def config_hash(plan: dict) -> str:
    """What makes two configs the same: base, variants (with the content of their config files), compare settings."""
    files = {v["config"]: hashlib.sha256(Path(v["config"]).read_bytes()).hexdigest() for v in plan["variants"] if v.get("config")}
    blob = json.dumps({k: plan[k] for k in ("base", "variants", "compare")} | {"files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- commands and the output folder ------------------------------------------------------------------

def export_dir(out: Path, variant: dict) -> Path:
    return out / "variants" / variant["name"] / RECIPES[variant["recipe"]].export_subdir


def command(variant: dict, model: str, base: str, out: Path) -> list[str]:
    """The command line that makes `variant` from `model`: what a user would type."""
    import importlib

    r = RECIPES[variant["recipe"]]
    folder = str(out / "variants" / variant["name"])
    if r.style == "flags":
        argv = [model, "--out", folder, *(["--config", variant["config"]] if variant["config"] else []),
                *_flag_args(variant["args"])]
    else:
        given = {r.model_key: model} | ({r.base_key: base} if r.base_key else {}) | variant["args"]
        argv = ["--config", variant["config"], *_override_args(given | {r.out_key: folder})]
    if variant["launcher"]:  # e.g. deepspeed --num_gpus 8 .../recipes/distill.py ...
        script = importlib.import_module(f"slimlm.recipes.{r.module}").__file__
        return [*variant["launcher"], script, *argv]
    return [sys.executable, "-m", "slimlm.recipes.cli", r.verb, *argv]


def check_out(out: Path, plan: dict, overwrite: bool) -> dict:
    """The state of an earlier run in `out` ({} if none): of this config, or of one with the same base model whose
    variants or compare settings changed (`pipeline` remakes what changed); refuses a folder of another base."""
    state_file = out / "pipeline.json"
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"--out {out} is a file.", "Pass a folder for the pipeline's exports and report.")
    if overwrite:
        return {}
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except ValueError as err:
            raise SlimlmError(f"{state_file} is not valid JSON ({err}); a run may have been cut off while writing it.",
                              "Pass --overwrite to start again (every variant is made anew), or choose another "
                              "--out.") from None
        if state.get("sha256") != plan["sha256"] and state.get("base") != plan["base"]:
            raise SlimlmError(f"{out} holds a pipeline made from another config ({state.get('config')}) of another "
                              f"base model ({state.get('base')}); this one's is {plan['base']} ({plan['config']}).",
                              "Pass --overwrite to delete it and start again, or choose another --out.")
        return state
    if out.is_dir() and any(out.iterdir()):
        raise SlimlmError(f"--out {out} is not empty and holds no slimlm pipeline.",
                          "Choose another --out, or pass --overwrite to write beside its files.")
    return {}


def start_out(out: Path, plan: dict, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in OUR_FILES:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    (out / "logs").mkdir(exist_ok=True)


def earlier_variants(state: dict, plan: dict) -> dict:
    """Records of variants an earlier run in the same folder made that this plan does not list (another config of
    the same base, or a variant taken out): kept in pipeline.json, so listing them again reuses their exports."""
    names = {v["name"] for v in plan["variants"]}
    return {n: r for n, r in (state.get("variants") or {}).items() if n not in names}


def save_state(out: Path, plan: dict, results: dict, earlier: dict | None = None) -> None:
    from slimlm.toolkit.eval import write_json

    state = {"config": plan["config"], "sha256": plan["sha256"], "base": plan["base"],
             "variants": {**results, **(earlier or {})}}
    write_json(state, out / "pipeline.json")  # atomically: a cut-off write leaves the last whole state


# -- running one step --------------------------------------------------------------------------------


def run_step(cmd: list[str], log: Path, show=lambda line: None) -> tuple[int, list[str]]:
    """Run `cmd`, teeing its output to `log` (and its complete lines to `show`); returns (exit code, last lines)."""
    env, tail, pending = dict(os.environ, PYTHONUNBUFFERED="1"), [], ""
    with open(log, "w", encoding="utf-8", buffering=1) as f:  # line-buffered: `tail -f` follows it
        f.write(f"$ {shlex.join(cmd)}\n")
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        except OSError as err:  # a launcher that is not installed
            f.write(f"{err}\n")
            return 127, [f"cannot start {cmd[0]}: {err}"]
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            text = chunk.decode("utf-8", "replace")
            f.write(text)
            pending += text
            *lines, pending = re.split(r"[\r\n]", pending)
            for line in (ANSI.sub("", x).rstrip() for x in lines):
                if line.strip():
                    tail = (tail + [line])[-20:]
                    show(line)
        if pending.strip():
            tail.append(ANSI.sub("", pending).rstrip())
        return proc.wait(), tail


def error_of(code: int, tail: list[str], log: Path) -> str:
    """The child's own error line (and hint) if it printed one, else its last line; with the exit code and log."""
    at = next((i for i in range(len(tail) - 1, -1, -1) if re.search(r"\berror\b|Error\b", tail[i])), None)
    said = " ".join(tail[at:at + 2]) if at is not None else (tail[-1] if tail else "no output")
    return f"{said.strip()[:500]} (exit code {code}; log: {log})"


def make_variant(v: dict, plan: dict, out: Path, results: dict, show=lambda line: None) -> dict:
    """Run one variant's recipe and check its export; returns its result (status done or failed)."""
    from slimlm.toolkit.export import read

    parent = results[v["from"]] if v["from"] else None
    model = parent["export"] if parent else plan["base"]
    folder, export = out / "variants" / v["name"], export_dir(out, v)
    cmd = command(v, model, plan["base"], out)
    result = {"recipe": v["recipe"], "from": v["from"], "command": shlex.join(cmd),
              "log": str(out / "logs" / f"{v['name']}.log"), "export": str(export),
              "sha256": plan["variant_sha256"][v["name"]]}
    shutil.rmtree(folder, ignore_errors=True)  # a fresh start: never a half-made earlier attempt
    children_cpu = lambda: sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])  # noqa: E731 - user + system
    start, cpu = time.perf_counter(), children_cpu()
    code, tail = run_step(cmd, Path(result["log"]), show)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["cpu_seconds"] = round(children_cpu() - cpu, 1)  # a figure a busy machine does not inflate
    if code != 0:
        return result | {"status": "failed", "error": error_of(code, tail, Path(result["log"]))}
    try:
        read(export)  # the integrity check: manifest, and the size and sha256 of every tensor file
    except SlimlmError as err:
        return result | {"status": "failed", "error": f"export failed its integrity check: {err.what}"}
    return result | {"status": "done"}


def still_good(v: dict, old: dict, out: Path, redone: set, identity: str, same_config: bool,
               verify: bool = True) -> bool:
    """An earlier run's export of this variant may be reused: it finished, verifies, its parent is unchanged and so
    is the variant (`identity`, its `variant_hashes` entry, which also sees the base's files; a record made before
    variants had one is reused where the whole config is the same)."""
    from slimlm.toolkit.export import read

    if old.get("status") != "done" or v["from"] in redone:
        return False
    if old.get("sha256", identity if same_config else None) != identity:
        return False
    try:
        return bool(read(export_dir(out, v), verify=verify))
    except SlimlmError:
        return False


# -- the whole pipeline -------------------------------------------------------------------------------

def pipeline(plan: dict, out: Path, state: dict, command_line: str = "", progress: bool = True) -> dict:
    """Make every variant (skipping those an earlier run made), then compare; returns the report dict."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from slimlm.recipes import compare

    old, results, redone = state.get("variants", {}), {}, set()
    earlier = earlier_variants(state, plan)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("variants", total=len(plan["variants"]))
        for v in plan["variants"]:
            name = v["name"]
            parent = results.get(v["from"]) if v["from"] else None
            drafter = results.get(v.get("draft"))
            if parent is not None and parent["status"] != "done":
                results[name] = {"recipe": v["recipe"], "from": v["from"], "status": "failed",
                                 "error": f"parent {v['from']} failed", "seconds": 0.0}
            elif drafter is not None and drafter["status"] != "done":
                results[name] = {"recipe": "draft", "from": v["from"], "status": "failed",
                                 "error": f"draft {v['draft']} failed", "seconds": 0.0}
            elif v["recipe"] == "ngram":  # nothing to make: compare times the model with prompt-lookup drafts
                model = parent["export"] if parent else plan["base"]
                results[name] = {"recipe": "ngram", "from": v["from"], "status": "done", "seconds": 0.0,
                                 "export": f"{model}{compare.NGRAM_SUFFIX}"}
            elif v["recipe"] == "draft":  # nothing to make: compare times the model with its draft
                model = parent["export"] if parent else plan["base"]
                lookup = compare.NGRAM_SUFFIX if v.get("ngram") else ""
                results[name] = {"recipe": "draft", "from": v["from"], "draft": v["draft"], "status": "done",
                                 "seconds": 0.0, "export": f"{model}{compare.DRAFT_SEP}{drafter['export']}{lookup}"}
            elif still_good(v, old.get(name, {}), out, redone, plan["variant_sha256"][name],
                            state.get("sha256") == plan["sha256"]):
                results[name] = old[name] | {"skipped": True, "export": str(export_dir(out, v))}  # here, now
                bar.console.print(escape(f"{name}: done in an earlier run, export verified; skipped"), highlight=False)
            else:
                label = f"{name} ({v['recipe']}{', from ' + v['from'] if v['from'] else ''})"
                bar.update(task, description=escape(label))
                show = lambda line, label=label: bar.update(task, description=escape(f"{label}: {line[:60]}"))  # noqa: E731
                r = results[name] = make_variant(v, plan, out, results, show)
                redone.add(name)
                bar.console.print(escape(f"{name}: done in {r['seconds']:.0f} s -> {r['export']}" if r["status"] == "done"
                                         else f"{name}: FAILED: {r['error']}"), highlight=False)
            save_state(out, plan, results, earlier)
            bar.advance(task)

    done = [v["name"] for v in plan["variants"] if results[v["name"]]["status"] == "done"]
    models = compare.check_models([plan["base"], *(results[n]["export"] for n in done)])
    for m, name in zip(models[1:], done):
        m["label"] = name  # the variant's name, not its folder's (distill exports are all called "model")
    cmp_out = out / "compare"
    try:
        compare.check_out(cmp_out, plan["compare"], overwrite=False)
        remeasure = False
    except SlimlmError:  # measured with other compare settings: every model again, with these
        remeasure = True
    compare.start_out(cmp_out, plan["compare"], overwrite=remeasure)
    extra = {"pipeline": {"config": plan["config"], "sha256": plan["sha256"], "variants": results}}
    return compare.compare(models, plan["compare"], cmp_out, command=command_line, progress=progress, extra=extra)


def run_pipeline(args) -> int:
    """The `slimlm pipeline` verb: check everything, make the variants, compare, print the table."""
    from rich.console import Console

    from slimlm.recipes import compare_report

    plan = load_pipeline(args.config, args.out, data=not args.dry_run)
    out = Path(plan["out"])
    state = check_out(out, plan, args.overwrite)
    earlier = earlier_variants(state, plan)
    if earlier:
        print(f"note: {out} holds variant(s) {', '.join(sorted(earlier))} that {plan['config']} does not list (made by "
              f"{state.get('config')}): their exports stay in {out / 'variants'}, out of this report; a config "
              "that lists them again reuses them.", file=sys.stderr)
    if args.dry_run:
        try:
            load_pipeline(args.config, args.out)
        except SlimlmError as err:  # e.g. a cluster's data file, dry-run elsewhere: said, not refused
            print(f"# note: a run here would stop before any work: {err.what}")
        by_name, old, redone = {v["name"]: v for v in plan["variants"]}, state.get("variants", {}), set()
        for v in plan["variants"]:
            model = str(export_dir(out, by_name[v["from"]])) if v["from"] else plan["base"]
            if v["recipe"] == "draft":
                print(f"# {v['name']}\n# nothing to make: compare times {model} with "
                      f"{export_dir(out, by_name[v['draft']])} as its draft model"
                      + (" where prompt lookup finds no draft" if v.get("ngram") else ""))
                continue
            if v["recipe"] == "ngram":
                print(f"# {v['name']}\n# nothing to make: compare times {model} with prompt-lookup drafts")
                continue
            cmd = shlex.join(command(v, model, plan['base'], out))
            if still_good(v, old.get(v["name"], {}), out, redone, plan["variant_sha256"][v["name"]],
                          state.get("sha256") == plan["sha256"], verify=False):  # (hashing every export: minutes)
                print(f"# {v['name']}\n# made by an earlier run in {out}, its files all there: reused, not made "
                      f"again, once a run verifies their hashes (--overwrite makes it anew)\n# {cmd}")
            else:
                redone.add(v["name"])
                print(f"# {v['name']}\n{cmd}")
        return 0
    start_out(out, plan, args.overwrite)
    report = pipeline(plan, out, state, command_line=getattr(args, "command_line", ""))
    compare_report.print_report(report, Console())
    failed = [n for n, r in report["pipeline"]["variants"].items() if r["status"] != "done"]
    if failed:
        print(f"slimlm pipeline: {len(failed)} variant(s) failed: {', '.join(failed)} (see the report)", file=sys.stderr)
    if report.get("failed"):
        print(f"slimlm pipeline: compare could not measure {', '.join(f['label'] for f in report['failed'])} "
              "(see the report)", file=sys.stderr)
    return 1 if failed or report.get("failed") else 0


def main(argv: list[str] | None = None) -> int:
    """`python recipes/pipeline.py ...`: the same options as `slimlm pipeline`."""
    from slimlm.recipes.cli import run_script

    return run_script("pipeline", argv)


if __name__ == "__main__":
    sys.exit(main())
