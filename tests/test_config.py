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
