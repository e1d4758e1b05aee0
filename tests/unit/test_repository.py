"""Repository-wide rules: every relative link and every repository path cited in README, docs/ and
the code resolves; nothing of ours unpickles."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

TOP = ("codistill", "model", "data_prep", "recipes", "ds_configs", "slurm", "benchmarks", "tests", "docs", ".ci")
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(t) for t in TOP) + r")/[\w./-]*[\w/])(?![<{\w])")
LINK = re.compile(r"\]\(([^)\s]+)\)")
DOC = re.compile(r"(?<![\w/-])([\w-]+\.md)\b")


def tracked(pattern: str) -> list[Path]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", pattern], capture_output=True, text=True).stdout
    return [ROOT / p for p in out.split()] or sorted(ROOT.glob(pattern))


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in md.read_text().splitlines() if line.startswith("#")}


def exists(p: str) -> bool:
    p = p.rstrip(".,:;")
    return (ROOT / p).exists() or any((ROOT / p).parent.glob((ROOT / p).name + "*"))


def test_markdown_links_resolve():
    bad = []
    for md in [ROOT / "README.md", *tracked("docs/*.md"), ROOT / "slurm" / "README.md"]:
        for target in LINK.findall(md.read_text()):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                bad.append(f"{md.relative_to(ROOT)}: {target} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{md.relative_to(ROOT)}: {target}: no heading #{anchor}")
    assert not bad, bad


def test_repository_paths_cited_in_docs_and_code_exist():
    docs = {p.name for p in tracked("*.md")} | {p.name for p in tracked("**/*.md")}
    bad = []
    sources = [ROOT / "README.md", *tracked("docs/*.md"), *tracked("*.py"), *tracked("**/*.py"),
               *tracked("**/*.sh"), *tracked("**/*.sbatch"), *tracked("ds_configs/*.json")]
    for f in sorted(set(sources)):
        text = f.read_text()
        for m in PATH.finditer(text):
            p = m.group(1)
            if "." not in p.rstrip("/").rsplit("/", 1)[-1] and not p.endswith("/"):
                continue  # neither a file (name.ext) nor a directory (dir/): e.g. "docs/s"
            if not exists(p):
                bad.append(f"{f.relative_to(ROOT)}: cites {p}, which is not in the repository")
        for name in DOC.findall(text):
            if name not in docs:
                bad.append(f"{f.relative_to(ROOT)}: cites {name}, which is not in the repository")
    assert not bad, bad


def test_nothing_of_ours_unpickles_without_weights_only():
    """Item 7: every torch.load in our code is weights_only=True; no pickle.load at all. Resume goes
    through DeepSpeed's loader (engine.load_checkpoint) on the run's own checkpoints only."""
    bad = []
    for sub in ("codistill", "recipes", "model", "data_prep", "benchmarks"):
        for f in (ROOT / sub).rglob("*.py"):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if re.search(r"\b(pickle|cPickle|dill)\.loads?\(", line) or (
                        "torch.load(" in line and "weights_only=True" not in line):
                    bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, bad


def test_every_benchmark_and_recipe_script_imports():
    """A renamed helper must not break a script nobody runs in the suite (CI once failed collecting
    tests/e2e/test_gpu.py because benchmarks/common.py lost an import): import each, as
    `python benchmarks/<name>.py` would (its folder first on sys.path), without running main - all
    in one fresh interpreter, so torch is imported once."""
    import json
    scripts = [str(p) for p in tracked("benchmarks/*.py") + tracked("recipes/*.py")]
    code = """if True:
        import json, runpy, sys, traceback
        failed = {}
        for path in sys.argv[1:]:
            folder = path.rsplit("/", 1)[0]
            sys.path.insert(0, folder)
            try:
                runpy.run_path(path, run_name="imported")
            except BaseException as e:
                failed[path] = traceback.format_exception_only(e)[-1].strip()
            finally:
                sys.path.remove(folder)
        print(json.dumps(failed))
    """
    r = subprocess.run([sys.executable, "-c", code, *scripts], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(scripts) >= 10 and not failed, failed


def test_layers_point_one_way():
    """data_prep/ (preparation) imports nothing from codistill/ (training); both share fileio.py."""
    import ast
    offenders = []
    for p in tracked("data_prep/*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module or ""] if isinstance(n, ast.ImportFrom) else []
            offenders += [f"{p.name}:{n.lineno} {m}" for m in names if m.split(".")[0] in ("codistill", "recipes")]
    assert len(tracked("data_prep/*.py")) > 5 and not offenders, offenders
