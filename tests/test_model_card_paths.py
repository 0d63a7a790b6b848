"""The exported model card loads the exported folder and names no absolute local path; the retention plot shows the
best teacher's retention per capability with a visible 0; the "Token indices sequence length" warning is quiet."""

import logging

import pytest
from conftest import char_tokenizer, tiny_teacher
from nexus.conversion.report_render import write_retention_plot
from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.hub.card_paths import absolute_paths_in, card_with_paths, load_path_for
from nexus.hub.export import export_checkpoint

CARD = """# run-nexus

```python
model = AutoModelForCausalLM.from_pretrained("run-nexus", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained('run-nexus', trust_remote_code=True)
```

See https://huggingface.co/docs and 1/3 of the teachers, a/b.

| profile | `{root}/runs/demo/profile` |
| distill | `/elsewhere/runs/demo/distill` |
"""


def test_card_loads_the_export_path_and_keeps_no_absolute_path(tmp_path):
    text = card_with_paths(CARD.format(root=tmp_path), "out/nexus-demo", cwd=tmp_path)
    assert text.count('from_pretrained("out/nexus-demo"') == 1 and text.count("from_pretrained('out/nexus-demo'") == 1
    assert "`runs/demo/profile`" in text and "`demo/distill`" in text  # under the cwd: relative; else <run>/<stage>
    assert "https://huggingface.co/docs" in text and "1/3" in text and "a/b" in text  # URLs and ratios untouched
    assert absolute_paths_in(text) == []
    assert load_path_for(tmp_path / "out" / "x", cwd=tmp_path) == "out/x"
    assert load_path_for("out/x", repo_id="me/x") == "me/x"


@pytest.mark.parametrize("absolute", [False, True], ids=["relative_out", "absolute_out"])
def test_exported_card_uses_the_folder_the_user_named(tmp_path, monkeypatch, absolute):
    src = tmp_path / "src"
    nexus_from_teacher(tiny_teacher("llama")).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    (src / "model_card.md").write_text(CARD.format(root=tmp_path))  # as validation writes it: absolute artefacts
    monkeypatch.chdir(tmp_path)
    out = (tmp_path / "exports" / "demo") if absolute else "exports/demo"
    export_checkpoint(src, out)
    card = (tmp_path / "exports" / "demo" / "README.md").read_text()
    assert 'from_pretrained("exports/demo", trust_remote_code=True)' in card, card
    assert absolute_paths_in(card) == [] and str(tmp_path) not in card, card
    assert card == (tmp_path / "exports" / "demo" / "model_card.md").read_text()


def _report(arith_value):
    def entry(value, metric="bpb"):
        return {"value": value, "ci": [max(0.0, value - 0.02), value + 0.02], "metric": metric}

    return {
        "ci_percent": 95,
        "gate": {"threshold": 0.95},
        "best": {"prose": "big", "arithmetic": "arith"},
        "per_teacher": {
            "prose": {"big": entry(0.83), "arith": entry(11.4), "code": entry(2.0)},  # non-best: far above parity
            "arithmetic": {"arith": entry(arith_value, "exact_match"), "big": {"value": None, "ci": None,
                                                                             "metric": "exact_match"}},
        },
    }


def test_retention_plot_shows_the_best_teacher_only_and_a_visible_zero(tmp_path, monkeypatch):
    import nexus.conversion.report_render as render

    figures = []
    monkeypatch.setattr(render, "_save", lambda fig, path: figures.append(fig) or path)
    write_retention_plot(_report(0.0), tmp_path / "retention.png")
    ax = figures[0].axes[0]
    bottom, top = ax.get_ylim()
    assert bottom < 0.0 < 1.0 < top < 1.5, (bottom, top)  # not stretched to 11.4 by a non-best teacher
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    assert heights == [0.0, 0.83], heights  # one bar per capability, the best teacher's
    points = [tuple(map(float, xy)) for line in ax.lines for xy in line.get_xydata()
              if line.get_marker() == "o"]
    assert (1.0, 0.0) in points, points  # the 0 is drawn as a point above the bottom of the axis
    assert {"0.000", "0.830"} <= {t.get_text() for t in ax.texts}
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["prose (bpb)", "arithmetic (exact_match)"]
    monkeypatch.undo()
    assert write_retention_plot(_report(0.5), tmp_path / "real.png").stat().st_size > 0  # and it renders to a file


def test_long_text_warning_is_quiet():
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect()
    logging.getLogger("transformers").addHandler(handler)
    try:
        for _ in range(3):  # a tokenizer per stage: transformers would warn once per instance
            tok = char_tokenizer()
            tok.model_max_length = 8
            assert len(tok("x" * 40).input_ids) == 40
        assert not any("Token indices sequence length" in r for r in records), records
        # and the filter is what keeps it quiet
        from nexus.long_text_warning import LOGGER, LongTextWarningFilter

        logger = logging.getLogger(LOGGER)
        saved = list(logger.filters)
        for f in saved:
            logger.removeFilter(f)
        try:
            tok = char_tokenizer()
            tok.model_max_length = 8
            tok("x" * 40)
        finally:
            for f in saved:
                logger.addFilter(f)
        assert any("Token indices sequence length" in r for r in records), records
        assert any(isinstance(f, LongTextWarningFilter) for f in logger.filters)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
