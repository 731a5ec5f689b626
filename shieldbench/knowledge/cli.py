"""``shieldbench knowledge ...``: extract knowledge elements with a language model.

    shieldbench knowledge extract --captions data.csv --model Qwen/Qwen2.5-0.5B-Instruct --out ke.jsonl

The output is the JSONL the ``file`` knowledge source reads (one
``{"caption", "knowledge", "found", "raw", "flagged", "key"}`` per caption).
It doubles as the cache: a rerun skips every caption already in ``--out``
(matched by the SHA-256 of its text), so an interrupted extraction resumes.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from shieldbench.errors import UserError

knowledge_app = typer.Typer(help="Knowledge elements for Semantic Shield.", no_args_is_help=True)
_err = Console(stderr=True)


#: Delimiters tried on the header line, in order: the first whose split names the
#: caption column is the file's. Tab comes first because a TSV's header never
#: holds a tab inside a column name, while captions often hold commas.
_DELIMITERS = ("\t", ",", ";", "|")


def _header_fields(line: str, delimiter: str) -> list[str]:
    return [f.strip() for f in next(csv.reader([line], delimiter=delimiter), [])]


def read_captions(path: Path, column: str) -> list[str]:
    """Captions from a CSV (or TSV) column, in file order; one-line errors.

    The delimiter is not sniffed from the content: ``csv.Sniffer`` (what
    pandas' ``sep=None`` uses) reads captions as data and picks a letter or a
    space on a one-column file ("caption" split at "t"). Instead it is the
    first of tab, comma, semicolon and pipe whose split of the header line
    names ``column``. A header that is the column name alone makes a
    one-column file: each line is one caption, commas and all (a caption in
    double quotes is unquoted as CSV). In a file with several columns, a row
    with a different number of fields than the header is an error naming its
    line, never a shifted column.
    """
    if not path.is_file():
        raise UserError(f"captions file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is not in the header
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read captions file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"cannot read captions file {path}: {exc.strerror or exc}") from None
    lines = text.splitlines()
    header = lines[0] if lines else ""
    if not header.strip():
        raise UserError(f"{path} is empty or its first line (the header) is blank; it needs a {column!r} column")
    if _header_fields(header, "\x1f") == [column]:
        return _one_column(path, lines[1:])
    delimiter = next((d for d in _DELIMITERS if column in _header_fields(header, d)), None)
    if delimiter is None:
        guess = max(_DELIMITERS, key=lambda d: len(_header_fields(header, d)))
        raise UserError(f"{path} has no column {column!r}; columns: {', '.join(_header_fields(header, guess))}")
    names = _header_fields(header, delimiter)
    at = names.index(column)
    out: list[str] = []
    try:
        reader = csv.reader(io.StringIO(text), delimiter=delimiter)
        next(reader)
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) != len(names):
                raise UserError(f"{path}:{reader.line_num}: {len(row)} fields where the header has {len(names)} "
                                f"(delimiter {delimiter!r}); quote a field that contains it")
            if row[at].strip():
                out.append(row[at])
    except csv.Error as exc:
        raise UserError(f"cannot read captions file {path}: line {reader.line_num}: {exc}") from None
    return out


def _one_column(path: Path, lines: list[str]) -> list[str]:
    """A file whose header is the column alone: one caption per line."""
    out: list[str] = []
    for n, line in enumerate(lines, 2):
        if not line.strip():
            continue
        if line.lstrip().startswith('"'):
            # A CSV writer quotes a caption holding a comma or a quote: undo that.
            try:
                fields = next(csv.reader([line.strip()]))
            except csv.Error as exc:
                raise UserError(f"cannot read captions file {path}: line {n}: {exc}") from None
            if len(fields) == 1:
                line = fields[0]
        out.append(line)
    return out


def extract_file(captions_csv: Path, model: str, out: Path, k: int = 3, batch_size: int = 8, column: str = "caption",
                 min_k: Optional[int] = None, max_new_tokens: int = 48, limit: Optional[int] = None,
                 show_progress: bool = True, source=None) -> dict:
    """The ``extract`` command as a function: returns counts. ``source`` overrides the LLM (tests)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from shieldbench.knowledge.llm import LlmSource

    captions = read_captions(captions_csv, column)
    if source is None:
        source = LlmSource(k=k, min_k=min_k, cache_file=str(out), model=model, batch=batch_size,
                           max_new_tokens=max_new_tokens)
    distinct = list(dict.fromkeys(captions))
    todo = source.missing(distinct)
    cached = len(distinct) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    if todo and hasattr(source, "load"):
        source.load()  # fail fast, before the progress bar
    columns = (TextColumn("[bold]knowledge"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_err, disable=not show_progress) as progress:
        task = progress.add_task("extract", total=len(todo))
        source.run(todo, progress=lambda n: progress.update(task, advance=n))
    flagged = source.flagged(distinct)
    return {"captions": len(distinct), "new": len(todo), "cached": cached,
            "remaining": len(source.missing(distinct)), "flagged": len(flagged), "out": str(out)}


@knowledge_app.command("extract")
def extract(
    captions: Path = typer.Option(..., "--captions", help="CSV/TSV file with a caption column"),
    model: str = typer.Option(..., "--model", help="transformers causal LM: hub id or local folder"),
    out: Path = typer.Option(..., "--out", help="output JSONL (also the resumable cache)"),
    k: int = typer.Option(3, "--k", min=1, max=16, help="knowledge elements per caption"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="captions per generate() call"),
    column: str = typer.Option("caption", "--column", help="caption column name"),
    min_k: Optional[int] = typer.Option(None, "--min-k", help="flag captions with fewer phrases found (default k)"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, help="answer length cap"),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="process at most N new captions, then stop"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Ask a language model for K visual knowledge elements per caption (greedy, batched, resumable).

    Examples:

      shieldbench knowledge extract --captions data.csv --model ./vicuna-7b --out ke.jsonl

      shieldbench knowledge extract --captions coco.tsv --column text --model Qwen/Qwen2.5-0.5B-Instruct --out ke.jsonl --k 5
    """
    res = extract_file(captions, model, out, k=k, batch_size=batch_size, column=column, min_k=min_k,
                       max_new_tokens=max_new_tokens, limit=limit, show_progress=not quiet)
    msg = (f"{res['captions']} distinct captions: {res['new']} extracted now, {res['cached']} already in {out}"
           + (f", {res['remaining']} left (rerun to resume)" if res["remaining"] else ""))
    typer.echo(msg)
    if res["flagged"]:
        typer.echo(f"{res['flagged']} captions had fewer than {min_k or k} elements: flagged (\"flagged\": true) "
                   f"and padded from their own words")
