"""Calibration data for compression: each capability's *training-side* text, cut into token windows.

Importance, vocabulary trimming and activation-aware factorisation look at a capability's data, so they must not look
at the held-out items its score is measured on:

- ``bundled:prose`` / ``bundled:code`` -> the bundled *train* slice (``corpus_path(name, "train")``);
- ``bundled:arithmetic`` -> items generated from `CALIBRATION_ARITHMETIC_SEED`, not the held-out seed;
- a text file -> its text; a JSONL file -> one line per item: ``prompt + answer`` (exact match), ``prompt`` + the
  correct choice (multiple choice), or its ``text`` field. Pointing a recipe's capability at the evaluation file
  makes calibration see it: that is the recipe's choice, and `calibration_text` says so in its label.
"""

import torch

from .corpora import GENERATED_ITEMS, corpus_path
from .probes.data_source import ProbeDataError, is_bundled, parse_bundled, read_jsonl, read_text

CALIBRATION_ARITHMETIC_SEED = 1234
CALIBRATION_ARITHMETIC_ITEMS = 2000


def _item_text(record, label, number):
    if isinstance(record.get("text"), str):
        return record["text"]
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        raise ProbeDataError(f"{label} line {number}: a calibration item needs 'text' or 'prompt'")
    if "answer" in record:
        return f"{prompt}{record['answer']}"
    choices, answer = record.get("choices"), record.get("answer_index", record.get("label"))
    if isinstance(choices, list) and isinstance(answer, int) and 0 <= answer < len(choices):
        return f"{prompt}{choices[answer]}"
    return prompt


def calibration_text(data, kind="text"):
    """``(text, label)``: the text compression may look at for a capability whose probe reads ``data``.

    ``kind`` is the probe's data kind: ``"text"`` or ``"jsonl"`` (an ``lm_eval_task`` cannot be calibrated on).
    """
    if is_bundled(data):
        name, _ = parse_bundled(data)
        if name in GENERATED_ITEMS:
            items = GENERATED_ITEMS[name](CALIBRATION_ARITHMETIC_ITEMS, seed=CALIBRATION_ARITHMETIC_SEED)
            return "\n".join(i["prompt"] + i["answer"] for i in items) + "\n", \
                f"bundled:{name} (seed {CALIBRATION_ARITHMETIC_SEED})"
        return read_text(f"bundled:{name}:train")[0], str(corpus_path(name, "train"))
    if kind == "text":
        return read_text(data)
    if kind != "jsonl":
        raise ProbeDataError(f"{data}: compression cannot calibrate on {kind!r} data (give a text or JSONL file)")
    records, label = read_jsonl(data)
    return "\n".join(_item_text(r, label, n) for n, r in records) + "\n", f"{label} (the probe's own items)"


def token_windows(tokenizer, text, max_tokens, window):
    """(rows, window) LongTensor: the first ``max_tokens`` tokens of ``text``, each row starting with BOS (or EOS).

    Rows are full windows; a short text gives one shorter row. Raises when the text encodes to nothing.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("calibration text encodes to no tokens")
    body = window - (start is not None)
    ids = ids[:max_tokens]
    rows = [ids[i:i + body] for i in range(0, len(ids), body)]
    if len(rows) > 1 and len(rows[-1]) < body:
        rows = rows[:-1]
    if start is not None:
        rows = [[start] + r for r in rows]
    return torch.tensor(rows, dtype=torch.long)
