"""Image-caption pairs listed in a CSV (open_clip_train's ``--csv-*`` convention).

One row per pair: a column of image paths (``filepath``) and one of captions
(``title``), tab separated by default, read with ``pandas.read_csv`` as
open_clip_train does. Relative image paths are relative to the CSV file's
folder (absolute ones are kept), so a corpus can be moved as one folder.
Images are lazy (:class:`~shieldbench.data.images.FileImages`): reading a
3M-row CSV costs its text, and nothing is decoded until a row is used.

The helpers here (separator unescaping and sniffing, column checks, path
resolution) are shared with the zero-shot and retrieval CSV readers in
:mod:`shieldbench.data.formats.zeroshot`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from shieldbench.data.images import FileImages
from shieldbench.data.types import PairSet
from shieldbench.errors import UserError

# Separators tried, in order, where a reader sniffs instead of being told.
SNIFF_SEPARATORS = ("\t", ",")


def unescape_sep(sep: str) -> str:
    """The separator as pandas wants it: a spec string cannot hold a raw tab, so ``\\t`` means tab."""
    return "\t" if sep == "\\t" else sep


def check_file(path: str | Path, what: str = "CSV file") -> Path:
    """``path`` as a Path, or a one-line UserError if it is not a readable file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {path}" + (" (it is a directory)" if p.is_dir() else ""))
    return p


def _pandas_kwargs(sep: str) -> dict:
    # A multi-character separator is a regex for pandas, which only the python engine reads;
    # naming the engine avoids its fallback warning.
    return {"sep": sep, "engine": "python" if len(sep) > 1 else "c"}


def read_header(path: str | Path, sep: str) -> list[str]:
    """The column names of a CSV under separator ``sep`` (one-line UserError when unreadable or empty)."""
    import pandas as pd

    try:
        return [str(c) for c in pd.read_csv(path, nrows=0, dtype=str, **_pandas_kwargs(sep)).columns]
    except pd.errors.EmptyDataError:
        raise UserError(f"CSV {path} is empty (no header row)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise UserError(f"cannot read CSV {path}: {type(exc).__name__}: {exc}") from None


def sniff_sep(path: str | Path, needed: Sequence[str], first: str | None = None) -> str:
    """The separator (``first``, then tab, then comma) under which the header has all ``needed`` columns.

    When none has them all, the one giving the most columns is returned, so
    that the missing-column error lists the file's real column names.
    """
    candidates = ([first] if first else []) + [s for s in SNIFF_SEPARATORS if s != first]
    best, best_n = candidates[0], -1
    for sep in candidates:
        cols = read_header(path, sep)
        if all(c in cols for c in needed):
            return sep
        if len(cols) > best_n:
            best, best_n = sep, len(cols)
    return best


def read_columns(path: str | Path, sep: str, columns: Mapping[str, str], nrows: int = 0) -> dict[str, list[str]]:
    """The named columns of a CSV as lists of str (empty cells are ``""``), first ``nrows`` rows if > 0.

    ``columns`` maps each needed column to the option that names it, so that a
    missing column is reported with the option to change and the columns the
    file does have.
    """
    import pandas as pd

    header = read_header(path, sep)
    for col, option in columns.items():
        if col not in header:
            hint = ""
            if len(header) == 1 and any(s in header[0] for s in SNIFF_SEPARATORS if s != sep):
                hint = f" (wrong separator? it was {sep!r})"
            raise UserError(f"CSV {path} has no column {col!r} ({option}); its columns: {', '.join(header)}{hint}")
    try:
        # dtype=str + na_filter=False: empty cells become "" (never NaN), and a caption that
        # reads "NA" or "null" stays text instead of turning into a missing value.
        df = pd.read_csv(path, usecols=list(columns), dtype=str, na_filter=False, nrows=nrows if nrows > 0 else None,
                         **_pandas_kwargs(sep))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise UserError(f"cannot read CSV {path}: {type(exc).__name__}: {exc}") from None
    if len(df) == 0:
        raise UserError(f"CSV {path} has a header but no rows")
    return {col: ["" if v is None else str(v) for v in df[col].tolist()] for col in columns}


def resolve_paths(csv_path: str | Path, paths: Sequence[str]) -> list[str]:
    """Image paths relative to the CSV's folder made absolute (absolute ones kept as they are).

    Absolute, so that the result does not depend on the working directory of
    whoever decodes the images later (a DataLoader worker, a resumed run).
    """
    base = os.path.abspath(os.path.dirname(os.fspath(csv_path)))
    join = os.path.join  # keeps p unchanged when p is absolute
    return [join(base, p) for p in paths]


def read_csv_pairs(path: str, img_key: str, caption_key: str, sep: str, image_size: int, max_rows: int) -> PairSet:
    """Image-caption pairs from a CSV with columns ``img_key`` and ``caption_key`` (first ``max_rows`` if > 0).

    ``ids`` are the image paths as written in the CSV; ``labels`` are None
    (a web corpus has no classes).
    """
    check_file(path)
    cols = read_columns(path, unescape_sep(sep),
                        {img_key: "data.csv_img_key", caption_key: "data.csv_caption_key"}, nrows=max_rows)
    raw_paths = cols[img_key]
    images = FileImages(resolve_paths(path, raw_paths), image_size)
    return PairSet(images=images, captions=cols[caption_key], labels=None, ids=list(raw_paths))


__all__ = ["check_file", "read_columns", "read_csv_pairs", "read_header", "resolve_paths", "sniff_sep",
           "unescape_sep"]
