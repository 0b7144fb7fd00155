"""`make mutate`: mutation testing (mutmut 3.x) of the modules whose bugs silently change numbers.

Each module is mutated on its own, in a scratch copy of the checkout (never in place: others may be running
tests in the working tree), and each mutant runs only the fast test files mapped to it below (mutmut then
narrows those to the tests that actually call the mutated function). The score per module and the surviving
mutants (with their diff) go to `tools/mutation-results.json` and into the marked blocks of
`docs/testing.md`; rows of modules not re-run are kept with their old date.

    python tools/mutate.py                          # every module in MODULES
    python tools/mutate.py data/sections.py --max-mutants 80 --jobs 1
    python tools/mutate.py --stable                 # the modules no one is rewriting (see STABLE)
    python tools/mutate.py --list                   # the module -> tests map, and what is missing

Survivors are not failures of this tool: judge each one (a real gap -> a killing test, usually in
tests/test_mutation_guards.py; equivalent -> list it with the reason in docs/testing.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tools" / "mutation-results.json"
DOC = ROOT / "docs" / "testing.md"
PACKAGES = ("radalign", "data", "pretrain", "zeroshot", "retrieval", "finetune", "configs")
STAGE_FOLDERS = PACKAGES[1:]  # installed as radalign.<folder> (setup.cfg package_dir)
GUARDS = "tests/test_mutation_guards.py"

# Module -> the fast test files that exercise it (seconds each, no slow marker). Statistics, losses, label and
# time parsing, linkage, and the recipes' step logic: the places where a bug changes a number, not a crash.
MODULES: dict[str, list[str]] = {
    # ROC summaries, operating points and calibration are also exercised through finetune.clinical's tests
    "radalign/metrics.py": ["tests/test_metrics_shared.py", "tests/test_clinical.py"],
    "radalign/report.py": ["tests/test_report.py"],
    "zeroshot/metrics.py": ["tests/test_zeroshot.py"],
    "pretrain/loss.py": ["tests/test_loss.py", GUARDS],
    "data/labels.py": ["tests/test_prepare.py", GUARDS],
    "data/mimic.py": [GUARDS, "tests/test_sections.py", "tests/test_prepare.py"],
    "data/sections.py": ["tests/test_sections.py", GUARDS],
    "data/ehr.py": ["tests/test_ehr.py"],
    "pretrain/recipe.py": ["tests/test_pretrain.py", "tests/test_training.py"],
    "radalign/training.py": ["tests/test_training.py", "tests/test_pretrain.py"],
    "radalign/io.py": ["tests/test_io.py", GUARDS],
    "radalign/precision.py": ["tests/test_training.py"],
    "radalign/lock.py": ["tests/test_lock.py"],
    "retrieval/classify.py": ["tests/test_retrieval_classify.py"],
    # Wave 2: re-run before resolving the finetune issues (statistics of the clinical report, retrieval P@K).
    "retrieval/evaluate.py": ["tests/test_retrieval.py"],
    "finetune/clinical.py": ["tests/test_clinical.py"],
    # Wave 3 (issue 18 §4): the rest of the finetune stage. recipe.py gets the fast guards only: its end-to-end
    # tests (tests/test_finetune_recipe.py, test_finetune_eval.py) train whole runs, minutes per mutant.
    "finetune/fewshot.py": ["tests/test_fewshot.py"],
    "finetune/features.py": ["tests/test_finetune_models.py", "tests/test_finetune_guards.py"],
    "finetune/models.py": ["tests/test_finetune_models.py"],
    "finetune/baselines.py": ["tests/test_finetune_models.py", "tests/test_finetune_guards.py"],
    "finetune/explain.py": ["tests/test_explain.py"],
    "finetune/recipe.py": ["tests/test_finetune_guards.py"],
    # Wave 4 (issue 20): the few-shot head (anchored pull chosen by grouped CV, cv_table, the one-SE rule) and
    # the multi-label per-class metrics and best-model statement. Not tests/test_fewshot_recipe.py: its module
    # fixture runs the whole sweep (~20 s) again for every mutant.
    "finetune/fewshot_heads.py": ["tests/test_fewshot_heads.py", "tests/test_fewshot_nested.py",
                                  "tests/test_fewshot.py", "tests/test_fewshot_folds.py"],
    "finetune/perclass.py": ["tests/test_finetune_multilabel.py"],
    # tower_units: the export lookup and the recorded spec on fake exports; not the run-level tests (tower_run):
    # each trains a run, too slow per mutant.
    "finetune/tower.py": ["tests/test_finetune_tower.py", "tests/test_finetune_tower_units.py"],
}
# Modules nobody was rewriting when the first scores were recorded (2026-12-02).
STABLE = ("pretrain/loss.py", "data/labels.py", "data/sections.py", "data/mimic.py", "radalign/io.py")

STATUSES = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault", "skipped",
            "caught by type check", "not checked", "check was interrupted by user")
_RESULT_LINE = re.compile(r"^\s+(\S+__mutmut_\d+): (.+?)\s*$")


@dataclass
class ModuleResult:
    module: str
    date: str
    commit: str
    tests: list[str]
    generated: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    survivors: list[dict] = field(default_factory=list)  # {"name", "status", "diff"}
    note: str = ""

    @property
    def checked(self) -> int:
        return sum(v for k, v in self.counts.items() if k not in ("not checked", "skipped"))

    @property
    def score(self) -> float | None:
        """Killed (timeouts count as killed, as in mutmut) over all mutants that were run."""
        done = self.checked
        return None if done == 0 else (self.counts.get("killed", 0) + self.counts.get("timeout", 0)) / done


# ----------------------------------------------------------------------------------------------------------
# One module.


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip()


def make_copy(work: Path) -> None:
    """The checkout's tracked and untracked-not-ignored files of the packages and tests, into `work`, in the
    installed shape: a stage folder `data/` is also copied to `radalign/data/`, so `import radalign.data` finds
    the copy (mutated) on sys.path before the editable install's mapping to the checkout (not mutated)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    files = _git("ls-files", "--cached", "--others", "--exclude-standard").splitlines()
    keep = [f for f in files if f.split("/", 1)[0] in (*PACKAGES, "tests", "bench")  # tests import bench scripts
            or f in ("setup.cfg", "pyproject.toml")]
    for rel in keep:
        src = ROOT / rel
        if not src.is_file():
            continue
        for dst in {rel, installed_path(rel)}:
            (work / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / dst)


