"""Recipe paths never escape the run folder: `safe_run_path` accepts names inside it and refuses the rest."""

import os

import pytest

from nexus.conversion.run_paths import RunPathError, safe_run_path


@pytest.fixture
def run(tmp_path):
    root = tmp_path / "runs" / "demo"
    root.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return root


@pytest.mark.parametrize("relative", ["profile", "export/model", "a/b/c.json",
                                      "./compress/tower", "name.with.dots", "deep/ly/nested/file.safetensors"])
def test_names_inside_the_run_folder_resolve_inside_it(run, relative):
    path = safe_run_path(run, relative)
    assert path.is_absolute() and run.resolve() in path.parents
    assert path == (run / relative).resolve()


def test_a_path_that_does_not_exist_yet_is_fine_and_nothing_is_created(run):
    path = safe_run_path(run, "distill/checkpoints/step-10")
    assert not path.exists() and not (run / "distill").exists()


@pytest.mark.parametrize("relative,needle", [
    ("..", "contains '..'"),
    ("../other-run/model", "contains '..'"),
    ("export/../../escape", "contains '..'"),
    ("..\\..\\escape", "contains '..'"),
    ("/etc/passwd", "is absolute"),
    ("C:\\Windows\\x", "is absolute"),
    ("", "empty path"),
    ("   ", "empty path"),
    (".", "the run folder itself"),
    ("export/..", "contains '..'"),
    ("bad\x00name", "NUL byte"),
])
def test_escaping_paths_are_refused_naming_the_value_and_field(run, relative, needle):
    with pytest.raises(RunPathError, match=needle) as info:
        safe_run_path(run, relative, field="stages.export.out")
    message = str(info.value)
    assert message.startswith("stages.export.out: ")
    if relative.strip() and "\x00" not in relative:
        assert repr(relative) in message


def test_non_string_values_are_refused(run):
    with pytest.raises(RunPathError, match="expected a relative path, got int"):
        safe_run_path(run, 3)


def test_a_symlink_pointing_outside_is_refused(run, tmp_path):
    os.symlink(tmp_path / "outside", run / "link")
    with pytest.raises(RunPathError, match=r"'link/model' resolves to .*outside.*outside the run folder"):
        safe_run_path(run, "link/model", field="name")
    os.symlink(tmp_path / "outside" / "file.json", run / "dangling.json")  # a dangling link to outside
    with pytest.raises(RunPathError, match="outside the run folder"):
        safe_run_path(run, "dangling.json")


def test_a_symlink_pointing_inside_is_followed(run):
    (run / "real").mkdir()
    os.symlink(run / "real", run / "alias")
    assert safe_run_path(run, "alias/x.json") == (run / "real" / "x.json").resolve()


def test_a_run_root_under_a_symlink_works(run, tmp_path):
    os.symlink(run, tmp_path / "run-link")
    path = safe_run_path(tmp_path / "run-link", "profile/profile.json")
    assert path == run.resolve() / "profile" / "profile.json"
