"""Knowledge elements from a causal language model (transformers), as in the paper.

The paper prompts Vicuna to "list strictly K low-level visual knowledge
elements" of each caption and parses the noisy answers with a regex. Here:

- any ``transformers`` causal LM, by hub id or local folder (offline-friendly:
  a model that is not available locally fails with one line);
- the prompt (:data:`PROMPT`), wrapped in the tokenizer's chat template when it
  has one;
- greedy decoding, batched with left padding (the right padding of a causal LM
  would put pad tokens between the prompt and the answer);
- :func:`parse_knowledge`, a parser for numbered lists, bullets, Python/JSON
  lists, comma-separated lines, and chatty preambles/epilogues;
- captions for which fewer than ``min_k`` (default ``k``) phrases are found are
  *flagged* (``KnowledgeSource.report`` / ``"flagged": true`` in the cache)
  rather than dropped; for training every caption gets exactly ``k``: the
  first ``k`` found, padded with the caption's own lexicon phrases.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

from shieldbench.errors import UserError
from shieldbench.knowledge.base import KnowledgeRecord, KnowledgeSource, caption_key, clean_phrase
from shieldbench.registry import register_knowledge

PROMPT = (
    "List strictly {k} low-level visual knowledge elements present in an image with this caption. "
    "Avoid abstract concepts; name only things that can be seen (parts, shapes, colours, textures). "
    "Answer as a list with one short phrase per line.\n"
    "Caption: {caption}\n"
    "Answer:"
)

# -- parsing -------------------------------------------------------------------------------

_ITEM = re.compile(r"^\s*(?:(?:\(?\d{1,2}[.):\]]|\(?[a-zA-Z][.)]|[-*\u2022\u2023\u25e6\u2013\u2014+>])\s+)(.+)$")
_QUOTED = re.compile(r"""(?:"([^"\n]{1,80})"|'([^'\n]{1,80})')""")
_PREAMBLE = re.compile(
    r"^(?:sure|okay|ok|certainly|of course|here (?:is|are)|the following|these are|below|answer|"
    r"knowledge elements?|visual (?:knowledge )?elements?|list)\b", re.IGNORECASE)
_LABEL = re.compile(r"^(?:knowledge element|element|ke|item)\s*\d*\s*[:\-]\s*", re.IGNORECASE)
_EPILOGUE = re.compile(r"^(?:note|these|i hope|let me know|please|this list|all of)\b", re.IGNORECASE)
_MAX_WORDS = 8


def _clean_item(text: str) -> str:
    text = re.sub(r"\*\*|__|`", "", text)
    text = _LABEL.sub("", text.strip())
    # "shaggy hair - the dog's fur looks messy": keep the head phrase.
    text = re.split(r"\s+[-\u2013\u2014]\s+|:\s+|\s*\(", text, maxsplit=1)[0]
    text = clean_phrase(text)
    return text


def _good(item: str) -> bool:
    return bool(item) and len(item.split()) <= _MAX_WORDS and any(ch.isalpha() for ch in item)


def _python_list(text: str) -> list[str] | None:
    m = re.search(r"\[[^\[\]]*\]", text, re.DOTALL)
    if not m:
        return None
    for loader in (json.loads, ast.literal_eval):
        try:
            value = loader(m.group(0))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    inner = m.group(0)[1:-1]
    quoted = [a or b for a, b in _QUOTED.findall(inner)]
    return quoted or None


def parse_knowledge(answer: str, max_items: int | None = None) -> list[str]:
    """Phrases from a noisy LLM answer, in order, cleaned and de-duplicated.

    Tries, in order: explicit list items (``1.``, ``2)``, ``-``, ``*``, ``•``,
    ``a)``) on separate or the same line; a Python/JSON list; otherwise the
    non-preamble lines, each split at commas/semicolons. Preamble lines
    ("Sure! Here are 3 ...:"), epilogues ("Note: ...") and over-long sentences
    are dropped.
    """
    text = answer.replace("\r", "\n")
    # Inline numbering "1. a 2. b 3. c" -> one item per line.
    text = re.sub(r"(?<=\S)\s+(?=\d{1,2}[.)]\s+\S)", "\n", text)
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    items: list[str] = []

    listed = [m.group(1) for m in (_ITEM.match(ln) for ln in lines) if m]
    if listed:
        items = listed
    else:
        py = _python_list(text)
        if py is not None:
            items = py
        else:
            for ln in lines:
                if _EPILOGUE.match(ln):
                    break
                if _PREAMBLE.match(ln) or ln.endswith(":"):
                    # "Answer: a, b, c" carries the list after the colon.
                    head, sep, tail = ln.partition(":")
                    if sep and tail.strip():
                        ln = tail
                    else:
                        continue
                pieces = [p for p in re.split(r"[,;]", ln) if p.strip()]
                if len(pieces) >= 2:
                    # "a, b and c": the last comma piece may hold two items.
                    pieces = pieces[:-1] + [p for p in re.split(r"\s+and\s+", pieces[-1]) if p.strip()]
                items += pieces

    out: list[str] = []
    for raw in items:
        item = _clean_item(raw)
        if _good(item) and item not in out:
            out.append(item)
        if max_items is not None and len(out) == max_items:
            break
    return out


