"""Config loading: YAML that would silently lose settings, and one-line errors."""

from __future__ import annotations

import pytest

from schemas.config import ConfigError, load_config


def test_a_key_given_twice_is_an_error_naming_it_and_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: /m}\ncapture:\n  causal: {methods: [zero, swap]}\n"
                    "capture:\n  layers: [0, 4]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line 4: key 'capture' is given twice") as err:
        load_config(path)
    assert "\n" not in str(err.value)
    path.write_text("model: {path: /m, path: /n}\n")
    with pytest.raises(ConfigError, match="line 1: key 'path' is given twice"):
        load_config(path)
    # the same key in different mappings is fine
    path.write_text("model: {path: /m}\nslurm: {time: '01:00:00', analysis: {time: '00:30:00'}}\n")
    cfg = load_config(path, ["slurm.analysis.cpus=2"])
    assert (cfg.slurm.time, cfg.slurm.analysis.time, cfg.slurm.analysis.cpus) == ("01:00:00", "00:30:00", 2)


def test_a_top_level_that_is_no_mapping_is_one_line_even_with_overrides(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list.yaml: the top level must be a mapping$"):
        load_config(path, ["slurm.shards=2"])


def test_a_bad_key_or_value_from_set_blames_the_set_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: /m}\ndata: {limit: 3}\n")
    with pytest.raises(ConfigError, match=r"^--set: unknown key 'data.limt'$"):
        load_config(path, ["data.limt=3"])
    with pytest.raises(ConfigError, match=r"^--set: invalid value for 'data.limit'"):
        load_config(path, ["data.limit=many"])
    path.write_text("model: {path: /m}\ndata: {limt: 3}\n")  # the file's own mistake
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'data.limt'$"):
        load_config(path, ["data.limit=3"])


def test_yaml_syntax_errors_say_where(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: /m}\ncapture:\n  layers: [0, 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: expected ',' or '\]', but got "
                                          r"'<stream end>' at line 4, column 1$"):
        load_config(path)
    path.write_text("model: {path: /m}\n")
    with pytest.raises(ConfigError, match=r"^--set capture.layers: value '\[0,1' is not valid YAML "
                                          r"\(expected ',' or '\]', but got '<stream end>' at column 5\)$"):
        load_config(path, ["capture.layers=[0,1"])


def test_python_m_schemas_prints_every_run_variable():
    import subprocess
    import sys
    from pathlib import Path

    from schemas.run import VARIABLES

    out = subprocess.run([sys.executable, "-m", "schemas"], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, check=True)
    assert out.stderr == ""  # no runpy warning about a module imported by its package
    names = [line.split("`")[1] for line in out.stdout.splitlines()[2:]]
    assert names == list(VARIABLES)