def installed_path(rel: str) -> str:
    """`data/loader.py` -> `radalign/data/loader.py`; other paths unchanged."""
    return f"radalign/{rel}" if rel.split("/", 1)[0] in STAGE_FOLDERS else rel


def mutmut_config(module: str, tests: list[str]) -> str:
    """mutmut mutates the installed-shape copy of `module` (radalign/...), which is what the tests import."""
    lines = ["", "[tool.mutmut]", 'source_paths = ["radalign"]', f"only_mutate = [{json.dumps(installed_path(module))}]",
             f"also_copy = {json.dumps([*STAGE_FOLDERS, 'bench'])}",
             f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
             'pytest_add_cli_args = ["-x", "-q"]', "use_git_change_detection = false", ""]
    return "\n".join(lines)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
    return env


def _mutmut(work: Path, args: list[str], log, timeout: float | None) -> int:
    cmd = [sys.executable, "-m", "mutmut", *args]
    proc = subprocess.Popen(cmd, cwd=work, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: mutmut forks one child per mutant
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return -1


def read_results(work: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work, env=_env(),
                         capture_output=True, text=True, check=False)
    return {m.group(1): m.group(2) for line in out.stdout.splitlines() if (m := _RESULT_LINE.match(line))}


def mutant_diff(work: Path, name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, env=_env(),
                         capture_output=True, text=True, check=False)
    lines = [x for x in out.stdout.splitlines()
             if x[:1] in "+-" and not x.startswith(("+++", "---"))]
    return "\n".join(lines)


def pick(names: list[str], k: int | None) -> list[str]:
    """Up to `k` names, evenly spread over the sorted list (so every function of the module is sampled)."""
    names = sorted(names, key=_natural)
    if k is None or k >= len(names):
        return names
    return [names[(i * len(names)) // k] for i in range(k)]


def _natural(name: str) -> tuple:
    base, _, n = name.rpartition("__mutmut_")
    return base, int(n) if n.isdigit() else 0


def run_module(module: str, *, work_root: Path, max_mutants: int | None, jobs: int, timeout: float,
               tests: list[str] | None = None) -> ModuleResult:
    tests = [t for t in (tests or MODULES[module]) if (ROOT / t).is_file()]
    res = ModuleResult(module, dt.date.today().isoformat(), _git("rev-parse", "--short", "HEAD"), tests)
    if not (ROOT / module).is_file():
        res.note = "module not present"
        return res
    if not tests:
        res.note = "none of its test files exist yet: " + ", ".join(MODULES[module])
        return res
    work = work_root / module.replace("/", "__").removesuffix(".py")
    make_copy(work)
    with open(work / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write(mutmut_config(module, tests))
    log_path = work / "mutmut.log"
    with open(log_path, "w", encoding="utf-8") as log:
        # Pass 1 generates the mutants and the test map; the impossible name stops it before any mutant runs.
        _mutmut(work, ["run", "--max-children", str(jobs), "radalign-generate-only"], log, timeout)
        names = list(read_results(work))
        res.generated = len(names)
        if not names:
            res.note = f"no mutants (mutmut mutates function bodies only; see {log_path})"
            return res
        chosen = pick(names, max_mutants)
        rc = _mutmut(work, ["run", "--max-children", str(jobs), *chosen], log, timeout)
    statuses = read_results(work)
    chosen_set = set(chosen)
    for name, status in statuses.items():
        if name in chosen_set:
            res.counts[status] = res.counts.get(status, 0) + 1
    if rc == -1:
        res.note = f"stopped after {timeout:.0f} s; unfinished mutants are 'not checked'"
    elif rc != 0:
        res.note = f"mutmut exited {rc}; see {log_path}"
    if len(chosen) < len(names):
        res.note = (res.note + "; " if res.note else "") + f"{len(chosen)} of {len(names)} mutants sampled"
    for name in sorted(chosen, key=_natural):
        if statuses.get(name) in ("survived", "no tests", "suspicious"):
            res.survivors.append({"name": name, "status": statuses[name], "diff": mutant_diff(work, name)})
    return res


# ----------------------------------------------------------------------------------------------------------
# The record: JSON, and two generated blocks in docs/testing.md.


def load_results() -> dict[str, dict]:
    return json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.is_file() else {}


def save_results(results: dict[str, dict]) -> None:
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, RESULTS)


def score_table(results: dict[str, dict]) -> str:
    head = ("| module | date | commit | killed | survived | timeout | no tests / other | run | generated "
            "| score | note |\n|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|")
    rows = []
    for module in sorted(results, key=lambda m: (list(MODULES).index(m) if m in MODULES else 99, m)):
        r = ModuleResult(**results[module])
        c = r.counts
        other = sum(v for k, v in c.items() if k not in ("killed", "survived", "timeout", "not checked", "skipped"))
        score = "–" if r.score is None else f"{100 * r.score:.0f}%"
        rows.append(f"| `{module}` | {r.date} | {r.commit} | {c.get('killed', 0)} | {c.get('survived', 0)} | "
                    f"{c.get('timeout', 0)} | {other} | {r.checked} | {r.generated} | {score} | "
                    f"{_md(r.note)} |")
    return "\n".join([head, *rows])


def survivor_list(results: dict[str, dict]) -> str:
    out = []
    for module in sorted(results):
        r = results[module]
        if not r["survivors"]:
            continue
        out.append(f"\n**`{module}`** ({r['date']}, {len(r['survivors'])} to judge)\n")
        for s in r["survivors"]:
            diff = " → ".join(_code(" ".join(x.split())) for x in s["diff"].splitlines()[:4]) or "(no diff)"
            out.append(f"- `{s['name']}` ({s['status']}): {diff}")
    return "\n".join(out).strip() + "\n" if out else "None.\n"


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell / list item: pipes, backticks, angle brackets escaped."""
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("<", "&lt;")
            .replace(">", "&gt;").replace("*", "\\*").replace("_", "\\_"))


def _code(text: str) -> str:
    """A Markdown code span that survives any content (backticks become quotes)."""
    return "`` " + text.replace("`", "'") + " ``"


def replace_block(doc: str, name: str, body: str) -> str:
    begin, end = f"<!-- mutate:{name} -->", f"<!-- /mutate:{name} -->"
    if begin not in doc or end not in doc:
        return doc.rstrip("\n") + f"\n\n{begin}\n{body.strip()}\n{end}\n"
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body.strip()}\n{end}{tail}"


def write_doc(results: dict[str, dict]) -> None:
    doc = DOC.read_text(encoding="utf-8") if DOC.is_file() else "# Testing\n"
    doc = replace_block(doc, "scores", score_table(results))
    doc = replace_block(doc, "survivors", survivor_list(results))
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, DOC)


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    p.add_argument("--stable", action="store_true", help=f"only {', '.join(STABLE)}")
    p.add_argument("--max-mutants", type=int, default=None, help="sample this many mutants per module")
    p.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (mutmut --max-children)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per module before it is stopped")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch copies (to `mutmut show` / browse)")
    p.add_argument("--tests", nargs="+", default=None,
                   help="test files to use instead of the map's (e.g. while a mapped file is broken)")
    p.add_argument("--list", action="store_true", help="print the module -> tests map and exit")
    args = p.parse_args(argv)

    if args.list:
        for module, tests in MODULES.items():
            flags = "" if (ROOT / module).is_file() else "  [module missing]"
            print(f"{module}{flags}\n    " + "\n    ".join(
                t + ("" if (ROOT / t).is_file() else "  [missing]") for t in tests))
        return 0
    modules = list(args.modules) or list(STABLE if args.stable else MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        print(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(MODULES)}", file=sys.stderr)
        return 2
    try:
        import mutmut  # noqa: F401
    except ImportError:
        print("mutmut is not installed: pip install -c constraints.txt 'mutmut>=3.8,<4'", file=sys.stderr)
        return 2
    try:
        os.nice(19)  # never compete with interactive work; children inherit it
    except OSError:
        pass
    work_root = args.work or Path(tempfile.mkdtemp(prefix="radalign-mutate-"))
    results = load_results()
    try:
        for module in modules:
            print(f"== {module}", flush=True)
            r = run_module(module, work_root=work_root, max_mutants=args.max_mutants, jobs=args.jobs,
                           timeout=args.timeout, tests=args.tests)
            results[module] = r.__dict__
            save_results(results)
            write_doc(results)
            score = "–" if r.score is None else f"{100 * r.score:.0f}%"
            print(f"   {r.counts} score {score} {r.note}", flush=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work_root, ignore_errors=True)
    print(f"scores: {DOC.relative_to(ROOT)}, raw: {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