# -- the model -----------------------------------------------------------------------------


def load_causal_lm(model: str, device: Any = None, dtype: str = "auto"):
    """(model, tokenizer) from a hub id or local folder; a one-line UserError if not loadable."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0")
    local_only = offline or os.path.isdir(model)
    try:
        tok = AutoTokenizer.from_pretrained(model, local_files_only=local_only)
        torch_dtype = None
        if dtype != "auto":
            torch_dtype = getattr(torch, dtype)
        elif device is not None and str(device).startswith("cuda"):
            torch_dtype = torch.bfloat16
        lm = AutoModelForCausalLM.from_pretrained(model, local_files_only=local_only, dtype=torch_dtype)
    except Exception as exc:  # OSError, ValueError, EnvironmentError, hub errors...
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (offline: download it first or pass a local folder)" if offline else ""
        raise UserError(f"cannot load language model {model!r}{hint}: {why}") from None
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
            lm.resize_token_embeddings(len(tok))
    tok.padding_side = "left"
    lm.eval()
    if device is not None:
        lm.to(device)
    return lm, tok


@register_knowledge("llm")
@dataclass
class LlmSource(KnowledgeSource):
    """A transformers causal LM asked for K visual elements per caption (greedy, batched)."""

    name = "llm"
    model: str = ""
    batch: int = 8
    max_new_tokens: int = 48
    prompt: str = PROMPT
    device: str = ""
    use_chat_template: bool = True
    _lm: Any = field(default=None, init=False, repr=False)
    _tok: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise UserError("the llm knowledge source needs a model (hub id or local folder)")
        if "{caption}" not in self.prompt:
            raise UserError("the knowledge prompt must contain {caption}")
        super().__post_init__()

    def cache_id(self) -> str:
        tag = caption_key(json.dumps([self.model, self.prompt, self.max_new_tokens, self.use_chat_template]))[:12]
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model.strip("/").split("/")[-1])[:40]
        return f"llm-{safe}-{tag}-k{self.k}-min{self.min_k}"

    def batch_size(self) -> int:
        return self.batch

    def load(self) -> None:
        if self._lm is None:
            import torch

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._lm, self._tok = load_causal_lm(self.model, device)

    def prompts(self, captions: list[str]) -> list[str]:
        texts = [self.prompt.format(k=self.k, caption=c.strip()) for c in captions]
        tok = self._tok
        if self.use_chat_template and tok is not None and getattr(tok, "chat_template", None):
            out = []
            for t in texts:
                # The chat template adds its own answer cue.
                msg = [{"role": "user", "content": t.rsplit("\nAnswer:", 1)[0]}]
                out.append(tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True))
            return out
        return texts

    def generate(self, captions: list[str]) -> list[str]:
        """Raw greedy answers, one per caption (left-padded batch)."""
        import torch

        self.load()
        tok, lm = self._tok, self._lm
        enc = tok(self.prompts(captions), return_tensors="pt", padding=True, add_special_tokens=True)
        enc = {k: v.to(lm.device) for k, v in enc.items()}
        with torch.inference_mode():
            out = lm.generate(
                **enc, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
        new = out[:, enc["input_ids"].shape[1]:]
        return tok.batch_decode(new, skip_special_tokens=True)

    def _extract_batch(self, captions: list[str]) -> list[KnowledgeRecord]:
        answers = self.generate(captions)
        return [self.record(c, parse_knowledge(a), a) for c, a in zip(captions, answers)]
